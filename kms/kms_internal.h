/*
 * Internals shared by the files of kms/ (not part of the contract).
 *
 * The in-memory cache. Operations must cost about one HSM call, so they
 * read key and version metadata from memory, never from LMDB and never
 * from the token. Every committed change of metadata bumps the store's
 * cross-process generation; a key entry whose generation is behind is
 * reloaded from LMDB on its next use. Writers therefore never edit the
 * cache: they commit, bump, and the next reader refreshes, so an aborted
 * transaction leaves nothing in memory to roll back.
 *
 * Key entries and version entries are never freed before kms_close (keys
 * and versions are never deleted, a destroyed version stays as a record),
 * so a version's atomic counters can be used without holding the lock.
 */
#ifndef KMS_INTERNAL_H
#define KMS_INTERNAL_H

#include "kms.h"
#include "kms_record.h"
#include "kms_store.h"

#include <pthread.h>
#include <stdatomic.h>

#define KMS_DAY_S                   INT64_C(86400)
#define KMS_DEFAULT_ROTATION_S      (90 * KMS_DAY_S)
#define KMS_DEFAULT_WARNING_S       (7 * KMS_DAY_S)
#define KMS_DEFAULT_GRACE_S         (30 * KMS_DAY_S)
#define KMS_DESTROY_WAIT_MIN_S      (7 * KMS_DAY_S)
#define KMS_DESTROY_WAIT_MAX_S      (30 * KMS_DAY_S)
#define KMS_DEFAULT_RESERVATION     4096
#define KMS_DEPRECATED_WARN_EVERY_S 60

typedef struct {
    uint32_t version;
    /* Metadata as last loaded from LMDB (under the cache lock). */
    kms_rec_version rec;
    uint8_t master_id[KMS_HSM_ID_BYTES];
    bool master_known;
    /* Encryption counter (NIST SP 800-38D 8.3): `next` is the count so far;
     * [next, block_end) is the block reserved in LMDB for this process. */
    _Atomic uint64_t next;
    _Atomic uint64_t block_end;
    _Atomic int64_t last_used;
    _Atomic int64_t last_warned;
    _Atomic uint64_t deprecated_uses;
    _Atomic bool auto_rotating;
} kms_ver;

typedef struct kms_keyent {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    kms_rec_key rec;
    kms_ver **vers; /* vers[v - 1] */
    uint32_t nvers;
    uint64_t gen;
    struct kms_keyent *hnext;
} kms_keyent;

typedef struct {
    uint32_t version;
    kms_rec_master rec;
} kms_master_ent;

struct kms {
    kms_config cfg;
    char *store_path;
    kms_hsm *hsm;
    kms_store *store;

    /* Serialises this process's administrative changes (create, rotate,
     * state changes, master rotation, check) so that a multi-transaction
     * change is never interleaved with another from this process. */
    pthread_mutex_t admin_mu;
    /* Serialises counter reservations. */
    pthread_mutex_t counter_mu;

    /* The cache: hash table of key entries, and the master table. */
    pthread_rwlock_t cache_lock;
    kms_keyent **buckets;
    size_t nbuckets;
    size_t nkeys_cached;
    kms_master_ent *masters;
    size_t nmasters;
    uint64_t masters_gen;
    bool masters_loaded;

    /* The audit trail (kms_audit.c); NULL until kms_audit_start. */
    struct kms_audit *audit;
};

int64_t kms_now(kms *k);
/* Writes fn in one transaction; bumps the cache generation on success
 * when the change concerns metadata. */
KMS_RESULT kms_write(kms *k, kms_store_fn fn, void *arg, bool metadata);

/* The effective state of a version at `now`: a deprecated version past its
 * grace is disabled, a version past its destroy_at is destroyed. */
kms_version_state kms_version_effective(const kms_rec_version *v, int64_t now);
bool kms_version_destroy_due(const kms_rec_version *v, int64_t now);
void kms_version_info_fill(kms *k, const kms_rec_version *rec, uint32_t version, const kms_ver *ve,
                           int64_t now, kms_version_info *out);
void kms_key_info_fill(const char *name, const kms_rec_key *rec, kms_key_info *out);
kms_hsm_secret_type kms_purpose_secret_type(uint8_t purpose);

/* What an operation needs of one version, copied out of the cache. */
typedef struct {
    uint8_t purpose;
    uint32_t primary_version;
    uint32_t min_decryption_version;
    uint32_t version;
    kms_ver *ver; /* stable; its atomics may be used without the lock */
    kms_rec_version rec;
    kms_hsm_key_ref ref; /* points into rec */
} kms_use;

/* version 0 = the primary. KMS_ERR_KEY_NOT_FOUND / KMS_ERR_VERSION_NOT_FOUND. */
KMS_RESULT kms_cache_use(kms *k, const char *name, uint32_t version, kms_use *u);
void kms_cache_free(kms *k);
/* Master table from LMDB (on generation change). */
KMS_RESULT kms_masters_refresh(kms *k);
/* Master id by version from the in-memory table. */
bool kms_master_id(kms *k, uint32_t version, uint8_t id[KMS_HSM_ID_BYTES]);
/* The master new secrets are generated under: the pending one during a
 * master rotation, else the current one. */
KMS_RESULT kms_master_target(kms *k, uint32_t *version, uint8_t id[KMS_HSM_ID_BYTES]);
/* First start: master version 1. */
KMS_RESULT kms_master_bootstrap(kms *k);
/* Live versions counted per master version (master rotation, check). */
typedef struct {
    uint32_t *mv;
    uint64_t *count;
    size_t n, cap;
} kms_mtally;
KMS_RESULT kms_mtally_add(kms_mtally *t, uint32_t master_version);
uint64_t kms_mtally_of(const kms_mtally *t, uint32_t master_version);
void kms_mtally_free(kms_mtally *t);
/* Destroys retired masters still on the token; returns how many. */
size_t kms_master_destroy_retired(kms *k);
/* Finishes an interrupted master rotation, if any (admin_mu held). */
KMS_RESULT kms_master_resume(kms *k, bool *resumed);

/* Counter reservation: accounts for one encryption under u's version. */
KMS_RESULT kms_counter_take(kms *k, const char *name, kms_use *u);
/* Persists what the counters of cached versions owe to LMDB (close). */
void kms_counters_flush(kms *k);
/* Destroys a version whose destroy_at has passed (own write transaction). */
KMS_RESULT kms_version_destroy_now(kms *k, const char *name, uint32_t version);
/* A deprecated version whose grace ended by `now` becomes disabled, stored,
 * and its cached HSM object is dropped; decided inside the transaction (it
 * may have been enabled meanwhile). *changed says whether it was. */
KMS_RESULT kms_version_expire_now(kms *k, const char *name, uint32_t version, int64_t now,
                                  bool *changed);

KMS_RESULT kms_rotation_put(kms_txn *t, const kms_rec_rotation *r);
KMS_RESULT kms_rotation_new(kms *k, const kms_caller *c, const char *key, kms_rotation_type type,
                            const char *reason, kms_rec_rotation *r);
KMS_RESULT kms_rotation_finish(kms *k, kms_rec_rotation *r, kms_rotation_status st);

KMS_RESULT kms_check_run(kms *k, bool repair, bool deep, kms_check_report *out);

/* Scheduler (kms_schedule.c): a scheduled rotation of `name`, done only if
 * the key is still due inside the write transaction (*rotated false when
 * it was not, and then nothing is written). */
KMS_RESULT kms_key_rotate_if_due(kms *k, const char *name, int64_t jitter_window_s,
                                 kms_rotation_info *out, bool *rotated);

/* Test hook: sets a cached version's encryption counter (and its LMDB
 * reservation) so that the limit behaviour can be tested without 2^30
 * real encryptions. */
KMS_RESULT kms_test_counter_set(kms *k, const char *name, uint32_t version, uint64_t count);

#endif /* KMS_INTERNAL_H */
