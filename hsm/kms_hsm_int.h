/* hsm/ internal: the kms_hsm handle, shared by kms_hsm.c and kms_hsm_bench.c. */
#ifndef KMS_HSM_INT_H
#define KMS_HSM_INT_H

#include "kms_hsm.h"
#include "kms_hsm_lru.h"
#include "kms_p11.h"

#include <p11-kit/uri.h>

#include <pthread.h>

typedef struct kms_hsm_master kms_hsm_master;

struct kms_hsm {
    kms_p11 p11;
    kms_hsm_counters own_counters; /* unless kms_hsm_config.counters */
    P11KitUri *uri;
    char *pin_file;
    kms_buf pin_kept;           /* only when the PIN came from the (now unset) environment */
    bool initialized;           /* we hold a C_Initialize of the module */
    bool live;                  /* the module is initialised (by us or another user) */
    unsigned finalize_failures; /* consecutive failed C_Finalize in recovery */
    /* Sessions whose C_CloseSession failed during a recovery: closed again
     * on the next attempt (under `life` exclusive). */
    CK_SESSION_HANDLE zombies[16];
    unsigned nzombies;
    CK_SLOT_ID slot;

    /* Operations hold it shared; recovery holds it exclusive. */
    pthread_rwlock_t life;
    _Atomic int broken;
    _Atomic int need_reinit;
    _Atomic uint64_t gen; /* bumped by every rebuild */
    pthread_mutex_t recover_mu;
    uint64_t next_attempt_ns; /* under recover_mu */
    uint64_t backoff_ns;

    /* Session pool: one session per operation at a time. */
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    unsigned pool_size;
    CK_SESSION_HANDLE *sessions; /* CK_INVALID_HANDLE: reopen lazily */
    bool *busy;

    /* The long-lived owner session of every cached session object. */
    pthread_mutex_t owner_mu;
    CK_SESSION_HANDLE owner;

    pthread_mutex_t master_mu;
    kms_hsm_master *masters;

    kms_hsm_lru *cache;
};

/* A pool session held by one operation. */
typedef struct {
    unsigned idx;
    CK_SESSION_HANDLE h;
    uint64_t gen;
    bool dirty;
} kms_hsm_session;

KMS_RESULT kms_hsm_session_acquire(kms_hsm *hsm, kms_hsm_session *s);
void kms_hsm_session_release(kms_hsm *hsm, kms_hsm_session *s);
/* Translates rv (!= CKR_OK) for function, marks the session dirty or the
 * pool broken as rv requires. */
kms_result kms_hsm_session_fail(kms_hsm *hsm, kms_hsm_session *s, CK_RV rv, const char *function,
                                kms_p11_ctx ctx);

/* Enters an operation: recovers a broken pool first, holds `life` shared
 * and one pool session until kms_hsm_leave (for kms_hsm_sign.c). */
KMS_RESULT kms_hsm_enter(kms_hsm *hsm, kms_hsm_session *s);
/* One C_FindObjects batch of at most max handles for tmpl, the search ended
 * on every path; failures go through kms_hsm_session_fail. */
KMS_RESULT kms_hsm_find(kms_hsm *hsm, kms_hsm_session *s, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                        CK_OBJECT_HANDLE *out, CK_ULONG max, CK_ULONG *count);
void kms_hsm_leave(kms_hsm *hsm, kms_hsm_session *s);

#endif /* KMS_HSM_INT_H */
