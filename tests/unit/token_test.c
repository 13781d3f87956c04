/* The token codec: layout, grammar, every parse-level defect, exhaustive
 * mutation of the framing bytes and of the text form, random inputs. The
 * cryptographic mutation test (every bit flip fails decryption) lives with
 * the domain tests, which hold keys. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "kms_base64.h"
#include "kms_hash.h"
#include "kms_rand.h"
#include "kms_token.h"

#define ERR(x) ((x).err)

/* Appends a well-formed token: AEAD with n ciphertext bytes, or MAC. */
static void make_token(kms_buf *b, kms_token_kind kind, const char *name, uint32_t version,
                       size_t n)
{
    kms_buf_reset(b);
    assert_int_equal(ERR(kms_token_header_write(kind, name, version, b)), KMS_OK);
    size_t body = kind == KMS_TOKEN_KIND_AEAD ? KMS_TOKEN_NONCE_BYTES + n + KMS_TOKEN_TAG_BYTES
                                              : KMS_TOKEN_MAC_BYTES;
    for (size_t i = 0; i < body; i++) {
        assert_int_equal(ERR(kms_buf_append_u8(b, (uint8_t)(0xA0 + i))), KMS_OK);
    }
}

static bool same_header(const kms_token *a, const kms_token *b)
{
    return a->kind == b->kind && a->key_version == b->key_version &&
           strcmp(a->key_name, b->key_name) == 0;
}

static void test_layout_aead(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    make_token(&b, KMS_TOKEN_KIND_AEAD, "orders.db-key_1", 0x01020304, 5);
    const uint8_t head[] = {0x4B, 0x01, 0x01, 15,  'o', 'r', 'd', 'e', 'r', 's', '.', 'd',
                            'b',  '-',  'k',  'e', 'y', '_', '1', 1,   2,   3,   4};
    assert_int_equal(b.len, sizeof(head) + 12 + 5 + 16);
    assert_memory_equal(b.data, head, sizeof(head));
    kms_token t;
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    assert_int_equal(t.kind, KMS_TOKEN_KIND_AEAD);
    assert_string_equal(t.key_name, "orders.db-key_1");
    assert_int_equal(t.key_version, 0x01020304);
    assert_ptr_equal(t.header, b.data);
    assert_int_equal(t.header_len, sizeof(head));
    assert_ptr_equal(t.nonce, b.data + sizeof(head));
    assert_ptr_equal(t.ciphertext, b.data + sizeof(head) + 12);
    assert_int_equal(t.ciphertext_len, 5);
    assert_ptr_equal(t.tag, b.data + b.len - 16);
}

static void test_layout_aead_empty_and_mac(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    make_token(&b, KMS_TOKEN_KIND_AEAD, "k", 1, 0);
    assert_int_equal(b.len, 9 + 28);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    assert_int_equal(t.ciphertext_len, 0);
    assert_ptr_equal(t.tag, t.nonce + 12);

    make_token(&b, KMS_TOKEN_KIND_MAC, "hooks", 2, 0);
    assert_int_equal(b.len, 13 + 32);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    assert_int_equal(t.kind, KMS_TOKEN_KIND_MAC);
    assert_null(t.nonce);
    assert_null(t.ciphertext);
    assert_ptr_equal(t.tag, b.data + 13);
    /* A MAC token has exactly 32 bytes after the header. */
    assert_int_equal(ERR(kms_buf_append_u8(&b, 0)), KMS_OK);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len - 2, &t)), KMS_ERR_TOKEN_INVALID);
}

static void test_key_name_grammar(void **state)
{
    (void)state;
    char max[KMS_KEY_NAME_MAX_BYTES + 2];
    memset(max, 'a', sizeof(max));
    assert_true(kms_key_name_valid("a", 1));
    assert_true(kms_key_name_valid("0", 1));
    assert_true(kms_key_name_valid("a.b_c-d9", 8));
    assert_true(kms_key_name_valid(max, KMS_KEY_NAME_MAX_BYTES));
    assert_false(kms_key_name_valid(max, KMS_KEY_NAME_MAX_BYTES + 1));
    assert_false(kms_key_name_valid("", 0));
    assert_false(kms_key_name_valid(NULL, 1));
    for (unsigned c = 0; c < 256; c++) {
        char s[2] = {'a', (char)c};
        const bool rest =
            (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
        const bool first = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        assert_int_equal(kms_key_name_valid(s, 2), rest);
        s[0] = (char)c;
        s[1] = 'a';
        assert_int_equal(kms_key_name_valid(s, 2), first);
    }
}

static void test_header_write_rejects(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    char long_name[KMS_KEY_NAME_MAX_BYTES + 2];
    memset(long_name, 'a', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_AEAD, "Bad", 1, &b)),
                     KMS_ERR_KEY_NAME_INVALID);
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_AEAD, "", 1, &b)),
                     KMS_ERR_KEY_NAME_INVALID);
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_AEAD, long_name, 1, &b)),
                     KMS_ERR_KEY_NAME_INVALID);
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_AEAD, "ok", 0, &b)),
                     KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(ERR(kms_token_header_write((kms_token_kind)3, "ok", 1, &b)),
                     KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(b.len, 0);
    long_name[KMS_KEY_NAME_MAX_BYTES] = '\0';
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_MAC, long_name, UINT32_MAX, &b)),
                     KMS_OK);
    assert_int_equal(b.len, KMS_TOKEN_HEADER_MAX_BYTES);
}

static void test_parse_rejects(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    /* version 0, written by hand since header_write refuses it */
    const uint8_t v0[] = {0x4B, 1, 2, 1, 'k', 0, 0, 0, 0};
    assert_int_equal(ERR(kms_buf_append(&b, v0, sizeof(v0))), KMS_OK);
    for (int i = 0; i < 32; i++) {
        assert_int_equal(ERR(kms_buf_append_u8(&b, 0)), KMS_OK);
    }
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);
    b.data[8] = 1; /* version 1: the same bytes now parse */
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    b.data[4] = 'K'; /* name outside the grammar */
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);
    b.data[4] = 'k';
    b.data[3] = 0; /* empty name */
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);

    assert_int_equal(ERR(kms_token_parse(NULL, 0, &t)), KMS_ERR_TOKEN_INVALID);
    assert_int_equal(ERR(kms_token_parse(b.data, 0, &t)), KMS_ERR_TOKEN_INVALID);

    /* AEAD shorter than nonce + tag */
    make_token(&b, KMS_TOKEN_KIND_AEAD, "k", 1, 0);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len - 1, &t)), KMS_ERR_TOKEN_INVALID);

    /* longest allowed ciphertext, then one byte more */
    make_token(&b, KMS_TOKEN_KIND_AEAD, "k", 1, KMS_TOKEN_PLAINTEXT_MAX_BYTES);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    assert_int_equal(t.ciphertext_len, KMS_TOKEN_PLAINTEXT_MAX_BYTES);
    assert_int_equal(ERR(kms_buf_append_u8(&b, 0)), KMS_OK);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);

    /* beyond the binary maximum, even with the longest name */
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    memset(name, 'z', KMS_KEY_NAME_MAX_BYTES);
    name[KMS_KEY_NAME_MAX_BYTES] = '\0';
    make_token(&b, KMS_TOKEN_KIND_AEAD, name, 1, KMS_TOKEN_PLAINTEXT_MAX_BYTES);
    assert_int_equal(b.len, KMS_TOKEN_BINARY_MAX_BYTES);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append_u8(&b, 0)), KMS_OK);
    assert_int_equal(ERR(kms_token_parse(b.data, b.len, &t)), KMS_ERR_TOKEN_INVALID);
}

/* Every truncation: a MAC token always fails; an AEAD token fails, or (cut
 * inside its ciphertext) parses to the same header with a shorter body
 * whose tag is other bytes, which decryption rejects. */
static void test_every_truncation(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token full, t;
    for (int kind = KMS_TOKEN_KIND_AEAD; kind <= KMS_TOKEN_KIND_MAC; kind++) {
        make_token(&b, (kms_token_kind)kind, "payments.v2", 258, 40);
        assert_int_equal(ERR(kms_token_parse(b.data, b.len, &full)), KMS_OK);
        for (size_t len = 0; len < b.len; len++) {
            /* An exact-size copy, so reading past the cut is caught by ASan. */
            uint8_t *cut = malloc(len ? len : 1);
            assert_non_null(cut);
            memcpy(cut, b.data, len);
            const kms_err e = ERR(kms_token_parse(cut, len, &t));
            if (kind == KMS_TOKEN_KIND_MAC || len < full.header_len + 28) {
                assert_int_equal(e, KMS_ERR_TOKEN_INVALID);
            } else if (e == KMS_OK) {
                assert_true(same_header(&t, &full));
                assert_true(t.ciphertext_len < full.ciphertext_len);
                assert_memory_not_equal(t.tag, full.tag, KMS_TOKEN_TAG_BYTES);
            } else {
                assert_int_equal(e, KMS_ERR_TOKEN_INVALID);
            }
            free(cut);
        }
    }
}

/* Every value of the magic, format version, kind and name length bytes:
 * the magic and version never parse; the kind and name length either fail
 * or give a different header, never the original one. */
static void test_every_framing_byte_value(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token full, t;
    for (int kind = KMS_TOKEN_KIND_AEAD; kind <= KMS_TOKEN_KIND_MAC; kind++) {
        make_token(&b, (kms_token_kind)kind, "abc.def", 0x00000107, 9);
        assert_int_equal(ERR(kms_token_parse(b.data, b.len, &full)), KMS_OK);
        for (size_t pos = 0; pos < 4; pos++) {
            const uint8_t orig = b.data[pos];
            for (unsigned v = 0; v < 256; v++) {
                if (v == orig) {
                    continue;
                }
                b.data[pos] = (uint8_t)v;
                const kms_err e = ERR(kms_token_parse(b.data, b.len, &t));
                if (pos < 2 || e != KMS_OK) {
                    assert_int_equal(e, KMS_ERR_TOKEN_INVALID);
                } else {
                    assert_false(same_header(&t, &full) && t.header_len == full.header_len);
                }
            }
            b.data[pos] = orig;
        }
    }
}

static void test_text_form(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t, tb;
    make_token(&b, KMS_TOKEN_KIND_AEAD, "orders", 3, 17);
    assert_int_equal(ERR(kms_token_to_text(b.data, b.len, &text)), KMS_OK);
    assert_memory_equal(text.data, "kms1:", 5);
    assert_int_equal(text.len, 5 + KMS_BASE64_ENCODED_LEN(b.len));
    assert_int_equal(ERR(kms_token_parse_any(text.data, text.len, &scratch, &t)), KMS_OK);
    assert_int_equal(ERR(kms_token_parse_any(b.data, b.len, &scratch, &tb)), KMS_OK);
    assert_true(same_header(&t, &tb));
    assert_int_equal(t.ciphertext_len, 17);
    assert_memory_equal(t.tag, tb.tag, 16);
    assert_ptr_equal(t.header, scratch.data);

    /* to_text refuses a malformed token and leaves out untouched */
    const size_t before = text.len;
    assert_int_equal(ERR(kms_token_to_text(b.data, b.len - 1 - 17 - 12, &text)),
                     KMS_ERR_TOKEN_INVALID);
    assert_int_equal(text.len, before);

    /* Neither form, wrong prefix, base64 defects: the one token error. */
    static const char *bad[] = {"",
                                "k",
                                "kms1",
                                "kms1:",
                                "KMS1:SwEBAQ==",
                                "kms2:SwEB",
                                "kms1:SwEB AQ==",
                                "kms1:SwEBAQ=",
                                "kms1:SwEBAQ==\n",
                                "\x4b\x02",
                                "\x4b"};
    for (size_t i = 0; i < KMS_ARRAY_LEN(bad); i++) {
        const size_t n = strlen(bad[i]) == 0 && i == 0 ? 0 : strlen(bad[i]);
        assert_int_equal(ERR(kms_token_parse_any((const uint8_t *)bad[i], n, &scratch, &t)),
                         KMS_ERR_TOKEN_INVALID);
    }
    /* text longer than any token could be */
    kms_buf huge KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(ERR(kms_buf_append(&huge, "kms1:", 5)), KMS_OK);
    uint8_t *p;
    assert_int_equal(ERR(kms_buf_extend(&huge, 100000, &p)), KMS_OK);
    memset(p, 'A', 100000);
    assert_int_equal(ERR(kms_token_parse_any(huge.data, huge.len, &scratch, &t)),
                     KMS_ERR_TOKEN_INVALID);
}

/* Every character of the text form replaced by every byte value: fails, or
 * decodes to other bytes (strict base64 has one encoding per byte string),
 * so it can never pass as the original token. */
static void test_every_text_character_replaced(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    make_token(&b, KMS_TOKEN_KIND_AEAD, "k1", 9, 1);
    assert_int_equal(ERR(kms_token_to_text(b.data, b.len, &text)), KMS_OK);
    for (size_t pos = 0; pos < text.len; pos++) {
        const uint8_t orig = text.data[pos];
        for (unsigned v = 0; v < 256; v++) {
            if (v == orig) {
                continue;
            }
            text.data[pos] = (uint8_t)v;
            const kms_err e = ERR(kms_token_parse_any(text.data, text.len, &scratch, &t));
            if (e == KMS_OK) {
                assert_false(scratch.len == b.len && memcmp(scratch.data, b.data, b.len) == 0);
            } else {
                assert_int_equal(e, KMS_ERR_TOKEN_INVALID);
            }
        }
        text.data[pos] = orig;
    }
}

/* Random inputs never crash and give only OK or the token error; inputs
 * starting with a valid framing reach the deeper checks. */
static void test_random_inputs(void **state)
{
    (void)state;
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    uint8_t buf[320];
    for (unsigned i = 0; i < 50000; i++) {
        uint8_t lenb[2];
        assert_int_equal(ERR(kms_rand_bytes(lenb, 2)), KMS_OK);
        const size_t len = ((size_t)lenb[0] << 8 | lenb[1]) % sizeof(buf);
        assert_int_equal(ERR(kms_rand_bytes(buf, len)), KMS_OK);
        if (len >= 4 && (i & 1)) {
            buf[0] = KMS_TOKEN_MAGIC;
            buf[1] = KMS_TOKEN_FORMAT_V1;
            buf[2] = (uint8_t)(1 + (buf[2] & 1));
            buf[3] = (uint8_t)(buf[3] % 8 + 1);
            for (size_t k = 4; k < len && k < 4u + buf[3]; k++) {
                buf[k] = (uint8_t)('a' + buf[k] % 26);
            }
        }
        uint8_t *exact = malloc(len ? len : 1);
        assert_non_null(exact);
        memcpy(exact, buf, len);
        kms_err e = ERR(kms_token_parse(exact, len, &t));
        assert_true(e == KMS_OK || e == KMS_ERR_TOKEN_INVALID);
        e = ERR(kms_token_parse_any(exact, len, &scratch, &t));
        assert_true(e == KMS_OK || e == KMS_ERR_TOKEN_INVALID);
        free(exact);
    }
}

/* AES-256-GCM tag of an empty plaintext under key, nonce and AAD. */
static void gcm_empty_tag(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                          size_t aad_len, uint8_t tag[16])
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int l;
    uint8_t out[16];
    assert_non_null(c);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL), 1);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, 12, NULL), 1);
    assert_int_equal(EVP_EncryptInit_ex(c, NULL, NULL, key, nonce), 1);
    assert_int_equal(EVP_EncryptUpdate(c, NULL, &l, aad, (int)aad_len), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, out, &l), 1);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag), 1);
    EVP_CIPHER_CTX_free(c);
}

/* The worked example of docs/ciphertext-format.md, byte for byte. */
static void test_worked_example_from_docs(void **state)
{
    (void)state;
    static const char doc_hex[] = "4b0101066f726465727300000001a0a1a2a3a4a5a6a7a8a9aaab"
                                  "1255c3efbe5119ff8d69c39b455165c5";
    static const char doc_text[] = "kms1:SwEBBm9yZGVycwAAAAGgoaKjpKWmp6ipqqsSVcPvvlEZ/41pw5tFUWXF";
    uint8_t key[32], nonce[12], tag[16];
    for (int i = 0; i < 32; i++) {
        key[i] = (uint8_t)i;
    }
    for (int i = 0; i < 12; i++) {
        nonce[i] = (uint8_t)(0xA0 + i);
    }
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf aad KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(ERR(kms_token_header_write(KMS_TOKEN_KIND_AEAD, "orders", 1, &tok)), KMS_OK);
    /* AAD = header || context */
    assert_int_equal(ERR(kms_buf_append(&aad, tok.data, tok.len)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append(&aad, "tenant=42", 9)), KMS_OK);
    gcm_empty_tag(key, nonce, aad.data, aad.len, tag);
    assert_int_equal(ERR(kms_buf_append(&tok, nonce, 12)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append(&tok, tag, 16)), KMS_OK);

    uint8_t want[sizeof(doc_hex) / 2];
    assert_int_equal(ERR(kms_hex_decode(doc_hex, sizeof(doc_hex) - 1, want, sizeof(want))), KMS_OK);
    assert_int_equal(tok.len, sizeof(want));
    assert_memory_equal(tok.data, want, sizeof(want));
    assert_int_equal(ERR(kms_token_to_text(tok.data, tok.len, &text)), KMS_OK);
    assert_int_equal(text.len, strlen(doc_text));
    assert_memory_equal(text.data, doc_text, text.len);

    kms_token t;
    assert_int_equal(ERR(kms_token_parse(tok.data, tok.len, &t)), KMS_OK);
    assert_int_equal(t.ciphertext_len, 0);
    assert_memory_equal(t.tag, tag, 16);

    /* Another context, or the header edited to version 2: other tags. */
    uint8_t other[16];
    aad.data[aad.len - 1] = '3';
    gcm_empty_tag(key, nonce, aad.data, aad.len, other);
    assert_memory_not_equal(other, tag, 16);
    aad.data[aad.len - 1] = '2';
    aad.data[13] = 2;
    gcm_empty_tag(key, nonce, aad.data, aad.len, other);
    assert_memory_not_equal(other, tag, 16);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_aead),
        cmocka_unit_test(test_layout_aead_empty_and_mac),
        cmocka_unit_test(test_key_name_grammar),
        cmocka_unit_test(test_header_write_rejects),
        cmocka_unit_test(test_parse_rejects),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_every_framing_byte_value),
        cmocka_unit_test(test_text_form),
        cmocka_unit_test(test_every_text_character_replaced),
        cmocka_unit_test(test_random_inputs),
        cmocka_unit_test(test_worked_example_from_docs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
