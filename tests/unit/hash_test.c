/* SHA-256 (FIPS 180-4 example vectors) and hex. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "kms_hash.h"

#define ERR(x) ((x).err)

static void test_sha256_vectors(void **state)
{
    (void)state;
    uint8_t d[KMS_SHA256_BYTES];
    char hex[2 * KMS_SHA256_BYTES + 1];
    assert_int_equal(ERR(kms_sha256("abc", 3, d)), KMS_OK);
    kms_hex_encode(d, sizeof(d), hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(ERR(kms_sha256(NULL, 0, d)), KMS_OK);
    kms_hex_encode(d, sizeof(d), hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_int_equal(ERR(kms_sha256(m, strlen(m), d)), KMS_OK);
    kms_hex_encode(d, sizeof(d), hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_sha256_iov_equals_concatenation(void **state)
{
    (void)state;
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const size_t n = strlen(m);
    uint8_t whole[KMS_SHA256_BYTES], parts[KMS_SHA256_BYTES];
    assert_int_equal(ERR(kms_sha256(m, n, whole)), KMS_OK);
    for (size_t cut = 0; cut <= n; cut++) {
        const kms_iov iov[3] = {{m, cut}, {NULL, 0}, {m + cut, n - cut}};
        assert_int_equal(ERR(kms_sha256_iov(iov, 3, parts)), KMS_OK);
        assert_memory_equal(whole, parts, sizeof(whole));
    }
    const kms_iov bad[1] = {{NULL, 3}};
    assert_int_equal(ERR(kms_sha256_iov(bad, 1, parts)), KMS_ERR_INVALID_ARGUMENT);
}

static void test_hex(void **state)
{
    (void)state;
    uint8_t all[256];
    for (unsigned i = 0; i < 256; i++) {
        all[i] = (uint8_t)i;
    }
    char hex[513];
    kms_hex_encode(all, sizeof(all), hex);
    assert_int_equal(strlen(hex), 512);
    assert_memory_equal(hex, "000102", 6);
    assert_memory_equal(hex + 506, "fdfeff", 6);
    uint8_t back[256];
    assert_int_equal(ERR(kms_hex_decode(hex, 512, back, sizeof(back))), KMS_OK);
    assert_memory_equal(all, back, sizeof(all));
    assert_int_equal(ERR(kms_hex_decode("ABcd", 4, back, 2)), KMS_OK);
    assert_int_equal(back[0], 0xab);
    assert_int_equal(back[1], 0xcd);
    assert_int_equal(ERR(kms_hex_decode("abc", 3, back, 1)), KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(ERR(kms_hex_decode("abcd", 4, back, 1)), KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(ERR(kms_hex_decode("ab", 2, back, 2)), KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(ERR(kms_hex_decode("g0", 2, back, 1)), KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(ERR(kms_hex_decode("0 ", 2, back, 1)), KMS_ERR_INVALID_ARGUMENT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_sha256_iov_equals_concatenation),
        cmocka_unit_test(test_hex),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
