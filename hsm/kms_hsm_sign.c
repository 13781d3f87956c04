/*
 * The audit signing key (kms_hsm.h): an EC P-256 key pair generated on the
 * token, used with CKM_ECDSA over a SHA-256 digest computed by the caller.
 * Every PKCS#11 call goes through the seam in kms_p11.c.
 */
#define _GNU_SOURCE
#include "kms_hsm_int.h"

#include "kms_rand.h"

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#include <string.h>

#define SIGN_LABEL "kmsd-audit-signing"
/* The DER encoding of the OID prime256v1 / secp256r1 (1.2.840.10045.3.1.7),
 * what PKCS#11 v2.40 section 2.3.3 calls the "DER-encoding of an ANSI X9.62
 * Parameters value" in its namedCurve form. */
static const uint8_t sign_p256_oid[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
#define SIGN_P256_FIELD_BYTES 32
/* Uncompressed point 04 || X || Y, inside a DER OCTET STRING (04 41 ...). */
#define SIGN_POINT_MAX_BYTES 80

static const CK_BBOOL ck_true = CK_TRUE;
static const CK_BBOOL ck_false = CK_FALSE;
static const CK_OBJECT_CLASS ck_private = CKO_PRIVATE_KEY;
static const CK_OBJECT_CLASS ck_public = CKO_PUBLIC_KEY;
static const CK_KEY_TYPE ck_ec = CKK_EC;

#define ATTR(t, v)                   \
    {                                \
        (t), (void *)&(v), sizeof(v) \
    }

static KMS_RESULT sign_find(kms_hsm *h, kms_hsm_session *s, CK_OBJECT_CLASS cls,
                            const uint8_t id[KMS_HSM_ID_BYTES], CK_OBJECT_HANDLE *out, bool *found)
{
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, cls),
        ATTR(CKA_KEY_TYPE, ck_ec),
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

/* One attempt of an operation on a pool session; a transient failure marks
 * the pool broken, and the next kms_hsm_enter recovers it. */
typedef kms_result (*sign_step_fn)(kms_hsm *h, kms_hsm_session *s, void *arg);

static KMS_RESULT sign_run(kms_hsm *h, sign_step_fn fn, void *arg)
{
    kms_result r = KMS_OK_RESULT;
    /* Idempotent steps only: after a transient failure, run once more. */
    for (int attempt = 0; attempt < 2; attempt++) {
        kms_hsm_session s;
        r = kms_hsm_enter(h, &s);
        if (kms_is_ok(r)) {
            r = fn(h, &s, arg);
            kms_hsm_leave(h, &s);
        }
        if (r.err != KMS_ERR_HSM_UNAVAILABLE)
            break;
    }
    return r;
}

typedef struct {
    uint8_t id[KMS_HSM_ID_BYTES];
} sign_create_arg;

static KMS_RESULT sign_create_step(kms_hsm *h, kms_hsm_session *s, void *argp)
{
    sign_create_arg *a = argp;
    static const char label[] = SIGN_LABEL;
    /* PKCS#11 v2.40 section 2.3.6: the EC key pair generation mechanism
     * takes CKA_EC_PARAMS in the public key template. */
    CK_ATTRIBUTE pub[] = {
        ATTR(CKA_CLASS, ck_public),
        ATTR(CKA_KEY_TYPE, ck_ec),
        ATTR(CKA_TOKEN, ck_true),
        ATTR(CKA_PRIVATE, ck_false),
        ATTR(CKA_VERIFY, ck_true),
        ATTR(CKA_ENCRYPT, ck_false),
        ATTR(CKA_WRAP, ck_false),
        ATTR(CKA_DERIVE, ck_false),
        {CKA_EC_PARAMS, (void *)sign_p256_oid, sizeof(sign_p256_oid)},
        {CKA_ID, a->id, sizeof(a->id)},
        {CKA_LABEL, (void *)label, sizeof(label) - 1},
    };
    CK_ATTRIBUTE priv[] = {
        ATTR(CKA_CLASS, ck_private),    ATTR(CKA_KEY_TYPE, ck_ec),
        ATTR(CKA_TOKEN, ck_true),       ATTR(CKA_PRIVATE, ck_true),
        ATTR(CKA_SENSITIVE, ck_true),   ATTR(CKA_EXTRACTABLE, ck_false),
        ATTR(CKA_SIGN, ck_true),        ATTR(CKA_DECRYPT, ck_false),
        ATTR(CKA_UNWRAP, ck_false),     ATTR(CKA_DERIVE, ck_false),
        {CKA_ID, a->id, sizeof(a->id)}, {CKA_LABEL, (void *)label, sizeof(label) - 1},
    };
    CK_MECHANISM m = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE hpub, hpriv;
    CK_RV rv = kms_p11_generate_key_pair(&h->p11, s->h, &m, pub, KMS_ARRAY_LEN(pub), priv,
                                         KMS_ARRAY_LEN(priv), &hpub, &hpriv);
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_GenerateKeyPair", KMS_P11_CTX_ANY);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_hsm_signkey_create(kms_hsm *h, uint8_t id_out[KMS_HSM_ID_BYTES])
{
    sign_create_arg a;
    KMS_GUARD(kms_rand_bytes(a.id, sizeof(a.id)));
    kms_hsm_session s;
    /* Not retried: a lost answer could leave a pair behind, and a second
     * pair under another id is harmless but confusing. */
    KMS_GUARD(kms_hsm_enter(h, &s));
    kms_result r = sign_create_step(h, &s, &a);
    kms_hsm_leave(h, &s);
    KMS_GUARD(r);
    memcpy(id_out, a.id, sizeof(a.id));
    return KMS_OK_RESULT;
}

typedef struct {
    const uint8_t *id;
    bool exists;
} sign_exists_arg;

static KMS_RESULT sign_exists_step(kms_hsm *h, kms_hsm_session *s, void *argp)
{
    sign_exists_arg *a = argp;
    CK_OBJECT_HANDLE o;
    bool priv = false, pub = false;
    KMS_GUARD(sign_find(h, s, ck_private, a->id, &o, &priv));
    KMS_GUARD(sign_find(h, s, ck_public, a->id, &o, &pub));
    a->exists = priv && pub;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_hsm_signkey_exists(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists)
{
    sign_exists_arg a = {.id = id};
    *exists = false;
    KMS_GUARD(sign_run(h, sign_exists_step, &a));
    *exists = a.exists;
    return KMS_OK_RESULT;
}

typedef struct {
    const uint8_t *id;
    uint8_t params[64];
    CK_ULONG params_len;
    uint8_t point[SIGN_POINT_MAX_BYTES];
    CK_ULONG point_len;
} sign_public_arg;

static KMS_RESULT sign_public_step(kms_hsm *h, kms_hsm_session *s, void *argp)
{
    sign_public_arg *a = argp;
    CK_OBJECT_HANDLE o;
    bool found = false;
    KMS_GUARD(sign_find(h, s, ck_public, a->id, &o, &found));
    KMS_ENSURE_MSG(found, KMS_ERR_HSM_OBJECT_MISSING, "audit signing public key not on the token");
    CK_ATTRIBUTE tmpl[] = {
        {CKA_EC_PARAMS, a->params, sizeof(a->params)},
        {CKA_EC_POINT, a->point, sizeof(a->point)},
    };
    CK_RV rv = kms_p11_get_attribute_value(&h->p11, s->h, o, tmpl, KMS_ARRAY_LEN(tmpl));
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_GetAttributeValue", KMS_P11_CTX_ANY);
    a->params_len = tmpl[0].ulValueLen;
    a->point_len = tmpl[1].ulValueLen;
    return KMS_OK_RESULT;
}

/* PKCS#11 v2.40 section 2.3.3: CKA_EC_POINT is the "DER-encoding of ANSI
 * X9.62 ECPoint value Q", an OCTET STRING around 04 || X || Y. Some tokens
 * return the bare point; accept both, nothing else. */
static KMS_RESULT sign_point_unwrap(const uint8_t *p, size_t n, const uint8_t **pt, size_t *pt_len)
{
    const size_t bare = 1 + 2 * SIGN_P256_FIELD_BYTES;
    if (n == bare && p[0] == 0x04) {
        *pt = p;
        *pt_len = n;
        return KMS_OK_RESULT;
    }
    KMS_ENSURE_MSG(n == bare + 2 && p[0] == 0x04 && p[1] == bare && p[2] == 0x04,
                   KMS_ERR_HSM_FAILED, "unexpected CKA_EC_POINT encoding");
    *pt = p + 2;
    *pt_len = bare;
    return KMS_OK_RESULT;
}

static void sign_pkey_ctx_free(EVP_PKEY_CTX **c)
{
    EVP_PKEY_CTX_free(*c);
}
static void sign_pkey_free(EVP_PKEY **k)
{
    EVP_PKEY_free(*k);
}
static void sign_bld_free(OSSL_PARAM_BLD **b)
{
    OSSL_PARAM_BLD_free(*b);
}
static void sign_params_free(OSSL_PARAM **p)
{
    OSSL_PARAM_free(*p);
}

KMS_RESULT kms_hsm_signkey_public(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES], kms_buf *spki_out)
{
    sign_public_arg a = {.id = id};
    KMS_GUARD(sign_run(h, sign_public_step, &a));
    KMS_ENSURE_MSG(a.params_len == sizeof(sign_p256_oid) &&
                       memcmp(a.params, sign_p256_oid, sizeof(sign_p256_oid)) == 0,
                   KMS_ERR_HSM_FAILED, "audit signing key is not on P-256");
    const uint8_t *pt = NULL;
    size_t pt_len = 0;
    KMS_GUARD(sign_point_unwrap(a.point, a.point_len, &pt, &pt_len));

    OSSL_PARAM_BLD *bld KMS_DEFER(sign_bld_free) = OSSL_PARAM_BLD_new();
    KMS_ENSURE(bld != NULL, KMS_ERR_NO_MEMORY);
    KMS_GUARD_OSSL(
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0),
        KMS_ERR_CRYPTO);
    KMS_GUARD_OSSL(OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, pt_len),
                   KMS_ERR_CRYPTO);
    OSSL_PARAM *params KMS_DEFER(sign_params_free) = OSSL_PARAM_BLD_to_param(bld);
    KMS_ENSURE(params != NULL, KMS_ERR_NO_MEMORY);
    EVP_PKEY_CTX *ctx KMS_DEFER(sign_pkey_ctx_free) = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    KMS_ENSURE(ctx != NULL, KMS_ERR_CRYPTO);
    KMS_GUARD_OSSL(EVP_PKEY_fromdata_init(ctx), KMS_ERR_CRYPTO);
    EVP_PKEY *pkey KMS_DEFER(sign_pkey_free) = NULL;
    /* fromdata checks that the point lies on the curve. */
    KMS_ENSURE_MSG(EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1,
                   KMS_ERR_HSM_FAILED, "audit signing public key is not a valid P-256 point");
    int len = i2d_PUBKEY(pkey, NULL);
    KMS_ENSURE(len > 0, KMS_ERR_CRYPTO);
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(spki_out, (size_t)len, &dst));
    KMS_ENSURE(i2d_PUBKEY(pkey, &dst) == len, KMS_ERR_CRYPTO);
    return KMS_OK_RESULT;
}

typedef struct {
    const uint8_t *id;
    const uint8_t *digest;
    uint8_t raw[2 * SIGN_P256_FIELD_BYTES];
    CK_ULONG raw_len;
} sign_sign_arg;

static KMS_RESULT sign_sign_step(kms_hsm *h, kms_hsm_session *s, void *argp)
{
    sign_sign_arg *a = argp;
    CK_OBJECT_HANDLE o;
    bool found = false;
    KMS_GUARD(sign_find(h, s, ck_private, a->id, &o, &found));
    KMS_ENSURE_MSG(found, KMS_ERR_HSM_OBJECT_MISSING, "audit signing key not on the token");
    /* PKCS#11 v2.40 section 2.3.6 (CKM_ECDSA): single-part; the input is
     * the hash, the signature "r || s", each of the order's length. */
    CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
    CK_RV rv = kms_p11_sign_init(&h->p11, s->h, &m, o);
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_SignInit", KMS_P11_CTX_ANY);
    a->raw_len = sizeof(a->raw);
    rv = kms_p11_sign(&h->p11, s->h, a->digest, KMS_SHA256_BYTES, a->raw, &a->raw_len);
    if (rv != CKR_OK)
        return kms_hsm_session_fail(h, s, rv, "C_Sign", KMS_P11_CTX_ANY);
    KMS_ENSURE_MSG(a->raw_len == sizeof(a->raw), KMS_ERR_HSM_FAILED,
                   "unexpected ECDSA signature length");
    return KMS_OK_RESULT;
}

static void sign_sig_free(ECDSA_SIG **s)
{
    ECDSA_SIG_free(*s);
}

KMS_RESULT kms_hsm_signkey_sign(kms_hsm *h, const uint8_t id[KMS_HSM_ID_BYTES],
                                const uint8_t digest[KMS_SHA256_BYTES],
                                uint8_t sig[KMS_HSM_ECDSA_SIG_MAX_BYTES], size_t *sig_len)
{
    sign_sign_arg a = {.id = id, .digest = digest};
    KMS_GUARD(sign_run(h, sign_sign_step, &a));
    /* r || s -> DER ECDSA-Sig-Value (RFC 3279 section 2.2.3), the form
     * OpenSSL's dgst -verify expects. */
    ECDSA_SIG *es KMS_DEFER(sign_sig_free) = ECDSA_SIG_new();
    KMS_ENSURE(es != NULL, KMS_ERR_NO_MEMORY);
    BIGNUM *r = BN_bin2bn(a.raw, SIGN_P256_FIELD_BYTES, NULL);
    BIGNUM *s = BN_bin2bn(a.raw + SIGN_P256_FIELD_BYTES, SIGN_P256_FIELD_BYTES, NULL);
    if (r == NULL || s == NULL || ECDSA_SIG_set0(es, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        KMS_BAIL(KMS_ERR_CRYPTO);
    }
    int len = i2d_ECDSA_SIG(es, NULL);
    KMS_ENSURE(len > 0 && len <= KMS_HSM_ECDSA_SIG_MAX_BYTES, KMS_ERR_CRYPTO);
    uint8_t *dst = sig;
    KMS_ENSURE(i2d_ECDSA_SIG(es, &dst) == len, KMS_ERR_CRYPTO);
    *sig_len = (size_t)len;
    return KMS_OK_RESULT;
}
