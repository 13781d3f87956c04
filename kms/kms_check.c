/*
 * The consistency check: LMDB against the token, and lifecycle work that
 * has come due. Reports everything; with repair, fixes what is safe:
 *   - stale `started` rotation records (their process is gone) -> failed
 *   - a pending master whose object is missing and that no version uses
 *     -> dropped (its rotation record failed)
 *   - kmsd master objects on the token that no record names -> destroyed
 *   - retired masters still on the token -> destroyed
 *   - destructions past due -> done; deprecations past grace -> disabled
 * and reports what cannot be repaired: masters named by LMDB but missing
 * from the token (missing_objects) and the versions they leave unreadable,
 * and (deep check) version blobs the HSM cannot unwrap.
 */
#include "kms_internal.h"

#include "kms_hash.h"
#include "kms_secmem.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KMS_CHECK_LIST_MAX 100000 /* lifecycle work items per run (bounded) */

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
} kms_vref;

typedef struct {
    int64_t now;
    kms_mtally mtally; /* per master version: live versions under it */
    kms_vref *due;     /* destructions past due */
    size_t ndue, due_cap;
    kms_vref *expired; /* deprecations past grace, still recorded deprecated */
    size_t nexp, exp_cap;
    size_t versions;
    size_t keys;
    kms_rec_rotation *stale;
    size_t nstale, stale_cap;
    kms_master_ent *masters;
    size_t nmasters, masters_cap;
} kms_chk;

static kms_result kms_vref_push(kms_vref **a, size_t *n, size_t *cap, const char *name, uint32_t v)
{
    if (*n >= KMS_CHECK_LIST_MAX)
        return KMS_OK_RESULT; /* the next run picks up the rest */
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        kms_vref *p = realloc(*a, c * sizeof(*p));
        KMS_ENSURE(p != NULL, KMS_ERR_NO_MEMORY);
        *a = p;
        *cap = c;
    }
    snprintf((*a)[*n].name, sizeof((*a)[*n].name), "%s", name);
    (*a)[*n].version = v;
    (*n)++;
    return KMS_OK_RESULT;
}

static kms_result kms_chk_versions(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                   void *arg, bool *stop)
{
    kms_chk *c = arg;
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    KMS_ENSURE(kms_rec_version_key_split(key, klen, name, &version), KMS_ERR_STORE_CORRUPT);
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(val, vlen, &rec));
    c->versions++;
    kms_result r = KMS_OK_RESULT;
    if (kms_version_destroy_due(&rec, c->now))
        r = kms_vref_push(&c->due, &c->ndue, &c->due_cap, name, version);
    else if (rec.state == KMS_VERSION_DEPRECATED && rec.grace_until != 0 &&
             c->now >= rec.grace_until)
        r = kms_vref_push(&c->expired, &c->nexp, &c->exp_cap, name, version);
    if (kms_is_ok(r) && rec.state != KMS_VERSION_DESTROYED)
        r = kms_mtally_add(&c->mtally, rec.master_version);
    kms_secmem_wipe(&rec, sizeof(rec));
    return r;
}

static kms_result kms_chk_rotations(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *arg, bool *stop)
{
    kms_chk *c = arg;
    kms_rec_rotation r;
    KMS_GUARD(kms_rec_rotation_decode(val, vlen, &r));
    if (r.info.status != KMS_ROTATION_STARTED)
        return KMS_OK_RESULT;
    /* Stale when the process that started it is gone. This process holds
     * the admin lock while it checks, so its own started records are
     * leftovers too. (A recycled pid can only delay the verdict.) */
    bool stale =
        r.owner_pid == (uint32_t)getpid() || (kill((pid_t)r.owner_pid, 0) != 0 && errno == ESRCH);
    if (!stale)
        return KMS_OK_RESULT;
    if (c->nstale == c->stale_cap) {
        size_t cap = c->stale_cap ? c->stale_cap * 2 : 8;
        kms_rec_rotation *p = realloc(c->stale, cap * sizeof(*p));
        KMS_ENSURE(p != NULL, KMS_ERR_NO_MEMORY);
        c->stale = p;
        c->stale_cap = cap;
    }
    c->stale[c->nstale++] = r;
    return KMS_OK_RESULT;
}

static kms_result kms_chk_masters(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                  void *arg, bool *stop)
{
    kms_chk *c = arg;
    if (c->nmasters == c->masters_cap) {
        size_t cap = c->masters_cap ? c->masters_cap * 2 : 8;
        kms_master_ent *p = realloc(c->masters, cap * sizeof(*p));
        KMS_ENSURE(p != NULL, KMS_ERR_NO_MEMORY);
        c->masters = p;
        c->masters_cap = cap;
    }
    kms_master_ent *e = &c->masters[c->nmasters];
    KMS_GUARD(kms_rec_master_key_parse(key, klen, &e->version));
    KMS_GUARD(kms_rec_master_decode(val, vlen, &e->rec));
    c->nmasters++;
    return KMS_OK_RESULT;
}

static kms_result kms_chk_txn(kms_txn *t, void *arg)
{
    kms_chk *c = arg;
    c->mtally.n = 0;
    c->ndue = c->nexp = c->versions = c->nstale = c->nmasters = 0;
    KMS_GUARD(kms_txn_count(t, KMS_DB_KEYS, &c->keys));
    KMS_GUARD(kms_txn_scan(t, KMS_DB_VERSIONS, NULL, 0, NULL, 0, kms_chk_versions, c));
    KMS_GUARD(kms_txn_scan(t, KMS_DB_ROTATIONS, NULL, 0, NULL, 0, kms_chk_rotations, c));
    return kms_txn_scan(t, KMS_DB_MASTERS, NULL, 0, NULL, 0, kms_chk_masters, c);
}

static void kms_chk_free(kms_chk *c)
{
    kms_mtally_free(&c->mtally);
    free(c->due);
    free(c->expired);
    free(c->stale);
    free(c->masters);
}

/* Drops a pending master record (its object is gone, nothing uses it). */
typedef struct {
    uint32_t version;
} kms_mdrop_tx;

static kms_result kms_mdrop_txn(kms_txn *t, void *arg)
{
    kms_mdrop_tx *x = arg;
    uint8_t key[4];
    kms_rec_master_key(x->version, key);
    return kms_txn_del(t, KMS_DB_MASTERS, key, sizeof(key));
}

/* Deep check: can the HSM unwrap each live version blob? A decrypt of a
 * bogus tag forces the unwrap and, for a readable secret, fails only the
 * tag check; it spends nothing of the GCM invocation budget. */
typedef struct {
    uint8_t start[KMS_VERSION_KEY_MAX_BYTES + 1];
    size_t start_len;
    bool at_end;
    struct {
        kms_rec_version rec;
        uint8_t purpose;
    } items[64];
    size_t n;
    char cur[KMS_KEY_NAME_MAX_BYTES + 1];
    uint8_t cur_purpose;
    kms_txn *t;
} kms_probe_batch;

static kms_result kms_probe_scan(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                 void *arg, bool *stop)
{
    kms_probe_batch *b = arg;
    memcpy(b->start, key, klen);
    b->start[klen] = 0;
    b->start_len = klen + 1;
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    KMS_ENSURE(kms_rec_version_key_split(key, klen, name, &version), KMS_ERR_STORE_CORRUPT);
    KMS_GUARD(kms_rec_version_decode(val, vlen, &b->items[b->n].rec));
    if (b->items[b->n].rec.state == KMS_VERSION_DESTROYED)
        return KMS_OK_RESULT;
    if (strcmp(name, b->cur) != 0) {
        const uint8_t *kv;
        size_t kvlen;
        bool found;
        KMS_GUARD(kms_txn_get(b->t, KMS_DB_KEYS, name, strlen(name), &kv, &kvlen, &found));
        KMS_ENSURE(found, KMS_ERR_STORE_CORRUPT);
        kms_rec_key kr;
        KMS_GUARD(kms_rec_key_decode(kv, kvlen, &kr));
        memcpy(b->cur, name, sizeof(name));
        b->cur_purpose = kr.purpose;
    }
    b->items[b->n].purpose = b->cur_purpose;
    if (++b->n == KMS_ARRAY_LEN(b->items))
        *stop = true;
    return KMS_OK_RESULT;
}

static kms_result kms_probe_txn(kms_txn *t, void *arg)
{
    kms_probe_batch *b = arg;
    b->n = 0;
    b->t = t;
    b->cur[0] = '\0';
    KMS_GUARD(kms_txn_scan(t, KMS_DB_VERSIONS, b->start_len ? b->start : NULL, b->start_len, NULL,
                           0, kms_probe_scan, b));
    b->at_end = b->n < KMS_ARRAY_LEN(b->items);
    return KMS_OK_RESULT;
}

static kms_result kms_check_probe(kms *k, const kms_chk *c, const bool *master_missing,
                                  size_t *unreadable)
{
    kms_probe_batch *b = calloc(1, sizeof(*b));
    KMS_ENSURE(b != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = KMS_OK_RESULT;
    for (;;) {
        KMS_GUARD_GOTO(r, kms_store_read(k->store, kms_probe_txn, b), out);
        for (size_t i = 0; i < b->n; i++) {
            kms_rec_version *rec = &b->items[i].rec;
            bool skip = false;
            for (size_t m = 0; m < c->nmasters; m++)
                if (c->masters[m].version == rec->master_version && master_missing[m])
                    skip = true; /* already counted as unreadable */
            if (skip)
                continue;
            kms_hsm_key_ref ref = {.type = kms_purpose_secret_type(b->items[i].purpose),
                                   .wrapped = rec->wrapped,
                                   .wrapped_len = rec->wrapped_len};
            memcpy(ref.uid, rec->uid, sizeof(ref.uid));
            if (!kms_master_id(k, rec->master_version, ref.master_id)) {
                (*unreadable)++;
                continue;
            }
            kms_result pr;
            if (ref.type == KMS_HSM_SECRET_AES256) {
                uint8_t nonce[KMS_HSM_NONCE_BYTES] = {0}, in[KMS_HSM_TAG_BYTES + 1] = {0};
                uint8_t out1[1];
                pr = kms_hsm_aead_decrypt(k->hsm, &ref, nonce, NULL, 0, in, sizeof(in), out1);
                if (pr.err == KMS_ERR_TOKEN_INVALID)
                    pr = KMS_OK_RESULT;
            } else {
                uint8_t mac[KMS_HSM_MAC_BYTES];
                kms_iov part = {"", 0};
                pr = kms_hsm_mac_sign(k->hsm, &ref, &part, 1, mac);
            }
            if (!kms_is_ok(pr))
                (*unreadable)++;
        }
        for (size_t i = 0; i < b->n; i++)
            kms_secmem_wipe(&b->items[i].rec, sizeof(b->items[i].rec));
        if (b->at_end)
            break;
    }
out:
    kms_secmem_wipe(b, sizeof(*b));
    free(b);
    kms_error_clear();
    return r;
}

static void kms_sum(kms_check_report *o, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void kms_sum(kms_check_report *o, size_t *used, const char *fmt, ...)
{
    if (*used >= sizeof(o->summary) - 1)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->summary + *used, sizeof(o->summary) - *used, fmt, ap);
    va_end(ap);
    if (n > 0)
        *used +=
            (size_t)n < sizeof(o->summary) - *used ? (size_t)n : sizeof(o->summary) - *used - 1;
}

KMS_RESULT kms_check_run(kms *k, bool repair, bool deep, kms_check_report *out)
{
    memset(out, 0, sizeof(*out));
    kms_chk c = {.now = kms_now(k)};
    kms_result r = kms_store_read(k->store, kms_chk_txn, &c);
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t nids = 0;
    bool *missing = NULL, *named = NULL;
    if (kms_is_ok(r))
        r = kms_hsm_master_list(k->hsm, &ids, &nids);
    if (kms_is_ok(r)) {
        missing = calloc(c.nmasters + 1, sizeof(*missing));
        named = calloc(nids + 1, sizeof(*named));
        if (missing == NULL || named == NULL)
            r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    }
    if (!kms_is_ok(r))
        goto done;
    KMS_GUARD_GOTO(r, kms_masters_refresh(k), done);
    out->keys = c.keys;
    out->versions = c.versions;
    out->masters = c.nmasters;
    size_t used = 0;

    /* Masters against the token. */
    for (size_t m = 0; m < c.nmasters; m++) {
        const kms_master_ent *e = &c.masters[m];
        bool present = false;
        for (size_t i = 0; i < nids; i++) {
            if (memcmp(ids[i], e->rec.id, KMS_HSM_ID_BYTES) == 0) {
                present = true;
                named[i] = true;
            }
        }
        uint64_t users = kms_mtally_of(&c.mtally, e->version);
        if (present && e->rec.state == KMS_MASTER_RETIRED) {
            out->problems++;
            kms_sum(out, &used, "retired master %u still on the token; ", e->version);
            if (repair && kms_is_ok(kms_hsm_master_destroy(k->hsm, e->rec.id)))
                out->repaired++;
        } else if (!present && e->rec.state == KMS_MASTER_PENDING && users == 0) {
            out->problems++;
            kms_sum(out, &used, "pending master %u has no object; ", e->version);
            kms_mdrop_tx x = {.version = e->version};
            if (repair && kms_is_ok(kms_write(k, kms_mdrop_txn, &x, true)))
                out->repaired++;
        } else if (!present && e->rec.state != KMS_MASTER_RETIRED) {
            missing[m] = true;
            out->problems++;
            out->missing_objects++;
            out->unreadable_versions += users;
            kms_sum(out, &used, "master %u missing from the token (%llu versions unreadable); ",
                    e->version, (unsigned long long)users);
        } else if (!present && users > 0) {
            /* Retired and gone, yet versions still name it. */
            missing[m] = true;
            out->problems++;
            out->missing_objects++;
            out->unreadable_versions += users;
            kms_sum(out, &used, "retired master %u is gone but %llu versions use it; ", e->version,
                    (unsigned long long)users);
        } else if (present && e->rec.state == KMS_MASTER_PENDING) {
            out->problems++;
            kms_sum(out, &used, "master rotation to %u interrupted; ", e->version);
            bool resumed = false;
            if (repair && kms_is_ok(kms_master_resume(k, &resumed)) && resumed)
                out->repaired++;
        }
    }
    for (size_t i = 0; i < nids; i++) {
        if (named[i])
            continue;
        out->problems++;
        out->orphan_objects++;
        char hex[2 * KMS_HSM_ID_BYTES + 1];
        kms_hex_encode(ids[i], KMS_HSM_ID_BYTES, hex);
        kms_sum(out, &used, "orphan master object %s; ", hex);
        /* Safe: no record names it, so nothing is wrapped under it. */
        if (repair && kms_is_ok(kms_hsm_master_destroy(k->hsm, ids[i])))
            out->repaired++;
    }

    /* Rotation records left `started` by a process that is gone. A master
     * rotation's record stays while its pending master is resumable. */
    for (size_t i = 0; i < c.nstale; i++) {
        kms_rec_rotation *rot = &c.stale[i];
        if (rot->info.type == KMS_ROTATION_MASTER) {
            bool pending = false;
            for (size_t m = 0; m < c.nmasters; m++)
                if (c.masters[m].version == rot->info.to_version &&
                    c.masters[m].rec.state == KMS_MASTER_PENDING && !missing[m])
                    pending = true;
            if (pending)
                continue;
        }
        out->problems++;
        kms_sum(out, &used, "stale rotation %s of '%s'; ", rot->info.id, rot->info.key);
        if (repair && kms_is_ok(kms_rotation_finish(k, rot, KMS_ROTATION_FAILED)))
            out->repaired++;
    }

    /* Lifecycle work that has come due. */
    for (size_t i = 0; i < c.ndue; i++) {
        out->problems++;
        if (repair && kms_is_ok(kms_version_destroy_now(k, c.due[i].name, c.due[i].version)))
            out->repaired++;
    }
    if (c.ndue > 0)
        kms_sum(out, &used, "%zu destructions due; ", c.ndue);
    for (size_t i = 0; i < c.nexp; i++) {
        out->problems++;
        bool changed = false;
        if (repair && kms_is_ok(kms_version_expire_now(k, c.expired[i].name, c.expired[i].version,
                                                       c.now, &changed)))
            out->repaired++;
    }
    if (c.nexp > 0)
        kms_sum(out, &used, "%zu deprecations past grace; ", c.nexp);

    if (deep) {
        size_t bad = 0;
        KMS_GUARD_GOTO(r, kms_check_probe(k, &c, missing, &bad), done);
        if (bad > 0) {
            out->problems += bad;
            out->unreadable_versions += bad;
            kms_sum(out, &used, "%zu version blobs fail to unwrap; ", bad);
        }
    }
    char head[200];
    snprintf(head, sizeof(head), "%zu keys, %zu versions, %zu masters: %zu problems, %zu repaired",
             out->keys, out->versions, out->masters, out->problems, out->repaired);
    char rest[sizeof(out->summary)];
    snprintf(rest, sizeof(rest), "%s", out->summary);
    if (used >= 2 && rest[used - 2] == ';')
        rest[used - 2] = '\0';
    if (rest[0] != '\0')
        snprintf(out->summary, sizeof(out->summary), "%.200s (%.800s)", head, rest);
    else
        snprintf(out->summary, sizeof(out->summary), "%.200s", head);
done:
    if (kms_is_ok(r))
        kms_error_clear();
    free(ids);
    free(missing);
    free(named);
    kms_chk_free(&c);
    return r;
}

KMS_RESULT kms_check(kms *k, bool repair, kms_check_report *out)
{
    KMS_ENSURE(k != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    pthread_mutex_lock(&k->admin_mu);
    kms_result r = kms_check_run(k, repair, true, out);
    pthread_mutex_unlock(&k->admin_mu);
    return r;
}
