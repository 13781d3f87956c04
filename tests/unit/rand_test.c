/* Randomness: output shape, and that two draws differ (a stuck generator
 * would repeat; 2^-128 false-failure odds). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "kms_rand.h"

#define ERR(x) ((x).err)

static void test_rand_bytes(void **state)
{
    (void)state;
    uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
    assert_int_equal(ERR(kms_rand_bytes(a, sizeof(a))), KMS_OK);
    assert_int_equal(ERR(kms_rand_bytes(b, sizeof(b))), KMS_OK);
    assert_memory_not_equal(a, b, sizeof(a));
    assert_memory_not_equal(a, zero, sizeof(a));
    assert_int_equal(ERR(kms_rand_bytes(NULL, 0)), KMS_OK);
}

static void test_rand_id_hex(void **state)
{
    (void)state;
    char a[KMS_RAND_ID_HEX_BYTES], b[KMS_RAND_ID_HEX_BYTES];
    assert_int_equal(ERR(kms_rand_id_hex(a)), KMS_OK);
    assert_int_equal(ERR(kms_rand_id_hex(b)), KMS_OK);
    assert_int_equal(strlen(a), 32);
    for (size_t i = 0; i < 32; i++) {
        assert_true((a[i] >= '0' && a[i] <= '9') || (a[i] >= 'a' && a[i] <= 'f'));
    }
    assert_string_not_equal(a, b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rand_bytes),
        cmocka_unit_test(test_rand_id_hex),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
