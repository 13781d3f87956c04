/*
 * The PKCS#11 seam (kms_p11.h): every call is counted and timed here, and
 * every CK_RV is translated here, once.
 */
#define _GNU_SOURCE
#include "kms_p11.h"

#include <p11-kit/p11-kit.h>

#include <time.h>

static uint64_t p11_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static CK_RV p11_account(kms_p11 *p, uint64_t t0, CK_RV rv)
{
    atomic_fetch_add_explicit(&p->c->ns, p11_now_ns() - t0, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->c->calls, 1, memory_order_relaxed);
    if (rv != CKR_OK)
        atomic_fetch_add_explicit(&p->c->errors, 1, memory_order_relaxed);
    return rv;
}

/* One statement expression so that the clock is read before the call (the
 * order of evaluation of function arguments is unspecified). */
#define P11_CALL(p, name, ...)                     \
    ({                                             \
        uint64_t p11_t0_ = p11_now_ns();           \
        CK_RV p11_rv_ = (p)->f->name(__VA_ARGS__); \
        p11_account((p), p11_t0_, p11_rv_);        \
    })

bool kms_p11_rv_transient(CK_RV rv)
{
    switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_COUNT:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_FUNCTION_FAILED:
    case CKR_GENERAL_ERROR:
    case CKR_HOST_MEMORY:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_OPERATION_ACTIVE:
        return true;
    default:
        return false;
    }
}

bool kms_p11_rv_needs_reinit(CK_RV rv)
{
    switch (rv) {
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_GENERAL_ERROR:
        return true;
    default:
        return false;
    }
}

bool kms_p11_rv_dirties_session(CK_RV rv)
{
    switch (rv) {
    case CKR_OK:
    /* PKCS#11 v2.40 5.9/5.12: a call to C_Decrypt "always terminates the
     * active decryption operation unless it returns CKR_BUFFER_TOO_SMALL";
     * a bad tag or length leaves the session clean. */
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
        return false;
    default:
        return true;
    }
}

kms_result kms_p11_fail(CK_RV rv, const char *function, kms_p11_ctx ctx)
{
    kms_err e;
    switch (rv) {
    case CKR_OK:
        return KMS_OK_RESULT;
    case CKR_SESSION_COUNT:
    case CKR_DEVICE_MEMORY:
    case CKR_HOST_MEMORY:
        e = KMS_ERR_HSM_BUSY;
        break;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
        e = KMS_ERR_HSM_PIN;
        break;
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_WRAPPING_KEY_HANDLE_INVALID:
    case CKR_UNWRAPPING_KEY_HANDLE_INVALID:
        e = KMS_ERR_HSM_OBJECT_MISSING;
        break;
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
        e = ctx == KMS_P11_CTX_DECRYPT ? KMS_ERR_TOKEN_INVALID : KMS_ERR_HSM_FAILED;
        break;
    default:
        e = kms_p11_rv_transient(rv) ? KMS_ERR_HSM_UNAVAILABLE : KMS_ERR_HSM_FAILED;
        break;
    }
    return kms_error_raisef(e, __FILE__, __LINE__, "%s: %s", function, p11_kit_strerror(rv));
}

CK_RV kms_p11_initialize(kms_p11 *p, CK_C_INITIALIZE_ARGS *args)
{
    return P11_CALL(p, C_Initialize, args);
}

CK_RV kms_p11_finalize(kms_p11 *p)
{
    return P11_CALL(p, C_Finalize, NULL);
}

CK_RV kms_p11_get_slot_list(kms_p11 *p, CK_BBOOL present, CK_SLOT_ID *slots, CK_ULONG *count)
{
    return P11_CALL(p, C_GetSlotList, present, slots, count);
}

CK_RV kms_p11_get_token_info(kms_p11 *p, CK_SLOT_ID slot, CK_TOKEN_INFO *info)
{
    return P11_CALL(p, C_GetTokenInfo, slot, info);
}

CK_RV kms_p11_init_token(kms_p11 *p, CK_SLOT_ID slot, const uint8_t *so_pin, size_t so_pin_len,
                         const uint8_t label[32])
{
    return P11_CALL(p, C_InitToken, slot, (CK_UTF8CHAR_PTR)so_pin, so_pin_len,
                    (CK_UTF8CHAR_PTR)label);
}

CK_RV kms_p11_open_session(kms_p11 *p, CK_SLOT_ID slot, CK_SESSION_HANDLE *s)
{
    return P11_CALL(p, C_OpenSession, slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, s);
}

CK_RV kms_p11_close_session(kms_p11 *p, CK_SESSION_HANDLE s)
{
    return P11_CALL(p, C_CloseSession, s);
}

CK_RV kms_p11_login(kms_p11 *p, CK_SESSION_HANDLE s, CK_USER_TYPE who, const uint8_t *pin,
                    size_t pin_len)
{
    return P11_CALL(p, C_Login, s, who, (CK_UTF8CHAR_PTR)pin, pin_len);
}

CK_RV kms_p11_logout(kms_p11 *p, CK_SESSION_HANDLE s)
{
    return P11_CALL(p, C_Logout, s);
}

CK_RV kms_p11_init_pin(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *pin, size_t pin_len)
{
    return P11_CALL(p, C_InitPIN, s, (CK_UTF8CHAR_PTR)pin, pin_len);
}

CK_RV kms_p11_generate_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *tmpl,
                           CK_ULONG n, CK_OBJECT_HANDLE *key)
{
    return P11_CALL(p, C_GenerateKey, s, m, tmpl, n, key);
}

CK_RV kms_p11_wrap_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE wrapping,
                       CK_OBJECT_HANDLE key, uint8_t *out, CK_ULONG *out_len)
{
    return P11_CALL(p, C_WrapKey, s, m, wrapping, key, out, out_len);
}

CK_RV kms_p11_unwrap_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m,
                         CK_OBJECT_HANDLE unwrapping, const uint8_t *wrapped, size_t wrapped_len,
                         CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *key)
{
    return P11_CALL(p, C_UnwrapKey, s, m, unwrapping, (CK_BYTE_PTR)wrapped, wrapped_len, tmpl, n,
                    key);
}

CK_RV kms_p11_destroy_object(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o)
{
    return P11_CALL(p, C_DestroyObject, s, o);
}

CK_RV kms_p11_find_objects_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl, CK_ULONG n)
{
    return P11_CALL(p, C_FindObjectsInit, s, tmpl, n);
}

CK_RV kms_p11_find_objects(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *out, CK_ULONG max,
                           CK_ULONG *count)
{
    return P11_CALL(p, C_FindObjects, s, out, max, count);
}

CK_RV kms_p11_find_objects_final(kms_p11 *p, CK_SESSION_HANDLE s)
{
    return P11_CALL(p, C_FindObjectsFinal, s);
}

CK_RV kms_p11_get_attribute_value(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                                  CK_ATTRIBUTE *tmpl, CK_ULONG n)
{
    return P11_CALL(p, C_GetAttributeValue, s, o, tmpl, n);
}

CK_RV kms_p11_encrypt_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k)
{
    return P11_CALL(p, C_EncryptInit, s, m, k);
}

CK_RV kms_p11_encrypt(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len,
                      uint8_t *out, CK_ULONG *out_len)
{
    return P11_CALL(p, C_Encrypt, s, (CK_BYTE_PTR)in, in_len, out, out_len);
}

CK_RV kms_p11_decrypt_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k)
{
    return P11_CALL(p, C_DecryptInit, s, m, k);
}

CK_RV kms_p11_decrypt(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len,
                      uint8_t *out, CK_ULONG *out_len)
{
    return P11_CALL(p, C_Decrypt, s, (CK_BYTE_PTR)in, in_len, out, out_len);
}

CK_RV kms_p11_sign_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k)
{
    return P11_CALL(p, C_SignInit, s, m, k);
}

CK_RV kms_p11_sign_update(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len)
{
    return P11_CALL(p, C_SignUpdate, s, (CK_BYTE_PTR)in, in_len);
}

CK_RV kms_p11_sign_final(kms_p11 *p, CK_SESSION_HANDLE s, uint8_t *out, CK_ULONG *out_len)
{
    return P11_CALL(p, C_SignFinal, s, out, out_len);
}

CK_RV kms_p11_generate_random(kms_p11 *p, CK_SESSION_HANDLE s, uint8_t *out, size_t n)
{
    return P11_CALL(p, C_GenerateRandom, s, out, n);
}

CK_RV kms_p11_generate_key_pair(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m,
                                CK_ATTRIBUTE *pub_tmpl, CK_ULONG pub_n, CK_ATTRIBUTE *priv_tmpl,
                                CK_ULONG priv_n, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv)
{
    return P11_CALL(p, C_GenerateKeyPair, s, m, pub_tmpl, pub_n, priv_tmpl, priv_n, pub, priv);
}

CK_RV kms_p11_sign(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len, uint8_t *out,
                   CK_ULONG *out_len)
{
    return P11_CALL(p, C_Sign, s, (CK_BYTE_PTR)in, in_len, out, out_len);
}
