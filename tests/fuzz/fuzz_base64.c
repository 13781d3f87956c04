/*
 * Fuzz target: strict base64.
 *
 * Invariants: decoding fails only with KMS_ERR_BASE64_INVALID and leaves
 * the output buffer unchanged; a successful decode re-encodes to exactly
 * the input (RFC 4648 section 3.5 with zero pad bits enforced: one encoding
 * per byte string); and any byte string survives encode then decode.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_check.h"
#include "kms_base64.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kms_buf dec KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf enc KMS_DEFER(kms_buf_cleanup) = {0};
    kms_result r = kms_base64_decode((const char *)data, size, &dec);
    if (kms_is_ok(r)) {
        CHECK(dec.len == KMS_BASE64_DECODED_MAX(size) - (size && data[size - 1] == '=') -
                             (size > 1 && data[size - 2] == '='));
        CHECK(kms_is_ok(kms_base64_encode(dec.data, dec.len, &enc)));
        CHECK(enc.len == size && (size == 0 || memcmp(enc.data, data, size) == 0));
    } else {
        CHECK(r.err == KMS_ERR_BASE64_INVALID);
        CHECK(dec.len == 0);
    }

    kms_buf_reset(&enc);
    kms_buf_reset(&dec);
    CHECK(kms_is_ok(kms_base64_encode(data, size, &enc)));
    CHECK(enc.len == KMS_BASE64_ENCODED_LEN(size));
    CHECK(kms_is_ok(kms_base64_decode((const char *)enc.data, enc.len, &dec)));
    CHECK(dec.len == size && (size == 0 || memcmp(dec.data, data, size) == 0));
    return 0;
}
