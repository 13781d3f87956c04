/*
 * kmsctl's output for people: aligned tables, times, durations, the key
 * block, and sanitising of text that came from the server.
 */
#define _GNU_SOURCE
#include "kmsctl_out.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct {
    FILE *f;
    char *text;
    size_t len;
} capture;

static void capture_start(capture *c)
{
    c->text = NULL;
    c->len = 0;
    c->f = open_memstream(&c->text, &c->len);
    assert_non_null(c->f);
}

static char *capture_end(capture *c)
{
    assert_int_equal(fclose(c->f), 0);
    return c->text;
}

static json_t *load(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (j == NULL) {
        fail_msg("fixture: %s", e.text);
    }
    return j;
}

static void test_table_alignment(void **state)
{
    static const char *const hdr[] = {"A", "LONGER", "Z"};
    static const char *const r1[] = {"wide cell", "x", "last"};
    static const char *const r2[] = {"y", NULL, "tail\x1b[31m"};
    kmsctl_table *t = NULL;
    assert_true(kms_is_ok(kmsctl_table_new(hdr, 3, &t)));
    assert_true(kms_is_ok(kmsctl_table_add(t, r1)));
    assert_true(kms_is_ok(kmsctl_table_add(t, r2)));
    capture c;
    capture_start(&c);
    kmsctl_table_print(t, c.f);
    char *out = capture_end(&c);
    assert_string_equal(out, "A          LONGER  Z\n"
                             "wide cell  x       last\n"
                             "y          -       tail?[31m\n");
    free(out);
    kmsctl_table_free(t);

    kms_result r = kmsctl_table_new(hdr, 0, &t);
    assert_int_equal(r.err, KMS_ERR_INVALID_ARGUMENT);
    r = kmsctl_table_new(hdr, KMSCTL_TABLE_MAX_COLS + 1, &t);
    assert_int_equal(r.err, KMS_ERR_INVALID_ARGUMENT);
}

static void test_time_format(void **state)
{
    char buf[32];
    kmsctl_time_format(1793491200 + 3723, buf, sizeof(buf));
    assert_string_equal(buf, "2026-11-01 01:02:03Z");
    kmsctl_time_format(0, buf, sizeof(buf));
    assert_string_equal(buf, "-");
    kmsctl_time_format(-5, buf, sizeof(buf));
    assert_string_equal(buf, "-");
}

static void test_key_block(void **state)
{
    json_t *key = load("{\"name\":\"billing\",\"purpose\":\"encrypt\",\"primary_version\":2,"
                       "\"latest_version\":2,\"min_decryption_version\":1,"
                       "\"rotation_period\":7776000,\"warning_window\":604800,"
                       "\"deletion_protection\":true,\"created_at\":1793491200,"
                       "\"rotated_at\":null,\"versions\":[{\"version\":1,\"state\":"
                       "\"deprecated\",\"created_at\":1793491200,\"primary_at\":1793491200,"
                       "\"deprecated_at\":1793494800,\"grace_until\":null,\"destroy_at\":null,"
                       "\"last_used_at\":null,\"encryptions\":12,\"master_version\":1}]}");
    capture c;
    capture_start(&c);
    assert_true(kms_is_ok(kmsctl_print_key(key, c.f)));
    char *out = capture_end(&c);
    assert_string_equal(
        out, "name:                    billing\n"
             "purpose:                 encrypt\n"
             "primary version:         2\n"
             "latest version:          2\n"
             "min decryption version:  1\n"
             "rotation period:         90d\n"
             "warning window:          7d\n"
             "deletion protection:     yes\n"
             "created:                 2026-11-01 00:00:00Z\n"
             "rotated:                 -\n"
             "\n"
             "VERSION  STATE       CREATED               PRIMARY SINCE         DEPRECATED       "
             "     GRACE UNTIL  DESTROY AT  LAST USED  USES 30D  ENCRYPTIONS  MASTER\n"
             "1        deprecated  2026-11-01 00:00:00Z  2026-11-01 00:00:00Z  2026-11-01 "
             "01:00:00Z  -            -           -          -         12           1\n");
    free(out);
    json_decref(key);

    /* Not an object: the caller gets the JSON error, nothing is printed. */
    json_t *arr = load("[]");
    capture_start(&c);
    kms_result r = kmsctl_print_key(arr, c.f);
    out = capture_end(&c);
    assert_int_equal(r.err, KMS_ERR_JSON_INVALID);
    assert_string_equal(out, "");
    free(out);
    json_decref(arr);
}

static void test_rotations_and_masters(void **state)
{
    json_t *rot = load("[{\"id\":\"r1\",\"key\":\"k\",\"from_version\":1,\"to_version\":2,"
                       "\"type\":\"emergency\",\"status\":\"succeeded\",\"initiator\":"
                       "\"spiffe://kmsd.dev/admin\",\"started_at\":1793491200,\"finished_at\":"
                       "1793491201,\"reason\":\"line\\nbreak\"}]");
    capture c;
    capture_start(&c);
    assert_true(kms_is_ok(kmsctl_print_rotations(rot, c.f)));
    char *out = capture_end(&c);
    assert_non_null(strstr(out, "ID  KEY  FROM  TO  TYPE       STATUS     INITIATOR"));
    assert_non_null(strstr(out, "emergency  succeeded  spiffe://kmsd.dev/admin"));
    assert_non_null(strstr(out, "line?break\n")); /* a newline in a reason cannot forge rows */
    free(out);
    json_decref(rot);

    json_t *m = load("[{\"version\":1,\"current\":false,\"created_at\":1793491200,"
                     "\"retired_at\":1793491300,\"versions_wrapped\":0},{\"version\":2,"
                     "\"current\":true,\"created_at\":1793491250,\"retired_at\":null,"
                     "\"versions_wrapped\":7}]");
    capture_start(&c);
    assert_true(kms_is_ok(kmsctl_print_masters(m, c.f)));
    out = capture_end(&c);
    assert_string_equal(out,
                        "VERSION  CURRENT  CREATED               RETIRED               VERSIONS "
                        "WRAPPED\n"
                        "1        no       2026-11-01 00:00:00Z  2026-11-01 00:01:40Z  0\n"
                        "2        yes      2026-11-01 00:00:50Z  -                     7\n");
    free(out);
    json_decref(m);

    json_t *obj = load("{}");
    capture_start(&c);
    kms_result r = kmsctl_print_keys(obj, c.f);
    out = capture_end(&c);
    assert_int_equal(r.err, KMS_ERR_JSON_INVALID);
    free(out);
    json_decref(obj);
}

static void test_generic(void **state)
{
    json_t *doc = load("{\"ok\":false,\"orphans\":[\"a\\u001b\",2],\"n\":{\"x\":1},"
                       "\"empty\":[]}");
    capture c;
    capture_start(&c);
    kmsctl_print_generic(doc, 0, c.f);
    char *out = capture_end(&c);
    assert_string_equal(out, "ok: no\norphans:\n  - a?\n  - 2\nn:\n  x: 1\nempty: (none)\n");
    free(out);
    json_decref(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table_alignment), cmocka_unit_test(test_time_format),
        cmocka_unit_test(test_key_block),       cmocka_unit_test(test_rotations_and_masters),
        cmocka_unit_test(test_generic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
