/*
 * kms-bench audit: wrap throughput with the durable audit trail on versus
 * off, in one run (issue 4 section 8; figures in docs/performance.md).
 *
 * Each worker thread does what a kmsd request thread does for a wrap: the
 * audit readiness check, kms_wrap, then kms_audit_append, which returns
 * only once the record is durable (group commit: one committer thread
 * writes everything queued to the audit journal and syncs it). "off" is
 * the same loop with the audit trail not started (kmsd's `audit = off`,
 * for benchmarks only). Off and on alternate in half-second slices, as in
 * core mode, so that a drift of the machine (or of SoftHSM's lock
 * contention, which swings the 16-thread figure by half) falls on both.
 * The ratio on/off is printed against the 0.8 target.
 */
#define _GNU_SOURCE
#include "kms_audit.h"
#include "kms_bench.h"

#include "kms_rand.h"

#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define AB_KEY         "kms-bench-audit"
#define AB_THREADS_MAX 256
#define AB_TARGET      0.8
#define AB_SLICE_S     0.5

static const unsigned ab_default_threads[] = {1, 4, 16, 64};

typedef struct {
    kms *k;
    bool audit;
    const uint8_t *pt;
    size_t size;
    double seconds;
    unsigned id;
    pthread_barrier_t *start;
    uint64_t ops;
    double elapsed;
    kms_result r;
} ab_thread;

static void *ab_run(void *arg)
{
    ab_thread *t = arg;
    kms_buf out;
    kms_buf_init(&out, 0);
    char rid[32];
    snprintf(rid, sizeof(rid), "bench-%u", t->id);
    kms_caller c = {.identity = "kms-bench", .request_id = rid, .source_addr = "127.0.0.1"};
    t->r = KMS_OK_RESULT;
    (void)pthread_barrier_wait(t->start);
    double t0 = kms_bench_now(), end = t0 + t->seconds;
    uint64_t ops = 0;
    while (kms_bench_now() < end) {
        uint32_t v = 0;
        kms_buf_reset(&out);
        kms_result r = KMS_OK_RESULT;
        if (t->audit)
            r = kms_audit_ready(t->k);
        if (kms_is_ok(r))
            r = kms_wrap(t->k, &c, AB_KEY, t->pt, t->size, NULL, 0, &out, &v);
        if (kms_is_ok(r) && t->audit) {
            kms_audit_record rec;
            memset(&rec, 0, sizeof(rec));
            snprintf(rec.identity, sizeof(rec.identity), "kms-bench");
            snprintf(rec.source, sizeof(rec.source), "127.0.0.1");
            snprintf(rec.request_id, sizeof(rec.request_id), "%s", rid);
            snprintf(rec.operation, sizeof(rec.operation), "wrap");
            snprintf(rec.key, sizeof(rec.key), AB_KEY);
            snprintf(rec.result, sizeof(rec.result), "ok");
            rec.version = v;
            rec.status = 200;
            r = kms_audit_append(t->k, &rec);
        }
        if (!kms_is_ok(r)) {
            t->r = r;
            break;
        }
        ops++;
    }
    t->elapsed = kms_bench_now() - t0;
    t->ops = ops;
    kms_buf_free(&out);
    return NULL;
}

/* One slice: ops done by every thread, and the longest thread's time. */
static KMS_RESULT ab_measure(kms *k, bool audit, unsigned threads, const uint8_t *pt, size_t size,
                             double seconds, uint64_t *ops, double *elapsed)
{
    ab_thread *th = calloc(threads, sizeof(*th));
    pthread_t *tid = calloc(threads, sizeof(*tid));
    pthread_barrier_t bar;
    if (th == NULL || tid == NULL || pthread_barrier_init(&bar, NULL, threads) != 0) {
        free(th);
        free(tid);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    for (unsigned i = 0; i < threads; i++) {
        th[i] = (ab_thread){.k = k,
                            .audit = audit,
                            .pt = pt,
                            .size = size,
                            .seconds = seconds,
                            .id = i,
                            .start = &bar};
        if (pthread_create(&tid[i], NULL, ab_run, &th[i]) != 0)
            abort(); /* the barrier would never release: fail loudly */
    }
    uint64_t total = 0;
    double longest = 0;
    kms_result r = KMS_OK_RESULT;
    for (unsigned i = 0; i < threads; i++) {
        (void)pthread_join(tid[i], NULL);
        total += th[i].ops;
        if (th[i].elapsed > longest)
            longest = th[i].elapsed;
        if (!kms_is_ok(th[i].r))
            r = th[i].r;
    }
    (void)pthread_barrier_destroy(&bar);
    free(th);
    free(tid);
    KMS_GUARD(r);
    *ops = total;
    *elapsed = longest;
    return KMS_OK_RESULT;
}

/* ---- a throwaway SoftHSM token (as core mode's --throwaway) ---- */

static int ab_rm(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    (void)remove(path);
    return 0;
}

static KMS_RESULT ab_write(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wx");
    KMS_ENSURE_MSG(f != NULL, KMS_ERR_IO, "create %s: %s", path, strerror(errno));
    (void)chmod(path, 0600);
    bool ok = fwrite(p, 1, n, f) == n;
    ok &= fclose(f) == 0;
    KMS_ENSURE_MSG(ok, KMS_ERR_IO, "write %s", path);
    return KMS_OK_RESULT;
}

typedef struct {
    char dir[256], conf[320], pin[320], store[320], uri[96];
} ab_tmp;

static KMS_RESULT ab_throwaway(ab_tmp *t, const char *module)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(t->dir, sizeof(t->dir), "%s/kms-bench-audit-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    KMS_ENSURE_MSG(mkdtemp(t->dir) != NULL, KMS_ERR_IO, "mkdtemp: %s", strerror(errno));
    char tokens[300];
    snprintf(tokens, sizeof(tokens), "%s/tokens", t->dir);
    snprintf(t->conf, sizeof(t->conf), "%s/softhsm2.conf", t->dir);
    snprintf(t->pin, sizeof(t->pin), "%s/user.pin", t->dir);
    snprintf(t->store, sizeof(t->store), "%s/store", t->dir);
    KMS_ENSURE_MSG(mkdir(tokens, 0700) == 0, KMS_ERR_IO, "mkdir: %s", strerror(errno));
    char conf[512];
    int n = snprintf(conf, sizeof(conf),
                     "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
                     "slots.removable = false\n",
                     tokens);
    KMS_GUARD(ab_write(t->conf, conf, (size_t)n));
    KMS_ENSURE(setenv("SOFTHSM2_CONF", t->conf, 1) == 0, KMS_ERR_IO);
    uint8_t id[4], raw[16];
    KMS_GUARD(kms_rand_bytes(id, sizeof(id)));
    char label[40];
    snprintf(label, sizeof(label), "kms-bench-audit-%02x%02x%02x%02x", id[0], id[1], id[2], id[3]);
    snprintf(t->uri, sizeof(t->uri), "pkcs11:token=%s", label);
    kms_buf so KMS_DEFER(kms_buf_cleanup) = {0}, user KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&so, 64);
    kms_buf_init_secret(&user, 64);
    static const char hex[] = "0123456789abcdef";
    for (int which = 0; which < 2; which++) {
        KMS_GUARD(kms_rand_bytes(raw, sizeof(raw)));
        for (size_t i = 0; i < sizeof(raw); i++) {
            char two[2] = {hex[raw[i] >> 4], hex[raw[i] & 15]};
            KMS_GUARD(kms_buf_append(which == 0 ? &so : &user, two, 2));
        }
    }
    memset(raw, 0, sizeof(raw));
    KMS_GUARD(ab_write(t->pin, user.data, user.len));
    return kms_hsm_token_init(module, label, &so, &user);
}

/* ---- the mode ---- */

static KMS_RESULT ab_main(const kms_bench_opts *o, const kms_hsm_config *hsm, const char *store,
                          const unsigned *threads, size_t nthreads, double *off, double *on)
{
    kms_config cfg = {.store_path = store, .hsm = *hsm};
    kms *k = NULL;
    KMS_GUARD(kms_open(&cfg, &k));
    uint8_t pt[KMS_WRAP_PLAINTEXT_MAX_BYTES];
    kms_result r = kms_rand_bytes(pt, o->size);
    if (kms_is_ok(r)) {
        kms_key_spec spec = {.name = AB_KEY, .purpose = KMS_PURPOSE_ENCRYPT};
        kms_caller admin = {.identity = "kms-bench"};
        r = kms_key_create(k, &admin, &spec, NULL);
        if (r.err == KMS_ERR_KEY_EXISTS)
            r = KMS_OK_RESULT;
    }
    /* Off (the trail not started) and on alternate in slices: same
     * process, same key, same store, so that only the audit differs. */
    unsigned rounds = (unsigned)(o->seconds / AB_SLICE_S + 0.5);
    if (rounds == 0)
        rounds = 1;
    double slice = o->seconds / rounds;
    kms_audit_config ac = {.enabled = true};
    for (size_t i = 0; i < nthreads && kms_is_ok(r); i++) {
        fprintf(stderr, "kms-bench audit: wrap, audit off and on, %u thread(s)\n", threads[i]);
        uint64_t ops[2] = {0, 0};
        double time[2] = {0, 0};
        for (unsigned n = 0; n < rounds && kms_is_ok(r); n++) {
            for (int audit = 0; audit < 2 && kms_is_ok(r); audit++) {
                if (audit)
                    r = kms_audit_start(k, &ac);
                uint64_t sops = 0;
                double stime = 0;
                if (kms_is_ok(r))
                    r = ab_measure(k, audit, threads[i], pt, o->size, slice, &sops, &stime);
                if (audit)
                    kms_audit_stop(k); /* ingests and signs outside the slice */
                ops[audit] += sops;
                time[audit] += stime;
            }
        }
        off[i] = time[0] > 0 ? (double)ops[0] / time[0] : 0;
        on[i] = time[1] > 0 ? (double)ops[1] / time[1] : 0;
    }
    kms_close(k);
    return r;
}

int kms_bench_audit(const kms_bench_opts *o)
{
    /* --connections LIST gives the thread counts (default 1,4,16,64): each
     * thread stands for one request thread of kmsd with one request in
     * flight. */
    unsigned threads[KMS_BENCH_MAX_CONNS_LIST];
    size_t nthreads = 0;
    for (size_t i = 0; i < o->n_conns && i < KMS_ARRAY_LEN(threads); i++) {
        if (o->conns[i] < 1 || o->conns[i] > AB_THREADS_MAX) {
            fprintf(stderr, "kms-bench audit: --connections: 1..%d threads each\n", AB_THREADS_MAX);
            return KMS_BENCH_EXIT_USAGE;
        }
        threads[nthreads++] = o->conns[i];
    }
    if (nthreads == 0) {
        memcpy(threads, ab_default_threads, sizeof(ab_default_threads));
        nthreads = KMS_ARRAY_LEN(ab_default_threads);
    }
    ab_tmp tmp = {0};
    kms_hsm_config hsm = {0};
    const char *store = o->store;
    kms_result r = KMS_OK_RESULT;
    if (o->throwaway) {
        const char *module = o->module != NULL ? o->module : getenv("KMS_SOFTHSM_MODULE");
        if (module == NULL || *module == '\0')
            module = "/usr/lib/softhsm/libsofthsm2.so";
        r = ab_throwaway(&tmp, module);
        hsm = (kms_hsm_config){.module = module, .token_uri = tmp.uri, .pin_file = tmp.pin};
        store = tmp.store;
    } else if (o->module == NULL || o->token_uri == NULL || o->pin_file == NULL || store == NULL) {
        fprintf(stderr, "kms-bench audit: --module, --token-uri, --pin-file and --store are "
                        "required (or --throwaway); see --help\n");
        return KMS_BENCH_EXIT_USAGE;
    } else {
        hsm = (kms_hsm_config){
            .module = o->module, .token_uri = o->token_uri, .pin_file = o->pin_file};
    }
    double off[KMS_BENCH_MAX_CONNS_LIST] = {0}, on[KMS_BENCH_MAX_CONNS_LIST] = {0};
    if (kms_is_ok(r))
        r = ab_main(o, &hsm, store, threads, nthreads, off, on);
    if (tmp.dir[0] != '\0')
        (void)nftw(tmp.dir, ab_rm, 16, FTW_DEPTH | FTW_PHYS);
    if (!kms_is_ok(r)) {
        kms_bench_fail("audit", r);
        return kms_error_exit_code(r.err);
    }
    if (o->json) {
        printf("{\"mode\":\"audit\",\"seconds\":%.2f,\"size\":%zu,\"target\":%.2f,\"runs\":[",
               o->seconds, o->size, AB_TARGET);
        for (size_t i = 0; i < nthreads; i++)
            printf("%s{\"threads\":%u,\"audit_off\":%.1f,\"audit_on\":%.1f,\"ratio\":%.3f}",
                   i ? "," : "", threads[i], off[i], on[i], off[i] > 0 ? on[i] / off[i] : 0);
        printf("]}\n");
        return 0;
    }
    printf("kms-bench audit: wrap of %zu-byte plaintexts, %.1f s per cell (off and on alternating "
           "in slices of about %.1f s), ops/s; each audited wrap waits for its record to be "
           "durable in the audit journal (group commit)\n\n",
           o->size, o->seconds, AB_SLICE_S);
    printf("| threads | audit off | audit on (durable) | on / off | target %.1f |\n", AB_TARGET);
    printf("|---:|---:|---:|---:|---|\n");
    for (size_t i = 0; i < nthreads; i++) {
        double q = off[i] > 0 ? on[i] / off[i] : 0;
        printf("| %u | %.0f | %.0f | %.2f | %s |\n", threads[i], off[i], on[i], q,
               q >= AB_TARGET ? "met" : "not met");
    }
    return 0;
}
