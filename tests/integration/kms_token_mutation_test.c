/*
 * Exhaustive token mutation against a real token: every bit flipped, every
 * byte changed to every other value, every truncation, every character of
 * the text form replaced, another key's token, wrong contexts. Each must
 * give exactly KMS_ERR_TOKEN_INVALID, except a change confined to the
 * version field that names a version the key does not have, which gives
 * KMS_ERR_VERSION_NOT_FOUND; and no plaintext byte is ever released.
 */
#include "kms_test_fixture.h"

#include "kms_base64.h"

#define KEY      "mut"
#define KEY_LEN  3
#define VERSIONS 3 /* the key has versions 1..3; tokens are under 3 */

static const uint8_t ctx[] = "order=1234";

typedef struct {
    kms_fx *f;
    kms_buf tok;
} mut_state;

static int setup(void **state)
{
    mut_state *s = calloc(1, sizeof(*s));
    s->f = kms_fx_new(0);
    kms_fx_key(s->f, KEY, KMS_PURPOSE_ENCRYPT);
    kms_fx_key(s->f, "mut-other", KMS_PURPOSE_ENCRYPT);
    for (int i = 1; i < VERSIONS; i++)
        assert_ok(kms_key_rotate(s->f->k, &s->f->admin, KEY, KMS_ROTATION_MANUAL, NULL, NULL));
    kms_buf_init(&s->tok, 0);
    const uint8_t dek[32] = "an example DEK of 32 bytes......";
    uint32_t v;
    assert_ok(kms_wrap(s->f->k, &s->f->app, KEY, dek, sizeof(dek), ctx, sizeof(ctx), &s->tok, &v));
    assert_int_equal(v, VERSIONS);
    *state = s;
    return 0;
}

static int teardown(void **state)
{
    mut_state *s = *state;
    kms_buf_free(&s->tok);
    kms_fx_free(s->f);
    free(s);
    return 0;
}

/* The oracle: what unwrapping `bin` must give, compared with the original.
 * The version is looked up before the tag can be checked, so a token whose
 * header is intact up to the version field and that names a version the
 * key lacks is VERSION_NOT_FOUND (whatever else changed after it). */
static kms_err expected(const kms_buf *orig, const uint8_t *bin, size_t len)
{
    const size_t vstart = 4 + KEY_LEN;
    if (len != orig->len || memcmp(bin, orig->data, vstart) != 0)
        return KMS_ERR_TOKEN_INVALID;
    if (memcmp(bin, orig->data, len) == 0)
        return KMS_OK;
    uint32_t v = (uint32_t)bin[vstart] << 24 | (uint32_t)bin[vstart + 1] << 16 |
                 (uint32_t)bin[vstart + 2] << 8 | bin[vstart + 3];
    if (v == 0 || v <= VERSIONS)
        return KMS_ERR_TOKEN_INVALID; /* malformed, or an existing version: tag fails */
    return KMS_ERR_VERSION_NOT_FOUND;
}

static size_t g_checked, g_not_found;

static void check_one(mut_state *s, const uint8_t *in, size_t in_len, kms_err want)
{
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v = 0;
    kms_result r = kms_unwrap(s->f->k, &s->f->app, KEY, in, in_len, ctx, sizeof(ctx), &pt, &v);
    if (r.err != want)
        fail_msg("mutation #%zu: got %s, expected %s", g_checked, kms_error_code(r.err),
                 kms_error_code(want));
    assert_int_equal(pt.len, want == KMS_OK ? 32 : 0);
    g_checked++;
    if (want == KMS_ERR_VERSION_NOT_FOUND)
        g_not_found++;
}

static void test_original_ok(void **state)
{
    mut_state *s = *state;
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    assert_ok(
        kms_unwrap(s->f->k, &s->f->app, KEY, s->tok.data, s->tok.len, ctx, sizeof(ctx), &pt, &v));
    assert_int_equal(pt.len, 32);
}

static void test_every_bit_flipped(void **state)
{
    mut_state *s = *state;
    uint8_t m[256];
    assert_true(s->tok.len <= sizeof(m));
    g_checked = g_not_found = 0;
    for (size_t i = 0; i < s->tok.len; i++) {
        for (int b = 0; b < 8; b++) {
            memcpy(m, s->tok.data, s->tok.len);
            m[i] ^= (uint8_t)(1u << b);
            check_one(s, m, s->tok.len, expected(&s->tok, m, s->tok.len));
        }
    }
    assert_int_equal(g_checked, s->tok.len * 8);
    /* 32 version bits: flipping bit 0 or 1 of 3 names 2 or 1 (tag fails),
     * the other 30 name versions that do not exist. */
    assert_int_equal(g_not_found, 30);
}

static void test_every_byte_changed(void **state)
{
    mut_state *s = *state;
    uint8_t m[256];
    g_checked = g_not_found = 0;
    for (size_t i = 0; i < s->tok.len; i++) {
        for (int val = 0; val < 256; val++) {
            if (val == s->tok.data[i])
                continue;
            memcpy(m, s->tok.data, s->tok.len);
            m[i] = (uint8_t)val;
            check_one(s, m, s->tok.len, expected(&s->tok, m, s->tok.len));
        }
    }
    assert_int_equal(g_checked, s->tok.len * 255);
    assert_true(g_not_found > 0);
}

static void test_every_truncation_and_extension(void **state)
{
    mut_state *s = *state;
    for (size_t n = 0; n < s->tok.len; n++)
        check_one(s, s->tok.data, n, KMS_ERR_TOKEN_INVALID);
    uint8_t m[257];
    memcpy(m, s->tok.data, s->tok.len);
    m[s->tok.len] = 0;
    check_one(s, m, s->tok.len + 1, KMS_ERR_TOKEN_INVALID);
}

static void test_text_every_char_replaced(void **state)
{
    mut_state *s = *state;
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_token_to_text(s->tok.data, s->tok.len, &text));
    check_one(s, text.data, text.len, KMS_OK);
    static const char repl[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ .:*\n\r";
    uint8_t m[512];
    assert_true(text.len <= sizeof(m));
    g_checked = 0;
    for (size_t i = 0; i < text.len; i++) {
        for (size_t r = 0; r < sizeof(repl) - 1; r++) {
            if ((uint8_t)repl[r] == text.data[i])
                continue;
            memcpy(m, text.data, text.len);
            m[i] = (uint8_t)repl[r];
            kms_err want = KMS_ERR_TOKEN_INVALID;
            if (i >= KMS_TOKEN_TEXT_PREFIX_BYTES) {
                /* Strict base64 has one encoding per byte string, so a
                 * replacement that still decodes is a real change of bytes. */
                kms_buf bin KMS_DEFER(kms_buf_cleanup) = {0};
                kms_result d = kms_base64_decode((const char *)m + KMS_TOKEN_TEXT_PREFIX_BYTES,
                                                 text.len - KMS_TOKEN_TEXT_PREFIX_BYTES, &bin);
                if (kms_is_ok(d))
                    want = expected(&s->tok, bin.data, bin.len);
                kms_error_clear();
            }
            check_one(s, m, text.len, want);
        }
    }
    assert_true(g_checked > text.len * 60);
    /* Every truncation of the text form. */
    for (size_t n = 0; n < text.len; n++)
        check_one(s, text.data, n, KMS_ERR_TOKEN_INVALID);
}

static void test_other_key_and_context(void **state)
{
    mut_state *s = *state;
    kms_buf other KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    const uint8_t dek[32] = {1};
    assert_ok(kms_wrap(s->f->k, &s->f->app, "mut-other", dek, 32, ctx, sizeof(ctx), &other, &v));
    check_one(s, other.data, other.len, KMS_ERR_TOKEN_INVALID);
    /* The other key's token under our name but with our header bytes is
     * still refused: names are bound into the AAD. */
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    const uint8_t *ctxs[] = {NULL, ctx, (const uint8_t *)"order=1235"};
    size_t lens[] = {0, sizeof(ctx) - 1, 11};
    for (size_t i = 0; i < KMS_ARRAY_LEN(ctxs); i++) {
        assert_err(kms_unwrap(s->f->k, &s->f->app, KEY, s->tok.data, s->tok.len, ctxs[i], lens[i],
                              &pt, &v),
                   KMS_ERR_TOKEN_INVALID);
        assert_int_equal(pt.len, 0);
    }
    /* A MAC-kind token presented for unwrap. */
    kms_fx_key(s->f, "mut-mac", KMS_PURPOSE_MAC);
    kms_buf mac KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_mac(s->f->k, &s->f->app, "mut-mac", dek, 32, &mac, &v));
    check_one(s, mac.data, mac.len, KMS_ERR_TOKEN_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_original_ok),
        cmocka_unit_test(test_every_bit_flipped),
        cmocka_unit_test(test_every_byte_changed),
        cmocka_unit_test(test_every_truncation_and_extension),
        cmocka_unit_test(test_text_every_char_replaced),
        cmocka_unit_test(test_other_key_and_context),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
