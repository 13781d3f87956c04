/*
 * kmsd end to end over libcurl: every route, every documented refusal with
 * its exact status and error code (and the server still serving after
 * each), certificate failures, limits, slowloris, SIGHUP policy reloads,
 * SIGTERM under load, and the processes worker mode. The curl CLI half of
 * the coverage is tests/integration/api_curl.sh, run from here against the
 * same server.
 */
#define _GNU_SOURCE
#include "api_fixture.h"
#include "kms_fault.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Asserts status and, for errors, the error code, the error shape, and the
 * request id (header equal to the body's). */
static void expect_status(api_resp *r, long status, const char *code)
{
    if (r->status != status) {
        fail_msg("expected %ld %s, got %ld (curl %d): %s", status, code ? code : "", r->status,
                 r->curl_code, r->body ? r->body : "");
    }
    assert_true(r->request_id[0] != '\0');
    if (code != NULL) {
        assert_non_null(r->json);
        json_t *e = json_object_get(r->json, "error");
        assert_non_null(e);
        assert_string_equal(json_string_value(json_object_get(e, "code")), code);
        assert_non_null(json_string_value(json_object_get(e, "message")));
        /* No decryption oracle: a tampered tag, a wrong context, another
         * key's token and a malformed one all read the same. */
        if (strcmp(code, "invalid_token") == 0) {
            assert_string_equal(json_string_value(json_object_get(e, "message")),
                                kms_error_message(KMS_ERR_TOKEN_INVALID));
        }
        assert_string_equal(json_string_value(json_object_get(r->json, "request_id")),
                            r->request_id);
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

static const char *jstr(api_resp *r, const char *field)
{
    const char *s = json_string_value(json_object_get(r->json, field));
    if (s == NULL) {
        fail_msg("no string field %s in %s", field, r->body ? r->body : "");
    }
    return s;
}

static json_int_t jint(api_resp *r, const char *field)
{
    json_t *v = json_object_get(r->json, field);
    if (!json_is_integer(v)) {
        fail_msg("no integer field %s in %s", field, r->body ? r->body : "");
    }
    return json_integer_value(v);
}

static char *wrap_token(const char *key, const char *pt_b64, const char *ctx_b64)
{
    char body[512], path[256];
    api_resp r;
    snprintf(path, sizeof(path), "/v1/keys/%s/wrap", key);
    if (ctx_b64 != NULL) {
        snprintf(body, sizeof(body), "{\"plaintext\":\"%s\",\"context\":\"%s\"}", pt_b64, ctx_b64);
    } else {
        snprintf(body, sizeof(body), "{\"plaintext\":\"%s\"}", pt_b64);
    }
    api_call(&F, "app", "POST", path, body, &r);
    expect_status(&r, 200, NULL);
    char *t = strdup(jstr(&r, "ciphertext"));
    assert_int_equal(strncmp(t, "kms1:", 5), 0);
    api_resp_free(&r);
    return t;
}

static int group_setup(void **state)
{
    (void)state;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    F.fault = true;
    return api_fixture_start(&F, "workers = threads:4\n");
}

static int group_teardown(void **state)
{
    (void)state;
    api_fixture_cleanup(&F);
    curl_global_cleanup();
    return 0;
}

/* ---- tests ---- */

static void test_health_and_metrics(void **state)
{
    (void)state;
    api_resp r;
    api_call(&F, "app", "GET", "/healthz", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "status"), "ok");
    api_resp_free(&r);
    api_call(&F, "app", "GET", "/readyz", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "status"), "ready");
    api_resp_free(&r);
    api_call(&F, "auditor", "GET", "/metrics", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_non_null(strstr(r.body, "kmsd_http_requests_total{route=\"/healthz\",status=\"200\"}"));
    assert_non_null(strstr(r.body, "kmsd_http_request_duration_seconds_bucket"));
    assert_non_null(strstr(r.body, "kmsd_hsm_calls_total"));
    assert_non_null(strstr(r.body, "kmsd_keys_overdue"));
    assert_non_null(strstr(r.body, "\nkmsd_store_used_bytes "));
    assert_non_null(strstr(r.body, "\nkmsd_store_limit_bytes "));
    /* The durable trail's cost: the healthz and readyz above were audited. */
    assert_non_null(strstr(r.body, "\nkmsd_audit_sync_seconds_bucket{le=\"+Inf\"} "));
    assert_true(strtol(strstr(r.body, "\nkmsd_audit_durable_wait_seconds_count ") +
                           strlen("\nkmsd_audit_durable_wait_seconds_count "),
                       NULL, 10) >= 2);
    assert_non_null(strstr(r.body, "\nkmsd_audit_refused_total 0\n"));
    const char *inf = strstr(r.body, "\nkmsd_audit_durable_wait_seconds_bucket{le=\"+Inf\"} ");
    const char *cnt = strstr(r.body, "\nkmsd_audit_durable_wait_seconds_count ");
    assert_true(inf != NULL && cnt != NULL);
    assert_int_equal(strtol(strchr(inf, '}') + 2, NULL, 10),
                     strtol(cnt + strlen("\nkmsd_audit_durable_wait_seconds_count "), NULL, 10));
    api_resp_free(&r);
    call_expect("app", "GET", "/metrics", NULL, 403, "forbidden");
    /* The same over IPv6 loopback, where the host has it. */
    if (F.ipv6) {
        F.use_ipv6 = true;
        api_call(&F, "app", "GET", "/healthz", NULL, &r);
        F.use_ipv6 = false;
        expect_status(&r, 200, NULL);
        api_resp_free(&r);
    } else {
        printf("# no IPv6 loopback: [::1] listener not tested\n");
    }
}

static void test_key_admin(void **state)
{
    (void)state;
    api_resp r;
    api_call(&F, "admin", "POST", "/v1/keys",
             "{\"name\":\"app-1\",\"purpose\":\"encrypt\",\"rotation_period\":2592000}", &r);
    expect_status(&r, 201, NULL);
    assert_string_equal(jstr(&r, "name"), "app-1");
    assert_string_equal(jstr(&r, "purpose"), "encrypt");
    assert_int_equal(jint(&r, "primary_version"), 1);
    assert_int_equal(jint(&r, "rotation_period"), 2592000);
    api_resp_free(&r);
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"app-1\",\"purpose\":\"encrypt\"}", 409,
                "key_exists");
    call_expect("app", "POST", "/v1/keys", "{\"name\":\"app-9\",\"purpose\":\"encrypt\"}", 403,
                "forbidden");
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"Bad Name\",\"purpose\":\"encrypt\"}", 400,
                "invalid_key_name");
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"x\",\"purpose\":\"sign\"}", 400,
                "invalid_argument");
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"mac-1\",\"purpose\":\"mac\"}", 201, NULL);
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"app-2\",\"purpose\":\"encrypt\"}", 201,
                NULL);
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"zz-private\",\"purpose\":\"encrypt\"}",
                201, NULL);

    /* Listing: the admin sees all, the app only its own; pages chain. */
    api_call(&F, "admin", "GET", "/v1/keys?limit=2", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(json_array_size(json_object_get(r.json, "keys")), 2);
    assert_string_equal(jstr(&r, "next"), "app-2");
    api_resp_free(&r);
    api_call(&F, "admin", "GET", "/v1/keys?after=app-2", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(json_array_size(json_object_get(r.json, "keys")), 2);
    assert_true(json_is_null(json_object_get(r.json, "next")));
    api_resp_free(&r);
    api_call(&F, "app", "GET", "/v1/keys", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(json_array_size(json_object_get(r.json, "keys")), 3);
    api_resp_free(&r);
    call_expect("admin", "GET", "/v1/keys?limit=0", NULL, 400, "invalid_argument");

    api_call(&F, "auditor", "GET", "/v1/keys/app-1", NULL, &r);
    expect_status(&r, 200, NULL);
    json_t *vs = json_object_get(r.json, "versions");
    assert_int_equal(json_array_size(vs), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(vs, 0), "state")),
                        "active");
    assert_true(json_is_null(json_object_get(json_array_get(vs, 0), "destroy_at")));
    api_resp_free(&r);
    call_expect("app", "GET", "/v1/keys/zz-private", NULL, 403, "forbidden");
    call_expect("admin", "GET", "/v1/keys/no-such-key", NULL, 404, "key_not_found");
    call_expect("admin", "GET", "/v1/keys/app-1/versions/1", NULL, 200, NULL);
    call_expect("admin", "GET", "/v1/keys/app-1/versions/99", NULL, 404, "version_not_found");
    call_expect("admin", "GET", "/v1/keys/app-1/versions/0", NULL, 404, "version_not_found");

    api_call(&F, "admin", "PATCH", "/v1/keys/app-1",
             "{\"rotation_period\":5184000,\"deletion_protection\":true}", &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "rotation_period"), 5184000);
    assert_true(json_is_true(json_object_get(r.json, "deletion_protection")));
    api_resp_free(&r);
    call_expect("admin", "PATCH", "/v1/keys/app-1", "{\"color\":\"red\"}", 400, "invalid_json");
    call_expect("app", "PATCH", "/v1/keys/app-1", "{\"rotation_period\":100}", 403, "forbidden");
}

static void test_data_ops(void **state)
{
    (void)state;
    api_resp r;
    /* "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" is 32 bytes 0..31. */
    const char *pt = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    char *tok = wrap_token("app-1", pt, "dGVuYW50PTE=");
    char body[2048];
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\",\"context\":\"dGVuYW50PTE=\"}", tok);
    api_call(&F, "app", "POST", "/v1/keys/app-1/unwrap", body, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "plaintext"), pt);
    assert_int_equal(jint(&r, "version"), 1);
    api_resp_free(&r);
    /* Wrong context, no context, tampered token, other key: one error. */
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\",\"context\":\"dGVuYW50PTI=\"}", tok);
    call_expect("app", "POST", "/v1/keys/app-1/unwrap", body, 400, "invalid_token");
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", tok);
    call_expect("app", "POST", "/v1/keys/app-1/unwrap", body, 400, "invalid_token");
    char *bad = strdup(tok);
    size_t mid = strlen(bad) - 10;
    bad[mid] = bad[mid] == 'A' ? 'B' : 'A';
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\",\"context\":\"dGVuYW50PTE=\"}", bad);
    call_expect("app", "POST", "/v1/keys/app-1/unwrap", body, 400, "invalid_token");
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\",\"context\":\"dGVuYW50PTE=\"}", tok);
    api_call(&F, "app", "POST", "/v1/keys/app-2/unwrap", body, &r);
    assert_int_equal(r.status / 100, 4);
    api_resp_free(&r);
    call_expect("app", "POST", "/v1/keys/app-1/unwrap", "{\"ciphertext\":\"kms1:AAAA\"}", 400,
                "invalid_token");
    /* Roles: admins do no data operations. */
    call_expect("admin", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", 403,
                "forbidden");
    free(bad);
    free(tok);

    api_call(&F, "app", "POST", "/v1/keys/app-1/encrypt", "{\"plaintext\":\"aGVsbG8gd29ybGQ=\"}",
             &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "key"), "app-1");
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", jstr(&r, "ciphertext"));
    api_resp_free(&r);
    api_call(&F, "app", "POST", "/v1/keys/app-1/decrypt", body, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "plaintext"), "aGVsbG8gd29ybGQ=");
    api_resp_free(&r);
    api_call(&F, "migrator", "POST", "/v1/keys/app-1/decrypt", body, &r);
    expect_status(&r, 200, NULL);
    api_resp_free(&r);

    api_call(&F, "app", "POST", "/v1/keys/app-1/datakey",
             "{\"bytes\":32,\"include_plaintext\":true}", &r);
    expect_status(&r, 200, NULL);
    char dk[128];
    snprintf(dk, sizeof(dk), "%s", jstr(&r, "plaintext"));
    assert_int_equal(strlen(dk), 44);
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", jstr(&r, "ciphertext"));
    api_resp_free(&r);
    api_call(&F, "app", "POST", "/v1/keys/app-1/unwrap", body, &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "plaintext"), dk);
    api_resp_free(&r);
    api_call(&F, "app", "POST", "/v1/keys/app-1/datakey", "{}", &r);
    expect_status(&r, 200, NULL);
    assert_null(json_object_get(r.json, "plaintext"));
    api_resp_free(&r);
    call_expect("app", "POST", "/v1/keys/app-1/datakey", "{\"bytes\":8}", 400, "invalid_argument");

    api_call(&F, "app", "POST", "/v1/keys/mac-1/mac", "{\"message\":\"aGVsbG8=\"}", &r);
    expect_status(&r, 200, NULL);
    char mac[256];
    snprintf(mac, sizeof(mac), "%s", jstr(&r, "mac"));
    api_resp_free(&r);
    snprintf(body, sizeof(body), "{\"message\":\"aGVsbG8=\",\"mac\":\"%s\"}", mac);
    api_call(&F, "app", "POST", "/v1/keys/mac-1/verify", body, &r);
    expect_status(&r, 200, NULL);
    assert_true(json_is_true(json_object_get(r.json, "valid")));
    api_resp_free(&r);
    snprintf(body, sizeof(body), "{\"message\":\"aGVsbG9v\",\"mac\":\"%s\"}", mac);
    api_call(&F, "app", "POST", "/v1/keys/mac-1/verify", body, &r);
    assert_true(r.status == 200 || r.status == 400);
    if (r.status == 200) {
        assert_true(json_is_false(json_object_get(r.json, "valid")));
    }
    api_resp_free(&r);
    call_expect("app", "POST", "/v1/keys/mac-1/wrap", "{\"plaintext\":\"AAAA\"}", 400,
                "wrong_key_purpose");
    call_expect("app", "POST", "/v1/keys/app-404/wrap", "{\"plaintext\":\"AAAA\"}", 404,
                "key_not_found");
}

static void test_rotation_states(void **state)
{
    (void)state;
    api_resp r;
    const char *pt = "c2VjcmV0LWRlay0xMjM0NTY3ODkwMTIzNDU2Nzg5MA==";
    char *old = wrap_token("app-2", pt, NULL);
    api_call(&F, "admin", "POST", "/v1/keys/app-2/rotate", "{\"reason\":\"test\"}", &r);
    expect_status(&r, 200, NULL);
    json_t *rot = json_object_get(r.json, "rotation");
    assert_int_equal(json_integer_value(json_object_get(rot, "to_version")), 2);
    assert_string_equal(json_string_value(json_object_get(rot, "type")), "manual");
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(r.json, "key"), "primary_version")), 2);
    api_resp_free(&r);
    char body[2048];
    snprintf(body, sizeof(body), "{\"ciphertext\":\"%s\"}", old);
    api_call(&F, "app", "POST", "/v1/keys/app-2/rewrap", body, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "from_version"), 1);
    assert_int_equal(jint(&r, "version"), 2);
    assert_true(json_is_true(json_object_get(r.json, "changed")));
    api_resp_free(&r);

    /* disable v1: refused; enable: readable again. */
    call_expect("admin", "POST", "/v1/keys/app-2/versions/1/state", "{\"action\":\"disable\"}", 200,
                NULL);
    call_expect("app", "POST", "/v1/keys/app-2/unwrap", body, 403, "version_disabled");
    call_expect("admin", "POST", "/v1/keys/app-2/versions/1/state", "{\"action\":\"enable\"}", 200,
                NULL);
    call_expect("app", "POST", "/v1/keys/app-2/unwrap", body, 200, NULL);
    call_expect("admin", "POST", "/v1/keys/app-2/versions/1/state", "{\"action\":\"explode\"}", 400,
                "invalid_argument");
    call_expect("admin", "POST", "/v1/keys/app-2/versions/1/state",
                "{\"action\":\"disable\",\"grace_period\":5}", 400, "invalid_json");
    call_expect("admin", "POST", "/v1/keys/app-2/versions/7/state", "{\"action\":\"disable\"}", 404,
                "version_not_found");

    /* compromise v1: apps refused, the migrator's rewrap still reads it. */
    api_call(&F, "admin", "POST", "/v1/keys/app-2/versions/1/state",
             "{\"action\":\"compromise\",\"reason\":\"leak\"}", &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(jstr(&r, "state"), "compromised");
    api_resp_free(&r);
    call_expect("app", "POST", "/v1/keys/app-2/unwrap", body, 403, "version_compromised");
    call_expect("app", "POST", "/v1/keys/app-2/rewrap", body, 403, "version_compromised");
    api_call(&F, "migrator", "POST", "/v1/keys/app-2/rewrap", body, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "version"), 2);
    api_resp_free(&r);
    call_expect("migrator", "POST", "/v1/keys/app-2/wrap", "{\"plaintext\":\"AAAA\"}", 403,
                "forbidden");

    /* rollback: primary back to the previous usable version. */
    api_call(&F, "admin", "POST", "/v1/keys/app-1/rotate", "{\"type\":\"manual\"}", &r);
    expect_status(&r, 200, NULL);
    api_resp_free(&r);
    api_call(&F, "admin", "POST", "/v1/keys/app-1/rollback", "{\"reason\":\"bad\"}", &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(r.json, "rotation"), "type")),
        "rollback");
    api_resp_free(&r);
    call_expect("admin", "POST", "/v1/keys/app-1/rotate", "{\"type\":\"scheduled\"}", 400,
                "invalid_argument");
    free(old);
}

static void test_batch(void **state)
{
    (void)state;
    api_resp r;
    api_call(&F, "app", "POST", "/v1/keys/app-1/batch/wrap",
             "{\"items\":[{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"},{\"plaintext\":\"!!\"},"
             "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\",\"context\":\"Yw==\"}]}",
             &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "succeeded"), 2);
    assert_int_equal(jint(&r, "failed"), 1);
    json_t *res = json_object_get(r.json, "results");
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_array_get(res, 1), "error"), "code")),
                        "invalid_base64");
    char body[4096];
    snprintf(body, sizeof(body),
             "{\"items\":[{\"ciphertext\":\"%s\"},{\"ciphertext\":\"%s\",\"context\":\"Yw==\"},"
             "{\"ciphertext\":\"%s\"}]}",
             json_string_value(json_object_get(json_array_get(res, 0), "ciphertext")),
             json_string_value(json_object_get(json_array_get(res, 2), "ciphertext")),
             json_string_value(json_object_get(json_array_get(res, 2), "ciphertext")));
    api_resp_free(&r);
    api_call(&F, "migrator", "POST", "/v1/keys/app-1/batch/unwrap", body, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "succeeded"), 2);
    assert_int_equal(jint(&r, "failed"), 1);
    res = json_object_get(r.json, "results");
    assert_string_equal(json_string_value(json_object_get(json_array_get(res, 0), "plaintext")),
                        "AAECAwQFBgcICQoLDA0ODw==");
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_array_get(res, 2), "error"), "code")),
                        "invalid_token");
    api_resp_free(&r);

    /* An answer larger than the server's first serialisation buffer
     * (512 bytes) arrives whole: 40 items, every one wrapped. */
    char many[40 * 48 + 32];
    size_t m = (size_t)snprintf(many, sizeof(many), "{\"items\":[");
    for (int i = 0; i < 40; i++)
        m += (size_t)snprintf(many + m, sizeof(many) - m,
                              "%s{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}", i > 0 ? "," : "");
    snprintf(many + m, sizeof(many) - m, "]}");
    api_call(&F, "app", "POST", "/v1/keys/app-1/batch/wrap", many, &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "succeeded"), 40);
    res = json_object_get(r.json, "results");
    assert_int_equal(json_array_size(res), 40);
    assert_true(strncmp(json_string_value(json_object_get(json_array_get(res, 39), "ciphertext")),
                        "kms1:", 5) == 0);
    api_resp_free(&r);

    /* 1001 items: refused as a whole, before any work. */
    size_t cap = 1001 * 24 + 32;
    char *big = malloc(cap);
    size_t n = (size_t)snprintf(big, cap, "{\"items\":[");
    for (int i = 0; i < 1001; i++) {
        n += (size_t)snprintf(big + n, cap - n, "%s{\"plaintext\":\"AAAA\"}", i ? "," : "");
    }
    snprintf(big + n, cap - n, "]}");
    call_expect("app", "POST", "/v1/keys/app-1/batch/wrap", big, 413, "limit_exceeded");
    free(big);
    call_expect("app", "POST", "/v1/keys/app-404/batch/wrap",
                "{\"items\":[{\"plaintext\":\"AAAA\"}]}", 404, "key_not_found");
    call_expect("app", "POST", "/v1/keys/app-1/batch/explode", "{\"items\":[]}", 404, "not_found");
    call_expect("app", "POST", "/v1/keys/app-1/batch/wrap", "{\"items\":[]}", 400, "invalid_json");
    call_expect("admin", "POST", "/v1/keys/app-1/batch/wrap",
                "{\"items\":[{\"plaintext\":\"AAAA\"}]}", 403, "forbidden");
}

static void test_bad_requests(void **state)
{
    (void)state;
    api_resp r;
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":", 400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "[1,2]", 400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":5}", 400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{}", 400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\",\"mode\":\"x\"}",
                400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap",
                "{\"plaintext\":\"AAAA\",\"plaintext\":\"AAAB\"}", 400, "invalid_json");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAA\"}", 400,
                "invalid_base64");
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AA AA\"}", 400,
                "invalid_base64");
    api_call(&F, "app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":5}", &r);
    assert_non_null(
        strstr(json_string_value(json_object_get(json_object_get(r.json, "error"), "message")),
               "plaintext"));
    api_resp_free(&r);
    api_call_ct(&F, "app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", "text/plain",
                &r);
    expect_status(&r, 415, "unsupported_media_type");
    api_resp_free(&r);
    call_expect("app", "DELETE", "/v1/keys/app-1", NULL, 405, "method_not_allowed");
    call_expect("app", "GET", "/v1/keys/app-1/wrap", NULL, 405, "method_not_allowed");
    call_expect("app", "GET", "/v1/nothing", NULL, 404, "not_found");
    call_expect("app", "GET", "/v1/keys/app-1/", NULL, 404, "not_found");
    call_expect("app", "GET", "/", NULL, 404, "not_found");

    /* Oversize bodies: announced (Content-Length) and chunked. */
    size_t big = 1024 * 1024 + 10;
    char *b = malloc(big + 1);
    memset(b, ' ', big);
    b[0] = '{';
    b[big - 1] = '}';
    b[big] = '\0';
    api_call(&F, "app", "POST", "/v1/keys/app-1/wrap", b, &r);
    expect_status(&r, 413, "body_too_large");
    assert_non_null(strstr(r.body, "1048576"));
    api_resp_free(&r);
    free(b);

    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

/* Chunked upload of 2 MiB of spaces inside an object. */
static size_t chunk_read(char *buf, size_t sz, size_t n, void *arg)
{
    size_t *left = arg;
    size_t m = sz * n;
    if (m > *left) {
        m = *left;
    }
    memset(buf, ' ', m);
    if (*left == 2 * 1024 * 1024 && m > 0) {
        buf[0] = '{';
    }
    *left -= m;
    return m;
}

static size_t discard(char *p, size_t sz, size_t n, void *arg)
{
    (void)p;
    size_t *len = arg;
    *len += sz * n;
    return sz * n;
}

static void test_chunked_too_large(void **state)
{
    (void)state;
    CURL *c = curl_easy_init();
    char url[128], cert[400], key[400], ca[400];
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/v1/keys/app-1/wrap", F.port);
    snprintf(cert, sizeof(cert), "%s/app.crt", F.pki);
    snprintf(key, sizeof(key), "%s/app.key", F.pki);
    snprintf(ca, sizeof(ca), "%s/ca.crt", F.pki);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, "Transfer-Encoding: chunked");
    size_t left = 2 * 1024 * 1024, got = 0;
    long status = 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, ca);
    curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
    curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, chunk_read);
    curl_easy_setopt(c, CURLOPT_READDATA, &left);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
    CURLcode rc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    assert_int_equal(rc, CURLE_OK);
    assert_int_equal(status, 413);
    assert_true(got > 0);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

static void test_client_certificates(void **state)
{
    (void)state;
    static const struct {
        const char *role;
        const char *reason;
    } cases[] = {
        {NULL, "no client certificate"},
        {"foreign", "not issued by the trusted CA"},
        {"expired", "expired"},
        {"revoked", "revoked"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        api_resp r;
        api_call(&F, cases[i].role, "GET", "/healthz", NULL, &r);
        expect_status(&r, 401, "unauthenticated");
        const char *msg =
            json_string_value(json_object_get(json_object_get(r.json, "error"), "message"));
        if (strstr(msg, cases[i].reason) == NULL) {
            fail_msg("%s: message '%s' lacks '%s'", cases[i].role ? cases[i].role : "none", msg,
                     cases[i].reason);
        }
        api_resp_free(&r);
        call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    }
    /* Plain HTTP to the TLS port: no HTTP answer, and the server goes on. */
    CURL *c = curl_easy_init();
    char url[128];
    size_t got = 0;
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/healthz", F.port);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    assert_true(rc != CURLE_OK || status == 0 || status >= 400);
    assert_int_not_equal(rc, CURLE_OPERATION_TIMEDOUT);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

/* A plain TCP connection to kmsd's port. */
static int raw_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)F.port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    return fd;
}

static void test_slowloris(void **state)
{
    (void)state;
    int fd = raw_connect();
    /* The start of a TLS record, then nothing. */
    assert_int_equal(send(fd, "\x16\x03\x01\x00", 4, 0), 4);
    double t0 = now_s();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    /* connection_timeout = 3 in the test config; allow slack. */
    int n = poll(&p, 1, 10000);
    double waited = now_s() - t0;
    /* The server may send a TLS alert before it closes: read to EOF. */
    char buf[256];
    ssize_t got = 1;
    for (int i = 0; n > 0 && i < 16 && got > 0; i++) {
        got = recv(fd, buf, sizeof(buf), 0);
    }
    close(fd);
    assert_true(n > 0);
    assert_true(got <= 0);
    assert_true(waited >= 2.0 && waited < 9.0);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

static void test_master_rotations_check(void **state)
{
    (void)state;
    api_resp r;
    api_call(&F, "auditor", "GET", "/v1/master", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_true(json_array_size(json_object_get(r.json, "masters")) >= 1);
    api_resp_free(&r);
    call_expect("auditor", "POST", "/v1/master/rotate", "{}", 403, "forbidden");
    call_expect("app", "GET", "/v1/master", NULL, 403, "forbidden");
    api_call(&F, "admin", "POST", "/v1/master/rotate", "{\"reason\":\"yearly\"}", &r);
    expect_status(&r, 200, NULL);
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(r.json, "rotation"), "type")), "master");
    api_resp_free(&r);
    api_call(&F, "auditor", "GET", "/v1/rotations?key=app-2", NULL, &r);
    expect_status(&r, 200, NULL);
    assert_true(json_array_size(json_object_get(r.json, "rotations")) >= 1);
    api_resp_free(&r);
    call_expect("auditor", "GET", "/v1/rotations?type=bogus", NULL, 400, "invalid_argument");
    call_expect("auditor", "GET", "/v1/rotations?limit=x", NULL, 400, "invalid_argument");
    api_call(&F, "admin", "POST", "/v1/admin/check", "{}", &r);
    expect_status(&r, 200, NULL);
    assert_int_equal(jint(&r, "problems"), 0);
    api_resp_free(&r);
    call_expect("auditor", "POST", "/v1/admin/check", "{}", 403, "forbidden");
    /* Data still readable after the master rotation. */
    char *t = wrap_token("app-1", "AAAA", NULL);
    free(t);
}

static void test_curl_cli(void **state)
{
    (void)state;
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "KMSD_URL=https://127.0.0.1:%d PKI='%s' bash '%s/tests/integration/api_curl.sh'",
             F.port, F.pki, getenv("KMS_SOURCE_DIR"));
    assert_int_equal(system(cmd), 0);
}

/* Whether kmsd's log has a line containing needle; with print, every such
 * line is also printed (as a test diagnostic). */
static bool log_lines(const char *needle, bool print)
{
    FILE *fp = fopen(F.log, "r");
    char line[2048];
    bool found = false;
    while (fp != NULL && fgets(line, sizeof(line), fp) != NULL) {
        if (strstr(line, needle) != NULL) {
            found = true;
            if (print) {
                printf("# kmsd: %s", line);
            }
        }
    }
    if (fp != NULL) {
        fclose(fp);
    }
    return found;
}

static bool log_contains(const char *needle)
{
    return log_lines(needle, false);
}

static void test_sighup_policy(void **state)
{
    (void)state;
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"other-1\",\"purpose\":\"encrypt\"}", 201,
                NULL);
    call_expect("app", "POST", "/v1/keys/other-1/wrap", "{\"plaintext\":\"AAAA\"}", 403,
                "forbidden");
    /* A broken policy: the old one stays in force. */
    assert_int_equal(api_fixture_write_policy(&F, "{\"rules\": [{\"identity\": 5}]}"), 0);
    kill(F.pid, SIGHUP);
    for (int i = 0; i < 50 && !log_contains("policy not reloaded"); i++) {
        sleep_ms(100);
    }
    assert_true(log_contains("policy not reloaded"));
    call_expect("app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", 200, NULL);
    call_expect("app", "POST", "/v1/keys/other-1/wrap", "{\"plaintext\":\"AAAA\"}", 403,
                "forbidden");
    /* A good one applies. */
    assert_int_equal(
        api_fixture_write_policy(
            &F, "{\"rules\": [\n"
                " {\"identity\": \"spiffe://kmsd.dev/app\", \"role\": \"app\", \"keys\": "
                "[\"app-*\", \"mac-*\", \"other-*\"]},\n"
                " {\"identity\": \"spiffe://kmsd.dev/migrator\", \"role\": \"migrator\", "
                "\"keys\": [\"app-*\"]},\n"
                " {\"identity\": \"spiffe://kmsd.dev/admin\", \"role\": \"admin\", \"keys\": "
                "[\"*\"]},\n"
                " {\"identity\": \"spiffe://kmsd.dev/auditor\", \"role\": \"auditor\", \"keys\": "
                "[\"*\"]}]}\n"),
        0);
    kill(F.pid, SIGHUP);
    bool ok = false;
    for (int i = 0; i < 50 && !ok; i++) {
        api_resp r;
        api_call(&F, "app", "POST", "/v1/keys/other-1/wrap", "{\"plaintext\":\"AAAA\"}", &r);
        ok = r.status == 200;
        api_resp_free(&r);
        if (!ok) {
            sleep_ms(100);
        }
    }
    assert_true(ok);
}

/* HSM failures: 503 with Retry-After: 1, and the service recovers by
 * itself once the HSM does. */
static void test_hsm_failure_503(void **state)
{
    (void)state;
    api_resp r;
    kms_fault_reset();
    /* CKR_DEVICE_ERROR (0x30) on every C_Encrypt from now on. */
    kms_fault_arm_sticky("C_Encrypt", 1, 0x30);
    api_call(&F, "app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", &r);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.retry_after, "1");
    assert_int_equal(
        strncmp(json_string_value(json_object_get(json_object_get(r.json, "error"), "code")),
                "hsm_", 4),
        0);
    api_resp_free(&r);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    kms_fault_disarm();
    bool ok = false;
    for (int i = 0; i < 100 && !ok; i++) {
        api_call(&F, "app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", &r);
        ok = r.status == 200;
        api_resp_free(&r);
        if (!ok) {
            sleep_ms(100);
        }
    }
    assert_true(ok);
}

/* A hung HSM: /readyz answers 503 within its timeout, /healthz is not held
 * up, and readiness comes back once the call returns. */
static void test_readyz_hung_hsm(void **state)
{
    (void)state;
    api_resp r;
    kms_fault_reset();
    kms_fault_arm("C_GenerateRandom", 1, 0, 5000);
    double t0 = now_s();
    api_call(&F, "auditor", "GET", "/readyz", NULL, &r);
    double took = now_s() - t0;
    assert_int_equal(r.status, 503);
    assert_string_equal(jstr(&r, "status"), "not_ready");
    assert_string_equal(r.retry_after, "1");
    api_resp_free(&r);
    assert_true(took < 4.5); /* ready_timeout_ms = 3000 in the test config */
    t0 = now_s();
    call_expect("auditor", "GET", "/healthz", NULL, 200, NULL);
    assert_true(now_s() - t0 < 1.0);
    bool ok = false;
    for (int i = 0; i < 100 && !ok; i++) {
        api_call(&F, "auditor", "GET", "/readyz", NULL, &r);
        ok = r.status == 200;
        api_resp_free(&r);
        if (!ok) {
            sleep_ms(100);
        }
    }
    assert_true(ok);
    kms_fault_disarm();
}

/* SIGHUP with a broken server certificate keeps the old one; with a good
 * one, new handshakes get it. */
static void test_sighup_certificate(void **state)
{
    (void)state;
    char crt[400], saved[400], cmd[1200];
    snprintf(crt, sizeof(crt), "%s/server.crt", F.pki);
    snprintf(saved, sizeof(saved), "%s/server.crt.good", F.pki);
    assert_int_equal(rename(crt, saved), 0);
    FILE *fp = fopen(crt, "w");
    assert_non_null(fp);
    fputs("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n", fp);
    fclose(fp);
    kill(F.pid, SIGHUP);
    for (int i = 0; i < 50 && !log_contains("server certificate not reloaded"); i++) {
        sleep_ms(100);
    }
    assert_true(log_contains("server certificate not reloaded"));
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    /* Good again: the same certificate re-read (a renewal looks the same to
     * the server), and clients still verify it. */
    snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", saved, crt);
    assert_int_equal(system(cmd), 0);
    kill(F.pid, SIGHUP);
    sleep_ms(300);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

/* kmsd --check-config: a valid file passes; a group-readable PIN file and an
 * unknown option are refused with exit status 78 (EX_CONFIG). */
static int run_kmsd_check(const char *conf)
{
    char cmd[1200];
    snprintf(cmd, sizeof(cmd), "'%s' --config '%s' --check-config >/dev/null 2>&1", F.kmsd, conf);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_check_config(void **state)
{
    (void)state;
    assert_int_equal(run_kmsd_check(F.conf), 0);
    char pin[400], conf[400], cmd[1600];
    snprintf(pin, sizeof(pin), "%s/pin-readable", F.dir);
    snprintf(conf, sizeof(conf), "%s/bad.conf", F.dir);
    snprintf(cmd, sizeof(cmd),
             "install -m 0644 /dev/null '%s' && sed 's|^hsm_pin_file = .*|hsm_pin_file = %s|' "
             "'%s' > '%s'",
             pin, pin, F.conf, conf);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(run_kmsd_check(conf), 78);
    snprintf(cmd, sizeof(cmd), "cp '%s' '%s' && echo 'no_such_option = 1' >> '%s'", F.conf, conf,
             conf);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(run_kmsd_check(conf), 78);

    /* A worker that cannot open its token: the supervisor does not loop
     * restarting it, kmsd exits with the worker's status (78, config). */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &l), 0);
    close(fd);
    snprintf(cmd, sizeof(cmd),
             "grep -v -e '^listen' -e '^hsm_token_uri' -e '^workers' '%s' > '%s' && "
             "printf 'listen = 127.0.0.1:%d\\nhsm_token_uri = pkcs11:token=no-such-token\\n"
             "workers = processes:2\\n' >> '%s'",
             F.conf, conf, ntohs(a.sin_port), conf);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof(cmd), "timeout 30 '%s' --config '%s' >/dev/null 2>&1", F.kmsd, conf);
    int st = system(cmd);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 78);
}

/* ---- SIGTERM under load ---- */

typedef struct {
    int answered, answered_bad, unanswered;
    volatile bool *stop;
} load_stats;

static void *load_main(void *arg)
{
    load_stats *ls = arg;
    /* Bounded: at most 5000 requests or until the server is gone. */
    for (int i = 0; i < 5000 && !*ls->stop; i++) {
        api_resp r;
        api_call(&F, "app", "POST", "/v1/keys/app-1/wrap",
                 "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}", &r);
        if (r.status == 0) {
            ls->unanswered++;
            if (ls->unanswered > 20) {
                api_resp_free(&r);
                break;
            }
        } else if (r.status == 200 && r.json != NULL &&
                   json_string_value(json_object_get(r.json, "ciphertext")) != NULL) {
            ls->answered++;
        } else {
            ls->answered_bad++;
        }
        api_resp_free(&r);
    }
    return NULL;
}

static void run_sigterm_under_load(void)
{
    volatile bool stop = false;
    load_stats ls[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        memset(&ls[i], 0, sizeof(ls[i]));
        ls[i].stop = &stop;
        assert_int_equal(pthread_create(&th[i], NULL, load_main, &ls[i]), 0);
    }
    sleep_ms(700);
    int status = api_fixture_stop(&F, SIGTERM);
    stop = true;
    int answered = 0, bad = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        answered += ls[i].answered;
        bad += ls[i].answered_bad;
    }
    printf("# SIGTERM under load: %d answered, %d answered wrongly\n", answered, bad);
    if (status != 0) {
        /* What the workers said, for the record of a failed run. */
        (void)log_lines("warn", true);
        (void)log_lines("error", true);
    }
    assert_int_equal(status, 0);
    assert_true(answered > 0);
    assert_int_equal(bad, 0);
}

static void test_sigterm_under_load(void **state)
{
    (void)state;
    run_sigterm_under_load();
}

static long metric_value(const char *series)
{
    api_resp r;
    api_call(&F, "auditor", "GET", "/metrics", NULL, &r);
    expect_status(&r, 200, NULL);
    const char *p = strstr(r.body, series);
    long v = p != NULL ? strtol(p + strlen(series), NULL, 10) : 0;
    api_resp_free(&r);
    return v;
}

/* processes:2 on the same token and store: serves, restarts a killed
 * worker, reloads, drains. */
static void test_processes_mode(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_write_policy(&F, NULL), 0);
    assert_int_equal(
        api_fixture_start(&F,
                          "workers = processes:2\nprocess_threads = 2\nscheduler_interval = 1\n"),
        0);
    /* Workers start one after the other; kill one only once all serve. */
    for (int i = 0; i < 100 && !log_contains("2 workers serving"); i++) {
        sleep_ms(100);
    }
    assert_true(log_contains("2 workers serving"));
    /* Counters are every worker's, kept in shared slots: a worker killed
     * and restarted counts on from its slot, so they never go down. */
    long calls_before = metric_value("\nkmsd_hsm_calls_total ");
    long syncs_before = metric_value("\nkmsd_audit_sync_seconds_count ");
    char path[128];
    snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)F.pid, (int)F.pid);
    FILE *fp = fopen(path, "r");
    int child = 0;
    if (fp != NULL) {
        if (fscanf(fp, "%d", &child) != 1) {
            child = 0;
        }
        fclose(fp);
    }
    if (child > 0) {
        kill(child, SIGKILL);
        sleep_ms(300);
    }
    int ok = 0;
    for (int i = 0; i < 20; i++) {
        api_resp r;
        api_call(&F, "app", "POST", "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAAA\"}", &r);
        ok += r.status == 200;
        api_resp_free(&r);
    }
    assert_int_equal(ok, 20);
    if (child > 0) {
        assert_true(log_contains("restarting"));
    }
    for (int i = 0; i < 4; i++) {
        assert_true(metric_value("\nkmsd_hsm_calls_total ") >= calls_before + 2 * 20);
        assert_true(metric_value("\nkmsd_audit_sync_seconds_count ") > syncs_before);
    }
    kill(F.pid, SIGHUP);
    sleep_ms(300);
    call_expect("app", "GET", "/readyz", NULL, 200, NULL);

    /* Request counters are shared by the workers: whichever one answers the
     * scrape counts every worker's requests. */
    long before = metric_value("kmsd_http_requests_total{route=\"/healthz\",status=\"200\"}");
    for (int i = 0; i < 12; i++) {
        call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    }
    long after = metric_value("kmsd_http_requests_total{route=\"/healthz\",status=\"200\"}");
    assert_int_equal(after - before, 12);

    /* The scheduler (one worker, every second here) rotates a key whose
     * period has run out. */
    call_expect("admin", "POST", "/v1/keys",
                "{\"name\":\"sched-1\",\"purpose\":\"encrypt\",\"rotation_period\":2,"
                "\"warning_window\":1}",
                201, NULL);
    bool rotated = false;
    for (int i = 0; i < 80 && !rotated; i++) {
        api_resp r;
        api_call(&F, "auditor", "GET", "/v1/rotations?key=sched-1&type=scheduled", NULL, &r);
        rotated = r.status == 200 && json_array_size(json_object_get(r.json, "rotations")) > 0;
        if (rotated) {
            json_t *rot = json_array_get(json_object_get(r.json, "rotations"), 0);
            assert_string_equal(json_string_value(json_object_get(rot, "initiator")), "system");
        }
        api_resp_free(&r);
        if (!rotated) {
            sleep_ms(100);
        }
    }
    assert_true(rotated);
    run_sigterm_under_load();
}

/* A POST made on a thread of its own, held in the HSM by an injected
 * delay (kms_fault_arm), while the test calls /healthz beside it. */
typedef struct {
    const char *path, *body;
    api_resp r;
    atomic_bool done;
    pthread_t thread;
} held_call;

static void *held_call_main(void *arg)
{
    held_call *c = arg;
    api_call(&F, "app", "POST", c->path, c->body, &c->r);
    atomic_store(&c->done, true);
    return NULL;
}

/* Starts c with a 3 s delay in its first C_Encrypt and returns once the
 * call waits in the HSM (the delay has fired). */
static void held_call_start(held_call *c, const char *path, const char *body)
{
    *c = (held_call){.path = path, .body = body};
    atomic_init(&c->done, false);
    kms_fault_reset();
    kms_fault_arm("C_Encrypt", 1, 0, 3000);
    assert_int_equal(pthread_create(&c->thread, NULL, held_call_main, c), 0);
    for (int i = 0; i < 200 && kms_fault_fired() == 0; i++) {
        sleep_ms(10);
    }
    assert_true(kms_fault_fired() > 0);
}

/* A batch runs on a thread of its own, not on the server thread that
 * received it: with a single server thread, /healthz on another connection
 * is answered while a batch waits on the HSM (an injected 3 s delay in its
 * first C_Encrypt). Before batches had threads of their own, that thread
 * answered nothing else until the batch was done. */
static void test_batch_own_thread(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = threads:1\n"), 0);
    held_call c;
    held_call_start(&c, "/v1/keys/app-1/batch/wrap",
                    "{\"items\":[{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"},"
                    "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}]}");
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    assert_false(atomic_load(&c.done));
    pthread_join(c.thread, NULL);
    expect_status(&c.r, 200, NULL);
    assert_int_equal(jint(&c.r, "succeeded"), 2);
    api_resp_free(&c.r);
    kms_fault_disarm();
}

/* A single operation held in the HSM holds the server thread that serves
 * it. With spill-over, the first thread takes every connection while it
 * can, so the wrap lands on it; once it has been held for thread_spill_ms,
 * the second thread starts accepting and /healthz on a new connection is
 * answered at once. Were the spare thread never to serve, /healthz would
 * wait the 3 s out. */
static void test_held_thread_spills(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = threads:2\nthread_spill_ms = 100\n"), 0);
    held_call c;
    held_call_start(&c, "/v1/keys/app-1/wrap", "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}");
    double t0 = now_s();
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
    double took = now_s() - t0;
    print_message("/healthz beside a held thread: %.3f s\n", took);
    assert_true(took < 1.5);
    assert_false(atomic_load(&c.done));
    pthread_join(c.thread, NULL);
    expect_status(&c.r, 200, NULL);
    api_resp_free(&c.r);
    kms_fault_disarm();
}

/* Answers are resumed on other threads than the one serving their
 * connection: an audited answer by the audit's syncer, a batch's by a batch
 * thread and then the syncer. Each must wake the server thread's loop,
 * which otherwise sleeps until its next deadline (1 s when idle): twenty
 * such answers in a row would take twenty seconds or more. */
static void test_resumed_answers_wake_their_thread(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = threads:4\n"), 0);
    double t0 = now_s();
    for (int i = 0; i < 20; i++) {
        if (i % 4 == 3) {
            api_resp r;
            api_call(&F, "app", "POST", "/v1/keys/app-1/batch/wrap",
                     "{\"items\":[{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODw==\"}]}", &r);
            expect_status(&r, 200, NULL);
            api_resp_free(&r);
        } else {
            call_expect("app", "GET", "/healthz", NULL, 200, NULL);
        }
    }
    double took = now_s() - t0;
    print_message("20 answers resumed from other threads in %.2f s\n", took);
    assert_true(took < 10.0);
}

static bool healthz_answered(void)
{
    api_resp r;
    api_call(&F, "app", "GET", "/healthz", NULL, &r);
    bool ok = r.status == 200;
    api_resp_free(&r);
    return ok;
}

/* Calls /healthz until it is answered (or refused), at most about 2 s. */
static bool healthz_until(bool answered)
{
    for (int i = 0; i < 100; i++) {
        if (healthz_answered() == answered) {
            return true;
        }
        sleep_ms(20);
    }
    return false;
}

/* per_ip_connection_limit counts the process's connections on every
 * server thread (each thread's libmicrohttpd daemon sees only its own).
 * thread_spill_ms = 0: every thread accepts from the start, so the
 * connections spread over the threads as they do after a spill. */
static void test_per_ip_limit_across_threads(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = threads:4\nthread_spill_ms = 0\n"
                                           "per_ip_connection_limit = 2\n"),
                     0);
    int a = raw_connect();
    int b = raw_connect();
    /* Once both are counted a third connection is closed as it is
     * accepted (connection_timeout = 3 closes a and b later). */
    assert_true(healthz_until(false));
    assert_true(log_contains("per_ip_connection_limit (2) reached"));
    close(a);
    bool answered = healthz_until(true);
    close(b);
    assert_true(answered);
}

/* Whether pid is a live (non-zombie) process. */
static bool alive(int pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *fp = fopen(path, "r");
    if (fp == NULL) {
        return false;
    }
    size_t n = fread(buf, 1, sizeof(buf) - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')');
    return rp != NULL && rp[1] == ' ' && rp[2] != 'Z' && rp[2] != 'X';
}

/* The two worker processes, once the supervisor lists both. */
static void two_workers(int kids[2])
{
    char path[128];
    int found = 0;
    snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)F.pid, (int)F.pid);
    for (int i = 0; i < 100 && found != 2; i++) {
        FILE *fp = fopen(path, "r");
        assert_non_null(fp);
        found = fscanf(fp, "%d %d", &kids[0], &kids[1]);
        fclose(fp);
        if (found != 2) {
            sleep_ms(100);
        }
    }
    assert_int_equal(found, 2);
}

/* Waits up to ms for the connections in fds that kmsd has not yet
 * answered (done[i] false): a worker that accepts a connection and reads
 * plain HTTP where TLS should be closes it, so a readable fd (EOF or an
 * alert) means a worker took it. Returns how many are answered in all. */
static int answered_within(const int *fds, bool *done, int n, int ms)
{
    double until = now_s() + ms / 1000.0;
    int count = 0;
    for (;;) {
        struct pollfd pf[64];
        int map[64], np = 0;
        count = 0;
        for (int i = 0; i < n; i++) {
            if (done[i]) {
                count++;
            } else {
                pf[np] = (struct pollfd){.fd = fds[i], .events = POLLIN};
                map[np++] = i;
            }
        }
        double left = until - now_s();
        if (np == 0 || left <= 0) {
            return count;
        }
        if (poll(pf, (nfds_t)np, (int)(left * 1000) + 1) > 0) {
            for (int j = 0; j < np; j++) {
                if (pf[j].revents != 0) {
                    done[map[j]] = true;
                }
            }
        }
    }
}

/* With worker processes, each has its own SO_REUSEPORT socket and the
 * kernel shares new connections out among them by a hash of their
 * addresses, whichever worker is awake: on one shared socket the first
 * server thread of whichever worker woke first took them (seen: all 16
 * benchmark connections on one worker, the other idle). With one worker
 * stopped, the other answers only its own share; the stopped worker's share
 * waits in its socket's queue and is answered once it runs again. One CI
 * run saw all 32 answered at once (cause not found; not seen in 5 runs since), so
 * the stopped worker gets up to three tries; on one shared socket every
 * try answers all 32. */
static int stopped_worker_try(int stopped, int *all)
{
    assert_int_equal(kill(stopped, SIGSTOP), 0);
    enum { N = 32 };
    int fds[N];
    bool done[N] = {false};
    static const char plain[] = "GET /healthz HTTP/1.0\r\n\r\n";
    for (int i = 0; i < N; i++) {
        fds[i] = raw_connect();
        assert_int_equal(send(fds[i], plain, sizeof(plain) - 1, MSG_NOSIGNAL),
                         (ssize_t)sizeof(plain) - 1);
    }
    int alone = answered_within(fds, done, N, 1500);
    assert_int_equal(kill(stopped, SIGCONT), 0);
    *all = answered_within(fds, done, N, 5000);
    for (int i = 0; i < N; i++) {
        close(fds[i]);
    }
    print_message("%d connections: %d answered while one worker was stopped, %d once it ran\n", N,
                  alone, *all);
    assert_int_equal(*all, N);
    return alone;
}

static void test_workers_share_connections(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = processes:2\n"), 0);
    int kids[2];
    two_workers(kids);
    int alone = 32, all = 0;
    for (int t = 0; t < 3 && alone == 32; t++) {
        alone = stopped_worker_try(kids[0], &all);
    }
    assert_true(alone >= 1 && alone < 32);
    call_expect("app", "GET", "/healthz", NULL, 200, NULL);
}

/* /metrics adds up every worker's HSM and audit counters, whichever worker
 * answers the scrape: before, each worker reported its own, so that a
 * counter went down and up between scrapes answered by different workers.
 * Every call below is a new connection, which the kernel gives to either
 * worker; each scrape must count all 24 wraps. */
static void test_workers_metrics_add_up(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = processes:2\n"), 0);
    int kids[2];
    two_workers(kids);
    call_expect("admin", "POST", "/v1/keys", "{\"name\":\"app-sum\",\"purpose\":\"encrypt\"}", 201,
                NULL);
    enum { WRAPS = 24 };
    for (int i = 0; i < WRAPS; i++) {
        call_expect("app", "POST", "/v1/keys/app-sum/wrap", "{\"plaintext\":\"AAAA\"}", 200, NULL);
    }
    long last_calls = 0, last_records = 0;
    for (int i = 0; i < 6; i++) {
        long hits = metric_value("\nkmsd_hsm_cache_hits_total ");
        long misses = metric_value("\nkmsd_hsm_cache_misses_total ");
        long calls = metric_value("\nkmsd_hsm_calls_total ");
        long records = metric_value("\nkmsd_audit_records_total ");
        long waits = metric_value("\nkmsd_audit_durable_wait_seconds_count ");
        print_message("scrape %d: cache %ld + %ld, calls %ld, records %ld, waits %ld\n", i, hits,
                      misses, calls, records, waits);
        assert_true(hits + misses >= WRAPS);
        assert_true(calls >= 2 * WRAPS); /* C_EncryptInit and C_Encrypt per wrap */
        assert_true(records >= WRAPS + 1 && waits >= WRAPS + 1);
        assert_true(calls >= last_calls && records >= last_records);
        last_calls = calls;
        last_records = records;
    }
}

/* A supervisor killed with SIGKILL cannot forward anything: its workers
 * notice (PR_SET_PDEATHSIG) and stop by themselves. */
static void test_supervisor_killed(void **state)
{
    (void)state;
    assert_int_equal(api_fixture_start(&F, "workers = processes:2\nprocess_threads = 1\n"), 0);
    int kids[2];
    two_workers(kids);
    pid_t sup = F.pid;
    kill(sup, SIGKILL);
    int ws;
    waitpid(sup, &ws, 0);
    F.pid = 0;
    bool gone = false;
    for (int i = 0; i < 100 && !gone; i++) {
        gone = !alive(kids[0]) && !alive(kids[1]);
        if (!gone) {
            sleep_ms(100);
        }
    }
    if (!gone) {
        kill(kids[0], SIGKILL);
        kill(kids[1], SIGKILL);
    }
    assert_true(gone);
}

/* Not a test: KMS_API_BENCH=1 measures wrap throughput (16 connections,
 * keep-alive) in both worker modes and prints the figures. */
typedef struct {
    double until;
    long done;
} bench_arg;

static void *bench_main(void *arg)
{
    bench_arg *b = arg;
    CURL *c = curl_easy_init();
    char url[128], cert[400], key[400], ca[400];
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/v1/keys/app-1/wrap", F.port);
    snprintf(cert, sizeof(cert), "%s/app.crt", F.pki);
    snprintf(key, sizeof(key), "%s/app.key", F.pki);
    snprintf(ca, sizeof(ca), "%s/ca.crt", F.pki);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    size_t got = 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, ca);
    curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
    curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS,
                     "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"}");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    while (now_s() < b->until) {
        long st = 0;
        if (curl_easy_perform(c) == CURLE_OK &&
            curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st) == CURLE_OK && st == 200) {
            b->done++;
        }
    }
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return NULL;
}

static double bench_once(double seconds)
{
    pthread_t th[16];
    bench_arg a[16];
    double t0 = now_s();
    for (int i = 0; i < 16; i++) {
        a[i] = (bench_arg){t0 + seconds, 0};
        pthread_create(&th[i], NULL, bench_main, &a[i]);
    }
    long total = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(th[i], NULL);
        total += a[i].done;
    }
    return (double)total / (now_s() - t0);
}

static void test_bench(void **state)
{
    (void)state;
    if (getenv("KMS_API_BENCH") == NULL) {
        skip();
    }
    /* A token of its own, straight on SoftHSM: the fault module's shared
     * counters would make processes contend on one cache line. */
    api_fixture saved = F;
    memset(&F, 0, sizeof(F));
    F.fault = false;
    static const char *modes[] = {"workers = threads:16\n",
                                  "workers = processes:2\nprocess_threads = 8\n",
                                  "workers = processes:4\nprocess_threads = 4\n"};
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(api_fixture_start(&F, modes[i]), 0);
        if (i == 0) {
            call_expect("admin", "POST", "/v1/keys", "{\"name\":\"app-1\",\"purpose\":\"encrypt\"}",
                        201, NULL);
        }
        bench_once(1.0); /* warm-up: handshakes, cache */
        double rps = bench_once(5.0);
        printf("# bench wrap 16 connections, %.*s: %.0f req/s\n", (int)strcspn(modes[i], "\n"),
               modes[i], rps);
        assert_int_equal(api_fixture_stop(&F, SIGTERM), 0);
    }
    api_fixture_cleanup(&F);
    F = saved;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_health_and_metrics),
        cmocka_unit_test(test_key_admin),
        cmocka_unit_test(test_data_ops),
        cmocka_unit_test(test_rotation_states),
        cmocka_unit_test(test_batch),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_chunked_too_large),
        cmocka_unit_test(test_client_certificates),
        cmocka_unit_test(test_slowloris),
        cmocka_unit_test(test_master_rotations_check),
        cmocka_unit_test(test_curl_cli),
        cmocka_unit_test(test_sighup_policy),
        cmocka_unit_test(test_hsm_failure_503),
        cmocka_unit_test(test_readyz_hung_hsm),
        cmocka_unit_test(test_sighup_certificate),
        cmocka_unit_test(test_check_config),
        cmocka_unit_test(test_sigterm_under_load),
        cmocka_unit_test(test_processes_mode),
        cmocka_unit_test(test_workers_share_connections),
        cmocka_unit_test(test_workers_metrics_add_up),
        cmocka_unit_test(test_supervisor_killed),
        cmocka_unit_test(test_batch_own_thread),
        cmocka_unit_test(test_held_thread_spills),
        cmocka_unit_test(test_resumed_answers_wake_their_thread),
        cmocka_unit_test(test_per_ip_limit_across_threads),
        cmocka_unit_test(test_bench),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
