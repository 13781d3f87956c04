/*
 * Shared helpers of the stress tests (tests/stress/): a kms_config on a
 * throwaway token, key/version snapshots for "unchanged or complete"
 * comparisons, a monotonic clock, and directory removal.
 */
#ifndef KMS_STRESS_UTIL_H
#define KMS_STRESS_UTIL_H

#include "kms.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Monotonic time in nanoseconds / seconds. */
uint64_t stress_now_ns(void);
double stress_now_s(void);

/* kms_config for a store under dir, on the token described by hsm. */
void stress_config_init(kms_config *cfg, const char *store_path, const kms_hsm_config *hsm);

/* Makes a fresh directory; 0 ok. */
int stress_mkdir(const char *path);
/* Removes a directory tree (like rm -rf); missing is fine. */
void stress_rmtree(const char *path);

/* One key as the domain reports it: metadata and every version. */
typedef struct {
    bool exists;
    kms_key_info info;
    kms_version_info *versions;
    size_t n;
} stress_key_snap;

/* Reads key `name`; a missing key gives exists = false. Any other error
 * fails (returns the error). */
kms_result stress_key_snap_take(kms *k, const char *name, stress_key_snap *out);
void stress_key_snap_free(stress_key_snap *s);

/* Field-by-field equality of the durable part of two version records:
 * everything except the usage fields (last_used_at, encryptions), which
 * data operations legitimately advance, and, when ignore_master is set,
 * master_version (a master rotation moves it). */
bool stress_version_same(const kms_version_info *a, const kms_version_info *b, bool ignore_master);
/* Key metadata and version lists equal in the sense above. */
bool stress_key_same(const stress_key_snap *a, const stress_key_snap *b, bool ignore_master);

/* Every key of the store in name order, paging through kms_key_list.
 * *out is malloc'd; free() it. */
kms_result stress_key_list_all(kms *k, kms_key_info **out, size_t *n);

/* Hex helpers for the crash test's record file. */
void stress_hex_encode(const uint8_t *in, size_t n, char *out);
/* Returns the number of bytes decoded, or -1 on a malformed string. */
long stress_hex_decode(const char *in, size_t in_len, uint8_t *out, size_t out_cap);

/* Prints, on stderr, every thread's stack of process pid (a child that
 * stopped making progress), with gdb if the machine has it, else the
 * kernel's wait channel of each thread. For the failure message only. */
void stress_dump_stacks(pid_t pid);

/* splitmix64: a small seeded PRNG for reproducible schedules. */
uint64_t stress_rand_next(uint64_t *state);

#endif /* KMS_STRESS_UTIL_H */
