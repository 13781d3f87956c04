/*
 * The ciphertext token codec (format: kms_token.h, docs/ciphertext-format.md).
 *
 * The parser reads the binary form through a bounded cursor whose error is
 * KMS_ERR_TOKEN_INVALID, so every defect, whatever the field, gives the same
 * error as a failed tag check: a caller (or an attacker) learns "invalid"
 * and nothing about which byte was wrong.
 */
#include "kms_token.h"
#include "kms_base64.h"

#include <string.h>

/* Longest text form: prefix + base64 of the longest binary form. */
#define KMS_TOKEN_TEXT_MAX_BYTES \
    (KMS_TOKEN_TEXT_PREFIX_BYTES + KMS_BASE64_ENCODED_LEN(KMS_TOKEN_BINARY_MAX_BYTES))

static bool kms_key_name_first_ok(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

bool kms_key_name_valid(const char *name, size_t len)
{
    /* [a-z0-9][a-z0-9._-]{0,127} */
    if (name == NULL || len == 0 || len > KMS_KEY_NAME_MAX_BYTES) {
        return false;
    }
    const unsigned char *s = (const unsigned char *)name;
    if (!kms_key_name_first_ok(s[0])) {
        return false;
    }
    for (size_t i = 1; i < len; i++) {
        if (!kms_key_name_first_ok(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-') {
            return false;
        }
    }
    return true;
}

static bool kms_token_kind_known(unsigned kind)
{
    switch (kind) {
    case KMS_TOKEN_KIND_AEAD:
    case KMS_TOKEN_KIND_MAC:
        return true;
    default:
        return false;
    }
}

KMS_RESULT kms_token_header_write(kms_token_kind kind, const char *name, uint32_t version,
                                  kms_buf *out)
{
    KMS_ENSURE(kms_token_kind_known(kind), KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(name != NULL, KMS_ERR_KEY_NAME_INVALID);
    const size_t len = strnlen(name, KMS_KEY_NAME_MAX_BYTES + 1);
    KMS_ENSURE(kms_key_name_valid(name, len), KMS_ERR_KEY_NAME_INVALID);
    KMS_ENSURE(version >= 1, KMS_ERR_INVALID_ARGUMENT);

    KMS_GUARD(kms_buf_reserve(out, 8 + len));
    KMS_GUARD(kms_buf_append_u8(out, KMS_TOKEN_MAGIC));
    KMS_GUARD(kms_buf_append_u8(out, KMS_TOKEN_FORMAT_V1));
    KMS_GUARD(kms_buf_append_u8(out, (uint8_t)kind));
    KMS_GUARD(kms_buf_append_u8(out, (uint8_t)len));
    KMS_GUARD(kms_buf_append(out, name, len));
    KMS_GUARD(kms_buf_append_u32(out, version));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_token_parse(const uint8_t *bin, size_t len, kms_token *out)
{
    KMS_ENSURE(out != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(out, 0, sizeof(*out));
    KMS_ENSURE(bin != NULL && len <= KMS_TOKEN_BINARY_MAX_BYTES, KMS_ERR_TOKEN_INVALID);

    kms_rcursor c;
    kms_rcursor_init(&c, bin, len, KMS_ERR_TOKEN_INVALID);
    uint8_t magic, format, kind, name_len;
    const uint8_t *name;
    uint32_t version;

    KMS_GUARD(kms_rcursor_u8(&c, &magic));
    KMS_ENSURE(magic == KMS_TOKEN_MAGIC, KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_rcursor_u8(&c, &format));
    KMS_ENSURE(format == KMS_TOKEN_FORMAT_V1, KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_rcursor_u8(&c, &kind));
    KMS_ENSURE(kms_token_kind_known(kind), KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_rcursor_u8(&c, &name_len));
    KMS_ENSURE(name_len >= 1 && name_len <= KMS_KEY_NAME_MAX_BYTES, KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_rcursor_view(&c, name_len, &name));
    KMS_ENSURE(kms_key_name_valid((const char *)name, name_len), KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_rcursor_u32(&c, &version));
    KMS_ENSURE(version >= 1, KMS_ERR_TOKEN_INVALID);
    const size_t header_len = c.pos;

    kms_token t = {0};
    t.kind = (kms_token_kind)kind;
    memcpy(t.key_name, name, name_len);
    t.key_name[name_len] = '\0';
    t.key_version = version;
    t.header = bin;
    t.header_len = header_len;

    switch (t.kind) {
    case KMS_TOKEN_KIND_AEAD: {
        /* nonce (12) | ciphertext (N >= 0) | tag (16): the tag is the last
         * 16 bytes, the ciphertext whatever lies between nonce and tag. */
        KMS_GUARD(kms_rcursor_view(&c, KMS_TOKEN_NONCE_BYTES, &t.nonce));
        KMS_ENSURE(kms_rcursor_remaining(&c) >= KMS_TOKEN_TAG_BYTES, KMS_ERR_TOKEN_INVALID);
        t.ciphertext_len = kms_rcursor_remaining(&c) - KMS_TOKEN_TAG_BYTES;
        /* GCM ciphertext is as long as the plaintext, which is bounded. */
        KMS_ENSURE(t.ciphertext_len <= KMS_TOKEN_PLAINTEXT_MAX_BYTES, KMS_ERR_TOKEN_INVALID);
        KMS_GUARD(kms_rcursor_view(&c, t.ciphertext_len, &t.ciphertext));
        KMS_GUARD(kms_rcursor_view(&c, KMS_TOKEN_TAG_BYTES, &t.tag));
        break;
    }
    case KMS_TOKEN_KIND_MAC:
        KMS_GUARD(kms_rcursor_view(&c, KMS_TOKEN_MAC_BYTES, &t.tag));
        break;
    default:
        KMS_BAIL(KMS_ERR_TOKEN_INVALID);
    }
    /* Nothing may follow the tag. */
    KMS_GUARD(kms_rcursor_end(&c));
    *out = t;
    return KMS_OK_RESULT;
}

static bool kms_token_is_text(const uint8_t *in, size_t len)
{
    return len >= KMS_TOKEN_TEXT_PREFIX_BYTES &&
           memcmp(in, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES) == 0;
}

KMS_RESULT kms_token_parse_any(const uint8_t *in, size_t len, kms_buf *scratch, kms_token *out)
{
    KMS_ENSURE(out != NULL && scratch != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(out, 0, sizeof(*out));
    KMS_ENSURE(in != NULL, KMS_ERR_TOKEN_INVALID);
    if (!kms_token_is_text(in, len)) {
        /* Binary: starts with magic and format version. Anything else is
         * neither form. */
        KMS_ENSURE(len >= 2 && in[0] == KMS_TOKEN_MAGIC && in[1] == KMS_TOKEN_FORMAT_V1,
                   KMS_ERR_TOKEN_INVALID);
        return kms_token_parse(in, len, out);
    }
    /* Bound the text before decoding, so an oversized input costs nothing. */
    KMS_ENSURE(len <= KMS_TOKEN_TEXT_MAX_BYTES, KMS_ERR_TOKEN_INVALID);
    kms_buf_reset(scratch);
    kms_result r = kms_base64_decode((const char *)in + KMS_TOKEN_TEXT_PREFIX_BYTES,
                                     len - KMS_TOKEN_TEXT_PREFIX_BYTES, scratch);
    if (!kms_is_ok(r)) {
        /* A base64 defect is a token defect: one error for every defect. */
        KMS_BAIL(r.err == KMS_ERR_BASE64_INVALID ? KMS_ERR_TOKEN_INVALID : r.err);
    }
    return kms_token_parse(scratch->data, scratch->len, out);
}

KMS_RESULT kms_token_to_text(const uint8_t *bin, size_t len, kms_buf *out)
{
    /* Only a well-formed token gets a text form. */
    kms_token t;
    KMS_GUARD(kms_token_parse(bin, len, &t));
    const size_t start = out->len;
    kms_result r = kms_buf_append(out, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES);
    if (kms_is_ok(r)) {
        r = kms_base64_encode(bin, len, out);
    }
    if (!kms_is_ok(r)) {
        out->len = start;
    }
    return r;
}
