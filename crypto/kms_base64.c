/*
 * Strict base64, RFC 4648 section 4 (standard alphabet, '=' padding).
 *
 * Base64 here carries secrets (DEKs and plaintext in API requests and
 * responses), so the character <-> value mapping is computed with masks
 * instead of a lookup table: a table indexed by secret bytes leaks them
 * through the data cache (the attack on base64 of PEM keys, "Util::Lookup",
 * 2021). The only branches depend on the input length and on whether the
 * input is valid, never on the value of a valid character; validity is
 * accumulated over the whole input and checked once at the end.
 */
#include "kms_base64.h"
#include "kms_secmem.h"

#include <stdint.h>

/* All-ones if a < b, else zero; a and b are below 2^16. */
static uint32_t kms_ct_lt(uint32_t a, uint32_t b)
{
    return 0U - ((a - b) >> 31);
}

static uint32_t kms_ct_eq(uint32_t a, uint32_t b)
{
    /* (x - 1) >> 31 is 1 only for x == 0 when x < 2^31. */
    return 0U - (((a ^ b) - 1U) >> 31);
}

/* In [lo, hi]? all-ones or zero. */
static uint32_t kms_ct_range(uint32_t c, uint32_t lo, uint32_t hi)
{
    return ~kms_ct_lt(c, lo) & ~kms_ct_lt(hi, c);
}

/* Section 4, Table 1: 0..25 'A'..'Z', 26..51 'a'..'z', 52..61 '0'..'9',
 * 62 '+', 63 '/'. */
static char kms_b64_char(uint32_t x)
{
    uint32_t c = x + 'A';
    c += ~kms_ct_lt(x, 26) & (uint32_t)('a' - 26 - 'A');
    c += ~kms_ct_lt(x, 52) & (uint32_t)(('0' - 52) - ('a' - 26));
    c += ~kms_ct_lt(x, 62) & (uint32_t)(('+' - 62) - ('0' - 52));
    c += ~kms_ct_lt(x, 63) & (uint32_t)(('/' - 63) - ('+' - 62));
    return (char)(c & 0xff);
}

/* The value of one character; *bad collects all-ones if it is outside the
 * alphabet (this includes '=', whitespace, line breaks and NUL). */
static uint32_t kms_b64_value(unsigned char ch, uint32_t *bad)
{
    const uint32_t c = ch;
    const uint32_t up = kms_ct_range(c, 'A', 'Z');
    const uint32_t lo = kms_ct_range(c, 'a', 'z');
    const uint32_t dg = kms_ct_range(c, '0', '9');
    const uint32_t pl = kms_ct_eq(c, '+');
    const uint32_t sl = kms_ct_eq(c, '/');
    *bad |= ~(up | lo | dg | pl | sl);
    return (up & (c - 'A')) | (lo & (c - 'a' + 26)) | (dg & (c - '0' + 52)) | (pl & 62) | (sl & 63);
}

KMS_RESULT kms_base64_encode(const uint8_t *in, size_t n, kms_buf *out)
{
    /* KMS_BASE64_ENCODED_LEN(n) must not wrap. */
    KMS_ENSURE(n <= (SIZE_MAX / 4) * 3 - 3, KMS_ERR_LIMIT_EXCEEDED);
    KMS_ENSURE(n == 0 || in != NULL, KMS_ERR_INVALID_ARGUMENT);
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(out, KMS_BASE64_ENCODED_LEN(n), &dst));

    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        const uint32_t w = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *dst++ = (uint8_t)kms_b64_char(w >> 18);
        *dst++ = (uint8_t)kms_b64_char((w >> 12) & 63);
        *dst++ = (uint8_t)kms_b64_char((w >> 6) & 63);
        *dst++ = (uint8_t)kms_b64_char(w & 63);
    }
    /* Section 4: a final quantum of 8 bits gives two characters and "==",
     * one of 16 bits gives three characters and "=". */
    if (n - i == 1) {
        const uint32_t w = (uint32_t)in[i] << 16;
        *dst++ = (uint8_t)kms_b64_char(w >> 18);
        *dst++ = (uint8_t)kms_b64_char((w >> 12) & 63);
        *dst++ = '=';
        *dst++ = '=';
    } else if (n - i == 2) {
        const uint32_t w = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *dst++ = (uint8_t)kms_b64_char(w >> 18);
        *dst++ = (uint8_t)kms_b64_char((w >> 12) & 63);
        *dst++ = (uint8_t)kms_b64_char((w >> 6) & 63);
        *dst++ = '=';
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_base64_decode(const char *in, size_t n, kms_buf *out)
{
    /* Section 3.2 (padding is required here) and 3.3 (no characters outside
     * the alphabet, so no whitespace or line breaks): the encoded length is
     * a whole number of 4-character quanta. */
    KMS_ENSURE(n % 4 == 0, KMS_ERR_BASE64_INVALID);
    if (n == 0) {
        return KMS_OK_RESULT;
    }
    const unsigned char *s = (const unsigned char *)in;
    /* Padding may only end the input: at most "==", and section 4 allows
     * "==" only after two characters, "=" only after three. A '=' anywhere
     * else is outside the alphabet and flagged below. */
    size_t pad = 0;
    if (s[n - 1] == '=') {
        pad = s[n - 2] == '=' ? 2 : 1;
    }
    const size_t out_n = n / 4 * 3 - pad;
    const size_t start = out->len;
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(out, out_n, &dst));

    uint32_t bad = 0;
    const size_t full = pad == 0 ? n : n - 4;
    size_t i = 0;
    for (; i < full; i += 4) {
        const uint32_t w = kms_b64_value(s[i], &bad) << 18 | kms_b64_value(s[i + 1], &bad) << 12 |
                           kms_b64_value(s[i + 2], &bad) << 6 | kms_b64_value(s[i + 3], &bad);
        *dst++ = (uint8_t)(w >> 16);
        *dst++ = (uint8_t)(w >> 8);
        *dst++ = (uint8_t)w;
    }
    if (pad == 2) {
        const uint32_t a = kms_b64_value(s[i], &bad);
        const uint32_t b = kms_b64_value(s[i + 1], &bad);
        /* Section 3.5: the 4 unused bits must be zero (one encoding per
         * byte string). */
        bad |= ~kms_ct_eq(b & 0x0f, 0);
        *dst++ = (uint8_t)(a << 2 | b >> 4);
    } else if (pad == 1) {
        const uint32_t a = kms_b64_value(s[i], &bad);
        const uint32_t b = kms_b64_value(s[i + 1], &bad);
        const uint32_t c = kms_b64_value(s[i + 2], &bad);
        bad |= ~kms_ct_eq(c & 0x03, 0);
        const uint32_t w = a << 18 | b << 12 | c << 6;
        *dst++ = (uint8_t)(w >> 16);
        *dst++ = (uint8_t)(w >> 8);
    }
    if (bad != 0) {
        /* The bytes decoded so far may be part of a secret: wipe them and
         * leave the buffer as it was. */
        kms_secmem_wipe(out->data + start, out_n);
        out->len = start;
        KMS_BAIL(KMS_ERR_BASE64_INVALID);
    }
    return KMS_OK_RESULT;
}
