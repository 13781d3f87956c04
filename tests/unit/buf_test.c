/* kms_buf and kms_rcursor: growth, ceilings, overflow, secret buffers,
 * big-endian fields and bounded reads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "kms_buf.h"
#include "kms_secmem.h"

#define ERR(x) ((x).err)

static void test_append_and_grow(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&b, 0);
    for (unsigned i = 0; i < 10000; i++) {
        assert_int_equal(ERR(kms_buf_append_u8(&b, (uint8_t)i)), KMS_OK);
    }
    assert_int_equal(b.len, 10000);
    assert_true(b.cap >= b.len);
    for (unsigned i = 0; i < 10000; i++) {
        assert_int_equal(b.data[i], (uint8_t)i);
    }
    assert_int_equal(ERR(kms_buf_terminate(&b)), KMS_OK);
    assert_int_equal(b.len, 10000);
    assert_int_equal(b.data[b.len], 0);
}

static void test_big_endian_appends(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(ERR(kms_buf_append_u16(&b, 0x0102)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append_u32(&b, 0x03040506)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append_u64(&b, 0x0708090a0b0c0d0eULL)), KMS_OK);
    const uint8_t want[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
    assert_int_equal(b.len, sizeof(want));
    assert_memory_equal(b.data, want, sizeof(want));
}

static void test_ceiling(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&b, 100);
    uint8_t chunk[40] = {0};
    assert_int_equal(ERR(kms_buf_append(&b, chunk, 40)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append(&b, chunk, 40)), KMS_OK);
    assert_int_equal(ERR(kms_buf_append(&b, chunk, 40)), KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(kms_error_last(), KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(b.len, 80);
    assert_int_equal(ERR(kms_buf_append(&b, chunk, 20)), KMS_OK);
    assert_int_equal(b.len, 100);
    assert_int_equal(ERR(kms_buf_append_u8(&b, 1)), KMS_ERR_LIMIT_EXCEEDED);
    /* The terminating NUL is not counted against the ceiling. */
    assert_int_equal(ERR(kms_buf_terminate(&b)), KMS_OK);
    assert_true(b.cap <= 101);
}

static void test_size_overflow(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&b, SIZE_MAX);
    assert_int_equal(ERR(kms_buf_append_u8(&b, 1)), KMS_OK);
    uint8_t *p;
    assert_int_equal(ERR(kms_buf_reserve(&b, SIZE_MAX)), KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(ERR(kms_buf_extend(&b, SIZE_MAX, &p)), KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(b.len, 1);
    /* Default ceiling (max 0). */
    kms_buf d KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(ERR(kms_buf_reserve(&d, KMS_BUF_DEFAULT_MAX + 1)), KMS_ERR_LIMIT_EXCEEDED);
}

static void test_extend_and_reset(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    uint8_t *p;
    assert_int_equal(ERR(kms_buf_extend(&b, 0, &p)), KMS_OK);
    assert_non_null(p);
    assert_int_equal(ERR(kms_buf_extend(&b, 5, &p)), KMS_OK);
    memcpy(p, "hello", 5);
    assert_int_equal(b.len, 5);
    kms_buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_non_null(b.data);
    kms_buf_free(&b);
    assert_null(b.data);
    assert_int_equal(b.cap, 0);
    kms_buf_free(&b); /* twice is harmless */
}

static void test_secret_buffer_grows_in_secure_memory(void **state)
{
    (void)state;
    kms_secmem_stats before, during, after;
    kms_secmem_stats_get(&before);
    kms_buf b = {0};
    kms_buf_init_secret(&b, 0);
    for (unsigned i = 0; i < 70000; i++) {
        assert_int_equal(ERR(kms_buf_append_u8(&b, (uint8_t)(i * 7))), KMS_OK);
    }
    for (unsigned i = 0; i < 70000; i++) {
        assert_int_equal(b.data[i], (uint8_t)(i * 7));
    }
    kms_secmem_stats_get(&during);
    /* Exactly one live secure block: every regrow freed its predecessor. */
    assert_int_equal(during.blocks_in_use, before.blocks_in_use + 1);
    kms_buf_reset(&b);
    for (size_t i = 0; i < b.cap; i++) {
        assert_int_equal(b.data[i], 0); /* reset wipes a secret buffer */
    }
    kms_buf_free(&b);
    kms_secmem_stats_get(&after);
    assert_int_equal(after.blocks_in_use, before.blocks_in_use);
}

static void test_rcursor_fields(void **state)
{
    (void)state;
    const uint8_t in[] = {0xAA, 0x01, 0x02, 0x01, 0x02, 0x03, 0x04, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    kms_rcursor c;
    kms_rcursor_init(&c, in, sizeof(in), KMS_ERR_TOKEN_INVALID);
    uint8_t u8;
    uint16_t u16;
    uint32_t u32;
    uint64_t u64;
    const uint8_t *v;
    assert_int_equal(ERR(kms_rcursor_u8(&c, &u8)), KMS_OK);
    assert_int_equal(u8, 0xAA);
    assert_int_equal(ERR(kms_rcursor_u16(&c, &u16)), KMS_OK);
    assert_int_equal(u16, 0x0102);
    assert_int_equal(ERR(kms_rcursor_u32(&c, &u32)), KMS_OK);
    assert_int_equal(u32, 0x01020304);
    assert_int_equal(ERR(kms_rcursor_u64(&c, &u64)), KMS_OK);
    assert_true(u64 == 0x0102030405060708ULL);
    assert_int_equal(kms_rcursor_remaining(&c), 1);
    assert_int_equal(ERR(kms_rcursor_end(&c)), KMS_ERR_TOKEN_INVALID);
    /* Short reads fail with the cursor's error and consume nothing. */
    assert_int_equal(ERR(kms_rcursor_u16(&c, &u16)), KMS_ERR_TOKEN_INVALID);
    assert_int_equal(ERR(kms_rcursor_u64(&c, &u64)), KMS_ERR_TOKEN_INVALID);
    assert_int_equal(ERR(kms_rcursor_view(&c, SIZE_MAX, &v)), KMS_ERR_TOKEN_INVALID);
    assert_int_equal(kms_rcursor_remaining(&c), 1);
    uint8_t last;
    assert_int_equal(ERR(kms_rcursor_copy(&c, &last, 1)), KMS_OK);
    assert_int_equal(last, 9);
    assert_int_equal(ERR(kms_rcursor_end(&c)), KMS_OK);
    assert_int_equal(ERR(kms_rcursor_u8(&c, &u8)), KMS_ERR_TOKEN_INVALID);
}

static void test_rcursor_every_short_length(void **state)
{
    (void)state;
    const uint8_t in[8] = {0};
    for (size_t len = 0; len < 8; len++) {
        kms_rcursor c;
        uint64_t u64;
        uint32_t u32;
        kms_rcursor_init(&c, in, len, KMS_ERR_JSON_INVALID);
        assert_int_equal(ERR(kms_rcursor_u64(&c, &u64)), KMS_ERR_JSON_INVALID);
        assert_int_equal(ERR(kms_rcursor_u32(&c, &u32)), len >= 4 ? KMS_OK : KMS_ERR_JSON_INVALID);
    }
    kms_rcursor c;
    const uint8_t *v;
    kms_rcursor_init(&c, NULL, 0, KMS_ERR_TOKEN_INVALID);
    assert_int_equal(ERR(kms_rcursor_view(&c, 0, &v)), KMS_OK);
    assert_int_equal(ERR(kms_rcursor_end(&c)), KMS_OK);
}

static void test_appendf(void **state)
{
    (void)state;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&b, 16);
    assert_true(kms_is_ok(kms_buf_appendf(&b, "seq=%d", 42)));
    assert_true(kms_is_ok(kms_buf_appendf(&b, ",%s", "ok")));
    assert_int_equal(b.len, 9);
    assert_memory_equal(b.data, "seq=42,ok", 9);
    /* Exactly at the ceiling fits (the NUL is outside len). */
    assert_true(kms_is_ok(kms_buf_appendf(&b, "%07d", 1234567)));
    assert_int_equal(b.len, 16);
    /* Past it: refused, nothing appended. */
    assert_int_equal(kms_buf_appendf(&b, "x").err, KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(b.len, 16);
    assert_memory_equal(b.data, "seq=42,ok1234567", 16);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_appendf),
        cmocka_unit_test(test_append_and_grow),
        cmocka_unit_test(test_big_endian_appends),
        cmocka_unit_test(test_ceiling),
        cmocka_unit_test(test_size_overflow),
        cmocka_unit_test(test_extend_and_reset),
        cmocka_unit_test(test_secret_buffer_grows_in_secure_memory),
        cmocka_unit_test(test_rcursor_fields),
        cmocka_unit_test(test_rcursor_every_short_length),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
