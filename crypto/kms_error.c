#include "kms_error.h"
#include "kms_result.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Exit codes follow sysexits(3) where one fits, so scripts can tell usage
 * errors (64), data errors (65), unavailable services (69), internal errors
 * (70), I/O (74), transient failures (75), permissions (77) and config (78)
 * apart. Domain "not found" and "conflict" get codes of their own. */
#define EX_USAGE       64
#define EX_DATAERR     65
#define EX_NOTFOUND    66
#define EX_UNAVAILABLE 69
#define EX_SOFTWARE    70
#define EX_IOERR       74
#define EX_TEMPFAIL    75
#define EX_NOPERM      77
#define EX_CONFIG      78
#define EX_CONFLICT    79
#define EX_REFUSED     80

static const kms_error_info kms_errors[KMS_ERR_COUNT] = {
    [KMS_OK] = {KMS_OK, "ok", 200, 0, false, "success"},

    [KMS_ERR_INTERNAL] = {KMS_ERR_INTERNAL, "internal", 500, EX_SOFTWARE, false, "internal error"},
    [KMS_ERR_NO_MEMORY] = {KMS_ERR_NO_MEMORY, "no_memory", 503, EX_TEMPFAIL, true, "out of memory"},
    [KMS_ERR_INVALID_ARGUMENT] = {KMS_ERR_INVALID_ARGUMENT, "invalid_argument", 400, EX_USAGE,
                                  false, "invalid argument"},
    [KMS_ERR_LIMIT_EXCEEDED] = {KMS_ERR_LIMIT_EXCEEDED, "limit_exceeded", 413, EX_DATAERR, false,
                                "a size or count limit was exceeded"},
    [KMS_ERR_CONFIG] = {KMS_ERR_CONFIG, "config_invalid", 500, EX_CONFIG, false,
                        "invalid configuration"},
    [KMS_ERR_IO] = {KMS_ERR_IO, "io_error", 500, EX_IOERR, false, "input/output error"},
    [KMS_ERR_UNAVAILABLE] = {KMS_ERR_UNAVAILABLE, "unavailable", 503, EX_UNAVAILABLE, true,
                             "service unavailable, retry later"},

    [KMS_ERR_BASE64_INVALID] = {KMS_ERR_BASE64_INVALID, "invalid_base64", 400, EX_DATAERR, false,
                                "value is not valid base64"},
    [KMS_ERR_TOKEN_INVALID] = {KMS_ERR_TOKEN_INVALID, "invalid_token", 400, EX_DATAERR, false,
                               "ciphertext is invalid, tampered with, for another key, or the "
                               "context does not match"},
    [KMS_ERR_CRYPTO] = {KMS_ERR_CRYPTO, "crypto_error", 500, EX_SOFTWARE, false,
                        "cryptographic library failure"},
    [KMS_ERR_RANDOM] = {KMS_ERR_RANDOM, "random_unavailable", 503, EX_TEMPFAIL, true,
                        "random number generator failure"},
    [KMS_ERR_SECURE_MEMORY] = {KMS_ERR_SECURE_MEMORY, "secure_memory", 503, EX_TEMPFAIL, true,
                               "secure memory could not be allocated"},

    [KMS_ERR_HSM_MODULE] = {KMS_ERR_HSM_MODULE, "hsm_module", 503, EX_CONFIG, false,
                            "the PKCS#11 module could not be loaded or initialised"},
    [KMS_ERR_HSM_TOKEN_NOT_FOUND] = {KMS_ERR_HSM_TOKEN_NOT_FOUND, "hsm_token_not_found", 503,
                                     EX_CONFIG, false, "no token matches the configured URI"},
    [KMS_ERR_HSM_PIN] = {KMS_ERR_HSM_PIN, "hsm_pin", 503, EX_CONFIG, false,
                         "HSM login failed: PIN incorrect, locked or unreadable"},
    [KMS_ERR_HSM_UNAVAILABLE] = {KMS_ERR_HSM_UNAVAILABLE, "hsm_unavailable", 503, EX_TEMPFAIL, true,
                                 "the HSM is unavailable, retry later"},
    [KMS_ERR_HSM_BUSY] = {KMS_ERR_HSM_BUSY, "hsm_busy", 503, EX_TEMPFAIL, true,
                          "the HSM is busy, retry later"},
    [KMS_ERR_HSM_OBJECT_MISSING] = {KMS_ERR_HSM_OBJECT_MISSING, "hsm_object_missing", 500,
                                    EX_SOFTWARE, false,
                                    "a key object expected on the HSM token is missing"},
    [KMS_ERR_HSM_FAILED] = {KMS_ERR_HSM_FAILED, "hsm_failed", 500, EX_SOFTWARE, false,
                            "the HSM refused the operation"},

    [KMS_ERR_STORE] = {KMS_ERR_STORE, "store_error", 500, EX_IOERR, false,
                       "metadata store failure"},
    [KMS_ERR_STORE_FULL] = {KMS_ERR_STORE_FULL, "store_full", 507, EX_IOERR, false,
                            "metadata store is full and reached its configured maximum size"},
    [KMS_ERR_STORE_BUSY] = {KMS_ERR_STORE_BUSY, "store_busy", 503, EX_TEMPFAIL, true,
                            "metadata store is busy, retry later"},
    [KMS_ERR_STORE_CORRUPT] = {KMS_ERR_STORE_CORRUPT, "store_corrupt", 500, EX_SOFTWARE, false,
                               "metadata store holds a malformed record"},
    [KMS_ERR_STORE_SCHEMA] = {KMS_ERR_STORE_SCHEMA, "store_schema", 500, EX_CONFIG, false,
                              "metadata store has an unsupported schema version"},

    [KMS_ERR_KEY_NAME_INVALID] = {KMS_ERR_KEY_NAME_INVALID, "invalid_key_name", 400, EX_USAGE,
                                  false, "key names match [a-z0-9][a-z0-9._-]{0,127}"},
    [KMS_ERR_KEY_NOT_FOUND] = {KMS_ERR_KEY_NOT_FOUND, "key_not_found", 404, EX_NOTFOUND, false,
                               "no such key"},
    [KMS_ERR_KEY_EXISTS] = {KMS_ERR_KEY_EXISTS, "key_exists", 409, EX_CONFLICT, false,
                            "a key with that name already exists"},
    [KMS_ERR_KEY_PURPOSE] = {KMS_ERR_KEY_PURPOSE, "wrong_key_purpose", 400, EX_USAGE, false,
                             "the key's purpose does not allow this operation"},
    [KMS_ERR_VERSION_NOT_FOUND] = {KMS_ERR_VERSION_NOT_FOUND, "version_not_found", 404, EX_NOTFOUND,
                                   false, "no such key version"},
    [KMS_ERR_VERSION_DISABLED] = {KMS_ERR_VERSION_DISABLED, "version_disabled", 403, EX_REFUSED,
                                  false, "the key version is disabled"},
    [KMS_ERR_VERSION_COMPROMISED] = {KMS_ERR_VERSION_COMPROMISED, "version_compromised", 403,
                                     EX_REFUSED, false,
                                     "the key version is compromised; only rewrap by the "
                                     "migrator role may read it"},
    [KMS_ERR_VERSION_DESTROYED] = {KMS_ERR_VERSION_DESTROYED, "version_destroyed", 410, EX_REFUSED,
                                   false, "the key version has been destroyed"},
    [KMS_ERR_VERSION_BELOW_MINIMUM] = {KMS_ERR_VERSION_BELOW_MINIMUM, "version_below_minimum", 403,
                                       EX_REFUSED, false,
                                       "the key version is below the key's minimum decryption "
                                       "version"},
    [KMS_ERR_VERSION_EXHAUSTED] = {KMS_ERR_VERSION_EXHAUSTED, "version_exhausted", 503, EX_TEMPFAIL,
                                   true,
                                   "the primary version reached its encryption limit; rotate "
                                   "the key"},
    [KMS_ERR_STATE_TRANSITION] = {KMS_ERR_STATE_TRANSITION, "invalid_state_transition", 409,
                                  EX_CONFLICT, false,
                                  "the version cannot move to that state from its current one"},
    [KMS_ERR_PROTECTED] = {KMS_ERR_PROTECTED, "protected", 409, EX_CONFLICT, false,
                           "refused by a deletion guard or the minimum decryption version"},
    [KMS_ERR_CONFLICT] = {KMS_ERR_CONFLICT, "conflict", 409, EX_CONFLICT, false,
                          "the request conflicts with the key's current state"},

    [KMS_ERR_UNAUTHENTICATED] = {KMS_ERR_UNAUTHENTICATED, "unauthenticated", 401, EX_NOPERM, false,
                                 "a valid client certificate is required"},
    [KMS_ERR_FORBIDDEN] = {KMS_ERR_FORBIDDEN, "forbidden", 403, EX_NOPERM, false,
                           "the client's role does not allow this operation on this key"},
    [KMS_ERR_NOT_FOUND] = {KMS_ERR_NOT_FOUND, "not_found", 404, EX_NOTFOUND, false,
                           "no such route"},
    [KMS_ERR_METHOD_NOT_ALLOWED] = {KMS_ERR_METHOD_NOT_ALLOWED, "method_not_allowed", 405, EX_USAGE,
                                    false, "method not allowed on this route"},
    [KMS_ERR_JSON_INVALID] = {KMS_ERR_JSON_INVALID, "invalid_json", 400, EX_DATAERR, false,
                              "request body is not valid JSON of the expected shape"},
    [KMS_ERR_BODY_TOO_LARGE] = {KMS_ERR_BODY_TOO_LARGE, "body_too_large", 413, EX_DATAERR, false,
                                "request body exceeds the size limit"},
    [KMS_ERR_UNSUPPORTED_MEDIA_TYPE] = {KMS_ERR_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                                        415, EX_USAGE, false,
                                        "request body must be application/json"},
    [KMS_ERR_AUDIT_UNAVAILABLE] = {KMS_ERR_AUDIT_UNAVAILABLE, "audit_unavailable", 503, EX_TEMPFAIL,
                                   true, "the audit log cannot be written; requests are refused"},
};

const kms_error_info *kms_error_info_get(kms_err err)
{
    if ((unsigned)err >= KMS_ERR_COUNT || kms_errors[err].code == NULL) {
        return &kms_errors[KMS_ERR_INTERNAL];
    }
    return &kms_errors[err];
}

const char *kms_error_code(kms_err err)
{
    return kms_error_info_get(err)->code;
}

const char *kms_error_message(kms_err err)
{
    return kms_error_info_get(err)->message;
}

int kms_error_http_status(kms_err err)
{
    return kms_error_info_get(err)->http_status;
}

int kms_error_exit_code(kms_err err)
{
    return kms_error_info_get(err)->exit_code;
}

bool kms_error_is_transient(kms_err err)
{
    return kms_error_info_get(err)->transient;
}

kms_err kms_error_from_code(const char *code)
{
    if (code == NULL) {
        return KMS_ERR_INTERNAL;
    }
    for (size_t i = 0; i < KMS_ERR_COUNT; i++) {
        if (kms_errors[i].code != NULL && strcmp(kms_errors[i].code, code) == 0) {
            return (kms_err)i;
        }
    }
    return KMS_ERR_INTERNAL;
}

/* The calling thread's last error. Detail text is formatted by the raiser
 * and must never include key material, PINs or plaintext. */
#define KMS_ERROR_DETAIL_BYTES 256
static _Thread_local kms_err last_err;
static _Thread_local char last_detail[KMS_ERROR_DETAIL_BYTES];
static _Thread_local const char *last_file;
static _Thread_local int last_line;
static _Thread_local char last_location[128];

kms_result kms_error_raise(kms_err err, const char *file, int line)
{
    last_err = err;
    last_detail[0] = '\0';
    last_file = file;
    last_line = line;
    return (kms_result){err};
}

kms_result kms_error_raisef(kms_err err, const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    last_err = err;
    last_file = file;
    last_line = line;
    va_start(ap, fmt);
    vsnprintf(last_detail, sizeof(last_detail), fmt, ap);
    va_end(ap);
    return (kms_result){err};
}

kms_err kms_error_last(void)
{
    return last_err;
}

const char *kms_error_detail(void)
{
    return last_detail;
}

const char *kms_error_location(void)
{
    if (last_file == NULL) {
        return "";
    }
    snprintf(last_location, sizeof(last_location), "%s:%d", last_file, last_line);
    return last_location;
}

void kms_error_clear(void)
{
    last_err = KMS_OK;
    last_detail[0] = '\0';
    last_file = NULL;
    last_line = 0;
}
