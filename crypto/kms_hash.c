/* SHA-256 and hex through OpenSSL. OpenSSL failures become KMS_ERR_CRYPTO. */
#include "kms_hash.h"

#include <openssl/evp.h>
#include <pthread.h>

/* SHA-256 fetched once. EVP_sha256() hands OpenSSL 3 a legacy method that
 * each EVP_DigestInit_ex fetches again from the provider: a lock, a lookup
 * and string compares, which cost more than hashing an audit record
 * (docs/performance.md, "One serving thread, the others spare"). NULL if
 * the fetch failed: EVP_sha256() then, as before. */
static EVP_MD *kms_sha256_md;
static pthread_once_t kms_sha256_once = PTHREAD_ONCE_INIT;

static void kms_sha256_fetch(void)
{
    kms_sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

KMS_RESULT kms_sha256(const void *data, size_t n, uint8_t out[KMS_SHA256_BYTES])
{
    const kms_iov part = {data, n};
    return kms_sha256_iov(&part, 1, out);
}

static void kms_md_ctx_cleanup(EVP_MD_CTX **ctx)
{
    EVP_MD_CTX_free(*ctx);
}

KMS_RESULT kms_sha256_iov(const kms_iov *parts, size_t count, uint8_t out[KMS_SHA256_BYTES])
{
    KMS_ENSURE(count == 0 || parts != NULL, KMS_ERR_INVALID_ARGUMENT);
    EVP_MD_CTX *ctx KMS_DEFER(kms_md_ctx_cleanup) = EVP_MD_CTX_new();
    KMS_ENSURE(ctx != NULL, KMS_ERR_NO_MEMORY);
    pthread_once(&kms_sha256_once, kms_sha256_fetch);
    const EVP_MD *md = kms_sha256_md != NULL ? kms_sha256_md : EVP_sha256();
    KMS_GUARD_OSSL(EVP_DigestInit_ex(ctx, md, NULL), KMS_ERR_CRYPTO);
    for (size_t i = 0; i < count; i++) {
        if (parts[i].n == 0) {
            continue;
        }
        KMS_ENSURE(parts[i].p != NULL, KMS_ERR_INVALID_ARGUMENT);
        KMS_GUARD_OSSL(EVP_DigestUpdate(ctx, parts[i].p, parts[i].n), KMS_ERR_CRYPTO);
    }
    unsigned int len = 0;
    KMS_GUARD_OSSL(EVP_DigestFinal_ex(ctx, out, &len), KMS_ERR_CRYPTO);
    KMS_ENSURE(len == KMS_SHA256_BYTES, KMS_ERR_CRYPTO);
    return KMS_OK_RESULT;
}

void kms_hex_encode(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
    out[2 * n] = '\0';
}

/* Value of one hex digit (either case), or -1. */
static int kms_hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

KMS_RESULT kms_hex_decode(const char *in, size_t n, uint8_t *out, size_t out_len)
{
    /* Exactly two digits per output byte: no odd length, no short input. */
    KMS_ENSURE(n % 2 == 0 && n / 2 == out_len, KMS_ERR_INVALID_ARGUMENT);
    for (size_t i = 0; i < out_len; i++) {
        const int hi = kms_hex_value(in[2 * i]);
        const int lo = kms_hex_value(in[2 * i + 1]);
        KMS_ENSURE(hi >= 0 && lo >= 0, KMS_ERR_INVALID_ARGUMENT);
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return KMS_OK_RESULT;
}
