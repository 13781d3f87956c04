/*
 * hsm/: kmsd's use of the HSM through PKCS#11 (kms_hsm.h). Every PKCS#11
 * call goes through the seam in kms_p11.c.
 *
 * Concurrency: operations hold `life` shared and one pool session each;
 * recovery holds `life` exclusive, so it never closes a session under a
 * running call. Session objects (the unwrapped version secrets) are all
 * created by the long-lived owner session (PKCS#11 v2.40 section 4.4.1:
 * "a session object is destroyed when the session that created it is
 * closed"), under owner_mu, and used from any pool session: "all sessions
 * of an application have the same access to session objects" (section
 * 5.6).
 */
#define _GNU_SOURCE
#include "kms_hsm_int.h"

#include "kms_rand.h"
#include "kms_secmem.h"

#include <p11-kit/p11-kit.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define HSM_DEFAULT_POOL_SIZE      4u
#define HSM_MAX_POOL_SIZE          256u
#define HSM_DEFAULT_CACHE_CAPACITY 4096u
#define HSM_MASTER_LABEL           "kmsd-master"
#define HSM_SECRET_BYTES           32u
#define HSM_PIN_MAX_BYTES          256u
#define HSM_BACKOFF_MIN_NS         (50ull * 1000 * 1000)
#define HSM_BACKOFF_MAX_NS         (5000ull * 1000 * 1000)
#define HSM_SCRATCH_BYTES          1024u
#define HSM_FINALIZE_ATTEMPTS      4u

struct kms_hsm_master {
    uint8_t id[KMS_HSM_ID_BYTES];
    CK_OBJECT_HANDLE handle;
    kms_hsm_master *next;
};

static const CK_BBOOL ck_true = CK_TRUE;
static const CK_BBOOL ck_false = CK_FALSE;
static const CK_OBJECT_CLASS ck_secret_class = CKO_SECRET_KEY;
static const CK_KEY_TYPE ck_aes = CKK_AES;
static const CK_KEY_TYPE ck_generic = CKK_GENERIC_SECRET;
static const CK_ULONG ck_secret_len = HSM_SECRET_BYTES;

#define ATTR(t, v)                   \
    {                                \
        (t), (void *)&(v), sizeof(v) \
    }

static uint64_t hsm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- failure classification ---- */

static void hsm_mark(kms_hsm *h, CK_RV rv)
{
    if (!kms_p11_rv_transient(rv))
        return;
    if (kms_p11_rv_needs_reinit(rv))
        atomic_store(&h->need_reinit, 1);
    atomic_store(&h->broken, 1);
}

kms_result kms_hsm_session_fail(kms_hsm *h, kms_hsm_session *s, CK_RV rv, const char *function,
                                kms_p11_ctx ctx)
{
    if (s != NULL && kms_p11_rv_dirties_session(rv))
        s->dirty = true;
    hsm_mark(h, rv);
    return kms_p11_fail(rv, function, ctx);
}

#define HSM_CHECK(h, s, rv, fn)                                                    \
    do {                                                                           \
        CK_RV hsm_rv_ = (rv);                                                      \
        if (hsm_rv_ != CKR_OK)                                                     \
            return kms_hsm_session_fail((h), (s), hsm_rv_, (fn), KMS_P11_CTX_ANY); \
    } while (0)

/* ---- module, token, login ---- */

static CK_FUNCTION_LIST *hsm_module_load(const char *module)
{
    if (strchr(module, '/') != NULL)
        return p11_kit_module_load(module, P11_KIT_MODULE_CRITICAL);
    /* A name: a module configured for p11-kit, else a file name in p11-kit's
     * module directory. */
    CK_FUNCTION_LIST **mods = p11_kit_modules_load(NULL, P11_KIT_MODULE_CRITICAL);
    CK_FUNCTION_LIST *chosen = NULL;
    if (mods != NULL) {
        chosen = p11_kit_module_for_name(mods, module);
        for (size_t i = 0; mods[i] != NULL; i++)
            if (mods[i] != chosen)
                p11_kit_module_release(mods[i]);
        free(mods);
    }
    if (chosen == NULL)
        chosen = p11_kit_module_load(module, P11_KIT_MODULE_CRITICAL);
    return chosen;
}

/* p11-kit's call logging prints every argument, PINs included
 * (p11-kit/log.c): refuse a module configured with log-calls. */
static KMS_RESULT hsm_module_check_config(CK_FUNCTION_LIST *f)
{
    char *v = p11_kit_config_option(f, "log-calls");
    bool logging = v != NULL && (strcasecmp(v, "yes") == 0 || strcasecmp(v, "true") == 0);
    free(v);
    KMS_ENSURE_MSG(!logging, KMS_ERR_CONFIG,
                   "p11-kit log-calls is enabled for the HSM module; it would log the PIN");
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_module_init(kms_p11 *p11, bool *initialized)
{
    /* Without CKF_OS_LOCKING_OK a module may assume a single-threaded
     * caller (PKCS#11 v2.40 section 5.4, C_Initialize; SoftHSM then turns
     * its locking off). */
    CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
    CK_RV rv = kms_p11_initialize(p11, &args);
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        /* Someone else in this process initialised it (an unmanaged
         * module): theirs to finalise. */
        *initialized = false;
        return KMS_OK_RESULT;
    }
    KMS_ENSURE_MSG(rv == CKR_OK, KMS_ERR_HSM_MODULE, "C_Initialize: %s", p11_kit_strerror(rv));
    *initialized = true;
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_slots(kms_p11 *p11, CK_SLOT_ID **slots, CK_ULONG *count)
{
    CK_ULONG n = 0;
    CK_RV rv = kms_p11_get_slot_list(p11, CK_TRUE, NULL, &n);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    /* Room for a slot appearing between the two calls. */
    CK_ULONG cap = n + 4;
    CK_SLOT_ID *s = calloc(cap, sizeof(*s));
    KMS_ENSURE(s != NULL, KMS_ERR_NO_MEMORY);
    n = cap;
    rv = kms_p11_get_slot_list(p11, CK_TRUE, s, &n);
    if (rv != CKR_OK) {
        free(s);
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    }
    *slots = s;
    *count = n;
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_token_find(kms_hsm *h)
{
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0;
    KMS_GUARD(hsm_slots(&h->p11, &slots, &n));
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        CK_RV rv = kms_p11_get_token_info(&h->p11, slots[i], &info);
        if (rv != CKR_OK && kms_p11_rv_transient(rv) && rv != CKR_TOKEN_NOT_PRESENT) {
            free(slots);
            return kms_p11_fail(rv, "C_GetTokenInfo", KMS_P11_CTX_ANY);
        }
        if (rv != CKR_OK)
            continue; /* a slot whose token went away: not ours */
        /* RFC 7512 section 3.3: a URI matches a token when every attribute
         * it names equals the token's. */
        if (p11_kit_uri_match_token_info(h->uri, &info) == 1) {
            h->slot = slots[i];
            free(slots);
            return KMS_OK_RESULT;
        }
    }
    free(slots);
    KMS_BAIL_MSG(KMS_ERR_HSM_TOKEN_NOT_FOUND, "no token matches the configured PKCS#11 URI");
}

static KMS_RESULT hsm_login(kms_hsm *h, CK_SESSION_HANDLE s)
{
    CK_RV rv;
    if (h->pin_file != NULL) {
        kms_buf pin KMS_DEFER(kms_buf_cleanup) = {0};
        kms_buf_init_secret(&pin, HSM_PIN_MAX_BYTES);
        KMS_GUARD(kms_secret_read_file(h->pin_file, &pin));
        rv = kms_p11_login(&h->p11, s, CKU_USER, pin.data, pin.len);
        /* pin is wiped by its cleanup right here. */
    } else {
        rv = kms_p11_login(&h->p11, s, CKU_USER, h->pin_kept.data, h->pin_kept.len);
    }
    /* One login per application and token (PKCS#11 v2.40 section 5.6):
     * another kms_hsm of this process may have logged in already. */
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN)
        return KMS_OK_RESULT;
    return kms_p11_fail(rv, "C_Login", KMS_P11_CTX_LOGIN);
}

/* Opens the owner session, logs in, opens the pool. Called with `life`
 * held exclusive (or before the handle is shared). */
static KMS_RESULT hsm_connect(kms_hsm *h)
{
    CK_RV rv = kms_p11_open_session(&h->p11, h->slot, &h->owner);
    if (rv != CKR_OK) {
        h->owner = CK_INVALID_HANDLE;
        return kms_p11_fail(rv, "C_OpenSession", KMS_P11_CTX_ANY);
    }
    KMS_GUARD(hsm_login(h, h->owner));
    for (unsigned i = 0; i < h->pool_size; i++) {
        rv = kms_p11_open_session(&h->p11, h->slot, &h->sessions[i]);
        if (rv != CKR_OK) {
            h->sessions[i] = CK_INVALID_HANDLE;
            return kms_p11_fail(rv, "C_OpenSession", KMS_P11_CTX_ANY);
        }
    }
    return KMS_OK_RESULT;
}

static void hsm_masters_clear(kms_hsm *h)
{
    pthread_mutex_lock(&h->master_mu);
    kms_hsm_master *m = h->masters;
    h->masters = NULL;
    pthread_mutex_unlock(&h->master_mu);
    while (m != NULL) {
        kms_hsm_master *n = m->next;
        free(m);
        m = n;
    }
}

/* Closes every session; their session objects die with them, so the cache
 * forgets its entries without destroying. Returns false if a session could
 * not be closed (its objects may live on: the module must be finalised). */
/* Closes s; a session the module may still hold (the close failed, but
 * not because the session is already gone) is kept to be closed again:
 * its session objects would otherwise live on inside the HSM. */
static bool hsm_close_or_keep(kms_hsm *h, CK_SESSION_HANDLE s)
{
    CK_RV rv = kms_p11_close_session(&h->p11, s);
    /* Gone already, or an answer that retrying cannot change. */
    if (rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
        !kms_p11_rv_transient(rv))
        return true;
    pthread_mutex_lock(&h->pool_mu);
    if (h->nzombies < KMS_ARRAY_LEN(h->zombies))
        h->zombies[h->nzombies++] = s;
    pthread_mutex_unlock(&h->pool_mu);
    return false;
}

/* Retries the closes that failed in an earlier recovery. Only with the
 * module initialised (p11-kit's managed wrapper must not see calls between a
 * failed C_Finalize and the next C_Initialize), and only while this handle
 * holds no live session whose number a re-initialised module could have
 * handed out again. */
static bool hsm_zombies_close(kms_hsm *h)
{
    if (!h->live)
        return h->nzombies == 0;
    unsigned nz = h->nzombies;
    CK_SESSION_HANDLE old[KMS_ARRAY_LEN(h->zombies)];
    memcpy(old, h->zombies, nz * sizeof(old[0]));
    h->nzombies = 0;
    bool clean = true;
    for (unsigned i = 0; i < nz; i++)
        clean &= hsm_close_or_keep(h, old[i]);
    return clean;
}

static bool hsm_drop(kms_hsm *h)
{
    bool clean = true;
    for (unsigned i = 0; h->sessions != NULL && i < h->pool_size; i++) {
        if (h->live && h->sessions[i] != CK_INVALID_HANDLE)
            clean &= hsm_close_or_keep(h, h->sessions[i]);
        h->sessions[i] = CK_INVALID_HANDLE;
    }
    if (h->live && h->owner != CK_INVALID_HANDLE)
        clean &= hsm_close_or_keep(h, h->owner);
    h->owner = CK_INVALID_HANDLE;
    if (h->cache != NULL)
        kms_hsm_lru_clear(h->cache);
    hsm_masters_clear(h);
    atomic_fetch_add(&h->gen, 1);
    return clean;
}

/* Called with `life` exclusive. */
static KMS_RESULT hsm_rebuild(kms_hsm *h)
{
    bool reinit = atomic_load(&h->need_reinit) != 0;
    if (!hsm_drop(h))
        reinit = true;
    if (reinit) {
        if (h->initialized) {
            /* Sessions that would not close, and their objects, die only
             * with a C_Finalize that worked: insist on one (with back-off)
             * before initialising again, and give up on it after a few
             * attempts so that a module whose C_Finalize is broken does
             * not keep us down forever. */
            CK_RV rv = kms_p11_finalize(&h->p11);
            if (rv != CKR_OK && rv != CKR_CRYPTOKI_NOT_INITIALIZED &&
                ++h->finalize_failures < HSM_FINALIZE_ATTEMPTS)
                return kms_p11_fail(rv, "C_Finalize", KMS_P11_CTX_ANY);
            /* A C_Finalize that worked closed every session of ours. */
            if (rv == CKR_OK)
                h->nzombies = 0;
            h->finalize_failures = 0;
            h->initialized = false;
            h->live = false;
        }
        KMS_GUARD(hsm_module_init(&h->p11, &h->initialized));
        h->live = true;
        KMS_GUARD(hsm_token_find(h));
    }
    KMS_ENSURE_MSG(hsm_zombies_close(h), KMS_ERR_HSM_UNAVAILABLE,
                   "C_CloseSession: sessions of the lost pool still cannot be closed");
    return hsm_connect(h);
}

/* Rebuilds a broken pool, at most once per back-off period: a dead HSM is
 * not hammered, and callers get KMS_ERR_HSM_UNAVAILABLE meanwhile (whatever
 * stopped the rebuild is in the detail, so the error slot always agrees
 * with the result the caller gets). */
static KMS_RESULT hsm_recover(kms_hsm *h)
{
    pthread_mutex_lock(&h->recover_mu);
    if (atomic_load(&h->broken) == 0) {
        pthread_mutex_unlock(&h->recover_mu);
        return KMS_OK_RESULT;
    }
    uint64_t now = hsm_now_ns();
    if (now < h->next_attempt_ns) {
        uint64_t wait_ms = (h->next_attempt_ns - now) / 1000000u;
        pthread_mutex_unlock(&h->recover_mu);
        KMS_BAIL_MSG(KMS_ERR_HSM_UNAVAILABLE, "HSM unavailable; next recovery attempt in %llu ms",
                     (unsigned long long)wait_ms);
    }
    pthread_rwlock_wrlock(&h->life);
    kms_result r = hsm_rebuild(h);
    if (kms_is_ok(r)) {
        atomic_store(&h->need_reinit, 0);
        atomic_store(&h->broken, 0);
        atomic_fetch_add(&h->p11.c->recoveries, 1);
        h->backoff_ns = HSM_BACKOFF_MIN_NS;
        h->next_attempt_ns = 0;
    } else {
        /* Half a rebuild is no state to build on: start from C_Initialize
         * next time. */
        atomic_store(&h->need_reinit, 1);
        h->next_attempt_ns = hsm_now_ns() + h->backoff_ns;
        h->backoff_ns =
            h->backoff_ns * 2 > HSM_BACKOFF_MAX_NS ? HSM_BACKOFF_MAX_NS : h->backoff_ns * 2;
        char detail[200];
        snprintf(detail, sizeof(detail), "%s", kms_error_detail());
        r = kms_error_raisef(KMS_ERR_HSM_UNAVAILABLE, __FILE__, __LINE__,
                             "HSM unavailable; recovery failed (%s: %s)", kms_error_code(r.err),
                             detail);
    }
    pthread_rwlock_unlock(&h->life);
    pthread_mutex_unlock(&h->recover_mu);
    return r;
}

/* ---- the session pool ---- */

KMS_RESULT kms_hsm_session_acquire(kms_hsm *h, kms_hsm_session *s)
{
    pthread_mutex_lock(&h->pool_mu);
    unsigned i;
    for (;;) {
        for (i = 0; i < h->pool_size && h->busy[i]; i++)
            ;
        if (i < h->pool_size)
            break;
        /* Bounded: every holder releases after one operation. */
        pthread_cond_wait(&h->pool_cv, &h->pool_mu);
    }
    h->busy[i] = true;
    CK_SESSION_HANDLE sh = h->sessions[i];
    pthread_mutex_unlock(&h->pool_mu);

    s->idx = i;
    s->gen = atomic_load(&h->gen);
    s->dirty = false;
    s->h = sh;
    if (sh == CK_INVALID_HANDLE) {
        /* A session dropped after an error: reopen it. The login is the
         * application's and survives while the owner session is open. */
        CK_RV rv = kms_p11_open_session(&h->p11, h->slot, &sh);
        if (rv != CKR_OK) {
            kms_result r = kms_hsm_session_fail(h, s, rv, "C_OpenSession", KMS_P11_CTX_ANY);
            s->dirty = false;
            kms_hsm_session_release(h, s);
            return r;
        }
        s->h = sh;
        pthread_mutex_lock(&h->pool_mu);
        h->sessions[i] = sh;
        pthread_mutex_unlock(&h->pool_mu);
    }
    return KMS_OK_RESULT;
}

void kms_hsm_session_release(kms_hsm *h, kms_hsm_session *s)
{
    if (s->dirty && s->h != CK_INVALID_HANDLE) {
        /* An operation may still be active on it: never hand it out again. */
        if (!hsm_close_or_keep(h, s->h))
            atomic_store(&h->broken, 1);
        pthread_mutex_lock(&h->pool_mu);
        h->sessions[s->idx] = CK_INVALID_HANDLE;
        pthread_mutex_unlock(&h->pool_mu);
    }
    pthread_mutex_lock(&h->pool_mu);
    h->busy[s->idx] = false;
    pthread_cond_signal(&h->pool_cv);
    pthread_mutex_unlock(&h->pool_mu);
}

static KMS_RESULT hsm_enter(kms_hsm *h, kms_hsm_session *s)
{
    if (atomic_load(&h->broken) != 0)
        KMS_GUARD(hsm_recover(h));
    pthread_rwlock_rdlock(&h->life);
    if (atomic_load(&h->broken) != 0) {
        pthread_rwlock_unlock(&h->life);
        KMS_BAIL_MSG(KMS_ERR_HSM_UNAVAILABLE, "HSM unavailable; recovery pending");
    }
    kms_result r = kms_hsm_session_acquire(h, s);
    if (!kms_is_ok(r))
        pthread_rwlock_unlock(&h->life);
    return r;
}

static void hsm_leave(kms_hsm *h, kms_hsm_session *s)
{
    kms_hsm_session_release(h, s);
    pthread_rwlock_unlock(&h->life);
}

KMS_RESULT kms_hsm_enter(kms_hsm *h, kms_hsm_session *s)
{
    return hsm_enter(h, s);
}

void kms_hsm_leave(kms_hsm *h, kms_hsm_session *s)
{
    hsm_leave(h, s);
}

/* For idempotent operations: after a transient failure, recover and run
 * once more (the failed call had no effect the caller can see). A failed
 * recovery is itself the KMS_ERR_HSM_UNAVAILABLE the caller gets. */
#define HSM_RETRY_ONCE(h, call)                                                        \
    ({                                                                                 \
        kms_result hsm_r_ = (call);                                                    \
        if (hsm_r_.err == KMS_ERR_HSM_UNAVAILABLE && atomic_load(&(h)->broken) != 0) { \
            hsm_r_ = hsm_recover(h);                                                   \
            if (kms_is_ok(hsm_r_))                                                     \
                hsm_r_ = (call);                                                       \
        }                                                                              \
        hsm_r_;                                                                        \
    })

/* ---- master keys ---- */

static bool hsm_master_cached(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES], CK_OBJECT_HANDLE *out)
{
    pthread_mutex_lock(&h->master_mu);
    for (kms_hsm_master *m = h->masters; m != NULL; m = m->next) {
        if (memcmp(m->id, id, KMS_HSM_ID_BYTES) == 0) {
            *out = m->handle;
            pthread_mutex_unlock(&h->master_mu);
            return true;
        }
    }
    pthread_mutex_unlock(&h->master_mu);
    return false;
}

static void hsm_master_forget(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES])
{
    pthread_mutex_lock(&h->master_mu);
    for (kms_hsm_master **pp = &h->masters; *pp != NULL; pp = &(*pp)->next) {
        if (memcmp((*pp)->id, id, KMS_HSM_ID_BYTES) == 0) {
            kms_hsm_master *m = *pp;
            *pp = m->next;
            free(m);
            break;
        }
    }
    pthread_mutex_unlock(&h->master_mu);
}

static void hsm_master_remember(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES],
                                CK_OBJECT_HANDLE handle)
{
    kms_hsm_master *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return; /* only a cache: the next use searches again */
    memcpy(m->id, id, KMS_HSM_ID_BYTES);
    m->handle = handle;
    pthread_mutex_lock(&h->master_mu);
    for (kms_hsm_master *o = h->masters; o != NULL; o = o->next) {
        if (memcmp(o->id, id, KMS_HSM_ID_BYTES) == 0) {
            o->handle = handle;
            pthread_mutex_unlock(&h->master_mu);
            free(m);
            return;
        }
    }
    m->next = h->masters;
    h->masters = m;
    pthread_mutex_unlock(&h->master_mu);
}

/* C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal, always finalised. */
KMS_RESULT kms_hsm_find(kms_hsm *h, kms_hsm_session *s, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                        CK_OBJECT_HANDLE *out, CK_ULONG max, CK_ULONG *count)
{
    HSM_CHECK(h, s, kms_p11_find_objects_init(&h->p11, s->h, tmpl, n), "C_FindObjectsInit");
    CK_RV rv = kms_p11_find_objects(&h->p11, s->h, out, max, count);
    CK_RV rv_final = kms_p11_find_objects_final(&h->p11, s->h);
    HSM_CHECK(h, s, rv, "C_FindObjects");
    HSM_CHECK(h, s, rv_final, "C_FindObjectsFinal");
    return KMS_OK_RESULT;
}

/* Calls fn for every object matching tmpl, searching in batches; the search
 * is ended (C_FindObjectsFinal) on every path. fn may read attributes. */
typedef kms_result (*hsm_each_fn)(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE o, void *arg);

static KMS_RESULT hsm_find_each(kms_hsm *h, kms_hsm_session *s, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                                hsm_each_fn fn, void *arg)
{
    CK_RV rv = kms_p11_find_objects_init(&h->p11, s->h, tmpl, n);
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_FindObjectsInit", KMS_P11_CTX_ANY);
    kms_result r = KMS_OK_RESULT;
    for (;;) {
        CK_OBJECT_HANDLE batch[64];
        CK_ULONG got = 0;
        rv = kms_p11_find_objects(&h->p11, s->h, batch, KMS_ARRAY_LEN(batch), &got);
        if (rv != CKR_OK) {
            r = kms_hsm_session_fail(h, s, rv, "C_FindObjects", KMS_P11_CTX_ANY);
            break;
        }
        if (got == 0)
            break;
        for (CK_ULONG i = 0; i < got && kms_is_ok(r); i++)
            r = fn(h, s, batch[i], arg);
        if (!kms_is_ok(r))
            break;
    }
    rv = kms_p11_find_objects_final(&h->p11, s->h);
    if (rv != CKR_OK && kms_is_ok(r))
        r = kms_hsm_session_fail(h, s, rv, "C_FindObjectsFinal", KMS_P11_CTX_ANY);
    return r;
}

static KMS_RESULT hsm_master_search(kms_hsm *h, kms_hsm_session *s,
                                    const uint8_t id[KMS_HSM_ID_BYTES], CK_OBJECT_HANDLE *out,
                                    bool *found)
{
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class),
        ATTR(CKA_KEY_TYPE, ck_aes),
        ATTR(CKA_TOKEN, ck_true),
        {CKA_ID, (void *)id, KMS_HSM_ID_BYTES},
    };
    CK_OBJECT_HANDLE hs[2];
    CK_ULONG n = 0;
    KMS_GUARD(kms_hsm_find(h, s, tmpl, KMS_ARRAY_LEN(tmpl), hs, KMS_ARRAY_LEN(hs), &n));
    *found = n > 0;
    if (n > 0)
        *out = hs[0];
    return KMS_OK_RESULT;
}

/* A master that another process created a moment ago may not be in this
 * process's view of the token yet: SoftHSM re-reads its token directory
 * lazily, and a search made right after the other process had created the
 * object and recorded it in LMDB was seen to miss it and find it 50 ms
 * later (the multi-process stress test). Where the caller has reason to
 * believe the master exists, a miss is searched again for a short while
 * before it is reported missing. */
#define HSM_MASTER_SETTLE_TRIES 10
#define HSM_MASTER_SETTLE_NS    (25L * 1000 * 1000)

static KMS_RESULT hsm_master_search_settled(kms_hsm *h, kms_hsm_session *s,
                                            const uint8_t id[KMS_HSM_ID_BYTES],
                                            CK_OBJECT_HANDLE *out, bool *found)
{
    KMS_GUARD(hsm_master_search(h, s, id, out, found));
    for (int i = 0; i < HSM_MASTER_SETTLE_TRIES && !*found; i++) {
        struct timespec pause = {0, HSM_MASTER_SETTLE_NS};
        nanosleep(&pause, NULL);
        KMS_GUARD(hsm_master_search(h, s, id, out, found));
    }
    return KMS_OK_RESULT;
}

/* The master's handle: from the cache, else searched (first use, or
 * `refind` after the cached handle proved invalid). */
static KMS_RESULT hsm_master_get(kms_hsm *h, kms_hsm_session *s, const uint8_t id[KMS_HSM_ID_BYTES],
                                 bool refind, CK_OBJECT_HANDLE *out)
{
    if (refind)
        hsm_master_forget(h, id);
    else if (hsm_master_cached(h, id, out))
        return KMS_OK_RESULT;
    bool found = false;
    KMS_GUARD(hsm_master_search_settled(h, s, id, out, &found));
    KMS_ENSURE_MSG(found, KMS_ERR_HSM_OBJECT_MISSING, "master key not found on the token");
    hsm_master_remember(h, id, *out);
    return KMS_OK_RESULT;
}

static bool hsm_rv_handle_invalid(CK_RV rv)
{
    return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID ||
           rv == CKR_WRAPPING_KEY_HANDLE_INVALID || rv == CKR_UNWRAPPING_KEY_HANDLE_INVALID;
}

static CK_MECHANISM hsm_kwp = {CKM_AES_KEY_WRAP_PAD, NULL, 0};

/* C_UnwrapKey under the master, re-finding it once if its handle is stale. */
static KMS_RESULT hsm_unwrap(kms_hsm *h, kms_hsm_session *s, const kms_hsm_key_ref *ref,
                             CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *out)
{
    KMS_ENSURE(ref->wrapped != NULL && ref->wrapped_len > 0 &&
                   ref->wrapped_len <= KMS_HSM_WRAPPED_MAX_BYTES,
               KMS_ERR_INVALID_ARGUMENT);
    CK_OBJECT_HANDLE mh;
    CK_RV rv = CKR_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        KMS_GUARD(hsm_master_get(h, s, ref->master_id, attempt > 0, &mh));
        CK_MECHANISM m = hsm_kwp;
        rv =
            kms_p11_unwrap_key(&h->p11, s->h, &m, mh, ref->wrapped, ref->wrapped_len, tmpl, n, out);
        if (!hsm_rv_handle_invalid(rv))
            break;
    }
    /* SoftHSM 2.6 reports a failed RFC 5649 integrity check (a corrupt
     * blob, or one wrapped under another master) as CKR_GENERAL_ERROR
     * rather than CKR_WRAPPED_KEY_INVALID. The master was just found and
     * the session is fine: a bad blob must not tear the pool down. */
    if (rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED)
        rv = CKR_WRAPPED_KEY_INVALID;
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_UnwrapKey", KMS_P11_CTX_ANY);
    return KMS_OK_RESULT;
}

/* C_WrapKey of key under the master into wrapped_out. */
static KMS_RESULT hsm_wrap(kms_hsm *h, kms_hsm_session *s,
                           const uint8_t master_id[KMS_HSM_ID_BYTES], CK_OBJECT_HANDLE key,
                           kms_buf *wrapped_out)
{
    uint8_t blob[KMS_HSM_WRAPPED_MAX_BYTES];
    CK_ULONG len = 0;
    CK_OBJECT_HANDLE mh;
    CK_RV rv = CKR_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        KMS_GUARD(hsm_master_get(h, s, master_id, attempt > 0, &mh));
        CK_MECHANISM m = hsm_kwp;
        len = sizeof(blob);
        rv = kms_p11_wrap_key(&h->p11, s->h, &m, mh, key, blob, &len);
        if (!hsm_rv_handle_invalid(rv))
            break;
    }
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_WrapKey", KMS_P11_CTX_ANY);
    KMS_ENSURE_MSG(len > 0 && len <= sizeof(blob), KMS_ERR_HSM_FAILED,
                   "C_WrapKey: implausible wrapped length");
    return kms_buf_append(wrapped_out, blob, len);
}

static void hsm_destroy_quietly(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE o)
{
    CK_RV rv = kms_p11_destroy_object(&h->p11, s->h, o);
    if (rv != CKR_OK) {
        /* The object is a session object of s: drop the session so that it
         * dies with it. */
        s->dirty = true;
        hsm_mark(h, rv);
    }
}

KMS_RESULT kms_hsm_master_create(kms_hsm *h, uint8_t id_out[KMS_HSM_ID_BYTES])
{
    uint8_t id[KMS_HSM_ID_BYTES];
    KMS_GUARD(kms_rand_bytes(id, sizeof(id)));
    static const char label[] = HSM_MASTER_LABEL;
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class),   ATTR(CKA_KEY_TYPE, ck_aes),
        ATTR(CKA_VALUE_LEN, ck_secret_len), ATTR(CKA_TOKEN, ck_true),
        ATTR(CKA_PRIVATE, ck_true),         ATTR(CKA_SENSITIVE, ck_true),
        ATTR(CKA_EXTRACTABLE, ck_false),    ATTR(CKA_WRAP, ck_true),
        ATTR(CKA_UNWRAP, ck_true),          ATTR(CKA_ENCRYPT, ck_false),
        ATTR(CKA_DECRYPT, ck_false),        ATTR(CKA_SIGN, ck_false),
        ATTR(CKA_VERIFY, ck_false),         ATTR(CKA_DERIVE, ck_false),
        {CKA_ID, id, sizeof(id)},           {CKA_LABEL, (void *)label, sizeof(label) - 1},
    };
    CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_OBJECT_HANDLE key;
    CK_RV rv = kms_p11_generate_key(&h->p11, s.h, &m, tmpl, KMS_ARRAY_LEN(tmpl), &key);
    kms_result r = KMS_OK_RESULT;
    if (rv != CKR_OK)
        r = kms_hsm_session_fail(h, &s, rv, "C_GenerateKey", KMS_P11_CTX_ANY);
    else
        hsm_master_remember(h, id, key);
    hsm_leave(h, &s);
    KMS_GUARD(r);
    memcpy(id_out, id, sizeof(id));
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_master_exists_once(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES],
                                         bool settle, bool *exists)
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_OBJECT_HANDLE o = CK_INVALID_HANDLE;
    kms_result r = settle ? hsm_master_search_settled(h, &s, id, &o, exists)
                          : hsm_master_search(h, &s, id, &o, exists);
    if (kms_is_ok(r) && *exists)
        hsm_master_remember(h, id, o);
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_master_exists(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists)
{
    *exists = false;
    return HSM_RETRY_ONCE(h, hsm_master_exists_once(h, id, false, exists));
}

KMS_RESULT kms_hsm_master_await(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists)
{
    *exists = false;
    return HSM_RETRY_ONCE(h, hsm_master_exists_once(h, id, true, exists));
}

KMS_RESULT kms_hsm_master_destroy(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES])
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_OBJECT_HANDLE o = CK_INVALID_HANDLE;
    bool found = false;
    kms_result r = hsm_master_search(h, &s, id, &o, &found);
    if (kms_is_ok(r) && !found)
        r = kms_error_raisef(KMS_ERR_HSM_OBJECT_MISSING, __FILE__, __LINE__,
                             "master key not found on the token");
    if (kms_is_ok(r)) {
        CK_RV rv = kms_p11_destroy_object(&h->p11, s.h, o);
        if (rv != CKR_OK)
            r = kms_hsm_session_fail(h, &s, rv, "C_DestroyObject", KMS_P11_CTX_ANY);
    }
    hsm_master_forget(h, id);
    hsm_leave(h, &s);
    return r;
}

/* hsm_find_each callback of kms_hsm_master_list: gathers CKA_IDs. */
typedef struct {
    uint8_t (*ids)[KMS_HSM_ID_BYTES];
    size_t n, cap;
} hsm_id_list;

static kms_result hsm_id_collect(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE o, void *arg)
{
    hsm_id_list *l = arg;
    uint8_t id[KMS_HSM_ID_BYTES];
    CK_ATTRIBUTE a = {CKA_ID, id, sizeof(id)};
    CK_RV rv = kms_p11_get_attribute_value(&h->p11, s->h, o, &a, 1);
    if (rv == CKR_BUFFER_TOO_SMALL || rv == CKR_ATTRIBUTE_TYPE_INVALID ||
        (rv == CKR_OK && a.ulValueLen != KMS_HSM_ID_BYTES))
        return KMS_OK_RESULT; /* not one of ours: another id length */
    if (hsm_rv_handle_invalid(rv))
        return KMS_OK_RESULT; /* destroyed since the search (another process) */
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_GetAttributeValue", KMS_P11_CTX_ANY);
    if (l->n == l->cap) {
        size_t ncap = l->cap == 0 ? 8 : l->cap * 2;
        void *p = reallocarray(l->ids, ncap, sizeof(*l->ids));
        KMS_ENSURE(p != NULL, KMS_ERR_NO_MEMORY);
        l->ids = p;
        l->cap = ncap;
    }
    memcpy(l->ids[l->n++], id, KMS_HSM_ID_BYTES);
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_master_list_once(kms_hsm *h, uint8_t (**ids)[KMS_HSM_ID_BYTES], size_t *count)
{
    static const char label[] = HSM_MASTER_LABEL;
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class),
        ATTR(CKA_TOKEN, ck_true),
        {CKA_LABEL, (void *)label, sizeof(label) - 1},
    };
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    hsm_id_list l = {0};
    kms_result r = hsm_find_each(h, &s, tmpl, KMS_ARRAY_LEN(tmpl), hsm_id_collect, &l);
    hsm_leave(h, &s);
    if (!kms_is_ok(r)) {
        free(l.ids);
        return r;
    }
    *ids = l.ids;
    *count = l.n;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_hsm_master_list(kms_hsm *h, uint8_t (**ids)[KMS_HSM_ID_BYTES], size_t *count)
{
    *ids = NULL;
    *count = 0;
    return HSM_RETRY_ONCE(h, hsm_master_list_once(h, ids, count));
}

/* ---- version secrets ---- */

static KMS_RESULT hsm_check_type(kms_hsm_secret_type type)
{
    KMS_ENSURE(type == KMS_HSM_SECRET_AES256 || type == KMS_HSM_SECRET_HMAC256,
               KMS_ERR_INVALID_ARGUMENT);
    return KMS_OK_RESULT;
}

/* Wraps a temporary session object under a master, appending the blob to
 * out (nothing appended on failure), and destroys the object either way. */
static KMS_RESULT hsm_wrap_temporary(kms_hsm *h, kms_hsm_session *s,
                                     const uint8_t master_id[KMS_HSM_ID_BYTES],
                                     CK_OBJECT_HANDLE tmp, kms_buf *out)
{
    size_t before = out->len;
    kms_result r = hsm_wrap(h, s, master_id, tmp, out);
    if (!kms_is_ok(r))
        kms_buf_truncate(out, before);
    hsm_destroy_quietly(h, s, tmp);
    return r;
}

static KMS_RESULT hsm_secret_generate_once(kms_hsm *h, const uint8_t master_id[KMS_HSM_ID_BYTES],
                                           kms_hsm_secret_type type, kms_buf *wrapped_out)
{
    bool aes = type == KMS_HSM_SECRET_AES256;
    /* A session object that exists only to be wrapped: sensitive, and
     * extractable solely so that C_WrapKey may export it (PKCS#11 v2.40
     * section 4.10: "CKA_EXTRACTABLE ... if CK_FALSE, the key cannot be
     * wrapped"). No usage at all; it is destroyed right after. */
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class),   ATTR(CKA_KEY_TYPE, *(aes ? &ck_aes : &ck_generic)),
        ATTR(CKA_VALUE_LEN, ck_secret_len), ATTR(CKA_TOKEN, ck_false),
        ATTR(CKA_PRIVATE, ck_true),         ATTR(CKA_SENSITIVE, ck_true),
        ATTR(CKA_EXTRACTABLE, ck_true),     ATTR(CKA_ENCRYPT, ck_false),
        ATTR(CKA_DECRYPT, ck_false),        ATTR(CKA_SIGN, ck_false),
        ATTR(CKA_VERIFY, ck_false),         ATTR(CKA_WRAP, ck_false),
        ATTR(CKA_UNWRAP, ck_false),         ATTR(CKA_DERIVE, ck_false),
    };
    CK_MECHANISM m = {aes ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_OBJECT_HANDLE key;
    kms_result r = KMS_OK_RESULT;
    CK_RV rv = kms_p11_generate_key(&h->p11, s.h, &m, tmpl, KMS_ARRAY_LEN(tmpl), &key);
    if (rv != CKR_OK) {
        r = kms_hsm_session_fail(h, &s, rv, "C_GenerateKey", KMS_P11_CTX_ANY);
    } else {
        r = hsm_wrap_temporary(h, &s, master_id, key, wrapped_out);
    }
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_secret_generate(kms_hsm *h, const uint8_t master_id[KMS_HSM_ID_BYTES],
                                   kms_hsm_secret_type type, kms_buf *wrapped_out)
{
    KMS_GUARD(hsm_check_type(type));
    return HSM_RETRY_ONCE(h, hsm_secret_generate_once(h, master_id, type, wrapped_out));
}

static KMS_RESULT hsm_secret_rewrap_once(kms_hsm *h, const kms_hsm_key_ref *ref,
                                         const uint8_t new_master_id[KMS_HSM_ID_BYTES],
                                         kms_buf *wrapped_out)
{
    bool aes = ref->type == KMS_HSM_SECRET_AES256;
    /* Temporary: extractable so it can be wrapped again, no usage. */
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class), ATTR(CKA_KEY_TYPE, *(aes ? &ck_aes : &ck_generic)),
        ATTR(CKA_TOKEN, ck_false),        ATTR(CKA_PRIVATE, ck_true),
        ATTR(CKA_SENSITIVE, ck_true),     ATTR(CKA_EXTRACTABLE, ck_true),
        ATTR(CKA_ENCRYPT, ck_false),      ATTR(CKA_DECRYPT, ck_false),
        ATTR(CKA_SIGN, ck_false),         ATTR(CKA_VERIFY, ck_false),
        ATTR(CKA_WRAP, ck_false),         ATTR(CKA_UNWRAP, ck_false),
        ATTR(CKA_DERIVE, ck_false),
    };
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_OBJECT_HANDLE tmp = CK_INVALID_HANDLE;
    kms_result r = hsm_unwrap(h, &s, ref, tmpl, KMS_ARRAY_LEN(tmpl), &tmp);
    if (kms_is_ok(r)) {
        r = hsm_wrap_temporary(h, &s, new_master_id, tmp, wrapped_out);
    }
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_secret_rewrap(kms_hsm *h, const kms_hsm_key_ref *ref,
                                 const uint8_t new_master_id[KMS_HSM_ID_BYTES],
                                 kms_buf *wrapped_out)
{
    KMS_GUARD(hsm_check_type(ref->type));
    return HSM_RETRY_ONCE(h, hsm_secret_rewrap_once(h, ref, new_master_id, wrapped_out));
}

/* Cache eviction callback: destroys an evicted object through the owner
 * session that created it, unless the session (and the object) are gone. */
static void hsm_cache_destroy(void *ctx, CK_OBJECT_HANDLE o, uint64_t gen)
{
    kms_hsm *h = ctx;
    if (gen != atomic_load(&h->gen))
        return;
    pthread_mutex_lock(&h->owner_mu);
    if (h->owner != CK_INVALID_HANDLE) {
        CK_RV rv = kms_p11_destroy_object(&h->p11, h->owner, o);
        if (rv != CKR_OK)
            hsm_mark(h, rv);
    }
    pthread_mutex_unlock(&h->owner_mu);
}

/* The unwrapped object of ref, pinned in the cache; unwrapped on a miss by
 * the owner session. */
static KMS_RESULT hsm_secret_get(kms_hsm *h, const kms_hsm_key_ref *ref, kms_hsm_lru_entry **out)
{
    kms_hsm_lru_entry *e;
    bool claimed;
    KMS_GUARD(kms_hsm_lru_acquire(h->cache, ref->uid, &e, &claimed));
    atomic_fetch_add_explicit(claimed ? &h->p11.c->cache_misses : &h->p11.c->cache_hits, 1,
                              memory_order_relaxed);
    if (!claimed) {
        if (kms_hsm_lru_entry_type(e) != ref->type) {
            kms_hsm_lru_release(h->cache, e, false);
            KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT, "version secret used with another type");
        }
        *out = e;
        return KMS_OK_RESULT;
    }
    bool aes = ref->type == KMS_HSM_SECRET_AES256;
    /* Only the usage the secret serves; never extractable again. */
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, ck_secret_class),
        ATTR(CKA_KEY_TYPE, *(aes ? &ck_aes : &ck_generic)),
        ATTR(CKA_TOKEN, ck_false),
        ATTR(CKA_PRIVATE, ck_true),
        ATTR(CKA_SENSITIVE, ck_true),
        ATTR(CKA_EXTRACTABLE, ck_false),
        ATTR(CKA_ENCRYPT, *(aes ? &ck_true : &ck_false)),
        ATTR(CKA_DECRYPT, *(aes ? &ck_true : &ck_false)),
        ATTR(CKA_SIGN, *(aes ? &ck_false : &ck_true)),
        ATTR(CKA_VERIFY, *(aes ? &ck_false : &ck_true)),
        ATTR(CKA_WRAP, ck_false),
        ATTR(CKA_UNWRAP, ck_false),
        ATTR(CKA_DERIVE, ck_false),
    };
    CK_OBJECT_HANDLE o = CK_INVALID_HANDLE;
    pthread_mutex_lock(&h->owner_mu);
    kms_hsm_session owner = {.idx = UINT_MAX, .h = h->owner, .gen = atomic_load(&h->gen)};
    kms_result r = hsm_unwrap(h, &owner, ref, tmpl, KMS_ARRAY_LEN(tmpl), &o);
    pthread_mutex_unlock(&h->owner_mu);
    if (!kms_is_ok(r)) {
        kms_hsm_lru_abandon(h->cache, e);
        return r;
    }
    kms_hsm_lru_fill(h->cache, e, o, ref->type, owner.gen);
    *out = e;
    return KMS_OK_RESULT;
}

void kms_hsm_cache_evict(kms_hsm *h, const uint8_t uid[KMS_HSM_UID_BYTES])
{
    pthread_rwlock_rdlock(&h->life);
    kms_hsm_lru_evict(h->cache, uid);
    pthread_rwlock_unlock(&h->life);
}

/* ---- operations ---- */

static KMS_RESULT hsm_gcm_call(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE key, bool encrypt,
                               const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                               size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out)
{
    /* PKCS#11 v2.40 curr. mech. section 2.12.3: CK_GCM_PARAMS {pIv,
     * ulIvLen, ulIvBits, pAAD, ulAADLen, ulTagBits}; p11-kit's header names
     * the same v2.40 layout iv_ptr, iv_len, iv_bits, aad_ptr, aad_len,
     * tag_bits. 96-bit IV and 128-bit tag as NIST SP 800-38D 5.2.1.1 and
     * 5.2.1.2 recommend. */
    CK_GCM_PARAMS gcm = {
        .pIv = (unsigned char *)nonce,
        .ulIvLen = KMS_HSM_NONCE_BYTES,
        .ulIvBits = KMS_HSM_NONCE_BYTES * 8,
        .pAAD = (unsigned char *)aad,
        .ulAADLen = aad_len,
        .ulTagBits = KMS_HSM_TAG_BYTES * 8,
    };
    CK_MECHANISM m = {CKM_AES_GCM, &gcm, sizeof(gcm)};
    /* Modules reject a NULL data pointer even for zero bytes. */
    static const uint8_t empty[1];
    if (in == NULL)
        in = empty;
    if (encrypt) {
        HSM_CHECK(h, s, kms_p11_encrypt_init(&h->p11, s->h, &m, key), "C_EncryptInit");
        CK_ULONG out_len = in_len + KMS_HSM_TAG_BYTES;
        HSM_CHECK(h, s, kms_p11_encrypt(&h->p11, s->h, in, in_len, out, &out_len), "C_Encrypt");
        KMS_ENSURE_MSG(out_len == in_len + KMS_HSM_TAG_BYTES, KMS_ERR_HSM_FAILED,
                       "C_Encrypt: unexpected output length");
        return KMS_OK_RESULT;
    }
    HSM_CHECK(h, s, kms_p11_decrypt_init(&h->p11, s->h, &m, key), "C_DecryptInit");
    /* Decrypt into scratch and copy only once the tag has verified, so
     * nothing reaches the caller's buffer from a module that writes output
     * before it checks the tag. */
    uint8_t stack[HSM_SCRATCH_BYTES];
    uint8_t *scratch = in_len <= sizeof(stack) ? stack : kms_secmem_alloc(in_len);
    if (scratch == NULL) {
        s->dirty = true; /* the decryption operation is still active */
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    CK_ULONG out_len = in_len;
    CK_RV rv = kms_p11_decrypt(&h->p11, s->h, in, in_len, scratch, &out_len);
    /* SoftHSM 2.6 answers a GCM tag mismatch with CKR_GENERAL_ERROR (its
     * SymDecrypt maps every failed decryptFinal so), not the
     * CKR_ENCRYPTED_DATA_INVALID of PKCS#11 v2.40 section 5.9. At this
     * point the key, session and mechanism were just accepted by
     * C_DecryptInit, so read it as a bad ciphertext; a device that really
     * failed fails the next call too and is recovered from there. */
    if (rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED)
        rv = CKR_ENCRYPTED_DATA_INVALID;
    kms_result r = KMS_OK_RESULT;
    if (rv != CKR_OK)
        r = kms_hsm_session_fail(h, s, rv, "C_Decrypt", KMS_P11_CTX_DECRYPT);
    else if (out_len != in_len - KMS_HSM_TAG_BYTES)
        r = kms_error_raisef(KMS_ERR_HSM_FAILED, __FILE__, __LINE__,
                             "C_Decrypt: unexpected output length");
    else
        memcpy(out, scratch, out_len);
    if (scratch == stack)
        kms_secmem_wipe(stack, in_len);
    else
        kms_secmem_free(scratch, in_len);
    return r;
}

static KMS_RESULT hsm_aead_once(kms_hsm *h, const kms_hsm_key_ref *ref, bool encrypt,
                                const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                                size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out)
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    kms_result r = KMS_OK_RESULT;
    for (int attempt = 0; attempt < 2; attempt++) {
        kms_hsm_lru_entry *e = NULL;
        r = hsm_secret_get(h, ref, &e);
        if (!kms_is_ok(r))
            break;
        r = hsm_gcm_call(h, &s, kms_hsm_lru_entry_handle(e), encrypt, nonce, aad, aad_len, in,
                         in_len, out);
        /* A stale handle (the object vanished): drop it and unwrap again. */
        bool stale = r.err == KMS_ERR_HSM_OBJECT_MISSING;
        kms_hsm_lru_release(h->cache, e, stale);
        if (!stale)
            break;
    }
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_aead_encrypt(kms_hsm *h, const kms_hsm_key_ref *ref,
                                const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                                size_t aad_len, const uint8_t *pt, size_t pt_len, uint8_t *out)
{
    KMS_ENSURE(ref->type == KMS_HSM_SECRET_AES256, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(pt_len <= SIZE_MAX - KMS_HSM_TAG_BYTES && (pt != NULL || pt_len == 0) &&
                   (aad != NULL || aad_len == 0),
               KMS_ERR_INVALID_ARGUMENT);
    /* A fresh C_EncryptInit + C_Encrypt with the same nonce gives the same
     * ciphertext: safe to run again after recovery. */
    return HSM_RETRY_ONCE(h, hsm_aead_once(h, ref, true, nonce, aad, aad_len, pt, pt_len, out));
}

KMS_RESULT kms_hsm_aead_decrypt(kms_hsm *h, const kms_hsm_key_ref *ref,
                                const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                                size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out)
{
    KMS_ENSURE(ref->type == KMS_HSM_SECRET_AES256, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(in != NULL && (aad != NULL || aad_len == 0), KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(in_len >= KMS_HSM_TAG_BYTES, KMS_ERR_TOKEN_INVALID, "ciphertext too short");
    return HSM_RETRY_ONCE(h, hsm_aead_once(h, ref, false, nonce, aad, aad_len, in, in_len, out));
}

static KMS_RESULT hsm_hmac_call(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE key,
                                const kms_iov *parts, size_t count, uint8_t out[KMS_HSM_MAC_BYTES])
{
    CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
    HSM_CHECK(h, s, kms_p11_sign_init(&h->p11, s->h, &m, key), "C_SignInit");
    for (size_t i = 0; i < count; i++) {
        if (parts[i].n == 0)
            continue;
        HSM_CHECK(h, s, kms_p11_sign_update(&h->p11, s->h, parts[i].p, parts[i].n), "C_SignUpdate");
    }
    CK_ULONG len = KMS_HSM_MAC_BYTES;
    HSM_CHECK(h, s, kms_p11_sign_final(&h->p11, s->h, out, &len), "C_SignFinal");
    KMS_ENSURE_MSG(len == KMS_HSM_MAC_BYTES, KMS_ERR_HSM_FAILED, "C_SignFinal: unexpected length");
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_mac_once(kms_hsm *h, const kms_hsm_key_ref *ref, const kms_iov *parts,
                               size_t count, uint8_t out[KMS_HSM_MAC_BYTES])
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    kms_result r = KMS_OK_RESULT;
    for (int attempt = 0; attempt < 2; attempt++) {
        kms_hsm_lru_entry *e = NULL;
        r = hsm_secret_get(h, ref, &e);
        if (!kms_is_ok(r))
            break;
        r = hsm_hmac_call(h, &s, kms_hsm_lru_entry_handle(e), parts, count, out);
        bool stale = r.err == KMS_ERR_HSM_OBJECT_MISSING;
        kms_hsm_lru_release(h->cache, e, stale);
        if (!stale)
            break;
    }
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_mac_sign(kms_hsm *h, const kms_hsm_key_ref *ref, const kms_iov *parts,
                            size_t count, uint8_t out[KMS_HSM_MAC_BYTES])
{
    KMS_ENSURE(ref->type == KMS_HSM_SECRET_HMAC256, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(parts != NULL || count == 0, KMS_ERR_INVALID_ARGUMENT);
    return HSM_RETRY_ONCE(h, hsm_mac_once(h, ref, parts, count, out));
}

static KMS_RESULT hsm_random_once(kms_hsm *h, uint8_t *out, size_t n)
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    CK_RV rv = kms_p11_generate_random(&h->p11, s.h, out, n);
    kms_result r = KMS_OK_RESULT;
    if (rv != CKR_OK)
        r = kms_hsm_session_fail(h, &s, rv, "C_GenerateRandom", KMS_P11_CTX_ANY);
    hsm_leave(h, &s);
    return r;
}

KMS_RESULT kms_hsm_random(kms_hsm *h, uint8_t *out, size_t n)
{
    if (n == 0)
        return KMS_OK_RESULT;
    KMS_ENSURE(out != NULL && n <= 1024 * 1024, KMS_ERR_INVALID_ARGUMENT);
    return HSM_RETRY_ONCE(h, hsm_random_once(h, out, n));
}

KMS_RESULT kms_hsm_ping(kms_hsm *h)
{
    uint8_t b;
    /* No retry: readiness must report what the HSM says now. */
    return hsm_random_once(h, &b, 1);
}

/* ---- open, close ---- */

/* RFC 7512 section 2.3 defines pin-value and pin-source query attributes.
 * Refuse them before parsing, so that a PIN never lands in p11-kit memory
 * that is freed without being wiped (p11-kit/uri.c). */
static bool hsm_uri_carries_pin(const char *uri)
{
    const char *q = strchr(uri, '?');
    return q != NULL && (strcasestr(q, "pin-value") != NULL || strcasestr(q, "pin-source") != NULL);
}

static KMS_RESULT hsm_parse_uri(const char *text, P11KitUri **out)
{
    KMS_ENSURE_MSG(!hsm_uri_carries_pin(text), KMS_ERR_CONFIG,
                   "the PKCS#11 URI must not carry a PIN (pin-value, pin-source): use a PIN file "
                   "or environment variable");
    P11KitUri *uri = p11_kit_uri_new();
    KMS_ENSURE(uri != NULL, KMS_ERR_NO_MEMORY);
    int rc = p11_kit_uri_parse(text, P11_KIT_URI_FOR_TOKEN, uri);
    if (rc != P11_KIT_URI_OK) {
        p11_kit_uri_free(uri);
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "invalid PKCS#11 URI: %s", p11_kit_uri_message(rc));
    }
    if (p11_kit_uri_get_pin_value(uri) != NULL || p11_kit_uri_get_pin_source(uri) != NULL) {
        p11_kit_uri_free(uri);
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "the PKCS#11 URI must not carry a PIN");
    }
    *out = uri;
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_open_steps(kms_hsm *h, const kms_hsm_config *cfg)
{
    KMS_GUARD(hsm_parse_uri(cfg->token_uri, &h->uri));
    if (cfg->pin_file != NULL) {
        h->pin_file = strdup(cfg->pin_file);
        KMS_ENSURE(h->pin_file != NULL, KMS_ERR_NO_MEMORY);
    } else {
        /* The variable is unset once read, so the PIN is kept (in locked,
         * non-dumpable memory) for re-login after a recovery. */
        kms_buf_init_secret(&h->pin_kept, HSM_PIN_MAX_BYTES);
        KMS_GUARD(kms_secret_read_env(cfg->pin_env, &h->pin_kept));
    }
    h->pool_size = cfg->pool_size == 0 ? HSM_DEFAULT_POOL_SIZE : cfg->pool_size;
    KMS_ENSURE_MSG(h->pool_size <= HSM_MAX_POOL_SIZE, KMS_ERR_CONFIG, "HSM pool size above %u",
                   HSM_MAX_POOL_SIZE);
    h->sessions = calloc(h->pool_size, sizeof(*h->sessions));
    h->busy = calloc(h->pool_size, sizeof(*h->busy));
    KMS_ENSURE(h->sessions != NULL && h->busy != NULL, KMS_ERR_NO_MEMORY);
    for (unsigned i = 0; i < h->pool_size; i++)
        h->sessions[i] = CK_INVALID_HANDLE;
    KMS_GUARD(
        kms_hsm_lru_new(cfg->cache_capacity == 0 ? HSM_DEFAULT_CACHE_CAPACITY : cfg->cache_capacity,
                        hsm_cache_destroy, h, &h->cache));

    h->p11.f = hsm_module_load(cfg->module);
    KMS_ENSURE_MSG(h->p11.f != NULL, KMS_ERR_HSM_MODULE, "cannot load PKCS#11 module: %s",
                   p11_kit_message() ? p11_kit_message() : "unknown error");
    KMS_GUARD(hsm_module_check_config(h->p11.f));
    KMS_GUARD(hsm_module_init(&h->p11, &h->initialized));
    h->live = true;
    KMS_GUARD(hsm_token_find(h));
    return hsm_connect(h);
}

KMS_RESULT kms_hsm_open(const kms_hsm_config *cfg, kms_hsm **out)
{
    KMS_ENSURE(cfg != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(cfg->module != NULL && *cfg->module != '\0', KMS_ERR_CONFIG,
                   "no PKCS#11 module configured");
    KMS_ENSURE_MSG(cfg->token_uri != NULL, KMS_ERR_CONFIG, "no PKCS#11 token URI configured");
    KMS_ENSURE_MSG((cfg->pin_file != NULL) != (cfg->pin_env != NULL), KMS_ERR_CONFIG,
                   "exactly one of pin_file and pin_env must be set");
    kms_hsm *h = calloc(1, sizeof(*h));
    KMS_ENSURE(h != NULL, KMS_ERR_NO_MEMORY);
    h->p11.c = cfg->counters != NULL ? cfg->counters : &h->own_counters;
    h->owner = CK_INVALID_HANDLE;
    h->backoff_ns = HSM_BACKOFF_MIN_NS;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* Recovery must not starve behind a stream of operations. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&h->life, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&h->recover_mu, NULL);
    pthread_mutex_init(&h->pool_mu, NULL);
    pthread_cond_init(&h->pool_cv, NULL);
    pthread_mutex_init(&h->owner_mu, NULL);
    pthread_mutex_init(&h->master_mu, NULL);

    kms_result r = hsm_open_steps(h, cfg);
    if (!kms_is_ok(r)) {
        /* Keep the first error for the caller: closing may raise others. */
        kms_err e = r.err;
        char detail[256];
        snprintf(detail, sizeof(detail), "%s", kms_error_detail());
        kms_hsm_close(h);
        if (detail[0] != '\0')
            return kms_error_raisef(e, __FILE__, __LINE__, "%s", detail);
        return kms_error_raise(e, __FILE__, __LINE__);
    }
    *out = h;
    return KMS_OK_RESULT;
}

void kms_hsm_close(kms_hsm *h)
{
    if (h == NULL)
        return;
    if (h->p11.f != NULL) {
        (void)hsm_drop(h);
        (void)hsm_zombies_close(h);
        if (h->initialized)
            (void)kms_p11_finalize(&h->p11);
        p11_kit_module_release(h->p11.f);
    }
    kms_hsm_lru_free(h->cache);
    hsm_masters_clear(h);
    free(h->sessions);
    free(h->busy);
    free(h->pin_file);
    kms_buf_free(&h->pin_kept);
    if (h->uri != NULL)
        p11_kit_uri_free(h->uri);
    pthread_rwlock_destroy(&h->life);
    pthread_mutex_destroy(&h->recover_mu);
    pthread_mutex_destroy(&h->pool_mu);
    pthread_cond_destroy(&h->pool_cv);
    pthread_mutex_destroy(&h->owner_mu);
    pthread_mutex_destroy(&h->master_mu);
    free(h);
}

static kms_result hsm_count_one(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_HANDLE o, void *arg)
{
    (*(size_t *)arg)++;
    return KMS_OK_RESULT;
}

static KMS_RESULT hsm_object_count_once(kms_hsm *h, size_t *count)
{
    kms_hsm_session s;
    KMS_GUARD(hsm_enter(h, &s));
    size_t total = 0;
    /* An empty template matches every object the session can see
     * (PKCS#11 v2.40 section 5.7, C_FindObjectsInit). */
    kms_result r = hsm_find_each(h, &s, NULL, 0, hsm_count_one, &total);
    hsm_leave(h, &s);
    if (kms_is_ok(r))
        *count = total;
    return r;
}

KMS_RESULT kms_hsm_object_count(kms_hsm *h, size_t *count)
{
    return HSM_RETRY_ONCE(h, hsm_object_count_once(h, count));
}

void kms_hsm_stats_get(kms_hsm *h, kms_hsm_stats *out)
{
    memset(out, 0, sizeof(*out));
    const kms_hsm_counters *c = h->p11.c;
    out->calls = atomic_load(&c->calls);
    out->errors = atomic_load(&c->errors);
    out->call_ns = atomic_load(&c->ns);
    out->recoveries = atomic_load(&c->recoveries);
    out->cache_hits = atomic_load(&c->cache_hits);
    out->cache_misses = atomic_load(&c->cache_misses);
    kms_hsm_lru_stats cs;
    kms_hsm_lru_stats_get(h->cache, &cs);
    out->cache_evictions = cs.evictions;
    out->cache_size = cs.size;
    pthread_mutex_lock(&h->pool_mu);
    for (unsigned i = 0; i < h->pool_size; i++)
        out->sessions_open += h->sessions[i] != CK_INVALID_HANDLE;
    pthread_mutex_unlock(&h->pool_mu);
    pthread_mutex_lock(&h->owner_mu);
    out->sessions_open += h->owner != CK_INVALID_HANDLE;
    pthread_mutex_unlock(&h->owner_mu);
}
