/* Randomness from OpenSSL's CSPRNG. */
#include "kms_rand.h"
#include "kms_hash.h"
#include "kms_secmem.h"

#include <limits.h>

#include <openssl/rand.h>

KMS_RESULT kms_rand_bytes(void *out, size_t n)
{
    /* RAND_priv_bytes: OpenSSL's private DRBG, kept apart from the public
     * one so that values an attacker sees (ids, nonces of other callers)
     * come from a different DRBG instance than key material. */
    uint8_t *p = out;
    while (n > 0) {
        const int chunk = n > INT_MAX ? INT_MAX : (int)n;
        KMS_GUARD_OSSL(RAND_priv_bytes(p, chunk), KMS_ERR_RANDOM);
        p += chunk;
        n -= (size_t)chunk;
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rand_id_hex(char out[KMS_RAND_ID_HEX_BYTES])
{
    /* Identifiers are public: the public DRBG is the right one for them. */
    uint8_t id[(KMS_RAND_ID_HEX_BYTES - 1) / 2];
    KMS_GUARD_OSSL(RAND_bytes(id, (int)sizeof(id)), KMS_ERR_RANDOM);
    kms_hex_encode(id, sizeof(id), out);
    return KMS_OK_RESULT;
}
