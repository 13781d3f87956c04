/*
 * Master key versions and master rotation.
 *
 * Rotation steps and why each crash point is safe:
 *  1. Create the new master object on the token. A crash here leaves an
 *     object no record names: kms_check finds it as an orphan.
 *  2. Transaction: the new master `pending` + a rotation record `started`.
 *     From here on new version secrets are generated under the pending
 *     master, so nothing new lands under the old one.
 *  3. Rewrap every version blob inside the HSM (unwrap under its master,
 *     wrap under the new one), in batches of KMS_MASTER_BATCH per write
 *     transaction. Each version records the master it is wrapped under and
 *     both masters exist, so after a crash mid-way every version is still
 *     readable; the next kms_open or kms_master_rotate resumes.
 *  4. Transaction: checks that no version is left under another master,
 *     makes the new one current, retires the others, marks the record
 *     `succeeded`.
 *  5. Destroy retired masters on the token. A crash before leaves retired
 *     masters on the token: kms_check destroys them.
 */
#include "kms_internal.h"

#include "kms_secmem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KMS_MASTER_BATCH      256
#define KMS_MASTER_PASSES_MAX 64

typedef struct {
    int64_t now;
    uint8_t id[KMS_HSM_ID_BYTES];
    bool raced;
} kms_boot_tx;

static kms_result kms_boot_txn(kms_txn *t, void *arg)
{
    kms_boot_tx *x = arg;
    size_t n;
    KMS_GUARD(kms_txn_count(t, KMS_DB_MASTERS, &n));
    x->raced = n != 0; /* another process bootstrapped first */
    if (x->raced)
        return KMS_OK_RESULT;
    kms_rec_master m = {.state = KMS_MASTER_CURRENT, .created_at = x->now};
    memcpy(m.id, x->id, sizeof(m.id));
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_master_encode(&m, &b));
    uint8_t key[4];
    kms_rec_master_key(1, key);
    return kms_txn_put(t, KMS_DB_MASTERS, key, sizeof(key), b.data, b.len, true);
}

KMS_RESULT kms_master_bootstrap(kms *k)
{
    kms_boot_tx x = {.now = kms_now(k)};
    KMS_GUARD(kms_hsm_master_create(k->hsm, x.id));
    kms_result r = kms_write(k, kms_boot_txn, &x, true);
    if (!kms_is_ok(r) || x.raced) {
        kms_result d = kms_hsm_master_destroy(k->hsm, x.id);
        (void)d; /* if this fails too, kms_check reports the orphan */
    }
    KMS_GUARD(r);
    return kms_masters_refresh(k);
}

/* ---------------------------------------------------------------------- */

/* Live (not destroyed) versions per master version. */
KMS_RESULT kms_mtally_add(kms_mtally *t, uint32_t master_version)
{
    for (size_t i = 0; i < t->n; i++) {
        if (t->mv[i] == master_version) {
            t->count[i]++;
            return KMS_OK_RESULT;
        }
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        uint32_t *m = realloc(t->mv, cap * sizeof(*m));
        KMS_ENSURE(m != NULL, KMS_ERR_NO_MEMORY);
        t->mv = m;
        uint64_t *n = realloc(t->count, cap * sizeof(*n));
        KMS_ENSURE(n != NULL, KMS_ERR_NO_MEMORY);
        t->count = n;
        t->cap = cap;
    }
    t->mv[t->n] = master_version;
    t->count[t->n] = 1;
    t->n++;
    return KMS_OK_RESULT;
}

uint64_t kms_mtally_of(const kms_mtally *t, uint32_t master_version)
{
    for (size_t i = 0; i < t->n; i++)
        if (t->mv[i] == master_version)
            return t->count[i];
    return 0;
}

void kms_mtally_free(kms_mtally *t)
{
    free(t->mv);
    free(t->count);
    memset(t, 0, sizeof(*t));
}

typedef struct {
    uint32_t target;
    kms_mtally tally;
    uint64_t older; /* live versions under a master older than target */
} kms_mcount;

static kms_result kms_mcount_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                  void *arg, bool *stop)
{
    kms_mcount *c = arg;
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(val, vlen, &rec));
    uint32_t mv = rec.master_version;
    bool live = rec.state != KMS_VERSION_DESTROYED;
    kms_secmem_wipe(&rec, sizeof(rec));
    if (!live)
        return KMS_OK_RESULT;
    if (mv < c->target)
        c->older++;
    return kms_mtally_add(&c->tally, mv);
}

typedef struct {
    kms_mcount *c;
    kms_master_info *out;
    size_t n;
} kms_mlist_tx;

static kms_result kms_mlist_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                 void *arg, bool *stop)
{
    kms_mlist_tx *x = arg;
    uint32_t v;
    kms_rec_master m;
    KMS_GUARD(kms_rec_master_key_parse(key, klen, &v));
    KMS_GUARD(kms_rec_master_decode(val, vlen, &m));
    kms_master_info *i = &x->out[x->n++];
    memset(i, 0, sizeof(*i));
    i->version = v;
    i->created_at = m.created_at;
    i->retired_at = m.retired_at;
    i->current = m.state == KMS_MASTER_CURRENT;
    i->versions_wrapped = kms_mtally_of(&x->c->tally, v);
    return KMS_OK_RESULT;
}

static kms_result kms_mlist_txn(kms_txn *t, void *arg)
{
    kms_mlist_tx *x = arg;
    x->n = 0;
    x->c->tally.n = 0;
    KMS_GUARD(kms_txn_scan(t, KMS_DB_VERSIONS, NULL, 0, NULL, 0, kms_mcount_scan, x->c));
    size_t n;
    KMS_GUARD(kms_txn_count(t, KMS_DB_MASTERS, &n));
    x->out = calloc(n ? n : 1, sizeof(*x->out));
    KMS_ENSURE(x->out != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = kms_txn_scan(t, KMS_DB_MASTERS, NULL, 0, NULL, 0, kms_mlist_scan, x);
    if (!kms_is_ok(r)) {
        free(x->out);
        x->out = NULL;
    }
    return r;
}

KMS_RESULT kms_master_list(kms *k, kms_master_info **out, size_t *n)
{
    KMS_ENSURE(k != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_mcount c = {0};
    kms_mlist_tx x = {.c = &c};
    kms_result r = kms_store_read(k->store, kms_mlist_txn, &x);
    kms_mtally_free(&c.tally);
    KMS_GUARD(r);
    *out = x.out;
    *n = x.n;
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Rewrap passes                                                           */

typedef struct {
    uint8_t key[KMS_VERSION_KEY_MAX_BYTES];
    size_t klen;
    uint8_t purpose;
    kms_rec_version old;
    uint8_t blob[KMS_HSM_WRAPPED_MAX_BYTES];
    size_t blob_len;
} kms_rw_item;

typedef struct {
    uint32_t target;
    uint8_t start[KMS_VERSION_KEY_MAX_BYTES + 1];
    size_t start_len;
    bool at_end;
    kms_rw_item *items;
    size_t n;
    /* purpose of the key whose versions are being scanned */
    char cur_name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint8_t cur_purpose;
    kms_txn *t;
} kms_rw_batch;

static kms_result kms_rw_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                              void *arg, bool *stop)
{
    kms_rw_batch *b = arg;
    /* Resume strictly after this key next time: key || 0x00. */
    memcpy(b->start, key, klen);
    b->start[klen] = 0;
    b->start_len = klen + 1;
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(val, vlen, &rec));
    /* Only versions under an older master move to the target. One under a
     * newer master means another process finished this rotation and
     * started the next: moving it back would put it under a master that
     * is about to be retired and destroyed. */
    if (rec.state == KMS_VERSION_DESTROYED || rec.master_version >= b->target) {
        kms_secmem_wipe(&rec, sizeof(rec));
        return KMS_OK_RESULT;
    }
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    KMS_ENSURE(kms_rec_version_key_split(key, klen, name, &version), KMS_ERR_STORE_CORRUPT);
    if (strcmp(name, b->cur_name) != 0) {
        const uint8_t *kv;
        size_t kvlen;
        bool found;
        KMS_GUARD(kms_txn_get(b->t, KMS_DB_KEYS, name, strlen(name), &kv, &kvlen, &found));
        KMS_ENSURE(found, KMS_ERR_STORE_CORRUPT);
        kms_rec_key kr;
        KMS_GUARD(kms_rec_key_decode(kv, kvlen, &kr));
        memcpy(b->cur_name, name, sizeof(name));
        b->cur_purpose = kr.purpose;
    }
    kms_rw_item *it = &b->items[b->n++];
    memcpy(it->key, key, klen);
    it->klen = klen;
    it->purpose = b->cur_purpose;
    it->old = rec;
    kms_secmem_wipe(&rec, sizeof(rec));
    if (b->n == KMS_MASTER_BATCH)
        *stop = true;
    return KMS_OK_RESULT;
}

static kms_result kms_rw_read_txn(kms_txn *t, void *arg)
{
    kms_rw_batch *b = arg;
    b->n = 0;
    b->t = t;
    b->cur_name[0] = '\0';
    size_t before = b->start_len;
    uint8_t saved[KMS_VERSION_KEY_MAX_BYTES + 1];
    memcpy(saved, b->start, before);
    kms_result r = kms_txn_scan(t, KMS_DB_VERSIONS, b->start_len ? b->start : NULL, b->start_len,
                                NULL, 0, kms_rw_scan, b);
    if (!kms_is_ok(r)) {
        memcpy(b->start, saved, before); /* a retried read starts over */
        b->start_len = before;
        return r;
    }
    b->at_end = b->n < KMS_MASTER_BATCH;
    return KMS_OK_RESULT;
}

static kms_result kms_rw_write_txn(kms_txn *t, void *arg)
{
    kms_rw_batch *b = arg;
    for (size_t i = 0; i < b->n; i++) {
        kms_rw_item *it = &b->items[i];
        if (it->blob_len == 0)
            continue;
        const uint8_t *v;
        size_t vlen;
        bool found;
        KMS_GUARD(kms_txn_get(t, KMS_DB_VERSIONS, it->key, it->klen, &v, &vlen, &found));
        if (!found)
            continue;
        kms_rec_version rec;
        KMS_GUARD(kms_rec_version_decode(v, vlen, &rec));
        /* Changed meanwhile (destroyed, or rewrapped by another process):
         * leave it; the final check catches anything left behind. */
        if (rec.master_version != it->old.master_version ||
            rec.wrapped_len != it->old.wrapped_len ||
            memcmp(rec.wrapped, it->old.wrapped, rec.wrapped_len) != 0) {
            kms_secmem_wipe(&rec, sizeof(rec));
            continue;
        }
        memcpy(rec.wrapped, it->blob, it->blob_len);
        rec.wrapped_len = (uint16_t)it->blob_len;
        rec.master_version = b->target;
        kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
        KMS_GUARD(kms_rec_version_encode(&rec, &out));
        kms_secmem_wipe(&rec, sizeof(rec));
        KMS_GUARD(kms_txn_put(t, KMS_DB_VERSIONS, it->key, it->klen, out.data, out.len, false));
    }
    return KMS_OK_RESULT;
}

static bool kms_master_pending(kms *k, uint32_t *version, uint32_t *current);

/* One pass over every version; returns how many it moved, and how many it
 * could not rewrap because their master is no longer on the token. */
static kms_result kms_rw_pass(kms *k, uint32_t target, const uint8_t target_id[KMS_HSM_ID_BYTES],
                              uint64_t *moved, uint64_t *missing)
{
    kms_rw_batch *b = calloc(1, sizeof(*b));
    KMS_ENSURE(b != NULL, KMS_ERR_NO_MEMORY);
    b->items = calloc(KMS_MASTER_BATCH, sizeof(*b->items));
    if (b->items == NULL) {
        free(b);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    b->target = target;
    *moved = 0;
    *missing = 0;
    kms_result r = KMS_OK_RESULT;
    kms_buf w KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&w, KMS_HSM_WRAPPED_MAX_BYTES);
    for (;;) {
        KMS_GUARD_GOTO(r, kms_store_read(k->store, kms_rw_read_txn, b), out);
        KMS_GUARD_GOTO(r, kms_masters_refresh(k), out);
        /* Finished (or finished and superseded) by another process while
         * this pass ran: stop moving; the final transaction tells which. */
        uint32_t pend = 0, cur = 0;
        if (!kms_master_pending(k, &pend, &cur) || pend != target)
            break;
        bool finished_elsewhere = false;
        for (size_t i = 0; i < b->n; i++) {
            kms_rw_item *it = &b->items[i];
            kms_hsm_key_ref ref = {.type = kms_purpose_secret_type(it->purpose),
                                   .wrapped = it->old.wrapped,
                                   .wrapped_len = it->old.wrapped_len};
            memcpy(ref.uid, it->old.uid, sizeof(ref.uid));
            if (!kms_master_id(k, it->old.master_version, ref.master_id)) {
                r = kms_error_raisef(KMS_ERR_HSM_OBJECT_MISSING, __FILE__, __LINE__,
                                     "master version %u is unknown", it->old.master_version);
                goto out;
            }
            /* Inside the HSM: unwrap under the old master, wrap under the
             * new; the secret never leaves it. */
            kms_buf_reset(&w);
            r = kms_hsm_secret_rewrap(k->hsm, &ref, target_id, &w);
            if (r.err == KMS_ERR_HSM_OBJECT_MISSING) {
                /* Another process running this same rotation moved the
                 * version and destroyed its old master after this batch was
                 * read. Leave it: the write below skips rows that changed,
                 * and the final transaction counts, inside the
                 * transaction, what is really left. */
                it->blob_len = 0;
                (*missing)++;
                r = KMS_OK_RESULT;
                /* Each miss costs the token search's settling time: if the
                 * rotation was finished elsewhere, stop at the first. */
                KMS_GUARD_GOTO(r, kms_masters_refresh(k), out);
                if (!kms_master_pending(k, &pend, &cur) || pend != target) {
                    finished_elsewhere = true;
                    break;
                }
                continue;
            }
            KMS_GUARD_GOTO(r, r, out);
            if (w.len == 0 || w.len > KMS_HSM_WRAPPED_MAX_BYTES) {
                r = kms_error_raise(KMS_ERR_HSM_FAILED, __FILE__, __LINE__);
                goto out;
            }
            memcpy(it->blob, w.data, w.len);
            it->blob_len = w.len;
        }
        if (b->n > 0) {
            KMS_GUARD_GOTO(r, kms_write(k, kms_rw_write_txn, b, true), out);
            for (size_t i = 0; i < b->n; i++)
                *moved += b->items[i].blob_len > 0;
        }
        for (size_t i = 0; i < b->n; i++)
            kms_secmem_wipe(&b->items[i], sizeof(b->items[i]));
        if (b->at_end || finished_elsewhere)
            break;
    }
out:
    kms_secmem_wipe(b->items, KMS_MASTER_BATCH * sizeof(*b->items));
    free(b->items);
    free(b);
    return r;
}

typedef struct {
    uint32_t target;
    kms_rec_rotation *rot;
    int64_t now;
    uint64_t left; /* out: versions still under an older master */
    bool already;  /* out: target was already current (or since retired) */
} kms_mfinal_tx;

/* Marks the rotation record (if any) succeeded at `now`, unless another
 * process that finished the same rotation marked it first: its finish
 * time stands (the time to rotate is the first finisher's), and *rot
 * becomes the stored record. */
static kms_result kms_mrot_succeeded(kms_txn *t, kms_rec_rotation *rot, int64_t now)
{
    if (rot == NULL)
        return KMS_OK_RESULT;
    uint8_t key[KMS_ROTATION_KEY_BYTES];
    kms_rec_rotation_key(&rot->info, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_ROTATIONS, key, sizeof(key), &v, &vlen, &found));
    if (found) {
        kms_rec_rotation stored;
        KMS_GUARD(kms_rec_rotation_decode(v, vlen, &stored));
        if (stored.info.status == KMS_ROTATION_SUCCEEDED) {
            *rot = stored;
            return KMS_OK_RESULT;
        }
    }
    rot->info.status = KMS_ROTATION_SUCCEEDED;
    rot->info.finished_at = now;
    return kms_rotation_put(t, rot);
}

static kms_result kms_mfinal_txn(kms_txn *t, void *arg)
{
    kms_mfinal_tx *x = arg;
    uint8_t key[4];
    kms_rec_master_key(x->target, key);
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(kms_txn_get(t, KMS_DB_MASTERS, key, sizeof(key), &v, &vlen, &found));
    KMS_ENSURE(found, KMS_ERR_CONFLICT);
    kms_rec_master tm;
    KMS_GUARD(kms_rec_master_decode(v, vlen, &tm));
    x->left = 0;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    if (tm.state == KMS_MASTER_RETIRED) {
        /* Finished by another process, which has rotated past it since:
         * nothing is left to do here, and nothing may move to it. */
        x->already = true;
        return kms_mrot_succeeded(t, x->rot, x->now);
    }
    kms_mcount c = {.target = x->target};
    kms_result r = kms_txn_scan(t, KMS_DB_VERSIONS, NULL, 0, NULL, 0, kms_mcount_scan, &c);
    kms_mtally_free(&c.tally);
    KMS_GUARD(r);
    x->left = c.older;
    if (x->left > 0)
        return KMS_OK_RESULT; /* nothing written: another pass first */
    /* Flip states: target current, every older non-retired one retired. */
    x->already = tm.state == KMS_MASTER_CURRENT;
    if (!x->already) {
        KMS_ENSURE(tm.state == KMS_MASTER_PENDING, KMS_ERR_CONFLICT);
        tm.state = KMS_MASTER_CURRENT;
        KMS_GUARD(kms_rec_master_encode(&tm, &b));
        KMS_GUARD(kms_txn_put(t, KMS_DB_MASTERS, key, sizeof(key), b.data, b.len, false));
    }
    for (uint32_t mv = 1; mv < x->target; mv++) {
        kms_rec_master_key(mv, key);
        KMS_GUARD(kms_txn_get(t, KMS_DB_MASTERS, key, sizeof(key), &v, &vlen, &found));
        if (!found)
            continue;
        kms_rec_master m;
        KMS_GUARD(kms_rec_master_decode(v, vlen, &m));
        if (m.state == KMS_MASTER_RETIRED)
            continue;
        m.state = KMS_MASTER_RETIRED;
        m.retired_at = x->now;
        kms_buf_reset(&b);
        KMS_GUARD(kms_rec_master_encode(&m, &b));
        KMS_GUARD(kms_txn_put(t, KMS_DB_MASTERS, key, sizeof(key), b.data, b.len, false));
    }
    return kms_mrot_succeeded(t, x->rot, x->now);
}

/* Destroys retired masters still on the token; returns how many. */
size_t kms_master_destroy_retired(kms *k)
{
    size_t destroyed = 0;
    kms_result r = kms_masters_refresh(k);
    if (!kms_is_ok(r))
        return 0;
    pthread_rwlock_rdlock(&k->cache_lock);
    size_t n = k->nmasters;
    kms_master_ent *m = malloc((n ? n : 1) * sizeof(*m));
    if (m != NULL)
        memcpy(m, k->masters, n * sizeof(*m));
    pthread_rwlock_unlock(&k->cache_lock);
    if (m == NULL)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (m[i].rec.state != KMS_MASTER_RETIRED)
            continue;
        bool exists = false;
        if (!kms_is_ok(kms_hsm_master_exists(k->hsm, m[i].rec.id, &exists)) || !exists)
            continue;
        if (kms_is_ok(kms_hsm_master_destroy(k->hsm, m[i].rec.id)))
            destroyed++;
        else
            fprintf(stderr, "kms: warning: retired master %u not destroyed; kms_check will retry\n",
                    m[i].version);
    }
    free(m);
    return destroyed;
}

/* Steps 3 to 5 for the pending master `target`. */
static kms_result kms_master_finish(kms *k, uint32_t target, kms_rec_rotation *rot)
{
    uint8_t target_id[KMS_HSM_ID_BYTES];
    KMS_ENSURE(kms_master_id(k, target, target_id), KMS_ERR_INTERNAL);
    uint64_t moved = 0, missing = 0, left = 0;
    for (int pass = 0; pass < KMS_MASTER_PASSES_MAX; pass++) {
        KMS_GUARD(kms_rw_pass(k, target, target_id, &moved, &missing));
        kms_mfinal_tx x = {.target = target, .rot = rot, .now = kms_now(k)};
        KMS_GUARD(kms_write(k, kms_mfinal_txn, &x, true));
        if (x.left == 0) {
            KMS_GUARD(kms_masters_refresh(k));
            (void)kms_master_destroy_retired(k);
            return KMS_OK_RESULT;
        }
        left = x.left;
        /* Nothing moved: what is left is being moved by another process
         * (or is unreadable). Give it a moment rather than spin. */
        if (moved == 0) {
            struct timespec pause = {0, 20 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    }
    if (missing > 0)
        KMS_BAIL_MSG(KMS_ERR_HSM_OBJECT_MISSING,
                     "%llu versions are wrapped under a master key missing from the token; run "
                     "the check",
                     (unsigned long long)left);
    KMS_BAIL_MSG(KMS_ERR_STORE_BUSY, "versions kept appearing under the old master");
}

typedef struct {
    uint32_t to;
    bool found;
    kms_rec_rotation rec;
} kms_mrot_find;

static kms_result kms_mrot_find_scan(const uint8_t *key, size_t klen, const uint8_t *val,
                                     size_t vlen, void *arg, bool *stop)
{
    kms_mrot_find *f = arg;
    kms_rec_rotation r;
    KMS_GUARD(kms_rec_rotation_decode(val, vlen, &r));
    if (r.info.type == KMS_ROTATION_MASTER && r.info.status == KMS_ROTATION_STARTED &&
        r.info.to_version == f->to) {
        f->found = true;
        f->rec = r;
    }
    return KMS_OK_RESULT;
}

static kms_result kms_mrot_find_txn(kms_txn *t, void *arg)
{
    ((kms_mrot_find *)arg)->found = false;
    return kms_txn_scan(t, KMS_DB_ROTATIONS, NULL, 0, NULL, 0, kms_mrot_find_scan, arg);
}

static bool kms_master_pending(kms *k, uint32_t *version, uint32_t *current)
{
    bool found = false;
    *current = 0;
    pthread_rwlock_rdlock(&k->cache_lock);
    for (size_t i = 0; i < k->nmasters; i++) {
        if (k->masters[i].rec.state == KMS_MASTER_PENDING) {
            *version = k->masters[i].version;
            found = true;
        } else if (k->masters[i].rec.state == KMS_MASTER_CURRENT) {
            *current = k->masters[i].version;
        }
    }
    pthread_rwlock_unlock(&k->cache_lock);
    return found;
}

KMS_RESULT kms_master_resume(kms *k, bool *resumed)
{
    *resumed = false;
    KMS_GUARD(kms_masters_refresh(k));
    uint32_t pend, cur;
    if (!kms_master_pending(k, &pend, &cur))
        return KMS_OK_RESULT;
    uint8_t id[KMS_HSM_ID_BYTES];
    KMS_ENSURE(kms_master_id(k, pend, id), KMS_ERR_INTERNAL);
    bool exists = false;
    /* Recorded pending, possibly by another process a moment ago. */
    KMS_GUARD(kms_hsm_master_await(k->hsm, id, &exists));
    if (!exists)
        return KMS_OK_RESULT; /* kms_check reports it (and drops it on repair) */
    kms_mrot_find f = {.to = pend};
    KMS_GUARD(kms_store_read(k->store, kms_mrot_find_txn, &f));
    kms_rec_rotation *rot = f.found ? &f.rec : NULL;
    KMS_GUARD(kms_master_finish(k, pend, rot));
    *resumed = true;
    return KMS_OK_RESULT;
}

typedef struct {
    uint32_t version;
    kms_rec_master m;
    kms_rec_rotation *rot;
} kms_mstart_tx;

static kms_result kms_mstart_txn(kms_txn *t, void *arg)
{
    kms_mstart_tx *x = arg;
    uint8_t key[4];
    kms_rec_master_key(x->version, key);
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_rec_master_encode(&x->m, &b));
    KMS_GUARD(kms_txn_put(t, KMS_DB_MASTERS, key, sizeof(key), b.data, b.len, true));
    return kms_rotation_put(t, x->rot);
}

/* A pending master exists (interrupted, or being rotated to by another
 * process right now): finishing it is this call's job. */
static kms_result kms_master_join(kms *k, uint32_t pend, kms_rotation_info *out)
{
    bool resumed = false;
    KMS_GUARD(kms_master_resume(k, &resumed));
    if (!resumed) {
        /* Either the process that started it finished it meanwhile (then
         * `pend` is current now), or its object is missing from the token. */
        uint32_t still = 0, cur = 0;
        KMS_GUARD(kms_masters_refresh(k));
        bool pending = kms_master_pending(k, &still, &cur);
        KMS_ENSURE_MSG(!pending && cur >= pend, KMS_ERR_HSM_OBJECT_MISSING,
                       "pending master %u is missing from the token: run the check with repair",
                       pend);
    }
    kms_rotation_filter f = {.type = KMS_ROTATION_MASTER, .limit = 0};
    kms_rotation_info *all = NULL;
    size_t n = 0;
    KMS_GUARD(kms_rotations_list(k, &f, &all, &n));
    for (size_t i = 0; out != NULL && i < n; i++)
        if (all[i].to_version == pend && all[i].status == KMS_ROTATION_SUCCEEDED)
            *out = all[i];
    free(all);
    return KMS_OK_RESULT;
}

static kms_result kms_master_rotate_locked(kms *k, const kms_caller *c, const char *reason,
                                           kms_rotation_info *out)
{
    KMS_GUARD(kms_masters_refresh(k));
    uint32_t pend = 0, cur = 0;
    if (kms_master_pending(k, &pend, &cur))
        return kms_master_join(k, pend, out);
    uint32_t max = 0;
    pthread_rwlock_rdlock(&k->cache_lock);
    for (size_t i = 0; i < k->nmasters; i++)
        if (k->masters[i].version > max)
            max = k->masters[i].version;
    pthread_rwlock_unlock(&k->cache_lock);
    kms_rec_rotation rot;
    KMS_GUARD(kms_rotation_new(k, c, "", KMS_ROTATION_MASTER, reason, &rot));
    rot.info.from_version = cur;
    rot.info.to_version = max + 1;
    kms_mstart_tx x = {.version = max + 1, .rot = &rot};
    x.m.state = KMS_MASTER_PENDING;
    x.m.created_at = kms_now(k);
    kms_result r = kms_hsm_master_create(k->hsm, x.m.id);
    if (!kms_is_ok(r)) {
        if (!kms_is_ok(kms_rotation_finish(k, &rot, KMS_ROTATION_FAILED)))
            fprintf(stderr, "kms: warning: master rotation %s could not be marked failed\n",
                    rot.info.id);
        return r;
    }
    r = kms_write(k, kms_mstart_txn, &x, true);
    if (!kms_is_ok(r)) {
        /* Nothing names the new object: remove it now (or kms_check will). */
        kms_result d = kms_hsm_master_destroy(k->hsm, x.m.id);
        (void)d;
        if (r.err != KMS_ERR_KEY_EXISTS)
            return r;
        /* Another process started a rotation to the same master version
         * first: join it instead. Our record of the attempt says failed. */
        if (!kms_is_ok(kms_rotation_finish(k, &rot, KMS_ROTATION_FAILED)))
            fprintf(stderr, "kms: warning: master rotation %s could not be marked failed\n",
                    rot.info.id);
        KMS_GUARD(kms_masters_refresh(k));
        KMS_ENSURE(kms_master_pending(k, &pend, &cur), KMS_ERR_CONFLICT);
        return kms_master_join(k, pend, out);
    }
    KMS_GUARD(kms_masters_refresh(k));
    KMS_GUARD(kms_master_finish(k, max + 1, &rot));
    if (out != NULL)
        *out = rot.info;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_master_rotate(kms *k, const kms_caller *c, const char *reason,
                             kms_rotation_info *out)
{
    KMS_ENSURE(k != NULL && c != NULL, KMS_ERR_INVALID_ARGUMENT);
    pthread_mutex_lock(&k->admin_mu);
    kms_result r = kms_master_rotate_locked(k, c, reason, out);
    pthread_mutex_unlock(&k->admin_mu);
    return r;
}
