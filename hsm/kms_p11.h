/*
 * hsm/ internal: the one seam between kmsd and PKCS#11. Every PKCS#11 call of
 * kmsd goes through the wrappers of kms_p11.c, which count it, time it and
 * hand back the raw CK_RV; kms_p11_fail() translates a CK_RV into the
 * project's error table, once, and classifies it (transient or not). Nothing
 * outside hsm/ includes this header: no CK_* type leaves the layer.
 */
#ifndef KMS_P11_H
#define KMS_P11_H

#include "kms_hsm.h"
#include "kms_result.h"

#include <p11-kit/pkcs11.h>

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct {
    CK_FUNCTION_LIST *f;
    kms_hsm_counters *c; /* every call is counted and timed here */
} kms_p11;

/* What the call was doing, where that changes the meaning of a CK_RV. */
typedef enum {
    KMS_P11_CTX_ANY = 0,
    KMS_P11_CTX_DECRYPT, /* encrypted-data errors mean a bad token */
    KMS_P11_CTX_LOGIN,   /* PIN errors */
} kms_p11_ctx;

/* CK_RVs after which the session, the login or the whole module is gone:
 * the pool must be dropped and rebuilt. */
bool kms_p11_rv_transient(CK_RV rv);
/* Transient CK_RVs after which the module itself must be re-initialised. */
bool kms_p11_rv_needs_reinit(CK_RV rv);
/* The operation on a session may still be active after rv: the session
 * must not be reused. */
bool kms_p11_rv_dirties_session(CK_RV rv);
/* Raises the project error for rv (rv != CKR_OK) with a detail naming the
 * function and p11_kit_strerror(rv), never the arguments. */
kms_result kms_p11_fail(CK_RV rv, const char *function, kms_p11_ctx ctx);

/* Thin wrappers: one per PKCS#11 function kmsd uses. */
CK_RV kms_p11_initialize(kms_p11 *p, CK_C_INITIALIZE_ARGS *args);
CK_RV kms_p11_finalize(kms_p11 *p);
CK_RV kms_p11_get_slot_list(kms_p11 *p, CK_BBOOL present, CK_SLOT_ID *slots, CK_ULONG *count);
CK_RV kms_p11_get_token_info(kms_p11 *p, CK_SLOT_ID slot, CK_TOKEN_INFO *info);
CK_RV kms_p11_init_token(kms_p11 *p, CK_SLOT_ID slot, const uint8_t *so_pin, size_t so_pin_len,
                         const uint8_t label[32]);
CK_RV kms_p11_open_session(kms_p11 *p, CK_SLOT_ID slot, CK_SESSION_HANDLE *s);
CK_RV kms_p11_close_session(kms_p11 *p, CK_SESSION_HANDLE s);
CK_RV kms_p11_login(kms_p11 *p, CK_SESSION_HANDLE s, CK_USER_TYPE who, const uint8_t *pin,
                    size_t pin_len);
CK_RV kms_p11_logout(kms_p11 *p, CK_SESSION_HANDLE s);
CK_RV kms_p11_init_pin(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *pin, size_t pin_len);
CK_RV kms_p11_generate_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *tmpl,
                           CK_ULONG n, CK_OBJECT_HANDLE *key);
CK_RV kms_p11_wrap_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE wrapping,
                       CK_OBJECT_HANDLE key, uint8_t *out, CK_ULONG *out_len);
CK_RV kms_p11_unwrap_key(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m,
                         CK_OBJECT_HANDLE unwrapping, const uint8_t *wrapped, size_t wrapped_len,
                         CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *key);
CK_RV kms_p11_destroy_object(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o);
CK_RV kms_p11_find_objects_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl, CK_ULONG n);
CK_RV kms_p11_find_objects(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *out, CK_ULONG max,
                           CK_ULONG *count);
CK_RV kms_p11_find_objects_final(kms_p11 *p, CK_SESSION_HANDLE s);
CK_RV kms_p11_get_attribute_value(kms_p11 *p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                                  CK_ATTRIBUTE *tmpl, CK_ULONG n);
CK_RV kms_p11_encrypt_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k);
CK_RV kms_p11_encrypt(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len,
                      uint8_t *out, CK_ULONG *out_len);
CK_RV kms_p11_decrypt_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k);
CK_RV kms_p11_decrypt(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len,
                      uint8_t *out, CK_ULONG *out_len);
CK_RV kms_p11_sign_init(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE k);
CK_RV kms_p11_sign_update(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len);
CK_RV kms_p11_sign_final(kms_p11 *p, CK_SESSION_HANDLE s, uint8_t *out, CK_ULONG *out_len);
CK_RV kms_p11_generate_random(kms_p11 *p, CK_SESSION_HANDLE s, uint8_t *out, size_t n);
/* Added for the audit signing key (hsm/kms_hsm_sign.c). */
CK_RV kms_p11_generate_key_pair(kms_p11 *p, CK_SESSION_HANDLE s, CK_MECHANISM *m,
                                CK_ATTRIBUTE *pub_tmpl, CK_ULONG pub_n, CK_ATTRIBUTE *priv_tmpl,
                                CK_ULONG priv_n, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv);
CK_RV kms_p11_sign(kms_p11 *p, CK_SESSION_HANDLE s, const uint8_t *in, size_t in_len, uint8_t *out,
                   CK_ULONG *out_len);

#endif /* KMS_P11_H */
