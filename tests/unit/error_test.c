/* The error table: every entry whole, API codes unique, statuses sane. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "kms_result.h"

static void test_every_entry_is_whole(void **state)
{
    (void)state;
    for (int i = 0; i < KMS_ERR_COUNT; i++) {
        const kms_error_info *e = kms_error_info_get((kms_err)i);
        /* kms_error_info_get falls back to INTERNAL for a missing entry,
         * so a hole in the table shows up as a code mismatch. */
        assert_int_equal(e->err, i);
        assert_non_null(e->code);
        assert_true(strlen(e->code) > 0);
        assert_non_null(e->message);
        assert_true(strlen(e->message) > 0);
        assert_in_range(e->http_status, 200, 599);
        if (i == KMS_OK) {
            assert_int_equal(e->exit_code, 0);
        } else {
            assert_in_range(e->http_status, 400, 599);
            assert_in_range(e->exit_code, 1, 125);
        }
        for (const char *p = e->code; *p; p++) {
            assert_true((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_');
        }
    }
}

static void test_codes_are_unique_and_round_trip(void **state)
{
    (void)state;
    for (int i = 0; i < KMS_ERR_COUNT; i++) {
        for (int j = i + 1; j < KMS_ERR_COUNT; j++) {
            assert_string_not_equal(kms_error_code((kms_err)i), kms_error_code((kms_err)j));
        }
        assert_int_equal(kms_error_from_code(kms_error_code((kms_err)i)), i);
    }
    assert_int_equal(kms_error_from_code("no_such_code"), KMS_ERR_INTERNAL);
    assert_int_equal(kms_error_from_code(NULL), KMS_ERR_INTERNAL);
}

static kms_result fails_with_detail(void)
{
    KMS_BAIL_MSG(KMS_ERR_HSM_FAILED, "C_Encrypt: %s", "CKR_DEVICE_ERROR");
}

static kms_result guards(int n)
{
    KMS_ENSURE(n > 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(fails_with_detail());
    return KMS_OK_RESULT;
}

static void test_thread_error_slot(void **state)
{
    (void)state;
    kms_error_clear();
    kms_result r = guards(1);
    assert_int_equal(r.err, KMS_ERR_HSM_FAILED);
    assert_int_equal(kms_error_last(), KMS_ERR_HSM_FAILED);
    assert_string_equal(kms_error_detail(), "C_Encrypt: CKR_DEVICE_ERROR");
    assert_non_null(strstr(kms_error_location(), "error_test.c"));
    r = guards(0);
    assert_int_equal(r.err, KMS_ERR_INVALID_ARGUMENT);
    assert_string_equal(kms_error_detail(), "");
    assert_int_equal(kms_error_info_get((kms_err)9999)->err, KMS_ERR_INTERNAL);
    assert_true(kms_error_is_transient(KMS_ERR_HSM_UNAVAILABLE));
    assert_false(kms_error_is_transient(KMS_ERR_TOKEN_INVALID));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_entry_is_whole),
        cmocka_unit_test(test_codes_are_unique_and_round_trip),
        cmocka_unit_test(test_thread_error_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
