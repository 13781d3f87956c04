/*
 * Fuzz target: the ciphertext token codec.
 *
 * Invariants checked on every input:
 *  - kms_token_parse_any and kms_token_parse fail only with
 *    KMS_ERR_TOKEN_INVALID;
 *  - a parsed token's fields satisfy the format (name grammar, version >= 1,
 *    header inside the bounds, nonce/ciphertext/tag inside the input);
 *  - the header re-written from the parsed fields equals the parsed header;
 *  - text form round trip: to_text(binary) parses back to the same binary
 *    bytes, and for a text input, re-encoding gives the input exactly
 *    (strict base64: one text per token).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_check.h"
#include "kms_token.h"

static bool within(const uint8_t *p, size_t n, const uint8_t *base, size_t len)
{
    return p >= base && n <= len && (size_t)(p - base) <= len - n;
}

static void check_token(const kms_token *t, const uint8_t *bin, size_t len)
{
    CHECK(t->kind == KMS_TOKEN_KIND_AEAD || t->kind == KMS_TOKEN_KIND_MAC);
    CHECK(t->key_version >= 1);
    const size_t name_len = strlen(t->key_name);
    CHECK(kms_key_name_valid(t->key_name, name_len));
    CHECK(t->header == bin && t->header_len == 8 + name_len);
    CHECK(t->header_len <= KMS_TOKEN_HEADER_MAX_BYTES && len <= KMS_TOKEN_BINARY_MAX_BYTES);
    if (t->kind == KMS_TOKEN_KIND_AEAD) {
        CHECK(within(t->nonce, KMS_TOKEN_NONCE_BYTES, bin, len));
        CHECK(t->nonce == bin + t->header_len);
        CHECK(t->ciphertext == t->nonce + KMS_TOKEN_NONCE_BYTES);
        CHECK(t->ciphertext_len <= KMS_TOKEN_PLAINTEXT_MAX_BYTES);
        CHECK(t->tag == t->ciphertext + t->ciphertext_len);
        CHECK(t->tag + KMS_TOKEN_TAG_BYTES == bin + len);
    } else {
        CHECK(t->nonce == NULL && t->ciphertext == NULL);
        CHECK(t->tag == bin + t->header_len && t->header_len + KMS_TOKEN_MAC_BYTES == len);
    }

    kms_buf hdr KMS_DEFER(kms_buf_cleanup) = {0};
    CHECK(kms_is_ok(kms_token_header_write(t->kind, t->key_name, t->key_version, &hdr)));
    CHECK(hdr.len == t->header_len && memcmp(hdr.data, t->header, hdr.len) == 0);

    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token back;
    CHECK(kms_is_ok(kms_token_to_text(bin, len, &text)));
    CHECK(kms_is_ok(kms_token_parse_any(text.data, text.len, &scratch, &back)));
    CHECK(scratch.len == len && memcmp(scratch.data, bin, len) == 0);
    CHECK(back.kind == t->kind && back.key_version == t->key_version);
    CHECK(strcmp(back.key_name, t->key_name) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kms_token t;
    kms_result r = kms_token_parse(data, size, &t);
    CHECK(kms_is_ok(r) || r.err == KMS_ERR_TOKEN_INVALID);
    if (kms_is_ok(r)) {
        check_token(&t, data, size);
    }

    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    r = kms_token_parse_any(data, size, &scratch, &t);
    CHECK(kms_is_ok(r) || r.err == KMS_ERR_TOKEN_INVALID);
    if (!kms_is_ok(r)) {
        return 0;
    }
    const bool is_text = size >= KMS_TOKEN_TEXT_PREFIX_BYTES &&
                         memcmp(data, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES) == 0;
    const uint8_t *bin = is_text ? scratch.data : data;
    const size_t len = is_text ? scratch.len : size;
    check_token(&t, bin, len);
    if (is_text) {
        kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
        CHECK(kms_is_ok(kms_token_to_text(bin, len, &text)));
        CHECK(text.len == size && memcmp(text.data, data, size) == 0);
    }
    return 0;
}
