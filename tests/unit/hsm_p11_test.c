/* The seam's CK_RV translation (hsm/kms_p11.h): each class of CK_RV gives
 * exactly its project error, and the detail names the function, not the
 * arguments. */
#define _GNU_SOURCE
#include "kms_p11.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static void expect_map(CK_RV rv, kms_p11_ctx ctx, kms_err want, bool transient)
{
    kms_result r = kms_p11_fail(rv, "C_Test", ctx);
    if (r.err != want)
        fail_msg("rv 0x%lx ctx %d: got %s, want %s", (unsigned long)rv, (int)ctx,
                 kms_error_code(r.err), kms_error_code(want));
    assert_int_equal(kms_p11_rv_transient(rv), transient);
    assert_non_null(strstr(kms_error_detail(), "C_Test: "));
}

static void test_map(void **state)
{
    /* Transient: the pool is rebuilt and callers see 503. */
    static const CK_RV unavailable[] = {
        CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,    CKR_DEVICE_REMOVED,
        CKR_DEVICE_ERROR,           CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED,
        CKR_FUNCTION_FAILED,        CKR_GENERAL_ERROR,     CKR_USER_NOT_LOGGED_IN,
        CKR_OPERATION_ACTIVE,
    };
    for (size_t i = 0; i < sizeof(unavailable) / sizeof(unavailable[0]); i++)
        expect_map(unavailable[i], KMS_P11_CTX_ANY, KMS_ERR_HSM_UNAVAILABLE, true);
    expect_map(CKR_DEVICE_MEMORY, KMS_P11_CTX_ANY, KMS_ERR_HSM_BUSY, true);
    expect_map(CKR_SESSION_COUNT, KMS_P11_CTX_ANY, KMS_ERR_HSM_BUSY, true);
    expect_map(CKR_PIN_INCORRECT, KMS_P11_CTX_LOGIN, KMS_ERR_HSM_PIN, false);
    expect_map(CKR_PIN_LOCKED, KMS_P11_CTX_LOGIN, KMS_ERR_HSM_PIN, false);
    expect_map(CKR_PIN_LEN_RANGE, KMS_P11_CTX_LOGIN, KMS_ERR_HSM_PIN, false);
    expect_map(CKR_OBJECT_HANDLE_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_OBJECT_MISSING, false);
    expect_map(CKR_KEY_HANDLE_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_OBJECT_MISSING, false);
    expect_map(CKR_UNWRAPPING_KEY_HANDLE_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_OBJECT_MISSING,
               false);
    /* A bad ciphertext is the caller's token error only when decrypting. */
    expect_map(CKR_ENCRYPTED_DATA_INVALID, KMS_P11_CTX_DECRYPT, KMS_ERR_TOKEN_INVALID, false);
    expect_map(CKR_ENCRYPTED_DATA_LEN_RANGE, KMS_P11_CTX_DECRYPT, KMS_ERR_TOKEN_INVALID, false);
    expect_map(CKR_ENCRYPTED_DATA_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_FAILED, false);
    expect_map(CKR_WRAPPED_KEY_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_FAILED, false);
    expect_map(CKR_MECHANISM_INVALID, KMS_P11_CTX_ANY, KMS_ERR_HSM_FAILED, false);
    expect_map(CKR_ARGUMENTS_BAD, KMS_P11_CTX_ANY, KMS_ERR_HSM_FAILED, false);
    expect_map(CKR_TEMPLATE_INCONSISTENT, KMS_P11_CTX_ANY, KMS_ERR_HSM_FAILED, false);
    assert_int_equal(kms_p11_fail(CKR_OK, "C_Test", KMS_P11_CTX_ANY).err, KMS_OK);
}

static void test_reinit_and_dirty(void **state)
{
    assert_true(kms_p11_rv_needs_reinit(CKR_CRYPTOKI_NOT_INITIALIZED));
    assert_true(kms_p11_rv_needs_reinit(CKR_DEVICE_REMOVED));
    assert_false(kms_p11_rv_needs_reinit(CKR_SESSION_HANDLE_INVALID));
    assert_false(kms_p11_rv_needs_reinit(CKR_DEVICE_ERROR));
    /* PKCS#11 v2.40 5.9: a failed C_Decrypt ends the operation. */
    assert_false(kms_p11_rv_dirties_session(CKR_OK));
    assert_false(kms_p11_rv_dirties_session(CKR_ENCRYPTED_DATA_INVALID));
    assert_true(kms_p11_rv_dirties_session(CKR_ARGUMENTS_BAD));
    assert_true(kms_p11_rv_dirties_session(CKR_DEVICE_ERROR));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_map),
        cmocka_unit_test(test_reinit_and_dirty),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
