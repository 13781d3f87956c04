/* Randomness from OpenSSL's CSPRNG (RAND_priv_bytes for secrets). */
#ifndef KMS_RAND_H
#define KMS_RAND_H

#include "kms_result.h"

#include <stddef.h>
#include <stdint.h>

KMS_RESULT kms_rand_bytes(void *out, size_t n);
/* A nonce of n bytes (n <= KMS_NONCE_MAX_BYTES) from the public DRBG,
 * through a per-thread buffer that a fork never lets repeat; see
 * kms_rand.c. For AES-GCM IVs (NIST SP 800-38D 8.2.2). */
#define KMS_NONCE_MAX_BYTES 32
KMS_RESULT kms_rand_nonce(uint8_t *out, size_t n);
/* A random 128-bit identifier rendered as 32 lowercase hex characters + NUL. */
#define KMS_RAND_ID_HEX_BYTES 33
KMS_RESULT kms_rand_id_hex(char out[KMS_RAND_ID_HEX_BYTES]);

#endif /* KMS_RAND_H */
