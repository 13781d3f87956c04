/* The authorization policy: parsing with clear errors, deny by default,
 * glob matching of identities and key names. */
#include "kms_api.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static const char good[] =
    "{\"rules\": ["
    " {\"identity\": \"spiffe://kmsd.dev/app\", \"role\": \"app\", \"keys\": [\"app-*\", "
    "\"shared\"]},"
    " {\"identity\": \"spiffe://kmsd.dev/migrator\", \"role\": \"migrator\", \"keys\": [\"*\"]},"
    " {\"identity\": \"spiffe://kmsd.dev/admin\", \"role\": \"admin\", \"keys\": [\"*\"],"
    "  \"comment\": \"security staff\"},"
    " {\"identity\": \"spiffe://kmsd.dev/ops/*\", \"role\": \"auditor\", \"keys\": [\"*\"]},"
    " {\"identity\": \"spiffe://kmsd.dev/admin\", \"role\": \"auditor\", \"keys\": [\"audit-*\"]}"
    "]}";

static void test_roles(void **state)
{
    (void)state;
    kms_policy *p = NULL;
    assert_true(kms_is_ok(kms_policy_parse(good, strlen(good), "p.json", &p)));
    assert_int_equal(kms_policy_rule_count(p), 5);
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/app", "app-billing"), KMS_ROLE_APP);
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/app", "shared"), KMS_ROLE_APP);
    /* Deny by default: another key, another identity, a near miss. */
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/app", "other"), 0);
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/apps", "app-billing"), 0);
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/app", "shared2"), 0);
    assert_int_equal(kms_policy_roles(p, "nobody", NULL), 0);
    assert_int_equal(kms_policy_roles(p, NULL, "x"), 0);
    assert_int_equal(kms_policy_roles(NULL, "spiffe://kmsd.dev/app", "app-x"), 0);
    /* Globs in identities match across '/'. */
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/ops/alice", "x"), KMS_ROLE_AUDITOR);
    /* Roles accumulate over rules. */
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/admin", "audit-1"),
                     KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR);
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/admin", "k"), KMS_ROLE_ADMIN);
    /* key == NULL: any role the identity holds anywhere. */
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/admin", NULL),
                     KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR);
    kms_policy_free(p);
}

static void expect_bad(const char *text, const char *detail_part)
{
    kms_policy *p = NULL;
    kms_result r = kms_policy_parse(text, strlen(text), "p.json", &p);
    assert_int_equal(r.err, KMS_ERR_CONFIG);
    assert_null(p);
    if (strstr(kms_error_detail(), detail_part) == NULL) {
        fail_msg("detail '%s' lacks '%s'", kms_error_detail(), detail_part);
    }
}

static void test_errors(void **state)
{
    (void)state;
    expect_bad("", "p.json:");
    expect_bad("{\"rules\": [", "p.json:");
    expect_bad("[]", "expected an object");
    expect_bad("{\"rules\": [], \"extra\": 1}", "expected an object");
    expect_bad("{\"rules\": [], \"rules\": []}", "p.json:");
    expect_bad("{\"rules\": [1]}", "rule 0: not an object");
    expect_bad("{\"rules\": [{\"identity\":\"a\",\"role\":\"app\",\"keys\":[\"k\"]},"
               "{\"identity\":\"a\",\"role\":\"root\",\"keys\":[\"k\"]}]}",
               "rule 1: role must be");
    expect_bad("{\"rules\": [{\"identity\":\"a\",\"role\":\"app\"}]}", "rule 0: keys must be");
    expect_bad("{\"rules\": [{\"identity\":\"a\",\"role\":\"app\",\"keys\":[]}]}",
               "rule 0: keys must be");
    expect_bad("{\"rules\": [{\"identity\":\"a\",\"role\":\"app\",\"keys\":[\"k\", 3]}]}",
               "rule 0: keys[1]");
    expect_bad("{\"rules\": [{\"identity\":\"a b\",\"role\":\"app\",\"keys\":[\"k\"]}]}",
               "rule 0: identity must be");
    expect_bad("{\"rules\": [{\"identity\":\"\",\"role\":\"app\",\"keys\":[\"k\"]}]}",
               "rule 0: identity must be");
    expect_bad("{\"rules\": [{\"role\":\"app\",\"keys\":[\"k\"]}]}", "rule 0: identity must be");
    expect_bad("{\"rules\": [{\"identity\":\"a\",\"role\":\"app\",\"keys\":[\"k\"],\"x\":1}]}",
               "rule 0: unknown field 'x'");
}

static void test_empty_policy_denies(void **state)
{
    (void)state;
    kms_policy *p = NULL;
    const char *t = "{\"rules\": []}";
    assert_true(kms_is_ok(kms_policy_parse(t, strlen(t), "p.json", &p)));
    assert_int_equal(kms_policy_roles(p, "spiffe://kmsd.dev/admin", NULL), 0);
    kms_policy_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roles),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_empty_policy_denies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
