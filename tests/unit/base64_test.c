/* Strict base64 (RFC 4648 section 4): section 10 vectors, one test per
 * defect class, exhaustive character substitution, and agreement with
 * OpenSSL's encoder on random and exhaustive inputs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include <openssl/evp.h>

#include "kms_base64.h"
#include "kms_rand.h"

#define ERR(x) ((x).err)

static const char kms_test_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void expect_decode(const char *in, size_t n, kms_err want)
{
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(ERR(kms_buf_append(&out, "xyz", 3)), KMS_OK);
    const kms_err got = ERR(kms_base64_decode(in, n, &out));
    if (got != want) {
        print_error("input \"%.*s\" (%zu bytes): got %s want %s\n", (int)n, in, n,
                    kms_error_code(got), kms_error_code(want));
    }
    assert_int_equal(got, want);
    if (want != KMS_OK) {
        /* A failed decode leaves the buffer as it was. */
        assert_int_equal(out.len, 3);
    }
}

static void test_rfc4648_section10_vectors(void **state)
{
    (void)state;
    static const struct {
        const char *raw, *enc;
    } v[] = {
        {"", ""},
        {"f", "Zg=="},
        {"fo", "Zm8="},
        {"foo", "Zm9v"},
        {"foob", "Zm9vYg=="},
        {"fooba", "Zm9vYmE="},
        {"foobar", "Zm9vYmFy"},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(v); i++) {
        kms_buf e KMS_DEFER(kms_buf_cleanup) = {0};
        kms_buf d KMS_DEFER(kms_buf_cleanup) = {0};
        const size_t rn = strlen(v[i].raw), en = strlen(v[i].enc);
        assert_int_equal(ERR(kms_base64_encode((const uint8_t *)v[i].raw, rn, &e)), KMS_OK);
        assert_int_equal(e.len, en);
        assert_int_equal(KMS_BASE64_ENCODED_LEN(rn), en);
        assert_true(en == 0 || memcmp(e.data, v[i].enc, en) == 0);
        assert_int_equal(ERR(kms_base64_decode(v[i].enc, en, &d)), KMS_OK);
        assert_int_equal(d.len, rn);
        assert_true(rn == 0 || memcmp(d.data, v[i].raw, rn) == 0);
    }
}

#define BAD(s) expect_decode((s), sizeof(s) - 1, KMS_ERR_BASE64_INVALID)

static void test_rejects_every_defect_class(void **state)
{
    (void)state;
    /* character outside the alphabet (including base64url's) */
    BAD("Zm9v!A==");
    BAD("Zm9-");
    BAD("Zm9_");
    BAD("Zm\x80v");
    BAD("Zm\0v");
    /* whitespace and line breaks, with a length that is a multiple of 4 */
    BAD("Zm 9");
    BAD("Zm9\t");
    BAD("Zm9v\nYg=");
    BAD("Zm9\r");
    BAD(" Zm9");
    /* missing padding */
    BAD("Zg");
    BAD("Zm8");
    BAD("Zm9vYg");
    /* too much padding */
    BAD("Zg===");
    BAD("Z===");
    BAD("====");
    BAD("Zm9v====");
    BAD("Zg==\n");
    /* padding in the middle */
    BAD("Zg==Zm9v");
    BAD("Zm8=Zm9v");
    BAD("Z=9v");
    BAD("Zm=v");
    BAD("=m9v");
    /* non-zero pad bits (section 3.5) */
    BAD("Zh==");
    BAD("Zv==");
    BAD("Zm9=");
    BAD("Zm+=");
    /* length not a multiple of 4 */
    BAD("Z");
    BAD("Zm9vY");
    BAD("Zm9vYmFy=");
    /* the same strings without their defect decode */
    expect_decode("Zm9vYg==", 8, KMS_OK);
    expect_decode("Zm8=", 4, KMS_OK);
    expect_decode("Zg==", 4, KMS_OK);
}

/* Every byte value at every position of "Zm9vYmFy" and of the padded
 * "Zm9vYg==": accepted exactly when the result is the canonical encoding
 * of some byte string. */
static void test_every_character_at_every_position(void **state)
{
    (void)state;
    char s[8];
    for (size_t pos = 0; pos < 8; pos++) {
        for (unsigned ch = 0; ch < 256; ch++) {
            memcpy(s, "Zm9vYmFy", 8);
            s[pos] = (char)ch;
            const bool in_alphabet = ch != 0 && strchr(kms_test_alphabet, (int)ch) != NULL;
            expect_decode(s, 8, in_alphabet ? KMS_OK : KMS_ERR_BASE64_INVALID);

            memcpy(s, "Zm9vYg==", 8);
            s[pos] = (char)ch;
            bool ok;
            if (pos < 5) {
                ok = in_alphabet;
            } else if (pos == 5) {
                /* 'g' carries 2 data bits and 4 pad bits that must be 0. */
                ok = in_alphabet &&
                     ((strchr(kms_test_alphabet, (int)ch) - kms_test_alphabet) & 0x0f) == 0;
            } else if (pos == 6) {
                /* "Yg?=": 3 characters and one '='; pad bits of '?' must
                 * be zero; "Yg==" is the original. */
                ok = ch == '=' ||
                     (in_alphabet &&
                      ((strchr(kms_test_alphabet, (int)ch) - kms_test_alphabet) & 0x03) == 0);
            } else {
                /* "Yg=?": only the original '=' is valid. */
                ok = ch == '=';
            }
            expect_decode(s, 8, ok ? KMS_OK : KMS_ERR_BASE64_INVALID);
        }
    }
}

static void test_round_trip_random_lengths_against_openssl(void **state)
{
    (void)state;
    uint8_t raw[300];
    char ref[KMS_BASE64_ENCODED_LEN(300) + 1];
    for (size_t n = 0; n <= 300; n++) {
        assert_int_equal(ERR(kms_rand_bytes(raw, n)), KMS_OK);
        kms_buf e KMS_DEFER(kms_buf_cleanup) = {0};
        kms_buf d KMS_DEFER(kms_buf_cleanup) = {0};
        assert_int_equal(ERR(kms_base64_encode(raw, n, &e)), KMS_OK);
        const int rn = EVP_EncodeBlock((unsigned char *)ref, raw, (int)n);
        assert_int_equal(e.len, (size_t)rn);
        assert_true(n == 0 || memcmp(e.data, ref, (size_t)rn) == 0);
        assert_int_equal(ERR(kms_base64_decode((const char *)e.data, e.len, &d)), KMS_OK);
        assert_int_equal(d.len, n);
        assert_true(n == 0 || memcmp(d.data, raw, n) == 0);
    }
}

/* The mask-based character mapping against OpenSSL's table, on every
 * 2-byte input (which covers every 6-bit value in every position). */
static void test_all_two_byte_inputs_against_openssl(void **state)
{
    (void)state;
    kms_buf e KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf d KMS_DEFER(kms_buf_cleanup) = {0};
    char ref[5];
    for (unsigned v = 0; v < 65536; v++) {
        const uint8_t raw[2] = {(uint8_t)(v >> 8), (uint8_t)v};
        kms_buf_reset(&e);
        kms_buf_reset(&d);
        assert_int_equal(ERR(kms_base64_encode(raw, 2, &e)), KMS_OK);
        assert_int_equal(EVP_EncodeBlock((unsigned char *)ref, raw, 2), 4);
        assert_memory_equal(e.data, ref, 4);
        assert_int_equal(ERR(kms_base64_decode((const char *)e.data, 4, &d)), KMS_OK);
        assert_memory_equal(d.data, raw, 2);
    }
}

static void test_secret_output_buffer(void **state)
{
    (void)state;
    kms_buf d KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&d, 16);
    assert_int_equal(ERR(kms_base64_decode("Zm9vYmFy", 8, &d)), KMS_OK);
    assert_int_equal(d.len, 6);
    /* Decoding past the buffer's ceiling is a limit, not a base64 error. */
    assert_int_equal(ERR(kms_base64_decode("Zm9vYmFyZm9vYmFy", 16, &d)), KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(d.len, 6);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc4648_section10_vectors),
        cmocka_unit_test(test_rejects_every_defect_class),
        cmocka_unit_test(test_every_character_at_every_position),
        cmocka_unit_test(test_round_trip_random_lengths_against_openssl),
        cmocka_unit_test(test_all_two_byte_inputs_against_openssl),
        cmocka_unit_test(test_secret_output_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
