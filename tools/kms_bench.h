/*
 * kms-bench internals shared by its modes (tools/kms-bench.c: main, options,
 * core mode; tools/kms_bench_http.c: http mode).
 */
#ifndef KMS_BENCH_H
#define KMS_BENCH_H

#include "kms.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_BENCH_MAX_CONNS_LIST 16

typedef struct {
    /* HSM and store (core; http's optional raw baseline) */
    const char *module;
    const char *token_uri;
    const char *pin_file;
    const char *store;
    bool throwaway;
    /* http */
    const char *url;
    const char *cert;
    const char *key;
    const char *cacert;
    const char *admin_cert;
    const char *admin_key;
    unsigned conns[KMS_BENCH_MAX_CONNS_LIST];
    size_t n_conns;
    long server_pid;
    double rate;               /* total requests/s offered per single-item run; 0 = closed loop */
    const char *ops;           /* http: comma-separated operations to run; NULL = all */
    unsigned client_threads;   /* http: threads driving the connections; 0 = one per 16 */
    unsigned rounds;           /* http: measurements per cell, taking turns; 0 = 1 */
    unsigned background_batch; /* http: connections sending batch rewraps beside each cell */
    /* both */
    double seconds;
    size_t size;
    bool json;
} kms_bench_opts;

/* Exit statuses: 0 ok, 64 usage, else the error table's exit code. */
#define KMS_BENCH_EXIT_USAGE 64
/* --rounds at most. */
#define KMS_BENCH_ROUNDS_MAX 50

int kms_bench_core(const kms_bench_opts *o);
int kms_bench_http(const kms_bench_opts *o);
/* Wrap throughput with the durable audit trail on vs off (tools/kms_bench_audit.c). */
int kms_bench_audit(const kms_bench_opts *o);
/* The hidden worker of core mode's 2-process runs (argv after "core-worker"). */
int kms_bench_core_worker(int argc, char **argv);

/* Helpers shared by the modes. */
double kms_bench_now(void);
void kms_bench_fail(const char *what, kms_result r);
/* Raw PKCS#11 baseline (1 and 2 threads) on an open HSM. */
typedef struct {
    double enc[2]; /* ops/s on 1, 2 threads */
    double dec[2];
} kms_bench_raw;
kms_result kms_bench_raw_measure(kms_hsm *hsm, size_t size, double seconds, kms_bench_raw *out);

#endif /* KMS_BENCH_H */
