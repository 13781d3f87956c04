/*
 * kmsctl's rotation-operations output: the status table, the usage report,
 * the report as text and as HTML (self-contained: no script, no URL, every
 * server text escaped; the numbers of the document on the page).
 */
#include "kmsctl_report.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static char *render(KMS_RESULT (*fn)(const json_t *, FILE *), const json_t *doc)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    kms_result r = fn(doc, f);
    assert_int_equal(fclose(f), 0);
    assert_true(kms_is_ok(r));
    return buf;
}

static json_t *load(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (j == NULL)
        fail_msg("bad test JSON at %d: %s", e.position, e.text);
    return j;
}

static const char *status_doc =
    "{\"now\":1700000000,\"summary\":{\"keys\":3,\"due_soon\":1,\"overdue\":1},\"keys\":["
    "{\"name\":\"a\",\"primary_version\":2,\"rotation_period\":7776000,\"warning_window\":604800,"
    "\"rotated_at\":1699000000,\"due_at\":1706776000,\"seconds_until_due\":6776000,"
    "\"days_until_due\":78,\"due_soon\":false,\"overdue\":false},"
    "{\"name\":\"b\",\"primary_version\":1,\"rotation_period\":2592000,\"warning_window\":604800,"
    "\"rotated_at\":1697600000,\"due_at\":1700192000,\"seconds_until_due\":192000,"
    "\"days_until_due\":2,\"due_soon\":true,\"overdue\":false},"
    "{\"name\":\"c\",\"primary_version\":5,\"rotation_period\":86400,\"warning_window\":3600,"
    "\"rotated_at\":1690000000,\"due_at\":1690086400,\"seconds_until_due\":-9913600,"
    "\"days_until_due\":-115,\"due_soon\":false,\"overdue\":true}]}";

static void test_status_table(void **state)
{
    (void)state;
    json_t *doc = load(status_doc);
    char *out = render(kmsctl_print_status, doc);
    assert_non_null(strstr(out, "NAME"));
    assert_non_null(strstr(out, "LAST ROTATED"));
    assert_non_null(strstr(out, "OVERDUE"));
    assert_non_null(strstr(out, "due soon"));
    assert_non_null(strstr(out, "-115"));
    assert_non_null(strstr(out, "90d"));
    assert_non_null(strstr(out, "3 keys: 1 due soon, 1 overdue"));
    /* Most urgent first: c (overdue), b (due soon), a. */
    const char *c = strstr(out, "\nc "), *b = strstr(out, "\nb "), *a = strstr(out, "\na ");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_true(c < b && b < a);
    free(out);
    json_decref(doc);
}

static void test_usage(void **state)
{
    (void)state;
    json_t *doc = load("{\"version\":3,\"from\":1700000000,\"to\":1700604800,\"uses\":12,"
                       "\"records_read\":40,\"truncated\":false,\"by\":["
                       "{\"identity\":\"spiffe://app/payments\",\"operation\":\"unwrap\","
                       "\"source\":\"127.0.0.1\",\"count\":10,\"items\":10,\"failures\":1,"
                       "\"first\":1700000100,\"last\":1700500000},"
                       "{\"identity\":\"evil\\u001b[2J\",\"operation\":\"rewrap\","
                       "\"source\":\"::1\",\"count\":2,\"items\":200,\"failures\":0,"
                       "\"first\":1700000200,\"last\":1700000300}]}");
    char *out = render(kmsctl_print_usage, doc);
    assert_non_null(strstr(out, "Uses of version 3"));
    assert_non_null(strstr(out, "12 requests by 2"));
    assert_non_null(strstr(out, "spiffe://app/payments"));
    assert_non_null(strstr(out, "2023-11-14 22:15:00Z"));
    assert_non_null(strstr(out, "200"));
    /* A terminal escape from the server is not passed through. */
    assert_null(strchr(out, 0x1b));
    assert_non_null(strstr(out, "evil?[2J"));
    free(out);
    json_decref(doc);
}

static const char *report_doc =
    "{\"month\":\"2023-11\",\"from\":1698796800,\"to\":1701388800,\"generated_at\":1701475200,"
    "\"rotations\":{\"total\":6,\"by_type\":{\"scheduled\":2,\"manual\":1,\"emergency\":2,"
    "\"rollback\":1,\"master\":0},\"by_status\":{\"started\":0,\"succeeded\":5,\"failed\":0,"
    "\"rolled_back\":1},\"success_rate\":0.8333333,\"duration\":{\"timed\":6,\"mean\":125.0,"
    "\"median\":90.0,\"max\":5400},\"per_day\":[0,1,0,0,0,0,0,0,0,0,0,0,0,0,1,1,0,0,0,2,1,0,0,0,"
    "0,0,0,0,0,0]},"
    "\"emergency\":{\"objective\":14400,\"count\":2,\"within_objective\":1,\"rotations\":["
    "{\"id\":\"x\",\"key\":\"payments\",\"from_version\":3,\"to_version\":4,\"type\":"
    "\"emergency\",\"status\":\"succeeded\",\"initiator\":\"ops <alice>\",\"started_at\":"
    "1700438400,\"finished_at\":1700438460,\"reason\":\"leak & <script>alert(1)</script>\","
    "\"duration\":60,\"within_objective\":true},"
    "{\"id\":\"y\",\"key\":\"billing\",\"from_version\":1,\"to_version\":2,\"type\":"
    "\"emergency\",\"status\":\"succeeded\",\"initiator\":\"ops\",\"started_at\":1700438400,"
    "\"finished_at\":1700456400,\"reason\":null,\"duration\":18000,\"within_objective\":false}]},"
    "\"policy\":{\"keys\":4,\"within_policy\":2,\"out_of_policy\":["
    "{\"name\":\"r-late\",\"rotation_period\":3456000,\"overdue_since\":1699574400,"
    "\"overdue\":518400,\"still_overdue\":false}]},"
    "\"due\":{\"ahead\":2592000,\"overdue_now\":0,\"keys\":[{\"name\":\"r-never\","
    "\"primary_version\":2,\"rotation_period\":3024000,\"warning_window\":432000,\"rotated_at\":"
    "1700006400,\"due_at\":1703030400,\"seconds_until_due\":1555200,\"days_until_due\":18,"
    "\"due_soon\":false,\"overdue\":false}]}}";

static void test_report_text(void **state)
{
    (void)state;
    json_t *doc = load(report_doc);
    char *out = render(kmsctl_print_report, doc);
    assert_non_null(strstr(out, "Rotation report 2023-11 (2023-11-01 00:00:00Z to "
                                "2023-11-30 23:59:59Z)"));
    assert_non_null(strstr(out, "Rotations: 6 (succeeded 5, failed 0, rolled back 1"));
    assert_non_null(strstr(out, "Success rate: 83.3%"));
    assert_non_null(strstr(out, "mean 2m 5s, median 1m 30s, longest 1h 30m"));
    assert_non_null(strstr(out, "scheduled 2, manual 1, emergency 2, rollback 1, master 0"));
    assert_non_null(strstr(out, "Emergency rotations: 2, within the 4h objective: 1"));
    assert_non_null(strstr(out, "MISSED"));
    assert_non_null(strstr(out, "5h"));
    assert_non_null(strstr(out, "Keys rotated within their policy: 2 of 4"));
    assert_non_null(strstr(out, "r-late"));
    assert_non_null(strstr(out, "6d"));
    assert_non_null(strstr(out, "Due in the next 30d: 1 (overdue now: 0)"));
    assert_non_null(strstr(out, "r-never"));
    free(out);
    json_decref(doc);
}

static void test_report_html(void **state)
{
    (void)state;
    json_t *doc = load(report_doc);
    char *out = render(kmsctl_report_html, doc);
    assert_true(strncmp(out, "<!DOCTYPE html>", 15) == 0);
    /* Self-contained: nothing to run, nothing fetched. */
    assert_null(strstr(out, "<script"));
    assert_null(strstr(out, "http:"));
    assert_null(strstr(out, "https:"));
    assert_null(strstr(out, "src="));
    assert_null(strstr(out, "@import"));
    assert_null(strstr(out, "url("));
    assert_non_null(strstr(out, "default-src 'none'"));
    /* Server text escaped. */
    assert_non_null(strstr(out, "leak &amp; &lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_non_null(strstr(out, "ops &lt;alice&gt;"));
    /* The figures. */
    assert_non_null(strstr(out, "83.3%"));
    assert_non_null(strstr(out, ">2m 5s<"));
    assert_non_null(strstr(out, ">1m 30s<"));
    assert_non_null(strstr(out, "1 of 2"));
    assert_non_null(strstr(out, "2 of 4"));
    assert_non_null(strstr(out, "<svg"));
    assert_non_null(strstr(out, "objective 4h"));
    assert_non_null(strstr(out, "day 20: 2"));
    assert_non_null(strstr(out, "r-never"));
    /* Balanced SVG and tables. */
    size_t open = 0, close = 0;
    for (const char *p = out; (p = strstr(p, "<svg")) != NULL; p++)
        open++;
    for (const char *p = out; (p = strstr(p, "</svg>")) != NULL; p++)
        close++;
    assert_int_equal(open, 4);
    assert_int_equal(close, 4);
    assert_non_null(strstr(out, "</html>\n"));
    if (getenv("KMSCTL_REPORT_HTML_OUT") != NULL) {
        FILE *f = fopen(getenv("KMSCTL_REPORT_HTML_OUT"), "w");
        assert_non_null(f);
        fputs(out, f);
        fclose(f);
    }
    free(out);
    json_decref(doc);
}

/* Missing members print as "-" and zero counts, never crash. */
static void test_report_sparse(void **state)
{
    (void)state;
    json_t *doc = load("{\"month\":\"2024-02\"}");
    char *out = render(kmsctl_report_html, doc);
    assert_non_null(strstr(out, "No emergency rotation"));
    free(out);
    out = render(kmsctl_print_report, doc);
    assert_non_null(strstr(out, "Success rate: - (no finished rotation)"));
    free(out);
    json_decref(doc);
    json_t *arr = json_array();
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_int_equal(kmsctl_report_html(arr, f).err, KMS_ERR_JSON_INVALID);
    fclose(f);
    free(buf);
    json_decref(arr);
}

static void test_duration_human(void **state)
{
    (void)state;
    char b[64];
    static const struct {
        int64_t s;
        const char *want;
    } cases[] = {{0, "0s"},        {45, "45s"},   {60, "1m"},       {125, "2m 5s"},   {3600, "1h"},
                 {5400, "1h 30m"}, {86400, "1d"}, {90061, "1d 1h"}, {7776000, "90d"}, {-1, "-"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        kmsctl_duration_human(cases[i].s, b, sizeof(b));
        assert_string_equal(b, cases[i].want);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_table),  cmocka_unit_test(test_usage),
        cmocka_unit_test(test_report_text),   cmocka_unit_test(test_report_html),
        cmocka_unit_test(test_report_sparse), cmocka_unit_test(test_duration_human),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
