/*
 * Rotation operations end to end on a real kmsd: GET /v1/status (filters,
 * roles, refusals), the scheduler thread rotating a short-period key (type
 * scheduled, initiator system, never twice for one period), an emergency
 * rotation whose answer carries the usage report of the compromised
 * version built from the audit records of the requests made just before,
 * per-version uses in GET /v1/keys/{name}, GET /v1/report, and kmsctl
 * status / report --html against the same server.
 */
#define _GNU_SOURCE
#include "api_fixture.h"

#include <curl/curl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

static api_fixture F;

static void sleep_ms(long ms)
{
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&d, NULL);
}

static void expect_status(api_resp *r, long status, const char *code)
{
    if (r->status != status)
        fail_msg("expected %ld %s, got %ld (curl %d): %s", status, code ? code : "", r->status,
                 r->curl_code, r->body ? r->body : "");
    if (code != NULL) {
        json_t *e = json_object_get(r->json, "error");
        assert_non_null(e);
        assert_string_equal(json_string_value(json_object_get(e, "code")), code);
    }
}

static void call_expect(const char *role, const char *method, const char *path, const char *body,
                        long status, const char *code)
{
    api_resp r;
    api_call(&F, role, method, path, body, &r);
    expect_status(&r, status, code);
    api_resp_free(&r);
}

static void create_key(const char *name, long period, long warning)
{
    char body[256];
    snprintf(body, sizeof(body),
             "{\"name\":\"%s\",\"purpose\":\"encrypt\",\"rotation_period\":%ld,"
             "\"warning_window\":%ld}",
             name, period, warning);
    call_expect("admin", "POST", "/v1/keys", body, 201, NULL);
}

static json_t *find_named(json_t *arr, const char *field, const char *name)
{
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v)
    {
        const char *s = json_string_value(json_object_get(v, field));
        if (s != NULL && strcmp(s, name) == 0)
            return v;
    }
    return NULL;
}

static json_int_t jint(json_t *o, const char *field)
{
    json_t *v = json_object_get(o, field);
    if (!json_is_integer(v))
        fail_msg("no integer %s", field);
    return json_integer_value(v);
}

static int group_setup(void **state)
{
    (void)state;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    /* The fixture turns the scheduler off; these tests run it every second,
     * with no jitter so that a 2-second period is enough. */
    return api_fixture_start(&F, "scheduler_interval = 1\nscheduler_jitter = 0\n");
}

static int group_teardown(void **state)
{
    (void)state;
    int st = api_fixture_stop(&F, SIGTERM);
    api_fixture_cleanup(&F);
    curl_global_cleanup();
    return st == 0 ? 0 : -1;
}

static void test_status(void **state)
{
    (void)state;
    create_key("app-st-long", 90 * 86400, 7 * 86400);
    /* Inside its warning window one second after creation. */
    create_key("app-st-soon", 3600 * 24 * 30, 3600 * 24 * 30 - 1);
    sleep_ms(1100);
    api_resp r;
    api_call(&F, "auditor", "GET", "/v1/status", NULL, &r);
    expect_status(&r, 200, NULL);
    json_t *keys = json_object_get(r.json, "keys");
    json_t *lng = find_named(keys, "name", "app-st-long");
    json_t *soon = find_named(keys, "name", "app-st-soon");
    assert_non_null(lng);
    assert_non_null(soon);
    json_int_t now = jint(r.json, "now");
    assert_true(json_is_false(json_object_get(lng, "due_soon")));
    assert_true(json_is_false(json_object_get(lng, "overdue")));
    /* 90 days less the seconds since creation, rounded down. */
    assert_true(jint(lng, "days_until_due") == 89 || jint(lng, "days_until_due") == 90);
    assert_int_equal(jint(lng, "due_at"), jint(lng, "rotated_at") + 90 * 86400);
    assert_int_equal(jint(lng, "seconds_until_due"), jint(lng, "due_at") - now);
    assert_true(json_is_true(json_object_get(soon, "due_soon")));
    assert_true(jint(json_object_get(r.json, "summary"), "keys") >= 2);
    api_resp_free(&r);

    /* --due-within 31d: the 30-day key only. */
    api_call(&F, "admin", "GET", "/v1/status?due_within=2678400", NULL, &r);
    expect_status(&r, 200, NULL);
    keys = json_object_get(r.json, "keys");
    assert_non_null(find_named(keys, "name", "app-st-soon"));
    assert_null(find_named(keys, "name", "app-st-long"));
    api_resp_free(&r);
    api_call(&F, "admin", "GET", "/v1/status?overdue=true", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_null(find_named(json_object_get(r.json, "keys"), "name", "app-st-soon"));
    api_resp_free(&r);

    /* The gauges: app-st-soon is due (inside its warning window). */
    api_call(&F, "auditor", "GET", "/metrics", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_non_null(r.body);
    const char *g = strstr(r.body, "\nkmsd_keys_due ");
    assert_non_null(g);
    assert_true(atoi(g + strlen("\nkmsd_keys_due ")) >= 1);
    assert_non_null(strstr(r.body, "\nkmsd_keys_overdue "));
    api_resp_free(&r);

    call_expect("app", "GET", "/v1/status", NULL, 403, "forbidden");
    call_expect("admin", "GET", "/v1/status?due_within=7d", NULL, 400, "invalid_argument");
    call_expect("admin", "GET", "/v1/status?overdue=yes", NULL, 400, "invalid_argument");
    call_expect("admin", "POST", "/v1/status", "{}", 405, NULL);
}

/* The scheduler thread inside kmsd rotates a key whose period runs out. */
static void test_scheduler(void **state)
{
    (void)state;
    create_key("app-sched", 2, 1);
    json_t *rots = NULL;
    /* Bounded: 20 s for a 2 s period and a 1 s tick. */
    for (int i = 0; i < 80 && rots == NULL; i++) {
        api_resp r;
        api_call(&F, "auditor", "GET", "/v1/rotations?key=app-sched&type=scheduled", NULL, &r);
        expect_status(&r, 200, NULL);
        json_t *a = json_object_get(r.json, "rotations");
        if (json_array_size(a) >= 2)
            rots = json_incref(a);
        api_resp_free(&r);
        if (rots == NULL)
            sleep_ms(250);
    }
    if (rots == NULL)
        fail_msg("the scheduler did not rotate app-sched twice in 20 s");
    size_t i;
    json_t *v;
    json_array_foreach(rots, i, v)
    {
        assert_string_equal(json_string_value(json_object_get(v, "initiator")), "system");
        assert_string_equal(json_string_value(json_object_get(v, "status")), "succeeded");
        /* Never twice for one period: each from_version rotated once. */
        for (size_t j = 0; j < i; j++)
            assert_int_not_equal(jint(json_array_get(rots, j), "from_version"),
                                 jint(v, "from_version"));
    }
    json_decref(rots);
    /* Stop it rotating for the rest of the run. */
    call_expect("admin", "PATCH", "/v1/keys/app-sched",
                "{\"rotation_period\":31536000,\"warning_window\":86400}", 200, NULL);
}

static void test_emergency_usage(void **state)
{
    (void)state;
    create_key("app-em", 90 * 86400, 7 * 86400);
    char tokens[3][512];
    for (int i = 0; i < 3; i++) {
        api_resp r;
        api_call(&F, "app", "POST", "/v1/keys/app-em/wrap",
                 "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}", &r);
        expect_status(&r, 200, NULL);
        snprintf(tokens[i], sizeof(tokens[i]), "%s",
                 json_string_value(json_object_get(r.json, "ciphertext")));
        api_resp_free(&r);
    }
    char body[1600];
    for (int i = 0; i < 2; i++) {
        snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", tokens[i]);
        call_expect("app", "POST", "/v1/keys/app-em/unwrap", body, 200, NULL);
    }
    call_expect("admin", "POST", "/v1/keys/app-em/rotate",
                "{\"type\":\"manual\",\"lookback\":3600}", 400, "invalid_argument");
    call_expect("admin", "POST", "/v1/keys/app-em/rotate",
                "{\"type\":\"emergency\",\"lookback\":0}", 400, "invalid_argument");

    api_resp r;
    api_call(&F, "admin", "POST", "/v1/keys/app-em/rotate",
             "{\"type\":\"emergency\",\"reason\":\"INC-42\",\"lookback\":86400}", &r);
    expect_status(&r, 200, NULL);
    json_t *rot = json_object_get(r.json, "rotation");
    assert_string_equal(json_string_value(json_object_get(rot, "type")), "emergency");
    assert_true(jint(rot, "finished_at") >= jint(rot, "started_at"));
    json_t *usage = json_object_get(r.json, "usage");
    assert_non_null(usage);
    assert_int_equal(jint(usage, "version"), 1);
    assert_int_equal(jint(usage, "to") - jint(usage, "from"), 86400);
    json_t *by = json_object_get(usage, "by");
    json_t *wrap = NULL, *unwrap = NULL;
    size_t i;
    json_t *v;
    json_array_foreach(by, i, v)
    {
        assert_string_equal(json_string_value(json_object_get(v, "identity")),
                            "spiffe://kmsd.dev/app");
        assert_string_equal(json_string_value(json_object_get(v, "source")), "127.0.0.1");
        const char *op = json_string_value(json_object_get(v, "operation"));
        if (strcmp(op, "wrap") == 0)
            wrap = v;
        else if (strcmp(op, "unwrap") == 0)
            unwrap = v;
        else
            fail_msg("unexpected operation %s in the usage report", op);
    }
    assert_non_null(wrap);
    assert_non_null(unwrap);
    assert_int_equal(jint(wrap, "count"), 3);
    assert_int_equal(jint(unwrap, "count"), 2);
    assert_int_equal(jint(unwrap, "failures"), 0);
    assert_true(jint(unwrap, "last") >= jint(unwrap, "first"));
    assert_int_equal(jint(usage, "uses"), 5);
    api_resp_free(&r);

    /* v1 is compromised: the application is refused, and the refusal is one
     * more use in the version's 30-day count. */
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", tokens[2]);
    call_expect("app", "POST", "/v1/keys/app-em/unwrap", body, 403, "version_compromised");
    api_call(&F, "admin", "GET", "/v1/keys/app-em", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_null(json_object_get(json_array_get(json_object_get(r.json, "versions"), 0),
                                "uses_30d")); /* only when asked */
    api_resp_free(&r);
    call_expect("admin", "GET", "/v1/keys/app-em?uses=1", NULL, 400, "invalid_argument");
    call_expect("app", "GET", "/v1/keys/app-em?uses=true", NULL, 403, "forbidden");
    call_expect("app", "GET", "/v1/keys/app-em?uses=false", NULL, 200, NULL);
    api_call(&F, "admin", "GET", "/v1/keys/app-em?uses=true", NULL, &r);
    expect_status(&r, 200, NULL);
    json_t *vers = json_object_get(r.json, "versions");
    assert_int_equal(json_array_size(vers), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(vers, 0), "state")),
                        "compromised");
    json_int_t uses1 = jint(json_array_get(vers, 0), "uses_30d");
    assert_true(uses1 >= 5 && uses1 <= 6);
    assert_int_equal(jint(json_array_get(vers, 1), "uses_30d"), 0);
    api_resp_free(&r);
}

static void current_month(char out[8])
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, 8, "%Y-%m", &tm);
}

static void test_report(void **state)
{
    (void)state;
    char month[8], path[64];
    current_month(month);
    snprintf(path, sizeof(path), "/v1/report?month=%s", month);
    api_resp r;
    api_call(&F, "auditor", "GET", path, NULL, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(json_string_value(json_object_get(r.json, "month")), month);
    json_t *rot = json_object_get(r.json, "rotations");
    assert_true(jint(rot, "total") >= 3); /* the scheduler's two, the emergency one */
    json_t *bt = json_object_get(rot, "by_type");
    assert_true(jint(bt, "scheduled") >= 2);
    assert_true(jint(bt, "emergency") >= 1);
    json_t *em = json_object_get(r.json, "emergency");
    assert_int_equal(jint(em, "objective"), 4 * 3600);
    assert_true(jint(em, "within_objective") >= 1);
    assert_non_null(find_named(json_object_get(em, "rotations"), "key", "app-em"));
    json_t *pol = json_object_get(r.json, "policy");
    assert_true(jint(pol, "keys") >= 4);
    json_t *due = json_object_get(r.json, "due");
    assert_non_null(find_named(json_object_get(due, "keys"), "name", "app-st-soon"));
    api_resp_free(&r);

    call_expect("app", "GET", path, NULL, 403, "forbidden");
    call_expect("auditor", "GET", "/v1/report", NULL, 400, "invalid_argument");
    call_expect("auditor", "GET", "/v1/report?month=2026-13", NULL, 400, "invalid_argument");
}

/* kmsctl against the same server: status and report --html. */
static void test_kmsctl(void **state)
{
    (void)state;
    const char *bld = getenv("KMS_BUILD_DIR");
    assert_non_null(bld);
    char month[8], cmd[4096], html[400];
    int st;
    current_month(month);
    snprintf(html, sizeof(html), "%s/report.html", F.dir);
    char prefix[2048];
    snprintf(prefix, sizeof(prefix),
             "%s/tools/kmsctl --url https://127.0.0.1:%d --cacert %s/ca.crt "
             "--cert %s/auditor.crt --key %s/auditor.key",
             bld, F.port, F.pki, F.pki, F.pki);
    snprintf(cmd, sizeof(cmd), "%s status --due-within 31d > %s/status.txt 2>&1", prefix, F.dir);
    if (system(cmd) != 0) {
        fail_msg("kmsctl status failed: %s", cmd);
    }
    snprintf(cmd, sizeof(cmd), "grep -q 'app-st-soon .*due soon' %s/status.txt", F.dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof(cmd), "%s/status.txt", F.dir);
        FILE *f = fopen(cmd, "r");
        char text[4096] = "";
        if (f != NULL) {
            text[fread(text, 1, sizeof(text) - 1, f)] = '\0';
            fclose(f);
        }
        fail_msg("kmsctl status printed:\n%s", text);
    }
    snprintf(cmd, sizeof(cmd), "%s report --month %s --html %s > %s/report.txt", prefix, month,
             html, F.dir);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof(cmd),
             "grep -q '^Emergency rotations: [1-9]' %s/report.txt && grep -q '<svg' %s && "
             "! grep -q '<script' %s",
             F.dir, html, html);
    assert_int_equal(system(cmd), 0);
    if (getenv("KMS_TEST_REPORT_COPY") != NULL) { /* for looking at it */
        snprintf(cmd, sizeof(cmd), "cp %s '%s'", html, getenv("KMS_TEST_REPORT_COPY"));
        assert_int_equal(system(cmd), 0);
    }
    /* kmsctl key rotate --emergency end to end: the usage report of the
     * version the application used through the API. */
    create_key("app-k", 90 * 86400, 7 * 86400);
    call_expect("app", "POST", "/v1/keys/app-k/wrap",
                "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}", 200, NULL);
    char admin[2048];
    snprintf(admin, sizeof(admin),
             "%s/tools/kmsctl --url https://127.0.0.1:%d --cacert %s/ca.crt "
             "--cert %s/admin.crt --key %s/admin.key",
             bld, F.port, F.pki, F.pki, F.pki);
    snprintf(cmd, sizeof(cmd),
             "%s key rotate app-k --emergency --reason 'INC-9 leak' --lookback 1d > %s/em.txt "
             "2>&1 && grep -q 'Uses of version 1 ' %s/em.txt && grep -q "
             "'spiffe://kmsd.dev/app  *wrap  *127.0.0.1  *1 ' %s/em.txt && grep -q 'emergency  "
             "succeeded' "
             "%s/em.txt",
             admin, F.dir, F.dir, F.dir, F.dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof(cmd), "%s/em.txt", F.dir);
        FILE *f = fopen(cmd, "r");
        char text[4096] = "";
        if (f != NULL) {
            text[fread(text, 1, sizeof(text) - 1, f)] = '\0';
            fclose(f);
        }
        fail_msg("kmsctl key rotate --emergency printed:\n%s", text);
    }
    /* --lookback without --emergency: a usage error. */
    snprintf(cmd, sizeof(cmd), "%s key rotate app-k --lookback 1d > /dev/null 2>&1", admin);
    st = system(cmd);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 64);
    /* key show: the versions with their 30-day uses. */
    snprintf(cmd, sizeof(cmd), "%s key show app-k | grep -q 'USES 30D'", admin);
    assert_int_equal(system(cmd), 0);

    /* A bad month: kmsd refuses it, kmsctl exits non-zero. */
    snprintf(cmd, sizeof(cmd), "%s report --month 2026-1 > /dev/null 2>&1", prefix);
    st = system(cmd);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) != 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status),          cmocka_unit_test(test_scheduler),
        cmocka_unit_test(test_emergency_usage), cmocka_unit_test(test_report),
        cmocka_unit_test(test_kmsctl),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
