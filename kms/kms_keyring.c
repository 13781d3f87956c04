/*
 * The keyring: opening the service, keys, versions and their states,
 * rotation and rollback, policy, rotation records, and the in-memory cache
 * the operations read from (see kms_internal.h for the cache's rules).
 */
#include "kms_audit.h"
#include "kms_internal.h"
#include "kms_schedule.h"

#include "kms_hash.h"
#include "kms_rand.h"
#include "kms_secmem.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KMS_MAP_INITIAL_DEFAULT     ((size_t)16 * 1024 * 1024)
#define KMS_MAP_MAX_DEFAULT         ((size_t)64 * 1024 * 1024 * 1024)
#define KMS_BUCKETS_INITIAL         1024
#define KMS_LIST_LIMIT_DEFAULT      100
#define KMS_LIST_LIMIT_MAX          1000
#define KMS_ROTATIONS_LIMIT_DEFAULT 1000
#define KMS_CACHE_RETRIES           4

int64_t kms_now(kms *k)
{
    if (k->cfg.clock != NULL)
        return k->cfg.clock(k->cfg.clock_arg);
    return (int64_t)time(NULL);
}

KMS_RESULT kms_write(kms *k, kms_store_fn fn, void *arg, bool metadata)
{
    KMS_GUARD(kms_store_write(k->store, fn, arg));
    if (metadata)
        kms_store_gen_bump(k->store);
    return KMS_OK_RESULT;
}

kms_hsm_secret_type kms_purpose_secret_type(uint8_t purpose)
{
    return purpose == KMS_PURPOSE_MAC ? KMS_HSM_SECRET_HMAC256 : KMS_HSM_SECRET_AES256;
}

bool kms_version_destroy_due(const kms_rec_version *v, int64_t now)
{
    return v->state != KMS_VERSION_DESTROYED && v->destroy_at != 0 && now >= v->destroy_at;
}

kms_version_state kms_version_effective(const kms_rec_version *v, int64_t now)
{
    if (v->state == KMS_VERSION_DESTROYED || kms_version_destroy_due(v, now))
        return KMS_VERSION_DESTROYED;
    if (v->state == KMS_VERSION_DEPRECATED && v->grace_until != 0 && now >= v->grace_until)
        return KMS_VERSION_DISABLED;
    return (kms_version_state)v->state;
}

void kms_key_info_fill(const char *name, const kms_rec_key *rec, kms_key_info *out)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->name, sizeof(out->name), "%s", name);
    out->purpose = (kms_purpose)rec->purpose;
    out->primary_version = rec->primary_version;
    out->latest_version = rec->latest_version;
    out->min_decryption_version = rec->min_decryption_version;
    out->rotation_period_s = rec->rotation_period_s;
    out->warning_window_s = rec->warning_window_s;
    out->deletion_protection = rec->deletion_protection;
    out->created_at = rec->created_at;
    out->rotated_at = rec->rotated_at;
}

void kms_version_info_fill(kms *k, const kms_rec_version *rec, uint32_t version, const kms_ver *ve,
                           int64_t now, kms_version_info *out)
{
    (void)k;
    memset(out, 0, sizeof(*out));
    out->version = version;
    out->state = kms_version_effective(rec, now);
    out->created_at = rec->created_at;
    out->primary_at = rec->primary_at;
    out->deprecated_at = rec->deprecated_at;
    out->grace_until = rec->state == KMS_VERSION_DEPRECATED ? rec->grace_until : 0;
    out->destroy_at = rec->destroy_at;
    out->last_used_at = rec->last_used_at;
    out->encryptions = rec->reserved;
    out->master_version = rec->master_version;
    if (ve != NULL) {
        /* This process's view is exact for what it did itself. */
        out->encryptions = atomic_load(&ve->next);
        int64_t lu = atomic_load(&ve->last_used);
        if (lu > out->last_used_at)
            out->last_used_at = lu;
    }
}

/* ---------------------------------------------------------------------- */
/* Cache                                                                   */

static uint64_t kms_name_hash(const char *s)
{
    uint64_t h = UINT64_C(14695981039346656037); /* FNV-1a */
    for (; *s != '\0'; s++)
        h = (h ^ (uint8_t)*s) * UINT64_C(1099511628211);
    return h;
}

static kms_keyent *kms_cache_find_locked(kms *k, const char *name)
{
    if (k->nbuckets == 0)
        return NULL;
    kms_keyent *e = k->buckets[kms_name_hash(name) % k->nbuckets];
    for (; e != NULL; e = e->hnext)
        if (strcmp(e->name, name) == 0)
            return e;
    return NULL;
}

static void kms_cache_rehash_locked(kms *k)
{
    size_t nb = k->nbuckets * 2;
    kms_keyent **b = calloc(nb, sizeof(*b));
    if (b == NULL)
        return; /* keep the old table: longer chains, still correct */
    for (size_t i = 0; i < k->nbuckets; i++) {
        kms_keyent *e = k->buckets[i];
        while (e != NULL) {
            kms_keyent *n = e->hnext;
            size_t j = kms_name_hash(e->name) % nb;
            e->hnext = b[j];
            b[j] = e;
            e = n;
        }
    }
    free(k->buckets);
    k->buckets = b;
    k->nbuckets = nb;
}

void kms_cache_free(kms *k)
{
    for (size_t i = 0; i < k->nbuckets; i++) {
        kms_keyent *e = k->buckets[i];
        while (e != NULL) {
            kms_keyent *n = e->hnext;
            for (uint32_t v = 0; v < e->nvers; v++) {
                if (e->vers[v] != NULL)
                    kms_secmem_wipe(&e->vers[v]->rec, sizeof(e->vers[v]->rec));
                free(e->vers[v]);
            }
            free(e->vers);
            free(e);
            e = n;
        }
    }
    free(k->buckets);
    k->buckets = NULL;
    k->nbuckets = 0;
    free(k->masters);
    k->masters = NULL;
    k->nmasters = 0;
}

static bool kms_master_id_locked(kms *k, uint32_t version, uint8_t id[KMS_HSM_ID_BYTES])
{
    for (size_t i = 0; i < k->nmasters; i++) {
        if (k->masters[i].version == version) {
            memcpy(id, k->masters[i].rec.id, KMS_HSM_ID_BYTES);
            return true;
        }
    }
    return false;
}

bool kms_master_id(kms *k, uint32_t version, uint8_t id[KMS_HSM_ID_BYTES])
{
    pthread_rwlock_rdlock(&k->cache_lock);
    bool ok = kms_master_id_locked(k, version, id);
    pthread_rwlock_unlock(&k->cache_lock);
    return ok;
}

typedef struct {
    kms_master_ent *m;
    size_t n, cap;
} kms_masters_load;

static kms_result kms_masters_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                   void *arg, bool *stop)
{
    kms_masters_load *l = arg;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        kms_master_ent *m = realloc(l->m, cap * sizeof(*m));
        KMS_ENSURE(m != NULL, KMS_ERR_NO_MEMORY);
        l->m = m;
        l->cap = cap;
    }
    kms_master_ent *e = &l->m[l->n];
    KMS_GUARD(kms_rec_master_key_parse(key, klen, &e->version));
    KMS_GUARD(kms_rec_master_decode(val, vlen, &e->rec));
    l->n++;
    return KMS_OK_RESULT;
}

static kms_result kms_masters_read(kms_txn *t, void *arg)
{
    kms_masters_load *l = arg;
    l->n = 0;
    return kms_txn_scan(t, KMS_DB_MASTERS, NULL, 0, NULL, 0, kms_masters_scan, l);
}

KMS_RESULT kms_masters_refresh(kms *k)
{
    uint64_t gen = kms_store_gen(k->store);
    kms_masters_load l = {0};
    kms_result r = kms_store_read(k->store, kms_masters_read, &l);
    if (!kms_is_ok(r)) {
        free(l.m);
        return r;
    }
    pthread_rwlock_wrlock(&k->cache_lock);
    free(k->masters);
    k->masters = l.m;
    k->nmasters = l.n;
    k->masters_gen = gen;
    k->masters_loaded = true;
    /* Versions resolve their master id at load; a master change (a new
     * master or a rewrap) always comes with a generation bump, so every key
     * entry reloads and re-resolves. */
    pthread_rwlock_unlock(&k->cache_lock);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_master_target(kms *k, uint32_t *version, uint8_t id[KMS_HSM_ID_BYTES])
{
    KMS_GUARD(kms_masters_refresh(k));
    pthread_rwlock_rdlock(&k->cache_lock);
    const kms_master_ent *cur = NULL, *pend = NULL;
    for (size_t i = 0; i < k->nmasters; i++) {
        if (k->masters[i].rec.state == KMS_MASTER_CURRENT)
            cur = &k->masters[i];
        else if (k->masters[i].rec.state == KMS_MASTER_PENDING)
            pend = &k->masters[i];
    }
    const kms_master_ent *m = pend != NULL ? pend : cur;
    if (m != NULL) {
        *version = m->version;
        memcpy(id, m->rec.id, KMS_HSM_ID_BYTES);
    }
    pthread_rwlock_unlock(&k->cache_lock);
    KMS_ENSURE_MSG(m != NULL, KMS_ERR_STORE_CORRUPT, "no current master key in the store");
    return KMS_OK_RESULT;
}

typedef struct {
    const char *name;
    size_t name_len;
    bool found;
    kms_rec_key key;
    kms_rec_version *recs;
    uint32_t n, cap;
} kms_key_load;

static kms_result kms_key_load_scan(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *arg, bool *stop)
{
    kms_key_load *l = arg;
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    KMS_ENSURE(kms_rec_version_key_split(key, klen, name, &version), KMS_ERR_STORE_CORRUPT);
    /* Versions are numbered 1, 2, 3... with no gap (never deleted). */
    KMS_ENSURE(version == l->n + 1, KMS_ERR_STORE_CORRUPT);
    if (l->n == l->cap) {
        uint32_t cap = l->cap ? l->cap * 2 : 4;
        kms_rec_version *r = realloc(l->recs, cap * sizeof(*r));
        KMS_ENSURE(r != NULL, KMS_ERR_NO_MEMORY);
        l->recs = r;
        l->cap = cap;
    }
    KMS_GUARD(kms_rec_version_decode(val, vlen, &l->recs[l->n]));
    l->n++;
    return KMS_OK_RESULT;
}

static kms_result kms_key_load_txn(kms_txn *t, void *arg)
{
    kms_key_load *l = arg;
    l->n = 0;
    const uint8_t *v;
    size_t vlen;
    KMS_GUARD(kms_txn_get(t, KMS_DB_KEYS, l->name, l->name_len, &v, &vlen, &l->found));
    if (!l->found)
        return KMS_OK_RESULT;
    KMS_GUARD(kms_rec_key_decode(v, vlen, &l->key));
    uint8_t prefix[KMS_KEY_NAME_MAX_BYTES + 1];
    memcpy(prefix, l->name, l->name_len);
    prefix[l->name_len] = 0;
    KMS_GUARD(kms_txn_scan(t, KMS_DB_VERSIONS, prefix, l->name_len + 1, prefix, l->name_len + 1,
                           kms_key_load_scan, l));
    KMS_ENSURE_MSG(l->n == l->key.latest_version, KMS_ERR_STORE_CORRUPT,
                   "key %s: %u versions stored, latest is %u", l->name, l->n,
                   l->key.latest_version);
    return KMS_OK_RESULT;
}

static void kms_key_load_free(kms_key_load *l)
{
    if (l->recs != NULL)
        kms_secmem_wipe(l->recs, l->cap * sizeof(*l->recs));
    free(l->recs);
    l->recs = NULL;
}

/* Loads a key from LMDB into the cache (insert or refresh in place). */
static kms_result kms_cache_refresh(kms *k, const char *name)
{
    uint64_t gen = kms_store_gen(k->store);
    pthread_rwlock_rdlock(&k->cache_lock);
    bool stale = !k->masters_loaded || k->masters_gen != gen;
    pthread_rwlock_unlock(&k->cache_lock);
    if (stale)
        KMS_GUARD(kms_masters_refresh(k));
    kms_key_load l = {.name = name, .name_len = strlen(name)};
    kms_result r = kms_store_read(k->store, kms_key_load_txn, &l);
    if (kms_is_ok(r) && !l.found)
        r = kms_error_raise(KMS_ERR_KEY_NOT_FOUND, __FILE__, __LINE__);
    if (!kms_is_ok(r)) {
        kms_key_load_free(&l);
        return r;
    }
    pthread_rwlock_wrlock(&k->cache_lock);
    kms_keyent *e = kms_cache_find_locked(k, name);
    if (e == NULL) {
        e = calloc(1, sizeof(*e));
        if (e == NULL) {
            r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto out;
        }
        snprintf(e->name, sizeof(e->name), "%s", name);
        if (k->nkeys_cached >= 2 * k->nbuckets)
            kms_cache_rehash_locked(k);
        size_t b = kms_name_hash(name) % k->nbuckets;
        e->hnext = k->buckets[b];
        k->buckets[b] = e;
        k->nkeys_cached++;
    }
    if (l.n > e->nvers) {
        kms_ver **vs = realloc(e->vers, l.n * sizeof(*vs));
        if (vs == NULL) {
            r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto out;
        }
        for (uint32_t i = e->nvers; i < l.n; i++)
            vs[i] = NULL;
        e->vers = vs;
        e->nvers = l.n;
    }
    for (uint32_t i = 0; i < l.n; i++) {
        kms_ver *v = e->vers[i];
        if (v == NULL) {
            v = calloc(1, sizeof(*v));
            if (v == NULL) {
                r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
                goto out;
            }
            v->version = i + 1;
            /* On load, the count is what LMDB reserved: a crash over-counts
             * by less than one reservation and never under-counts. */
            atomic_store(&v->next, l.recs[i].reserved);
            atomic_store(&v->block_end, l.recs[i].reserved);
            atomic_store(&v->last_used, l.recs[i].last_used_at);
            e->vers[i] = v;
        }
        v->rec = l.recs[i];
        v->master_known = kms_master_id_locked(k, v->rec.master_version, v->master_id);
    }
    e->rec = l.key;
    e->gen = gen;
out:
    pthread_rwlock_unlock(&k->cache_lock);
    kms_key_load_free(&l);
    return r;
}

KMS_RESULT kms_cache_use(kms *k, const char *name, uint32_t version, kms_use *u)
{
    KMS_ENSURE(name != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(kms_key_name_valid(name, strnlen(name, KMS_KEY_NAME_MAX_BYTES + 1)),
               KMS_ERR_KEY_NAME_INVALID);
    for (int attempt = 0;; attempt++) {
        uint64_t gen = kms_store_gen(k->store);
        pthread_rwlock_rdlock(&k->cache_lock);
        kms_keyent *e = kms_cache_find_locked(k, name);
        /* A stale entry is refreshed; under a storm of writes from other
         * processes the freshest load wins after a few attempts. */
        if (e == NULL || (e->gen != gen && attempt < KMS_CACHE_RETRIES)) {
            pthread_rwlock_unlock(&k->cache_lock);
            KMS_GUARD(kms_cache_refresh(k, name));
            continue;
        }
        uint32_t v = version == 0 ? e->rec.primary_version : version;
        if (v == 0 || v > e->nvers || e->vers[v - 1] == NULL) {
            pthread_rwlock_unlock(&k->cache_lock);
            KMS_BAIL(KMS_ERR_VERSION_NOT_FOUND);
        }
        kms_ver *ve = e->vers[v - 1];
        u->purpose = e->rec.purpose;
        u->primary_version = e->rec.primary_version;
        u->min_decryption_version = e->rec.min_decryption_version;
        u->version = v;
        u->ver = ve;
        u->rec = ve->rec;
        bool known = ve->master_known;
        memcpy(u->ref.master_id, ve->master_id, KMS_HSM_ID_BYTES);
        pthread_rwlock_unlock(&k->cache_lock);
        memcpy(u->ref.uid, u->rec.uid, KMS_HSM_UID_BYTES);
        u->ref.type = kms_purpose_secret_type(u->purpose);
        u->ref.wrapped = u->rec.wrapped;
        u->ref.wrapped_len = u->rec.wrapped_len;
        KMS_ENSURE_MSG(known || u->rec.state == KMS_VERSION_DESTROYED, KMS_ERR_HSM_OBJECT_MISSING,
                       "master version %u of %s v%u is unknown", u->rec.master_version, name, v);
        return KMS_OK_RESULT;
    }
}

/* ---------------------------------------------------------------------- */
/* Counters (NIST SP 800-38D 8.3 via reservation)                          */

typedef struct {
    const char *name;
    uint32_t version;
    uint32_t reservation;
    int64_t last_used;
    uint64_t set_to; /* test hook: exact value, else 0 */
    bool exact;
    uint64_t start; /* out: first count of the new block */
    uint64_t end;   /* out */
} kms_reserve_tx;

static kms_result kms_reserve_txn(kms_txn *t, void *arg)
{
    kms_reserve_tx *x = arg;
    uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
    size_t klen = kms_rec_version_key(x->name, x->version, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, key, klen, &v, &vlen, &found));
    KMS_ENSURE(found, KMS_ERR_VERSION_NOT_FOUND);
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(v, vlen, &rec));
    if (x->exact) {
        rec.reserved = x->set_to;
        x->start = x->end = x->set_to;
    } else {
        /* Claim the next block after everything reserved so far, by any
         * process: blocks never overlap, so the sum over processes never
         * exceeds what LMDB holds. */
        x->start = rec.reserved;
        KMS_ENSURE(rec.reserved <= UINT64_MAX - x->reservation, KMS_ERR_VERSION_EXHAUSTED);
        rec.reserved += x->reservation;
        x->end = rec.reserved;
    }
    if (x->last_used > rec.last_used_at)
        rec.last_used_at = x->last_used;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_version_encode(&rec, &b));
    kms_secmem_wipe(&rec, sizeof(rec));
    return kms_txn_put(t, KMS_DB_VERSIONS, key, klen, b.data, b.len, false);
}

KMS_RESULT kms_counter_take(kms *k, const char *name, kms_use *u)
{
    kms_ver *v = u->ver;
    /* Bounded: each pass either takes a count or reserves a new block. */
    for (int i = 0; i < 64; i++) {
        uint64_t n = atomic_load(&v->next);
        uint64_t end = atomic_load(&v->block_end);
        KMS_ENSURE_MSG(n < KMS_ENCRYPTIONS_HARD_LIMIT, KMS_ERR_VERSION_EXHAUSTED,
                       "%s v%u reached %llu encryptions", name, u->version, (unsigned long long)n);
        if (n < end) {
            if (atomic_compare_exchange_weak(&v->next, &n, n + 1)) {
                int64_t now = kms_now(k);
                if (atomic_load_explicit(&v->last_used, memory_order_relaxed) < now)
                    atomic_store_explicit(&v->last_used, now, memory_order_relaxed);
                if (n + 1 >= KMS_ENCRYPTIONS_SOFT_LIMIT && u->version == u->primary_version &&
                    !atomic_exchange(&v->auto_rotating, true)) {
                    kms_caller sys = {.identity = "system"};
                    kms_rotation_info ri;
                    kms_result r = kms_key_rotate(k, &sys, name, KMS_ROTATION_SCHEDULED,
                                                  "encryption limit", &ri);
                    if (!kms_is_ok(r)) {
                        fprintf(stderr,
                                "kms: warning: automatic rotation of %s at the encryption limit "
                                "failed: %s\n",
                                name, kms_error_code(r.err));
                        atomic_store(&v->auto_rotating, false);
                    }
                }
                return KMS_OK_RESULT;
            }
            continue;
        }
        pthread_mutex_lock(&k->counter_mu);
        kms_result r = KMS_OK_RESULT;
        if (atomic_load(&v->next) >= atomic_load(&v->block_end)) {
            kms_reserve_tx x = {.name = name,
                                .version = u->version,
                                .reservation = k->cfg.counter_reservation,
                                .last_used = atomic_load(&v->last_used)};
            r = kms_write(k, kms_reserve_txn, &x, false);
            if (kms_is_ok(r)) {
                /* next first, then block_end: a reader that sees the new end
                 * also sees the new next, so no count is handed out twice. */
                uint64_t cur = atomic_load(&v->next);
                atomic_store(&v->next, x.start > cur ? x.start : cur);
                atomic_store(&v->block_end, x.end);
            }
        }
        pthread_mutex_unlock(&k->counter_mu);
        KMS_GUARD(r);
    }
    KMS_BAIL(KMS_ERR_STORE_BUSY);
}

KMS_RESULT kms_test_counter_set(kms *k, const char *name, uint32_t version, uint64_t count)
{
    kms_use u;
    KMS_GUARD(kms_cache_use(k, name, version, &u));
    pthread_mutex_lock(&k->counter_mu);
    kms_reserve_tx x = {.name = name, .version = version, .exact = true, .set_to = count};
    kms_result r = kms_write(k, kms_reserve_txn, &x, false);
    if (kms_is_ok(r)) {
        atomic_store(&u.ver->next, count);
        atomic_store(&u.ver->block_end, count);
        atomic_store(&u.ver->auto_rotating, false);
    }
    pthread_mutex_unlock(&k->counter_mu);
    return r;
}

typedef struct {
    kms *k;
} kms_flush_tx;

static kms_result kms_flush_txn(kms_txn *t, void *arg)
{
    kms *k = ((kms_flush_tx *)arg)->k;
    for (size_t b = 0; b < k->nbuckets; b++) {
        for (kms_keyent *e = k->buckets[b]; e != NULL; e = e->hnext) {
            for (uint32_t i = 0; i < e->nvers; i++) {
                kms_ver *v = e->vers[i];
                if (v == NULL)
                    continue;
                uint64_t next = atomic_load(&v->next), end = atomic_load(&v->block_end);
                int64_t lu = atomic_load(&v->last_used);
                if (next == end && lu <= v->rec.last_used_at)
                    continue;
                uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
                size_t klen = kms_rec_version_key(e->name, v->version, key);
                const uint8_t *val;
                size_t vlen;
                bool found;
                KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, key, klen, &val, &vlen, &found));
                if (!found)
                    continue;
                kms_rec_version rec;
                KMS_GUARD(kms_rec_version_decode(val, vlen, &rec));
                bool changed = false;
                /* Give back the unused part of our block, but only if no
                 * other process reserved after it. */
                if (rec.reserved == end && next < end) {
                    rec.reserved = next;
                    changed = true;
                }
                if (lu > rec.last_used_at) {
                    rec.last_used_at = lu;
                    changed = true;
                }
                if (changed) {
                    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
                    KMS_GUARD(kms_rec_version_encode(&rec, &out));
                    KMS_GUARD(kms_txn_put(t, KMS_DB_VERSIONS, key, klen, out.data, out.len, false));
                }
                kms_secmem_wipe(&rec, sizeof(rec));
            }
        }
    }
    return KMS_OK_RESULT;
}

void kms_counters_flush(kms *k)
{
    kms_flush_tx x = {k};
    pthread_rwlock_rdlock(&k->cache_lock);
    kms_result r = kms_store_write(k->store, kms_flush_txn, &x);
    pthread_rwlock_unlock(&k->cache_lock);
    if (!kms_is_ok(r))
        fprintf(stderr, "kms: warning: usage counters not persisted at close: %s\n",
                kms_error_code(r.err));
}

/* ---------------------------------------------------------------------- */
/* Open / close                                                            */

KMS_RESULT kms_open(const kms_config *cfg, kms **out)
{
    KMS_ENSURE(cfg != NULL && out != NULL && cfg->store_path != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(cfg->default_rotation_period_s >= 0 && cfg->default_warning_window_s >= 0,
               KMS_ERR_CONFIG);
    *out = NULL;
    kms *k = calloc(1, sizeof(*k));
    KMS_ENSURE(k != NULL, KMS_ERR_NO_MEMORY);
    k->cfg = *cfg;
    if (k->cfg.map_size_initial == 0)
        k->cfg.map_size_initial = KMS_MAP_INITIAL_DEFAULT;
    if (k->cfg.map_size_max == 0)
        k->cfg.map_size_max = KMS_MAP_MAX_DEFAULT;
    if (k->cfg.default_rotation_period_s == 0)
        k->cfg.default_rotation_period_s = KMS_DEFAULT_ROTATION_S;
    if (k->cfg.default_warning_window_s == 0)
        k->cfg.default_warning_window_s = KMS_DEFAULT_WARNING_S;
    if (k->cfg.counter_reservation == 0)
        k->cfg.counter_reservation = KMS_DEFAULT_RESERVATION;
    memset(&k->cfg.hsm, 0, sizeof(k->cfg.hsm)); /* the caller's strings are not kept */
    pthread_mutex_init(&k->admin_mu, NULL);
    pthread_mutex_init(&k->counter_mu, NULL);
    pthread_rwlock_init(&k->cache_lock, NULL);
    kms_result r = KMS_OK_RESULT;
    k->store_path = strdup(cfg->store_path);
    k->buckets = calloc(KMS_BUCKETS_INITIAL, sizeof(*k->buckets));
    if (k->store_path == NULL || k->buckets == NULL) {
        free(k->store_path);
        free(k->buckets);
        free(k);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    k->nbuckets = KMS_BUCKETS_INITIAL;
    if (mkdir(cfg->store_path, 0700) != 0 && errno != EEXIST) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "store directory %s: %s",
                             cfg->store_path, strerror(errno));
        goto fail;
    }
    KMS_GUARD_GOTO(
        r, kms_store_open(cfg->store_path, k->cfg.map_size_initial, k->cfg.map_size_max, &k->store),
        fail);
    KMS_GUARD_GOTO(r, kms_hsm_open(&cfg->hsm, &k->hsm), fail);
    KMS_GUARD_GOTO(r, kms_masters_refresh(k), fail);
    if (k->nmasters == 0)
        KMS_GUARD_GOTO(r, kms_master_bootstrap(k), fail);

    /* The start-up check: report only, except that an interrupted master
     * rotation is finished (it is safe to resume and unsafe to leave). */
    pthread_mutex_lock(&k->admin_mu);
    bool resumed = false;
    r = kms_master_resume(k, &resumed);
    kms_check_report rep;
    if (kms_is_ok(r))
        r = kms_check_run(k, false, false, &rep);
    pthread_mutex_unlock(&k->admin_mu);
    if (!kms_is_ok(r))
        goto fail;
    fprintf(stderr, "kms: store %s: %s%s\n", cfg->store_path, rep.summary,
            resumed ? " (interrupted master rotation finished)" : "");
    /* A store already near its maximum refuses ordinary writes as soon as
     * they would grow it: say so at start, not at the first refusal. */
    size_t map, used, limit;
    kms_store_sizes(k->store, &map, &used, &limit);
    if (used * 10 > limit * 9)
        fprintf(stderr,
                "kms: store %s holds %zu of the %zu bytes ordinary writes may fill "
                "(store_map_size_max less the reserve kept for pruning): prune or raise "
                "store_map_size_max (docs/runbook.md, \"A store running full\")\n",
                cfg->store_path, used, limit);
    *out = k;
    return KMS_OK_RESULT;
fail:
    kms_close(k);
    return r;
}

void kms_close(kms *k)
{
    if (k == NULL)
        return;
    kms_audit_stop(k); /* drains queued records while store and HSM are open */
    if (k->store != NULL)
        kms_counters_flush(k);
    kms_cache_free(k);
    kms_hsm_close(k->hsm);
    kms_store_close(k->store);
    pthread_rwlock_destroy(&k->cache_lock);
    pthread_mutex_destroy(&k->counter_mu);
    pthread_mutex_destroy(&k->admin_mu);
    free(k->store_path);
    free(k);
}

kms_hsm *kms_hsm_of(kms *k)
{
    return k->hsm;
}

/* ---------------------------------------------------------------------- */
/* Rotation records                                                        */

KMS_RESULT kms_rotation_put(kms_txn *t, const kms_rec_rotation *r)
{
    uint8_t key[KMS_ROTATION_KEY_BYTES];
    kms_rec_rotation_key(&r->info, key);
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_rotation_encode(r, &b));
    return kms_txn_put(t, KMS_DB_ROTATIONS, key, sizeof(key), b.data, b.len, false);
}

static kms_result kms_caller_check(const kms_caller *c)
{
    KMS_ENSURE(c != NULL, KMS_ERR_INVALID_ARGUMENT);
    if (c->identity != NULL)
        KMS_ENSURE(strlen(c->identity) <= KMS_IDENTITY_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rotation_new(kms *k, const kms_caller *c, const char *key, kms_rotation_type type,
                            const char *reason, kms_rec_rotation *r)
{
    KMS_GUARD(kms_caller_check(c));
    KMS_ENSURE(reason == NULL || strlen(reason) <= KMS_REASON_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED);
    memset(r, 0, sizeof(*r));
    KMS_GUARD(kms_rand_id_hex(r->info.id));
    snprintf(r->info.key, sizeof(r->info.key), "%s", key);
    r->info.type = type;
    r->info.status = KMS_ROTATION_STARTED;
    snprintf(r->info.initiator, sizeof(r->info.initiator), "%s",
             c->identity != NULL ? c->identity : "");
    snprintf(r->info.reason, sizeof(r->info.reason), "%s", reason != NULL ? reason : "");
    r->info.started_at = kms_now(k);
    r->owner_pid = (uint32_t)getpid();
    return KMS_OK_RESULT;
}

static kms_result kms_rotation_put_txn(kms_txn *t, void *arg)
{
    return kms_rotation_put(t, arg);
}

KMS_RESULT kms_rotation_finish(kms *k, kms_rec_rotation *r, kms_rotation_status st)
{
    r->info.status = st;
    r->info.finished_at = kms_now(k);
    return kms_write(k, kms_rotation_put_txn, r, false);
}

typedef struct {
    const kms_rotation_filter *f;
    kms_rotation_info *out;
    size_t n, cap, limit;
} kms_rot_list;

static kms_result kms_rot_list_scan(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *arg, bool *stop)
{
    kms_rot_list *l = arg;
    kms_rec_rotation r;
    KMS_GUARD(kms_rec_rotation_decode(val, vlen, &r));
    const kms_rotation_filter *f = l->f;
    if (f != NULL) {
        if (f->to != 0 && r.info.started_at > f->to) {
            *stop = true;
            return KMS_OK_RESULT;
        }
        if ((f->key != NULL && strcmp(f->key, r.info.key) != 0) ||
            (f->type != 0 && f->type != (int)r.info.type) ||
            (f->status != 0 && f->status != (int)r.info.status) ||
            (f->from != 0 && r.info.started_at < f->from))
            return KMS_OK_RESULT;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        kms_rotation_info *o = realloc(l->out, cap * sizeof(*o));
        KMS_ENSURE(o != NULL, KMS_ERR_NO_MEMORY);
        l->out = o;
        l->cap = cap;
    }
    l->out[l->n++] = r.info;
    if (l->n >= l->limit)
        *stop = true;
    return KMS_OK_RESULT;
}

static kms_result kms_rot_list_txn(kms_txn *t, void *arg)
{
    kms_rot_list *l = arg;
    l->n = 0;
    uint8_t start[8] = {0};
    if (l->f != NULL && l->f->from > 0) {
        uint64_t from = (uint64_t)l->f->from;
        for (int i = 0; i < 8; i++)
            start[i] = (uint8_t)(from >> (56 - 8 * i));
    }
    return kms_txn_scan(t, KMS_DB_ROTATIONS, start, sizeof(start), NULL, 0, kms_rot_list_scan, l);
}

KMS_RESULT kms_rotations_list(kms *k, const kms_rotation_filter *f, kms_rotation_info **out,
                              size_t *n)
{
    KMS_ENSURE(k != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_rot_list l = {.f = f, .limit = KMS_ROTATIONS_LIMIT_DEFAULT};
    if (f != NULL && f->limit != 0)
        l.limit = f->limit;
    kms_result r = kms_store_read(k->store, kms_rot_list_txn, &l);
    if (!kms_is_ok(r)) {
        free(l.out);
        return r;
    }
    *out = l.out;
    *n = l.n;
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Keys                                                                    */

static kms_result kms_name_check(const char *name)
{
    KMS_ENSURE(name != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(kms_key_name_valid(name, strnlen(name, KMS_KEY_NAME_MAX_BYTES + 1)),
               KMS_ERR_KEY_NAME_INVALID);
    return KMS_OK_RESULT;
}

typedef struct {
    const char *name;
    bool found;
    kms_rec_key key;
} kms_key_read_tx;

/* The key record of `name`, inside a transaction; KMS_ERR_KEY_NOT_FOUND if
 * there is none. */
static kms_result kms_txn_key_load(kms_txn *t, const char *name, kms_rec_key *out)
{
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_KEYS, name, strlen(name), &v, &vlen, &found));
    KMS_ENSURE(found, KMS_ERR_KEY_NOT_FOUND);
    return kms_rec_key_decode(v, vlen, out);
}

static kms_result kms_key_read_txn(kms_txn *t, void *arg)
{
    kms_key_read_tx *x = arg;
    const uint8_t *v;
    size_t vlen;
    KMS_GUARD(kms_txn_get(t, KMS_DB_KEYS, x->name, strlen(x->name), &v, &vlen, &x->found));
    if (x->found)
        KMS_GUARD(kms_rec_key_decode(v, vlen, &x->key));
    return KMS_OK_RESULT;
}

/* A fresh version secret generated in the HSM under the target master. */
static kms_result kms_version_generate(kms *k, uint8_t purpose, int64_t now, kms_rec_version *v)
{
    memset(v, 0, sizeof(*v));
    uint8_t master_id[KMS_HSM_ID_BYTES];
    KMS_GUARD(kms_master_target(k, &v->master_version, master_id));
    KMS_GUARD(kms_rand_bytes(v->uid, sizeof(v->uid)));
    kms_buf w KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&w, KMS_HSM_WRAPPED_MAX_BYTES);
    KMS_GUARD(kms_hsm_secret_generate(k->hsm, master_id, kms_purpose_secret_type(purpose), &w));
    KMS_ENSURE(w.len > 0 && w.len <= KMS_HSM_WRAPPED_MAX_BYTES, KMS_ERR_HSM_FAILED);
    memcpy(v->wrapped, w.data, w.len);
    v->wrapped_len = (uint16_t)w.len;
    v->state = KMS_VERSION_ACTIVE;
    v->created_at = now;
    v->primary_at = now;
    return KMS_OK_RESULT;
}

/* Inside a write transaction that stores a new version: is the master it
 * was wrapped under still current or pending? A master rotation retires the
 * old master in the same transaction that checks no version is left under
 * it (kms_mfinal_txn), and LMDB serialises writers across threads and
 * processes. So either this version commits first, and the master rotation
 * sees it and rewraps it in another pass, or the master is already retired
 * here, is about to be destroyed, and the version must not be stored. */
static kms_result kms_txn_master_live(kms_txn *t, uint32_t master_version, bool *live)
{
    uint8_t key[4];
    kms_rec_master_key(master_version, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_MASTERS, key, sizeof(key), &v, &vlen, &found));
    *live = false;
    if (found) {
        kms_rec_master m;
        KMS_GUARD(kms_rec_master_decode(v, vlen, &m));
        *live = m.state == KMS_MASTER_CURRENT || m.state == KMS_MASTER_PENDING;
    }
    return KMS_OK_RESULT;
}

/* Attempts at generating a version when master rotations keep finishing
 * between generation and commit (each one takes a full pass over every
 * version, so more than a couple in a row means something else is wrong). */
#define KMS_VERSION_COMMIT_ATTEMPTS 4

/* Generates *ver under the current target master and commits it with fn.
 * fn must call kms_txn_master_live first and, when the master is no longer
 * live, write nothing and set *stale; the version is then generated again
 * under the new target. A generation that finds the target master already
 * destroyed (HSM_OBJECT_MISSING) is the same race seen from the HSM side. */
static kms_result kms_version_commit(kms *k, uint8_t purpose, int64_t now, kms_rec_version *ver,
                                     bool *stale, kms_store_fn fn, void *arg)
{
    kms_result r = KMS_OK_RESULT;
    for (int attempt = 0; attempt < KMS_VERSION_COMMIT_ATTEMPTS; attempt++) {
        *stale = false;
        r = kms_version_generate(k, purpose, now, ver);
        if (r.err == KMS_ERR_HSM_OBJECT_MISSING)
            continue; /* the next kms_master_target reloads the masters */
        KMS_GUARD(r);
        KMS_GUARD(kms_write(k, fn, arg, true));
        if (!*stale)
            return KMS_OK_RESULT;
    }
    if (!kms_is_ok(r))
        return r;
    KMS_BAIL_MSG(KMS_ERR_STORE_BUSY, "the master key was rotated during every attempt");
}

typedef struct {
    const char *name;
    kms_rec_key key;
    kms_rec_version ver;
    bool stale_master; /* out: ver's master was retired meanwhile */
} kms_create_tx;

static kms_result kms_create_txn(kms_txn *t, void *arg)
{
    kms_create_tx *x = arg;
    bool live;
    KMS_GUARD(kms_txn_master_live(t, x->ver.master_version, &live));
    x->stale_master = !live;
    if (!live)
        return KMS_OK_RESULT;
    kms_buf kb KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf vb KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_key_encode(&x->key, &kb));
    KMS_GUARD(kms_rec_version_encode(&x->ver, &vb));
    KMS_GUARD(kms_txn_put(t, KMS_DB_KEYS, x->name, strlen(x->name), kb.data, kb.len, true));
    uint8_t vk[KMS_VERSION_KEY_MAX_BYTES];
    size_t vklen = kms_rec_version_key(x->name, 1, vk);
    return kms_txn_put(t, KMS_DB_VERSIONS, vk, vklen, vb.data, vb.len, true);
}

static kms_result kms_key_create_locked(kms *k, const kms_key_spec *spec, kms_key_info *out)
{
    kms_key_read_tx rd = {.name = spec->name};
    KMS_GUARD(kms_store_read(k->store, kms_key_read_txn, &rd));
    KMS_ENSURE(!rd.found, KMS_ERR_KEY_EXISTS);
    int64_t now = kms_now(k);
    kms_create_tx x = {.name = spec->name};
    x.key.purpose = (uint8_t)spec->purpose;
    x.key.primary_version = 1;
    x.key.latest_version = 1;
    x.key.min_decryption_version = 1;
    x.key.rotation_period_s =
        spec->rotation_period_s ? spec->rotation_period_s : k->cfg.default_rotation_period_s;
    x.key.warning_window_s =
        spec->warning_window_s ? spec->warning_window_s : k->cfg.default_warning_window_s;
    KMS_ENSURE_MSG(x.key.warning_window_s < x.key.rotation_period_s, KMS_ERR_INVALID_ARGUMENT,
                   "the warning window must be shorter than the rotation period");
    x.key.deletion_protection = spec->deletion_protection;
    x.key.created_at = now;
    x.key.rotated_at = now;
    kms_result r =
        kms_version_commit(k, x.key.purpose, now, &x.ver, &x.stale_master, kms_create_txn, &x);
    kms_secmem_wipe(&x.ver, sizeof(x.ver));
    KMS_GUARD(r);
    if (out != NULL)
        kms_key_info_fill(spec->name, &x.key, out);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_key_create(kms *k, const kms_caller *c, const kms_key_spec *spec, kms_key_info *out)
{
    KMS_ENSURE(k != NULL && spec != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_caller_check(c));
    KMS_GUARD(kms_name_check(spec->name));
    KMS_ENSURE(spec->purpose == KMS_PURPOSE_ENCRYPT || spec->purpose == KMS_PURPOSE_MAC,
               KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(spec->rotation_period_s >= 0 && spec->warning_window_s >= 0,
               KMS_ERR_INVALID_ARGUMENT);
    pthread_mutex_lock(&k->admin_mu);
    kms_result r = kms_key_create_locked(k, spec, out);
    pthread_mutex_unlock(&k->admin_mu);
    return r;
}

KMS_RESULT kms_key_get(kms *k, const char *name, kms_key_info *out)
{
    KMS_ENSURE(k != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_name_check(name));
    kms_key_read_tx rd = {.name = name};
    KMS_GUARD(kms_store_read(k->store, kms_key_read_txn, &rd));
    KMS_ENSURE(rd.found, KMS_ERR_KEY_NOT_FOUND);
    kms_key_info_fill(name, &rd.key, out);
    return KMS_OK_RESULT;
}

typedef struct {
    const char *after;
    size_t limit;
    kms_key_info *out;
    size_t n;
} kms_list_tx;

static kms_result kms_list_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                void *arg, bool *stop)
{
    kms_list_tx *x = arg;
    KMS_ENSURE(klen >= 1 && klen <= KMS_KEY_NAME_MAX_BYTES, KMS_ERR_STORE_CORRUPT);
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    memcpy(name, key, klen);
    name[klen] = '\0';
    if (x->after != NULL && strcmp(name, x->after) <= 0)
        return KMS_OK_RESULT;
    kms_rec_key rec;
    KMS_GUARD(kms_rec_key_decode(val, vlen, &rec));
    kms_key_info_fill(name, &rec, &x->out[x->n++]);
    if (x->n >= x->limit)
        *stop = true;
    return KMS_OK_RESULT;
}

static kms_result kms_list_txn(kms_txn *t, void *arg)
{
    kms_list_tx *x = arg;
    x->n = 0;
    size_t alen = x->after != NULL ? strlen(x->after) : 0;
    return kms_txn_scan(t, KMS_DB_KEYS, x->after, alen, NULL, 0, kms_list_scan, x);
}

KMS_RESULT kms_key_list(kms *k, const char *after, size_t limit, kms_key_info **out, size_t *n)
{
    KMS_ENSURE(k != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    if (after != NULL && after[0] == '\0')
        after = NULL;
    if (after != NULL)
        KMS_ENSURE(strlen(after) <= KMS_KEY_NAME_MAX_BYTES, KMS_ERR_KEY_NAME_INVALID);
    if (limit == 0)
        limit = KMS_LIST_LIMIT_DEFAULT;
    KMS_ENSURE(limit <= KMS_LIST_LIMIT_MAX, KMS_ERR_LIMIT_EXCEEDED);
    kms_list_tx x = {.after = after, .limit = limit};
    x.out = calloc(limit, sizeof(*x.out));
    KMS_ENSURE(x.out != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = kms_store_read(k->store, kms_list_txn, &x);
    if (!kms_is_ok(r)) {
        free(x.out);
        return r;
    }
    *out = x.out;
    *n = x.n;
    return KMS_OK_RESULT;
}

/* Overlays this process's counters, if the version is cached. */
static void kms_info_overlay(kms *k, const char *name, kms_version_info *info, size_t n,
                             const kms_rec_version *recs, int64_t now)
{
    pthread_rwlock_rdlock(&k->cache_lock);
    kms_keyent *e = kms_cache_find_locked(k, name);
    for (size_t i = 0; i < n; i++) {
        const kms_ver *ve = e != NULL && i < e->nvers ? e->vers[i] : NULL;
        kms_version_info_fill(k, &recs[i], (uint32_t)(i + 1), ve, now, &info[i]);
    }
    pthread_rwlock_unlock(&k->cache_lock);
}

/* Lazily completes destructions that have come due (any access). */
static kms_result kms_destroy_due(kms *k, const char *name, const kms_rec_version *recs, size_t n,
                                  int64_t now)
{
    for (size_t i = 0; i < n; i++)
        if (kms_version_destroy_due(&recs[i], now))
            KMS_GUARD(kms_version_destroy_now(k, name, (uint32_t)(i + 1)));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_key_versions(kms *k, const char *name, kms_version_info **out, size_t *n)
{
    KMS_ENSURE(k != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_name_check(name));
    kms_key_load l = {.name = name, .name_len = strlen(name)};
    kms_result r = kms_store_read(k->store, kms_key_load_txn, &l);
    if (kms_is_ok(r) && !l.found)
        r = kms_error_raise(KMS_ERR_KEY_NOT_FOUND, __FILE__, __LINE__);
    kms_version_info *info = NULL;
    if (kms_is_ok(r)) {
        info = calloc(l.n ? l.n : 1, sizeof(*info));
        if (info == NULL)
            r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    }
    if (kms_is_ok(r)) {
        int64_t now = kms_now(k);
        kms_info_overlay(k, name, info, l.n, l.recs, now);
        r = kms_destroy_due(k, name, l.recs, l.n, now);
    }
    if (!kms_is_ok(r)) {
        free(info);
        kms_key_load_free(&l);
        return r;
    }
    *out = info;
    *n = l.n;
    kms_key_load_free(&l);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_version_get(kms *k, const char *name, uint32_t version, kms_version_info *out)
{
    KMS_ENSURE(out != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_version_info *all = NULL;
    size_t n = 0;
    KMS_GUARD(kms_key_versions(k, name, &all, &n));
    if (version == 0 || version > n) {
        free(all);
        KMS_BAIL(KMS_ERR_VERSION_NOT_FOUND);
    }
    *out = all[version - 1];
    free(all);
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Version state changes                                                   */

typedef struct {
    const char *name;
    uint32_t version;
    int64_t now;
    kms_rec_version rec; /* out */
    bool evict;
} kms_destroy_tx;

static kms_result kms_destroy_txn(kms_txn *t, void *arg)
{
    kms_destroy_tx *x = arg;
    x->evict = false;
    uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
    size_t klen = kms_rec_version_key(x->name, x->version, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, key, klen, &v, &vlen, &found));
    if (!found)
        return KMS_OK_RESULT; /* the caller reports the missing key or version */
    KMS_GUARD(kms_rec_version_decode(v, vlen, &x->rec));
    if (!kms_version_destroy_due(&x->rec, x->now))
        return KMS_OK_RESULT; /* already destroyed, or cancelled meanwhile */
    /* The wrapped secret is erased: without it no HSM can recover the
     * version, whatever master keys survive. Irreversible by design. */
    kms_secmem_wipe(x->rec.wrapped, sizeof(x->rec.wrapped));
    x->rec.wrapped_len = 0;
    x->rec.state = KMS_VERSION_DESTROYED;
    x->evict = true;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_version_encode(&x->rec, &b));
    return kms_txn_put(t, KMS_DB_VERSIONS, key, klen, b.data, b.len, false);
}

typedef struct {
    const char *name;
    uint32_t version;
    int64_t now;
    bool changed;
    uint8_t uid[KMS_HSM_UID_BYTES];
} kms_expire_tx;

static kms_result kms_expire_txn(kms_txn *t, void *arg)
{
    kms_expire_tx *x = arg;
    x->changed = false;
    uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
    size_t klen = kms_rec_version_key(x->name, x->version, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, key, klen, &v, &vlen, &found));
    if (!found)
        return KMS_OK_RESULT;
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(v, vlen, &rec));
    kms_result r = KMS_OK_RESULT;
    if (rec.state == KMS_VERSION_DEPRECATED && rec.grace_until != 0 && x->now >= rec.grace_until) {
        rec.state = KMS_VERSION_DISABLED;
        rec.grace_until = 0;
        memcpy(x->uid, rec.uid, sizeof(x->uid));
        kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
        r = kms_rec_version_encode(&rec, &b);
        if (kms_is_ok(r))
            r = kms_txn_put(t, KMS_DB_VERSIONS, key, klen, b.data, b.len, false);
        x->changed = kms_is_ok(r);
    }
    kms_secmem_wipe(&rec, sizeof(rec));
    return r;
}

KMS_RESULT kms_version_expire_now(kms *k, const char *name, uint32_t version, int64_t now,
                                  bool *changed)
{
    kms_expire_tx x = {.name = name, .version = version, .now = now};
    KMS_GUARD(kms_write(k, kms_expire_txn, &x, true));
    if (x.changed)
        kms_hsm_cache_evict(k->hsm, x.uid);
    *changed = x.changed;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_version_destroy_now(kms *k, const char *name, uint32_t version)
{
    kms_destroy_tx x = {.name = name, .version = version, .now = kms_now(k)};
    kms_result r = kms_write(k, kms_destroy_txn, &x, true);
    if (kms_is_ok(r) && x.evict)
        kms_hsm_cache_evict(k->hsm, x.rec.uid);
    kms_secmem_wipe(&x.rec, sizeof(x.rec));
    return r;
}

typedef struct {
    const char *name;
    uint32_t version;
    kms_version_action action;
    int64_t arg;
    int64_t now;
    kms_rec_key key;     /* out */
    kms_rec_version rec; /* out */
} kms_state_tx;

static kms_result kms_state_apply(kms_state_tx *x)
{
    kms_rec_version *v = &x->rec;
    kms_version_state eff = kms_version_effective(v, x->now);
    bool primary = x->version == x->key.primary_version;
    bool pending = eff != KMS_VERSION_DESTROYED && v->destroy_at != 0;
    KMS_ENSURE_MSG(eff != KMS_VERSION_DESTROYED, KMS_ERR_STATE_TRANSITION,
                   "version %u is destroyed", x->version);
    switch (x->action) {
    case KMS_ACTION_DEPRECATE:
        KMS_ENSURE(x->arg >= 0, KMS_ERR_INVALID_ARGUMENT);
        KMS_ENSURE_MSG(!primary, KMS_ERR_STATE_TRANSITION, "rotate first: %u is the primary",
                       x->version);
        KMS_ENSURE(eff == KMS_VERSION_ACTIVE, KMS_ERR_STATE_TRANSITION);
        v->state = KMS_VERSION_DEPRECATED;
        v->deprecated_at = x->now;
        v->grace_until = x->now + (x->arg ? x->arg : KMS_DEFAULT_GRACE_S);
        return KMS_OK_RESULT;
    case KMS_ACTION_COMPROMISE:
        KMS_ENSURE_MSG(!primary, KMS_ERR_STATE_TRANSITION,
                       "rotate first (an emergency rotation compromises the primary itself)");
        KMS_ENSURE(!pending && (eff == KMS_VERSION_ACTIVE || eff == KMS_VERSION_DEPRECATED ||
                                eff == KMS_VERSION_DISABLED),
                   KMS_ERR_STATE_TRANSITION);
        v->state = KMS_VERSION_COMPROMISED;
        v->grace_until = 0;
        return KMS_OK_RESULT;
    case KMS_ACTION_DISABLE:
        KMS_ENSURE_MSG(!primary, KMS_ERR_STATE_TRANSITION, "rotate first: %u is the primary",
                       x->version);
        /* From compromised, disable would make a later enable a way back
         * to active: a compromised version only goes on to destruction. */
        KMS_ENSURE(v->state == KMS_VERSION_ACTIVE || v->state == KMS_VERSION_DEPRECATED,
                   KMS_ERR_STATE_TRANSITION);
        v->state = KMS_VERSION_DISABLED;
        v->grace_until = 0;
        return KMS_OK_RESULT;
    case KMS_ACTION_ENABLE:
        KMS_ENSURE(!pending &&
                       (v->state == KMS_VERSION_DISABLED || v->state == KMS_VERSION_DEPRECATED),
                   KMS_ERR_STATE_TRANSITION);
        v->state = KMS_VERSION_ACTIVE;
        v->deprecated_at = 0;
        v->grace_until = 0;
        return KMS_OK_RESULT;
    case KMS_ACTION_SCHEDULE_DESTROY: {
        int64_t wait = x->arg ? x->arg : KMS_DESTROY_WAIT_MAX_S;
        KMS_ENSURE_MSG(wait >= KMS_DESTROY_WAIT_MIN_S && wait <= KMS_DESTROY_WAIT_MAX_S,
                       KMS_ERR_INVALID_ARGUMENT, "waiting period must be 7 to 30 days");
        KMS_ENSURE_MSG(!primary, KMS_ERR_STATE_TRANSITION, "rotate first: %u is the primary",
                       x->version);
        KMS_ENSURE_MSG(!x->key.deletion_protection, KMS_ERR_PROTECTED, "deletion protection is on");
        KMS_ENSURE_MSG(x->version < x->key.min_decryption_version, KMS_ERR_PROTECTED,
                       "raise min_decryption_version above %u first", x->version);
        KMS_ENSURE(!pending, KMS_ERR_STATE_TRANSITION);
        /* Unusable while pending: reported as disabled with destroy_at. */
        v->state = KMS_VERSION_DISABLED;
        v->grace_until = 0;
        v->destroy_at = x->now + wait;
        return KMS_OK_RESULT;
    }
    case KMS_ACTION_CANCEL_DESTROY:
        KMS_ENSURE(pending, KMS_ERR_STATE_TRANSITION);
        v->state = KMS_VERSION_DISABLED;
        v->destroy_at = 0;
        return KMS_OK_RESULT;
    default:
        KMS_BAIL(KMS_ERR_INVALID_ARGUMENT);
    }
}

static kms_result kms_state_txn(kms_txn *t, void *arg)
{
    kms_state_tx *x = arg;
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_key_load(t, x->name, &x->key));
    uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
    size_t klen = kms_rec_version_key(x->name, x->version, key);
    KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, key, klen, &v, &vlen, &found));
    KMS_ENSURE(found, KMS_ERR_VERSION_NOT_FOUND);
    KMS_GUARD(kms_rec_version_decode(v, vlen, &x->rec));
    KMS_GUARD(kms_state_apply(x));
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_version_encode(&x->rec, &b));
    return kms_txn_put(t, KMS_DB_VERSIONS, key, klen, b.data, b.len, false);
}

KMS_RESULT kms_version_set_state(kms *k, const kms_caller *c, const char *name, uint32_t version,
                                 kms_version_action action, int64_t arg, const char *reason,
                                 kms_version_info *out)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_caller_check(c));
    KMS_GUARD(kms_name_check(name));
    KMS_ENSURE(reason == NULL || strlen(reason) <= KMS_REASON_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED);
    KMS_ENSURE(version >= 1, KMS_ERR_VERSION_NOT_FOUND);
    pthread_mutex_lock(&k->admin_mu);
    kms_state_tx x = {.name = name, .version = version, .action = action, .arg = arg};
    x.now = kms_now(k);
    /* A destruction that has come due happens first, so that no action
     * can act on a version that is already gone in all but the record. */
    kms_result r = kms_version_destroy_now(k, name, version);
    if (kms_is_ok(r))
        r = kms_write(k, kms_state_txn, &x, true);
    pthread_mutex_unlock(&k->admin_mu);
    if (kms_is_ok(r) && x.rec.state != KMS_VERSION_ACTIVE && x.rec.state != KMS_VERSION_DEPRECATED)
        kms_hsm_cache_evict(k->hsm, x.rec.uid);
    if (kms_is_ok(r) && out != NULL) {
        kms_version_info_fill(k, &x.rec, version, NULL, x.now, out);
        kms_version_info tmp;
        if (kms_is_ok(kms_version_get(k, name, version, &tmp)))
            *out = tmp; /* with this process's counters */
    }
    kms_secmem_wipe(&x.rec, sizeof(x.rec));
    return r;
}

/* ---------------------------------------------------------------------- */
/* Policy                                                                  */

typedef struct {
    const char *name;
    const kms_key_update *u;
    kms_rec_key key; /* out */
} kms_policy_tx;

static kms_result kms_policy_txn(kms_txn *t, void *arg)
{
    kms_policy_tx *x = arg;
    KMS_GUARD(kms_txn_key_load(t, x->name, &x->key));
    const kms_key_update *u = x->u;
    if (u->rotation_period_s != 0)
        x->key.rotation_period_s = u->rotation_period_s;
    if (u->warning_window_s != 0)
        x->key.warning_window_s = u->warning_window_s;
    KMS_ENSURE_MSG(x->key.warning_window_s < x->key.rotation_period_s, KMS_ERR_INVALID_ARGUMENT,
                   "the warning window must be shorter than the rotation period");
    if (u->min_decryption_version != 0) {
        KMS_ENSURE_MSG(u->min_decryption_version <= x->key.primary_version, KMS_ERR_CONFLICT,
                       "min_decryption_version cannot exceed the primary version %u",
                       x->key.primary_version);
        x->key.min_decryption_version = u->min_decryption_version;
    }
    if (u->deletion_protection >= 0)
        x->key.deletion_protection = u->deletion_protection == 1;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_key_encode(&x->key, &b));
    return kms_txn_put(t, KMS_DB_KEYS, x->name, strlen(x->name), b.data, b.len, false);
}

KMS_RESULT kms_key_update_policy(kms *k, const kms_caller *c, const char *name,
                                 const kms_key_update *u, kms_key_info *out)
{
    KMS_ENSURE(k != NULL && u != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_caller_check(c));
    KMS_GUARD(kms_name_check(name));
    KMS_ENSURE(u->rotation_period_s >= 0 && u->warning_window_s >= 0 &&
                   u->deletion_protection >= -1 && u->deletion_protection <= 1,
               KMS_ERR_INVALID_ARGUMENT);
    pthread_mutex_lock(&k->admin_mu);
    kms_policy_tx x = {.name = name, .u = u};
    kms_result r = kms_write(k, kms_policy_txn, &x, true);
    pthread_mutex_unlock(&k->admin_mu);
    KMS_GUARD(r);
    if (out != NULL)
        kms_key_info_fill(name, &x.key, out);
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Rotation and rollback                                                   */

typedef struct {
    const char *name;
    kms_rec_rotation *rot;
    kms_rec_version ver; /* generated */
    int64_t now;
    kms_rec_key key; /* out */
    /* Scheduler: rotate only if due at `now` (jitter window below), judged
     * from rotated_at inside this transaction; else skipped, nothing written. */
    bool if_due;
    int64_t jitter_window_s;
    bool skipped;      /* out */
    bool stale_master; /* out: ver's master was retired meanwhile */
} kms_rotate_tx;

static kms_result kms_rotate_txn(kms_txn *t, void *arg)
{
    kms_rotate_tx *x = arg;
    const uint8_t *v;
    size_t vlen;
    bool found;
    bool live;
    KMS_GUARD(kms_txn_master_live(t, x->ver.master_version, &live));
    x->stale_master = !live;
    if (!live)
        return KMS_OK_RESULT;
    KMS_GUARD(kms_txn_key_load(t, x->name, &x->key));
    if (x->if_due) {
        int64_t lead = kms_schedule_lead(x->name, x->jitter_window_s, x->key.warning_window_s);
        x->skipped = x->now < x->key.rotated_at + x->key.rotation_period_s - lead;
        if (x->skipped)
            return KMS_OK_RESULT; /* rotated meanwhile, by this or another process */
    }
    uint32_t from = x->key.primary_version;
    KMS_ENSURE(x->key.latest_version < UINT32_MAX, KMS_ERR_LIMIT_EXCEEDED);
    uint32_t to = x->key.latest_version + 1;

    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    uint8_t vk[KMS_VERSION_KEY_MAX_BYTES];
    size_t vklen;
    if (x->rot->info.type == KMS_ROTATION_EMERGENCY) {
        vklen = kms_rec_version_key(x->name, from, vk);
        KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, vk, vklen, &v, &vlen, &found));
        KMS_ENSURE(found, KMS_ERR_STORE_CORRUPT);
        kms_rec_version old;
        KMS_GUARD(kms_rec_version_decode(v, vlen, &old));
        if (old.state != KMS_VERSION_DESTROYED) {
            old.state = KMS_VERSION_COMPROMISED;
            old.grace_until = 0;
            KMS_GUARD(kms_rec_version_encode(&old, &b));
            KMS_GUARD(kms_txn_put(t, KMS_DB_VERSIONS, vk, vklen, b.data, b.len, false));
            kms_buf_reset(&b);
        }
        kms_secmem_wipe(&old, sizeof(old));
    }
    vklen = kms_rec_version_key(x->name, to, vk);
    KMS_GUARD(kms_rec_version_encode(&x->ver, &b));
    KMS_GUARD(kms_txn_put(t, KMS_DB_VERSIONS, vk, vklen, b.data, b.len, true));
    kms_buf_reset(&b);
    x->key.latest_version = to;
    x->key.primary_version = to;
    x->key.rotated_at = x->now;
    KMS_GUARD(kms_rec_key_encode(&x->key, &b));
    KMS_GUARD(kms_txn_put(t, KMS_DB_KEYS, x->name, strlen(x->name), b.data, b.len, false));
    x->rot->info.from_version = from;
    x->rot->info.to_version = to;
    x->rot->info.status = KMS_ROTATION_SUCCEEDED;
    x->rot->info.finished_at = x->now;
    return kms_rotation_put(t, x->rot);
}

static kms_result kms_key_rotate_locked(kms *k, const kms_caller *c, const char *name,
                                        kms_rotation_type type, const char *reason,
                                        kms_rotation_info *out)
{
    kms_key_read_tx rd = {.name = name};
    KMS_GUARD(kms_store_read(k->store, kms_key_read_txn, &rd));
    KMS_ENSURE(rd.found, KMS_ERR_KEY_NOT_FOUND);
    kms_rec_rotation rot;
    KMS_GUARD(kms_rotation_new(k, c, name, type, reason, &rot));
    rot.info.from_version = rd.key.primary_version;
    rot.info.to_version = rd.key.latest_version + 1;
    /* Transaction 1: the intent. A crash after it leaves a `started`
     * record and no version; kms_check marks it failed. */
    KMS_GUARD(kms_write(k, kms_rotation_put_txn, &rot, false));

    kms_rotate_tx x = {.name = name, .rot = &rot};
    x.now = kms_now(k);
    /* Transaction 2: the new version, primary, and the record succeeded,
     * all at once. */
    kms_result r =
        kms_version_commit(k, rd.key.purpose, x.now, &x.ver, &x.stale_master, kms_rotate_txn, &x);
    kms_secmem_wipe(&x.ver, sizeof(x.ver));
    if (!kms_is_ok(r)) {
        /* The record says failed; the caller gets the failure that stopped
         * the rotation (a successful write leaves the error slot alone). */
        rot.info.from_version = rd.key.primary_version;
        if (!kms_is_ok(kms_rotation_finish(k, &rot, KMS_ROTATION_FAILED)))
            fprintf(stderr, "kms: warning: rotation %s of %s could not be marked failed\n",
                    rot.info.id, name);
        return r;
    }
    if (out != NULL)
        *out = rot.info;
    return KMS_OK_RESULT;
}

/* The scheduler's rotation. Unlike a manual one it writes nothing before
 * the HSM has generated the new secret: the single write transaction
 * decides "due" from the stored rotated_at and, only if still due, stores
 * the version, the new primary and the succeeded record together. A
 * process that lost the race (or a tick repeated after a restart) skips,
 * having spent one HSM generation; it never rotates a key twice. */
KMS_RESULT kms_key_rotate_if_due(kms *k, const char *name, int64_t jitter_window_s,
                                 kms_rotation_info *out, bool *rotated)
{
    KMS_ENSURE(k != NULL && rotated != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_name_check(name));
    *rotated = false;
    kms_caller sys = {.identity = "system"};
    pthread_mutex_lock(&k->admin_mu);
    kms_key_read_tx rd = {.name = name};
    kms_rec_rotation rot;
    kms_rotate_tx x = {
        .name = name, .rot = &rot, .if_due = true, .jitter_window_s = jitter_window_s};
    kms_result r = kms_store_read(k->store, kms_key_read_txn, &rd);
    if (kms_is_ok(r) && !rd.found)
        r = kms_error_raise(KMS_ERR_KEY_NOT_FOUND, __FILE__, __LINE__);
    if (kms_is_ok(r))
        r = kms_rotation_new(k, &sys, name, KMS_ROTATION_SCHEDULED, "rotation period elapsed",
                             &rot);
    bool have_rot = kms_is_ok(r);
    if (kms_is_ok(r)) {
        rot.info.from_version = rd.key.primary_version;
        rot.info.to_version = rd.key.latest_version + 1;
        x.now = kms_now(k);
        r = kms_version_commit(k, rd.key.purpose, x.now, &x.ver, &x.stale_master, kms_rotate_txn,
                               &x);
    }
    kms_secmem_wipe(&x.ver, sizeof(x.ver));
    if (!kms_is_ok(r) && have_rot) {
        /* A failed scheduled rotation is on the record: it counts against
         * the success rate. (A skipped one is not a failure: no record.) */
        if (!kms_is_ok(kms_rotation_finish(k, &rot, KMS_ROTATION_FAILED)))
            fprintf(stderr, "kms: warning: rotation %s of %s could not be marked failed\n",
                    rot.info.id, name);
    }
    pthread_mutex_unlock(&k->admin_mu);
    KMS_GUARD(r);
    *rotated = !x.skipped;
    if (*rotated && out != NULL)
        *out = rot.info;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_key_rotate(kms *k, const kms_caller *c, const char *name, kms_rotation_type type,
                          const char *reason, kms_rotation_info *out)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_name_check(name));
    KMS_ENSURE(type == KMS_ROTATION_SCHEDULED || type == KMS_ROTATION_MANUAL ||
                   type == KMS_ROTATION_EMERGENCY,
               KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_caller_check(c));
    pthread_mutex_lock(&k->admin_mu);
    kms_result r = kms_key_rotate_locked(k, c, name, type, reason, out);
    pthread_mutex_unlock(&k->admin_mu);
    return r;
}

typedef struct {
    const char *name;
    uint32_t to_version;
    bool found;
    uint8_t key[KMS_ROTATION_KEY_BYTES];
    kms_rec_rotation rec;
} kms_rb_find;

static kms_result kms_rb_find_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                   void *arg, bool *stop)
{
    kms_rb_find *f = arg;
    kms_rec_rotation r;
    KMS_GUARD(kms_rec_rotation_decode(val, vlen, &r));
    if (strcmp(r.info.key, f->name) == 0 && r.info.to_version == f->to_version &&
        r.info.status == KMS_ROTATION_SUCCEEDED && r.info.type != KMS_ROTATION_MASTER &&
        klen == KMS_ROTATION_KEY_BYTES) {
        f->found = true; /* the latest one wins: records are in time order */
        memcpy(f->key, key, klen);
        f->rec = r;
    }
    return KMS_OK_RESULT;
}

typedef struct {
    const char *name;
    kms_rec_rotation *rot;
    int64_t now;
    kms_rec_key key; /* out */
} kms_rollback_tx;

static kms_result kms_rollback_txn(kms_txn *t, void *arg)
{
    kms_rollback_tx *x = arg;
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_key_load(t, x->name, &x->key));
    uint32_t from = x->key.primary_version;
    uint32_t floor = x->key.min_decryption_version > 1 ? x->key.min_decryption_version : 1;
    uint32_t to = 0;
    kms_rec_version rec;
    uint8_t vk[KMS_VERSION_KEY_MAX_BYTES];
    size_t vklen = 0;
    for (uint32_t cand = from - 1; cand >= floor && cand >= 1; cand--) {
        vklen = kms_rec_version_key(x->name, cand, vk);
        KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, vk, vklen, &v, &vlen, &found));
        KMS_ENSURE(found, KMS_ERR_STORE_CORRUPT);
        KMS_GUARD(kms_rec_version_decode(v, vlen, &rec));
        if (kms_version_effective(&rec, x->now) == KMS_VERSION_ACTIVE) {
            to = cand;
            break;
        }
    }
    KMS_ENSURE_MSG(to != 0, KMS_ERR_CONFLICT, "no earlier active version to roll back to");
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    rec.primary_at = x->now;
    KMS_GUARD(kms_rec_version_encode(&rec, &b));
    kms_secmem_wipe(&rec, sizeof(rec));
    KMS_GUARD(kms_txn_put(t, KMS_DB_VERSIONS, vk, vklen, b.data, b.len, false));
    kms_buf_reset(&b);
    x->key.primary_version = to;
    x->key.rotated_at = x->now;
    KMS_GUARD(kms_rec_key_encode(&x->key, &b));
    KMS_GUARD(kms_txn_put(t, KMS_DB_KEYS, x->name, strlen(x->name), b.data, b.len, false));

    /* The rotation that made `from` primary is rolled back. */
    kms_rb_find f = {.name = x->name, .to_version = from};
    KMS_GUARD(kms_txn_scan(t, KMS_DB_ROTATIONS, NULL, 0, NULL, 0, kms_rb_find_scan, &f));
    if (f.found) {
        f.rec.info.status = KMS_ROTATION_ROLLED_BACK;
        KMS_GUARD(kms_rotation_put(t, &f.rec));
    }
    x->rot->info.from_version = from;
    x->rot->info.to_version = to;
    x->rot->info.status = KMS_ROTATION_SUCCEEDED;
    x->rot->info.finished_at = x->now;
    return kms_rotation_put(t, x->rot);
}

KMS_RESULT kms_key_rollback(kms *k, const kms_caller *c, const char *name, const char *reason,
                            kms_rotation_info *out)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_name_check(name));
    pthread_mutex_lock(&k->admin_mu);
    kms_rec_rotation rot;
    kms_result r = kms_rotation_new(k, c, name, KMS_ROTATION_ROLLBACK, reason, &rot);
    kms_rollback_tx x = {.name = name, .rot = &rot};
    x.now = rot.info.started_at;
    if (kms_is_ok(r))
        r = kms_write(k, kms_rollback_txn, &x, true);
    pthread_mutex_unlock(&k->admin_mu);
    KMS_GUARD(r);
    if (out != NULL)
        *out = rot.info;
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Stats                                                                   */

typedef struct {
    int64_t now;
    kms_stats *s;
} kms_stats_tx;

static kms_result kms_stats_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                 void *arg, bool *stop)
{
    kms_stats_tx *x = arg;
    kms_rec_key rec;
    KMS_GUARD(kms_rec_key_decode(val, vlen, &rec));
    x->s->keys++;
    int64_t due = rec.rotated_at + rec.rotation_period_s;
    if (x->now >= due)
        x->s->keys_overdue++;
    else if (x->now >= due - rec.warning_window_s)
        x->s->keys_due++;
    return KMS_OK_RESULT;
}

static kms_result kms_stats_txn(kms_txn *t, void *arg)
{
    kms_stats_tx *x = arg;
    x->s->keys = x->s->keys_due = x->s->keys_overdue = 0;
    return kms_txn_scan(t, KMS_DB_KEYS, NULL, 0, NULL, 0, kms_stats_scan, x);
}

KMS_RESULT kms_stats_get(kms *k, kms_stats *out)
{
    KMS_ENSURE(k != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(out, 0, sizeof(*out));
    kms_stats_tx x = {.now = kms_now(k), .s = out};
    KMS_GUARD(kms_store_read(k->store, kms_stats_txn, &x));
    kms_hsm_stats_get(k->hsm, &out->hsm);
    kms_store_sizes(k->store, &out->store_map_size, &out->store_used_bytes,
                    &out->store_limit_bytes);
    return KMS_OK_RESULT;
}

static kms_result kms_ready_txn(kms_txn *t, void *arg)
{
    size_t n;
    return kms_txn_count(t, KMS_DB_KEYS, &n);
}

KMS_RESULT kms_ready(kms *k)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_store_read(k->store, kms_ready_txn, NULL));
    return kms_hsm_ping(k->hsm);
}

KMS_RESULT kms_backup(kms *k, const char *dir)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    /* The copy holds every record answered so far, not only those the
     * journal has handed over. */
    KMS_GUARD(kms_audit_flush(k));
    return kms_store_backup(k->store, dir);
}
