/*
 * The one error table of kmsd. Every error has exactly one entry in
 * kms_error.c: its stable API code (snake_case, used in JSON error bodies and
 * in CLI output), HTTP status, CLI exit code, whether retrying can help, and
 * the message shown to people. tests/unit/error_test.c fails if any entry is
 * incomplete or if two entries share an API code.
 *
 * Foreign codes are translated where they enter: CKR_* inside hsm/, MDB_*
 * inside kms/ store, OpenSSL errors inside crypto/. Nothing above those
 * layers sees a foreign code.
 */
#ifndef KMS_ERROR_H
#define KMS_ERROR_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    KMS_OK = 0,

    /* generic */
    KMS_ERR_INTERNAL,
    KMS_ERR_NO_MEMORY,
    KMS_ERR_INVALID_ARGUMENT,
    KMS_ERR_LIMIT_EXCEEDED,
    KMS_ERR_CONFIG,
    KMS_ERR_IO,
    KMS_ERR_UNAVAILABLE,

    /* crypto/ */
    KMS_ERR_BASE64_INVALID,
    KMS_ERR_TOKEN_INVALID,
    KMS_ERR_CRYPTO,
    KMS_ERR_RANDOM,
    KMS_ERR_SECURE_MEMORY,

    /* hsm/ */
    KMS_ERR_HSM_MODULE,
    KMS_ERR_HSM_TOKEN_NOT_FOUND,
    KMS_ERR_HSM_PIN,
    KMS_ERR_HSM_UNAVAILABLE,
    KMS_ERR_HSM_BUSY,
    KMS_ERR_HSM_OBJECT_MISSING,
    KMS_ERR_HSM_FAILED,

    /* kms/ store */
    KMS_ERR_STORE,
    KMS_ERR_STORE_FULL,
    KMS_ERR_STORE_BUSY,
    KMS_ERR_STORE_CORRUPT,
    KMS_ERR_STORE_SCHEMA,

    /* kms/ domain */
    KMS_ERR_KEY_NAME_INVALID,
    KMS_ERR_KEY_NOT_FOUND,
    KMS_ERR_KEY_EXISTS,
    KMS_ERR_KEY_PURPOSE,
    KMS_ERR_VERSION_NOT_FOUND,
    KMS_ERR_VERSION_DISABLED,
    KMS_ERR_VERSION_COMPROMISED,
    KMS_ERR_VERSION_DESTROYED,
    KMS_ERR_VERSION_BELOW_MINIMUM,
    KMS_ERR_VERSION_EXHAUSTED,
    KMS_ERR_STATE_TRANSITION,
    KMS_ERR_PROTECTED,
    KMS_ERR_CONFLICT,

    /* api/ */
    KMS_ERR_UNAUTHENTICATED,
    KMS_ERR_FORBIDDEN,
    KMS_ERR_NOT_FOUND,
    KMS_ERR_METHOD_NOT_ALLOWED,
    KMS_ERR_JSON_INVALID,
    KMS_ERR_BODY_TOO_LARGE,
    KMS_ERR_UNSUPPORTED_MEDIA_TYPE,
    KMS_ERR_AUDIT_UNAVAILABLE,

    KMS_ERR_COUNT
} kms_err;

typedef struct {
    kms_err err;
    const char *code;    /* stable API code, e.g. "invalid_token" */
    int http_status;     /* status the API answers with */
    int exit_code;       /* CLI exit status (documented in docs/cli.md) */
    bool transient;      /* retrying later may succeed */
    const char *message; /* for people; never carries secrets */
} kms_error_info;

/* The entry for err; the KMS_ERR_INTERNAL entry for an out-of-range value. */
const kms_error_info *kms_error_info_get(kms_err err);
const char *kms_error_code(kms_err err);
const char *kms_error_message(kms_err err);
int kms_error_http_status(kms_err err);
int kms_error_exit_code(kms_err err);
bool kms_error_is_transient(kms_err err);
/* Looks an entry up by API code (the CLI maps server answers back). */
kms_err kms_error_from_code(const char *code);

/* The calling thread's last raised error: code, detail text (may be empty;
 * never holds secrets) and where it was raised. */
kms_err kms_error_last(void);
const char *kms_error_detail(void);
const char *kms_error_location(void);
void kms_error_clear(void);

#endif /* KMS_ERROR_H */
