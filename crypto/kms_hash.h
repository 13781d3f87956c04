/* Hashing and HMAC through OpenSSL (for the audit hash chain, fingerprints). */
#ifndef KMS_HASH_H
#define KMS_HASH_H

#include "kms_result.h"

#include <stddef.h>
#include <stdint.h>

#define KMS_SHA256_BYTES 32

KMS_RESULT kms_sha256(const void *data, size_t n, uint8_t out[KMS_SHA256_BYTES]);
/* SHA-256 over the concatenation of parts (each given as pointer + length). */
typedef struct {
    const void *p;
    size_t n;
} kms_iov;
KMS_RESULT kms_sha256_iov(const kms_iov *parts, size_t count, uint8_t out[KMS_SHA256_BYTES]);
/* Lowercase hex of n bytes into out (2n+1 bytes, NUL-terminated). */
void kms_hex_encode(const uint8_t *in, size_t n, char *out);
KMS_RESULT kms_hex_decode(const char *in, size_t n, uint8_t *out, size_t out_len);

#endif /* KMS_HASH_H */
