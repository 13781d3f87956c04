/*
 * The audit trail through a real kmsd (issue 4 sections 5 and 7):
 *  - kill -9 right after a burst of answered requests: after a restart,
 *    every request the clients got an answer to (2xx and 4xx alike) has its
 *    record, and an export of the whole chain verifies offline;
 *  - the audit device fails (a store at its 1 MiB maximum, filled by the
 *    records themselves): requests are refused with 503 audit_unavailable,
 *    a refused key creation did not happen, no answer other than that 503
 *    went out without its record, and with room again (restart with a
 *    larger maximum) the service recovers and the chain still verifies.
 *  - GET /v1/audit filters and roles.
 */
#define _GNU_SOURCE
#include "api_fixture.h"
#include "kmsctl_verify.h"

#include <curl/curl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#define RID_MAX 20000

typedef struct {
    pthread_mutex_t mu;
    char (*rids)[80];
    size_t n;
    size_t refused; /* 503 audit_unavailable answers */
} answered;

static void answered_add(answered *a, const api_resp *r)
{
    pthread_mutex_lock(&a->mu);
    const char *code =
        json_string_value(json_object_get(json_object_get(r->json, "error"), "code"));
    if (r->status == 503 && code != NULL && strcmp(code, "audit_unavailable") == 0) {
        a->refused++;
    } else if (r->status != 0 && r->request_id[0] != '\0' && a->n < RID_MAX) {
        snprintf(a->rids[a->n++], sizeof(a->rids[0]), "%s", r->request_id);
    }
    pthread_mutex_unlock(&a->mu);
}

static int rid_cmp(const void *x, const void *y)
{
    return strcmp(x, y);
}

typedef struct {
    api_fixture *f;
    answered *ans;
    int id;
    int n;
    bool stop_on_refusal;
} burst_arg;

static const char wrap_body[] = "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"}";

static void *burst_main(void *p)
{
    burst_arg *b = p;
    for (int i = 0; i < b->n; i++) {
        api_resp r;
        switch ((b->id + i) % 4) {
        case 0:
        case 1: /* allowed: 200 */
            api_call(b->f, "app", "POST", "/v1/keys/app-k1/wrap", wrap_body, &r);
            break;
        case 2: /* denied by policy: 403 */
            api_call(b->f, "app", "POST", "/v1/keys/other/wrap", wrap_body, &r);
            break;
        default: /* failed: 404 */
            api_call(b->f, "admin", "GET", "/v1/keys/app-k1/versions/99", NULL, &r);
            break;
        }
        answered_add(b->ans, &r);
        bool refused = r.status == 503;
        api_resp_free(&r);
        if (refused && b->stop_on_refusal)
            break;
    }
    return NULL;
}

static void burst(api_fixture *f, answered *ans, int threads, int per, bool stop_on_refusal)
{
    pthread_t t[16];
    burst_arg a[16];
    for (int i = 0; i < threads; i++) {
        a[i] =
            (burst_arg){.f = f, .ans = ans, .id = i, .n = per, .stop_on_refusal = stop_on_refusal};
        assert_int_equal(pthread_create(&t[i], NULL, burst_main, &a[i]), 0);
    }
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
}

/* Every request id of the audit trail, sorted (auditor, paged). */
static char (*all_rids(api_fixture *f, size_t *n))[80]
{
    char(*v)[80] = calloc(RID_MAX * 4, sizeof(*v));
    assert_non_null(v);
    *n = 0;
    long long after = 0;
    for (int page = 0; page < 100; page++) {
        char path[128];
        snprintf(path, sizeof(path), "/v1/audit?limit=10000&after=%lld", after);
        api_resp r;
        api_call(f, "auditor", "GET", path, NULL, &r);
        assert_int_equal(r.status, 200);
        json_t *recs = json_object_get(r.json, "records");
        size_t i;
        json_t *e;
        json_array_foreach(recs, i, e)
        {
            assert_true(*n < RID_MAX * 4);
            snprintf(v[(*n)++], sizeof(v[0]), "%s",
                     json_string_value(json_object_get(e, "request_id")));
        }
        json_t *next = json_object_get(r.json, "next");
        bool more = json_is_integer(next);
        after = more ? json_integer_value(next) : 0;
        api_resp_free(&r);
        if (!more)
            break;
    }
    qsort(v, *n, sizeof(v[0]), rid_cmp);
    return v;
}

static void assert_all_recorded(api_fixture *f, answered *ans)
{
    size_t n = 0;
    char(*have)[80] = all_rids(f, &n);
    size_t missing = 0;
    for (size_t i = 0; i < ans->n; i++) {
        if (bsearch(ans->rids[i], have, n, sizeof(have[0]), rid_cmp) == NULL) {
            if (missing++ < 5)
                fprintf(stderr, "answered request %s has no audit record\n", ans->rids[i]);
        }
    }
    free(have);
    assert_int_equal(missing, 0);
}

static void export_verifies(api_fixture *f)
{
    api_resp r;
    api_call(f, "auditor", "POST", "/v1/export", "{}", &r);
    if (r.status != 200) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "tail -20 '%s' >&2", f->log);
        fprintf(stderr, "export: status %ld, curl %d; kmsd's log:\n", r.status, r.curl_code);
        if (system(cmd) != 0) {
            fprintf(stderr, "(no log)\n");
        }
    }
    assert_int_equal(r.status, 200);
    char dir[400];
    static int seq;
    snprintf(dir, sizeof(dir), "%s/export-%d", f->dir, seq++);
    kms_result w = kmsctl_export_write(r.json, dir);
    assert_true(kms_is_ok(w));
    api_resp_free(&r);
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    kmsctl_verify_report rep;
    assert_true(kms_is_ok(kmsctl_verify_export(dir, NULL, out, &rep)));
    fclose(out);
    if (rep.problems != 0)
        fail_msg("export does not verify:\n%s", text);
    free(text);
}

static void create_key(api_fixture *f, const char *name)
{
    char body[128];
    snprintf(body, sizeof(body), "{\"name\":\"%s\",\"purpose\":\"encrypt\"}", name);
    api_resp r;
    api_call(f, "admin", "POST", "/v1/keys", body, &r);
    assert_int_equal(r.status, 201);
    api_resp_free(&r);
}

/* Each test's kmsd is stopped and its directory removed even when the test
 * fails half-way (cmocka runs the teardown after a failed assertion). */
static int fx_setup(void **state)
{
    api_fixture *f = calloc(1, sizeof(*f));
    *state = f;
    return f != NULL ? 0 : -1;
}

static int fx_teardown(void **state)
{
    api_fixture *f = *state;
    if (f->pid > 0) {
        kill(-f->pid, SIGKILL); /* the whole process group: workers too */
        api_fixture_stop(f, SIGKILL);
    }
    api_fixture_cleanup(f);
    free(f);
    return 0;
}

static void test_kill9_after_burst(void **state)
{
    api_fixture *f = *state;
    assert_int_equal(api_fixture_start(f, NULL), 0);
    create_key(f, "app-k1");
    answered ans = {.mu = PTHREAD_MUTEX_INITIALIZER};
    ans.rids = calloc(RID_MAX, sizeof(*ans.rids));
    assert_non_null(ans.rids);
    burst(f, &ans, 8, 40, false);
    /* Right after the last answer: every kmsd process (supervisor and
     * workers, one process group) killed, no drain, no clean shutdown. */
    assert_int_equal(kill(-f->pid, SIGKILL), 0);
    assert_int_equal(api_fixture_stop(f, SIGKILL), 128 + SIGKILL);
    assert_int_equal(ans.refused, 0);
    assert_int_equal(ans.n, 8 * 40);

    assert_int_equal(api_fixture_start(f, NULL), 0);
    assert_all_recorded(f, &ans);
    export_verifies(f);
    free(ans.rids);
    api_fixture_stop(f, SIGTERM);
}

static void test_audit_device_full(void **state)
{
    api_fixture *f = *state;
    static const char tiny[] = "store_map_size_initial = 1048576\nstore_map_size_max = 1048576\n";
    assert_int_equal(api_fixture_start(f, tiny), 0);
    create_key(f, "app-k1");
    answered ans = {.mu = PTHREAD_MUTEX_INITIALIZER};
    ans.rids = calloc(RID_MAX, sizeof(*ans.rids));
    assert_non_null(ans.rids);
    /* The records fill the store: bounded at 8 x 1500 requests. */
    burst(f, &ans, 8, 1500, true);
    assert_true(ans.refused > 0);

    /* Refused before running: no ciphertext, and a key creation does not
     * happen. */
    int refused = 0;
    for (int i = 0; i < 5; i++) {
        api_resp r;
        api_call(f, "app", "POST", "/v1/keys/app-k1/wrap", wrap_body, &r);
        if (r.status == 503) {
            refused++;
            assert_null(json_object_get(r.json, "ciphertext"));
            assert_string_equal(
                json_string_value(json_object_get(json_object_get(r.json, "error"), "code")),
                "audit_unavailable");
        } else {
            answered_add(&ans, &r);
        }
        api_resp_free(&r);
    }
    assert_true(refused > 0);
    api_resp r;
    api_call(f, "admin", "POST", "/v1/keys", "{\"name\":\"app-new\",\"purpose\":\"encrypt\"}", &r);
    bool created_refused = r.status == 503;
    if (!created_refused)
        answered_add(&ans, &r);
    api_resp_free(&r);
    assert_int_equal(api_fixture_stop(f, SIGTERM), 0);

    /* Room again: the service recovers; what was refused did not happen;
     * everything answered otherwise is in the chain, which verifies. */
    assert_int_equal(api_fixture_start(f, "store_map_size_max = 67108864\n"), 0);
    if (created_refused) {
        api_call(f, "admin", "GET", "/v1/keys/app-new", NULL, &r);
        assert_int_equal(r.status, 404);
        api_resp_free(&r);
    }
    api_call(f, "app", "POST", "/v1/keys/app-k1/wrap", wrap_body, &r);
    assert_int_equal(r.status, 200);
    api_resp_free(&r);
    assert_all_recorded(f, &ans);
    export_verifies(f);
    free(ans.rids);
    api_fixture_stop(f, SIGTERM);
}

static void test_audit_query(void **state)
{
    api_fixture *f = *state;
    assert_int_equal(api_fixture_start(f, NULL), 0);
    create_key(f, "app-k1");
    api_resp r;
    api_call(f, "app", "POST", "/v1/keys/app-k1/wrap", wrap_body, &r);
    assert_int_equal(r.status, 200);
    char rid[80];
    snprintf(rid, sizeof(rid), "%s", r.request_id);
    api_resp_free(&r);
    api_call(f, "app", "POST", "/v1/keys/other/wrap", wrap_body, &r);
    assert_int_equal(r.status, 403);
    api_resp_free(&r);

    /* The app role may not read the trail; its refusal is recorded too. */
    api_call(f, "app", "GET", "/v1/audit", NULL, &r);
    assert_int_equal(r.status, 403);
    api_resp_free(&r);

    api_call(f, "auditor", "GET", "/v1/audit?operation=wrap&key=app-k1", NULL, &r);
    assert_int_equal(r.status, 200);
    json_t *recs = json_object_get(r.json, "records");
    assert_int_equal(json_array_size(recs), 1);
    json_t *e = json_array_get(recs, 0);
    assert_string_equal(json_string_value(json_object_get(e, "request_id")), rid);
    assert_string_equal(json_string_value(json_object_get(e, "identity")), "spiffe://kmsd.dev/app");
    assert_string_equal(json_string_value(json_object_get(e, "result")), "ok");
    assert_int_equal(json_integer_value(json_object_get(e, "status")), 200);
    assert_int_equal(json_integer_value(json_object_get(e, "version")), 1);
    api_resp_free(&r);

    api_call(f, "auditor", "GET", "/v1/audit?key=other", NULL, &r);
    assert_int_equal(r.status, 200);
    recs = json_object_get(r.json, "records");
    assert_int_equal(json_array_size(recs), 1);
    e = json_array_get(recs, 0);
    assert_string_equal(json_string_value(json_object_get(e, "result")), "forbidden");
    assert_int_equal(json_integer_value(json_object_get(e, "status")), 403);
    api_resp_free(&r);

    api_call(f, "auditor", "GET", "/v1/audit?identity=spiffe://kmsd.dev/app&operation=audit.query",
             NULL, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(json_array_size(json_object_get(r.json, "records")), 1);
    api_resp_free(&r);

    api_call(f, "auditor", "GET", "/v1/audit?limit=abc", NULL, &r);
    assert_int_equal(r.status, 400);
    api_resp_free(&r);
    api_fixture_stop(f, SIGTERM);
}

/* The same through the kmsctl binary: audit, export, verify-export, and a
 * tampered record making verify-export exit 1 naming it. */
static int sh(const char *cmd)
{
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_kmsctl_cli(void **state)
{
    api_fixture *f = *state;
    assert_int_equal(api_fixture_start(f, NULL), 0);
    create_key(f, "app-k1");
    api_resp r;
    api_call(f, "app", "POST", "/v1/keys/app-k1/wrap", wrap_body, &r);
    assert_int_equal(r.status, 200);
    api_resp_free(&r);
    char base[1400], cmd[2400];
    snprintf(base, sizeof(base),
             "'%s/tools/kmsctl' --url https://127.0.0.1:%d --cert '%s/auditor.crt' --key "
             "'%s/auditor.key' --cacert '%s/ca.crt'",
             getenv("KMS_BUILD_DIR"), f->port, f->pki, f->pki, f->pki);
    snprintf(cmd, sizeof(cmd), "%s audit --operation wrap --key app-k1 >'%s/audit.txt' 2>&1", base,
             f->dir);
    assert_int_equal(sh(cmd), 0);
    snprintf(cmd, sizeof(cmd), "grep -q ' wrap .*app-k1 .* 200 ok' '%s/audit.txt'", f->dir);
    assert_int_equal(sh(cmd), 0);
    snprintf(cmd, sizeof(cmd), "%s export --from 0 --out '%s/x' >/dev/null 2>&1", base, f->dir);
    assert_int_equal(sh(cmd), 0);
    snprintf(cmd, sizeof(cmd),
             "'%s/tools/kmsctl' verify-export '%s/x' --public-key '%s/x/public-key.pem' "
             ">'%s/v.txt' 2>&1",
             getenv("KMS_BUILD_DIR"), f->dir, f->dir, f->dir);
    assert_int_equal(sh(cmd), 0);
    /* Change the identity in the record of the wrap; remember its seq. */
    snprintf(
        cmd, sizeof(cmd),
        "sed -i '/\"operation\":\"wrap\"/s/kmsd.dev\\/app/kmsd.dev\\/apq/' '%s/x/audit.jsonl' && "
        "grep -o '\"seq\":[0-9]*,[^}]*kmsd.dev/apq' '%s/x/audit.jsonl' | cut -d, -f1 | "
        "cut -d: -f2 >'%s/seq.txt'",
        f->dir, f->dir, f->dir);
    assert_int_equal(sh(cmd), 0);
    snprintf(cmd, sizeof(cmd), "'%s/tools/kmsctl' verify-export '%s/x' >'%s/v.txt' 2>&1",
             getenv("KMS_BUILD_DIR"), f->dir, f->dir);
    assert_int_equal(sh(cmd), 1);
    snprintf(cmd, sizeof(cmd),
             "grep -q \"^FAIL: record seq $(cat '%s/seq.txt') changed\" '%s/v.txt'", f->dir,
             f->dir);
    if (sh(cmd) != 0) {
        snprintf(cmd, sizeof(cmd), "cat '%s/v.txt' >&2", f->dir);
        (void)sh(cmd);
        fail_msg("verify-export did not name the changed record");
    }
    api_fixture_stop(f, SIGTERM);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_audit_query, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_kmsctl_cli, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_kill9_after_burst, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_audit_device_full, fx_setup, fx_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
