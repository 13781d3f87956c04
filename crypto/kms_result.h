/*
 * The result type every fallible function of kmsd returns, and the macros
 * that keep the happy path straight (shape after s2n-tls utils/s2n_result.h).
 *
 *   KMS_RESULT kms_thing_do(...)
 *   {
 *       KMS_ENSURE(len <= MAX, KMS_ERR_LIMIT_EXCEEDED);
 *       KMS_GUARD(kms_other_thing(...));
 *       KMS_GUARD_OSSL(EVP_DigestUpdate(...), KMS_ERR_CRYPTO);
 *       return KMS_OK_RESULT;
 *   }
 *
 * A result must be used: KMS_RESULT carries warn_unused_result, so a dropped
 * error is a compile error under -Werror.
 */
#ifndef KMS_RESULT_H
#define KMS_RESULT_H

#include "kms_error.h"

typedef struct {
    kms_err err;
} kms_result;

#define KMS_MUST_USE __attribute__((warn_unused_result))
#define KMS_RESULT   KMS_MUST_USE kms_result

#define KMS_OK_RESULT ((kms_result){KMS_OK})
#define kms_is_ok(r)  ((r).err == KMS_OK)

/* Records the error (code, file, line; detail cleared or formatted) in the
 * calling thread's error slot and returns it as a result. */
kms_result kms_error_raise(kms_err err, const char *file, int line);
kms_result kms_error_raisef(kms_err err, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define KMS_BAIL(e)          return kms_error_raise((e), __FILE__, __LINE__)
#define KMS_BAIL_MSG(e, ...) return kms_error_raisef((e), __FILE__, __LINE__, __VA_ARGS__)

#define KMS_ENSURE(cond, e) \
    do {                    \
        if (!(cond))        \
            KMS_BAIL(e);    \
    } while (0)

#define KMS_ENSURE_MSG(cond, e, ...)      \
    do {                                  \
        if (!(cond))                      \
            KMS_BAIL_MSG(e, __VA_ARGS__); \
    } while (0)

/* Propagates a failed result unchanged. */
#define KMS_GUARD(x)                   \
    do {                               \
        kms_result kms_guard_r_ = (x); \
        if (!kms_is_ok(kms_guard_r_))  \
            return kms_guard_r_;       \
    } while (0)

/* OpenSSL's convention: 1 is success, anything else is failure. */
#define KMS_GUARD_OSSL(x, e) \
    do {                     \
        if ((x) != 1)        \
            KMS_BAIL(e);     \
    } while (0)

/* For functions that use one exit label instead of cleanup attributes:
 * stores a failed result in `res` and jumps to `label`. */
#define KMS_GUARD_GOTO(res, x, label) \
    do {                              \
        (res) = (x);                  \
        if (!kms_is_ok(res))          \
            goto label;               \
    } while (0)

/* Cleanup that cannot be forgotten (s2n-tls DEFER_CLEANUP). */
#define KMS_DEFER(fn) __attribute__((cleanup(fn)))

#define KMS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif /* KMS_RESULT_H */
