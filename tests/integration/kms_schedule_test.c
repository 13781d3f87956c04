/*
 * Rotation operations on a real token with an injected clock: status (due,
 * warning window, overdue, filters), the scheduler's tick (type scheduled,
 * initiator system, jitter, backlog bound, never twice: repeated ticks,
 * a restart, two processes ticking at once), grace expiry and destruction
 * moved forward by the tick, rollback after a scheduled rotation, and the
 * monthly report's numbers on a known history.
 */
#include "kms_test_fixture.h"

#include "kms_audit.h"
#include "kms_fault.h"
#include "kms_internal.h"
#include "kms_schedule.h"

#include <sys/wait.h>
#include <unistd.h>

#define DAY  INT64_C(86400)
#define HOUR INT64_C(3600)

static int setup(void **state)
{
    *state = kms_fx_new(0);
    return 0;
}

static int teardown(void **state)
{
    kms_fx_free(*state);
    return 0;
}

static void key(kms_fx *f, const char *name, int64_t period, int64_t warning)
{
    kms_key_spec s = {.name = name,
                      .purpose = KMS_PURPOSE_ENCRYPT,
                      .rotation_period_s = period,
                      .warning_window_s = warning};
    assert_ok(kms_key_create(f->k, &f->admin, &s, NULL));
}

static const kms_key_status *find(const kms_key_status *st, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(st[i].name, name) == 0)
            return &st[i];
    return NULL;
}

static const kms_schedule_opts no_jitter = {.jitter_window_s = -1};

static uint32_t primary_of(kms_fx *f, const char *name)
{
    kms_key_info ki;
    assert_ok(kms_key_get(f->k, name, &ki));
    return ki.primary_version;
}

static size_t rotations_of(kms_fx *f, const char *name, int type)
{
    kms_rotation_filter rf = {.key = name, .type = type};
    kms_rotation_info *rs = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &rf, &rs, &n));
    free(rs);
    return n;
}

/* due / warning window / overdue at the edges, in status and in the gauges. */
static void test_status_edges(void **state)
{
    kms_fx *f = *state;
    key(f, "s-a", 90 * DAY, 7 * DAY);
    key(f, "s-b", 30 * DAY, 3 * DAY);
    kms_key_status *st = NULL;
    size_t n = 0;
    assert_ok(kms_status_list(f->k, NULL, &st, &n));
    assert_int_equal(n, 2);
    const kms_key_status *a = find(st, n, "s-a");
    assert_non_null(a);
    assert_int_equal(a->due_at, KMS_FX_T0 + 90 * DAY);
    assert_int_equal(a->seconds_until_due, 90 * DAY);
    assert_false(a->due_soon);
    assert_false(a->overdue);
    free(st);

    /* One second before the warning window of s-a; s-b is overdue. */
    f->now = KMS_FX_T0 + 83 * DAY - 1;
    assert_ok(kms_status_list(f->k, NULL, &st, &n));
    assert_false(find(st, n, "s-a")->due_soon);
    assert_true(find(st, n, "s-b")->overdue);
    assert_false(find(st, n, "s-b")->due_soon);
    free(st);
    f->now = KMS_FX_T0 + 83 * DAY;
    assert_ok(kms_status_list(f->k, NULL, &st, &n));
    assert_true(find(st, n, "s-a")->due_soon);
    assert_int_equal(find(st, n, "s-a")->seconds_until_due, 7 * DAY);
    free(st);
    kms_stats s;
    assert_ok(kms_stats_get(f->k, &s));
    assert_int_equal(s.keys_due, 1);
    assert_int_equal(s.keys_overdue, 1);

    /* Filters: due within 7 days includes the overdue key; overdue only. */
    kms_status_filter flt = {.due_within_s = 7 * DAY};
    assert_ok(kms_status_list(f->k, &flt, &st, &n));
    assert_int_equal(n, 2);
    free(st);
    flt.due_within_s = 7 * DAY - 1;
    assert_ok(kms_status_list(f->k, &flt, &st, &n));
    assert_int_equal(n, 1);
    assert_string_equal(st[0].name, "s-b");
    free(st);
    flt = (kms_status_filter){.due_within_s = -1, .overdue_only = true};
    assert_ok(kms_status_list(f->k, &flt, &st, &n));
    assert_int_equal(n, 1);
    assert_string_equal(st[0].name, "s-b");
    assert_int_equal(st[0].seconds_until_due, -(53 * DAY));
    free(st);

    /* Exactly at the due time: overdue, not "due soon". */
    f->now = KMS_FX_T0 + 90 * DAY;
    assert_ok(kms_status_list(f->k, NULL, &st, &n));
    assert_true(find(st, n, "s-a")->overdue);
    assert_false(find(st, n, "s-a")->due_soon);
    free(st);
}

static void test_tick_rotates_due_once(void **state)
{
    kms_fx *f = *state;
    key(f, "t-a", 10 * DAY, 2 * DAY);
    key(f, "t-b", 20 * DAY, 2 * DAY);
    kms_schedule_result res;
    f->now = KMS_FX_T0 + 10 * DAY - 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.keys, 2);
    assert_int_equal(res.rotated, 0);
    assert_int_equal(res.next_due_at, KMS_FX_T0 + 10 * DAY);
    assert_int_equal(primary_of(f, "t-a"), 1);

    f->now = KMS_FX_T0 + 10 * DAY;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 1);
    assert_int_equal(res.failed, 0);
    assert_int_equal(primary_of(f, "t-a"), 2);
    assert_int_equal(primary_of(f, "t-b"), 1);
    kms_rotation_filter rf = {.key = "t-a"};
    kms_rotation_info *rs = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &rf, &rs, &n));
    assert_int_equal(n, 1);
    assert_int_equal(rs[0].type, KMS_ROTATION_SCHEDULED);
    assert_int_equal(rs[0].status, KMS_ROTATION_SUCCEEDED);
    assert_string_equal(rs[0].initiator, "system");
    assert_int_equal(rs[0].from_version, 1);
    assert_int_equal(rs[0].to_version, 2);
    assert_int_equal(rs[0].started_at, f->now);
    assert_int_equal(rs[0].finished_at, f->now);
    free(rs);

    /* The same tick again, and after a restart: nothing more. */
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 0);
    kms_fx_reopen(f);
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 0);
    assert_int_equal(primary_of(f, "t-a"), 2);
    assert_int_equal(rotations_of(f, "t-a", 0), 1);

    /* The decision is taken in the transaction: a direct call for a key
     * that is not due writes nothing and says so. */
    bool rotated = true;
    assert_ok(kms_key_rotate_if_due(f->k, "t-a", -1, NULL, &rotated));
    assert_false(rotated);
    assert_int_equal(rotations_of(f, "t-a", 0), 1);
    assert_err(kms_key_rotate_if_due(f->k, "nope", -1, NULL, &rotated), KMS_ERR_KEY_NOT_FOUND);

    /* The period counts from the scheduled rotation. */
    f->now = KMS_FX_T0 + 20 * DAY - 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 0);
    f->now = KMS_FX_T0 + 20 * DAY;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 2); /* t-a (second period) and t-b */
    assert_int_equal(primary_of(f, "t-a"), 3);
    assert_int_equal(primary_of(f, "t-b"), 2);
    /* Ciphertexts made before stay readable after the scheduled rotation. */
}

/* Jitter: each key is rotated lead(name) seconds before it is due, the
 * lead below min(window, warning window); keys due together spread out. */
static void test_jitter_spreads(void **state)
{
    kms_fx *f = *state;
    char name[32];
    const int keys = 12;
    for (int i = 0; i < keys; i++) {
        snprintf(name, sizeof(name), "j-%02d", i);
        key(f, name, 10 * DAY, 1 * DAY);
    }
    kms_schedule_opts o = {.jitter_window_s = 6 * HOUR};
    int64_t leads[12];
    int distinct = 0;
    for (int i = 0; i < keys; i++) {
        snprintf(name, sizeof(name), "j-%02d", i);
        leads[i] = kms_schedule_lead(name, o.jitter_window_s, DAY);
        assert_true(leads[i] >= 0 && leads[i] < 6 * HOUR);
        assert_int_equal(leads[i], kms_schedule_lead(name, o.jitter_window_s, DAY));
        bool seen = false;
        for (int j = 0; j < i; j++)
            seen = seen || leads[j] / HOUR == leads[i] / HOUR;
        distinct += !seen;
    }
    /* 12 keys over 6 one-hour slots: a burst would put them all in one. */
    assert_true(distinct >= 3);
    /* The window never reaches outside the warning window. */
    assert_true(kms_schedule_lead("j-00", 30 * DAY, 2 * HOUR) < 2 * HOUR);
    assert_int_equal(kms_schedule_lead("j-00", -1, DAY), 0);

    /* Hour by hour through the window: each key rotates in its own hour,
     * exactly once. */
    size_t total = 0;
    for (int64_t t = KMS_FX_T0 + 10 * DAY - 6 * HOUR; t <= KMS_FX_T0 + 10 * DAY; t += HOUR) {
        f->now = t;
        kms_schedule_result res;
        assert_ok(kms_schedule_tick(f->k, &o, &res));
        size_t expect = 0;
        for (int i = 0; i < keys; i++) {
            int64_t at = KMS_FX_T0 + 10 * DAY - leads[i];
            expect += at <= t && at > t - HOUR;
        }
        if (t == KMS_FX_T0 + 10 * DAY - 6 * HOUR) {
            expect = 0;
            for (int i = 0; i < keys; i++)
                expect += KMS_FX_T0 + 10 * DAY - leads[i] <= t;
        }
        assert_int_equal(res.rotated, expect);
        total += res.rotated;
    }
    assert_int_equal(total, (size_t)keys);
    for (int i = 0; i < keys; i++) {
        snprintf(name, sizeof(name), "j-%02d", i);
        assert_int_equal(primary_of(f, name), 2);
    }
}

/* A backlog (after an outage) is worked off max_rotations per tick, the
 * longest overdue first. */
static void test_backlog_bounded(void **state)
{
    kms_fx *f = *state;
    key(f, "b-late", 5 * DAY, DAY);
    key(f, "b-x", 10 * DAY, DAY);
    key(f, "b-y", 10 * DAY, DAY);
    key(f, "b-z", 10 * DAY, DAY);
    f->now = KMS_FX_T0 + 30 * DAY;
    kms_schedule_opts o = {.jitter_window_s = -1, .max_rotations = 2};
    kms_schedule_result res;
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(res.rotated, 2);
    assert_int_equal(res.deferred, 2);
    assert_int_equal(primary_of(f, "b-late"), 2);
    assert_int_equal(primary_of(f, "b-x"), 2);
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(res.rotated, 2);
    assert_int_equal(res.deferred, 0);
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(res.rotated, 0);
    assert_int_equal(primary_of(f, "b-y"), 2);
    assert_int_equal(primary_of(f, "b-z"), 2);
}

/* Two processes tick at the same moment over the same store (a restart in
 * the middle of a tick looks the same to the store): every key rotates
 * exactly once. */
static void test_two_processes_never_twice(void **state)
{
    kms_fx *f = *state;
    char name[32];
    const int keys = 16;
    for (int i = 0; i < keys; i++) {
        snprintf(name, sizeof(name), "p-%02d", i);
        key(f, name, 10 * DAY, DAY);
    }
    f->now = KMS_FX_T0 + 11 * DAY;
    kms_close(f->k);
    f->k = NULL;
    /* The children open the store one after the other (SoftHSM may not see
     * its token while another process is initialising it), then tick at
     * the same moment: the parent closes the "go" pipe. */
    int go[2], out[2];
    assert_int_equal(pipe(go), 0);
    assert_int_equal(pipe(out), 0);
    pid_t pids[2];
    for (int p = 0; p < 2; p++) {
        int ready[2];
        assert_int_equal(pipe(ready), 0);
        pids[p] = fork();
        assert_true(pids[p] >= 0);
        if (pids[p] == 0) {
            close(go[1]);
            close(ready[0]);
            kms *c = NULL;
            kms_result r = kms_open(&f->cfg, &c);
            if (!kms_is_ok(r)) {
                fprintf(stderr, "child: kms_open: %s: %s\n", kms_error_code(r.err),
                        kms_error_detail());
                _exit(2);
            }
            char b = 1;
            if (write(ready[1], &b, 1) != 1 || read(go[0], &b, 1) != 0)
                _exit(4);
            kms_schedule_opts o = {.jitter_window_s = -1, .max_rotations = 100};
            kms_schedule_result res;
            int rc = kms_is_ok(kms_schedule_tick(c, &o, &res)) ? 0 : 3;
            size_t got[2] = {res.rotated, res.skipped};
            if (write(out[1], got, sizeof(got)) != (ssize_t)sizeof(got))
                rc = 5;
            kms_close(c);
            _exit(rc);
        }
        close(ready[1]);
        char b;
        assert_int_equal(read(ready[0], &b, 1), 1);
        close(ready[0]);
    }
    close(go[0]);
    close(go[1]);
    close(out[1]);
    for (int p = 0; p < 2; p++) {
        int status = 0;
        assert_int_equal(waitpid(pids[p], &status, 0), pids[p]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    /* Between them, exactly one rotation per key. */
    size_t rotated = 0, skipped = 0, got[2];
    for (int p = 0; p < 2; p++) {
        assert_int_equal(read(out[0], got, sizeof(got)), (ssize_t)sizeof(got));
        rotated += got[0];
        skipped += got[1];
    }
    close(out[0]);
    print_message("two processes: %zu rotated, %zu found already rotated\n", rotated, skipped);
    assert_int_equal(rotated, (size_t)keys);
    assert_true(skipped <= (size_t)keys);
    assert_ok(kms_open(&f->cfg, &f->k));
    for (int i = 0; i < keys; i++) {
        snprintf(name, sizeof(name), "p-%02d", i);
        assert_int_equal(primary_of(f, name), 2);
        assert_int_equal(rotations_of(f, name, KMS_ROTATION_SCHEDULED), 1);
    }
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
}

/* deprecate -> grace -> disabled, stored by the tick; schedule, cancel and
 * complete destruction, the completion moved forward by the tick. */
static void test_tick_grace_and_destroy(void **state)
{
    kms_fx *f = *state;
    key(f, "g", 365 * DAY, 7 * DAY);
    const uint8_t dek[32] = "0123456789abcdef0123456789abcdef";
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, "g", dek, 32, NULL, 0, &tok, &v));
    assert_ok(kms_key_rotate(f->k, &f->admin, "g", KMS_ROTATION_MANUAL, NULL, NULL));
    kms_version_info vi;
    assert_ok(kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_DEPRECATE, 3 * DAY,
                                    "retire", &vi));
    assert_int_equal(vi.state, KMS_VERSION_DEPRECATED);
    assert_int_equal(vi.grace_until, f->now + 3 * DAY);
    /* In grace: still decrypts. */
    assert_ok(kms_unwrap(f->k, &f->app, "g", tok.data, tok.len, NULL, 0, &pt, &v));
    kms_buf_reset(&pt);
    kms_schedule_result res;
    f->now += 3 * DAY - 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.grace_expired, 0);
    f->now += 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.grace_expired, 1);
    assert_ok(kms_version_get(f->k, "g", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DISABLED);
    assert_int_equal(vi.grace_until, 0);
    assert_err(kms_unwrap(f->k, &f->app, "g", tok.data, tok.len, NULL, 0, &pt, &v),
               KMS_ERR_VERSION_DISABLED);
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.grace_expired, 0); /* stored: nothing left to do */

    /* Destruction: refused while min_decryption_version still needs v1. */
    assert_err(kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_SCHEDULE_DESTROY, 7 * DAY,
                                     NULL, &vi),
               KMS_ERR_PROTECTED);
    kms_key_update u = {.min_decryption_version = 2, .deletion_protection = -1};
    assert_ok(kms_key_update_policy(f->k, &f->admin, "g", &u, NULL));
    assert_err(kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_SCHEDULE_DESTROY, 6 * DAY,
                                     NULL, &vi),
               KMS_ERR_INVALID_ARGUMENT);
    assert_ok(kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_SCHEDULE_DESTROY, 7 * DAY,
                                    NULL, &vi));
    assert_int_equal(vi.destroy_at, f->now + 7 * DAY);
    /* Cancel, then schedule again with the default wait (30 days). */
    assert_ok(
        kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_CANCEL_DESTROY, 0, NULL, &vi));
    assert_int_equal(vi.destroy_at, 0);
    assert_int_equal(vi.state, KMS_VERSION_DISABLED);
    f->now += 8 * DAY;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.destroyed, 0); /* cancelled: nothing happens */
    assert_ok(
        kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_SCHEDULE_DESTROY, 0, NULL, &vi));
    assert_int_equal(vi.destroy_at, f->now + 30 * DAY);
    f->now += 30 * DAY - 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.destroyed, 0);
    f->now += 1;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.destroyed, 1);
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.destroyed, 0);
    assert_ok(kms_version_get(f->k, "g", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DESTROYED);
    /* Irreversible: no action brings it back. */
    assert_err(kms_version_set_state(f->k, &f->admin, "g", 1, KMS_ACTION_ENABLE, 0, NULL, &vi),
               KMS_ERR_STATE_TRANSITION);
    assert_err(kms_unwrap(f->k, &f->migrator, "g", tok.data, tok.len, NULL, 0, &pt, &v),
               KMS_ERR_VERSION_DESTROYED);
}

/* A scheduled rotation that proved bad is rolled back: the old primary is
 * back, the new version still decrypts, the record says rolled_back; the
 * scheduler then counts the period from the rollback. */
static void test_rollback_after_scheduled(void **state)
{
    kms_fx *f = *state;
    key(f, "rb", 10 * DAY, DAY);
    f->now += 10 * DAY;
    kms_schedule_result res;
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 1);
    const uint8_t dek[16] = "0123456789abcdef";
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, "rb", dek, 16, NULL, 0, &tok, &v));
    assert_int_equal(v, 2);
    f->now += HOUR;
    kms_rotation_info ri;
    assert_ok(kms_key_rollback(f->k, &f->admin, "rb", "v2 fails validation", &ri));
    assert_int_equal(ri.from_version, 2);
    assert_int_equal(ri.to_version, 1);
    assert_int_equal(primary_of(f, "rb"), 1);
    assert_ok(kms_unwrap(f->k, &f->app, "rb", tok.data, tok.len, NULL, 0, &pt, &v));
    assert_int_equal(v, 2);
    assert_int_equal(rotations_of(f, "rb", KMS_ROTATION_SCHEDULED), 1);
    kms_rotation_filter rf = {.key = "rb", .status = KMS_ROTATION_ROLLED_BACK};
    kms_rotation_info *rs = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &rf, &rs, &n));
    assert_int_equal(n, 1);
    assert_int_equal(rs[0].type, KMS_ROTATION_SCHEDULED);
    assert_int_equal(rs[0].to_version, 2);
    free(rs);
    /* Not due again right away. */
    assert_ok(kms_schedule_tick(f->k, &no_jitter, &res));
    assert_int_equal(res.rotated, 0);
}

static void test_month_parse(void **state)
{
    (void)state;
    int64_t from, to;
    assert_ok(kms_month_parse("2023-11", &from, &to));
    assert_int_equal(from, 1698796800); /* 2023-11-01T00:00:00Z */
    assert_int_equal(to, 1701388800);   /* 2023-12-01T00:00:00Z */
    assert_ok(kms_month_parse("2024-02", &from, &to));
    assert_int_equal(to - from, 29 * DAY);
    assert_ok(kms_month_parse("2023-12", &from, &to));
    assert_int_equal(to, 1704067200); /* 2024-01-01 */
    const char *bad[] = {"2023-13", "2023-00",  "23-11", "2023/11", "2023-1",
                         "1969-12", "2023-11x", "",      "abcd-ef"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
        assert_err(kms_month_parse(bad[i], &from, &to), KMS_ERR_INVALID_ARGUMENT);
}

/* The report on a known history, November 2023 (T0 is 2023-11-14 22:13:20Z). */
static void test_report_numbers(void **state)
{
    kms_fx *f = *state;
    int64_t from, to;
    assert_ok(kms_month_parse("2023-11", &from, &to));
    /* Keys created 2023-10-01. */
    f->now = from - 31 * DAY;
    key(f, "r-ok", 40 * DAY, 5 * DAY);    /* rotated in time below */
    key(f, "r-late", 40 * DAY, 5 * DAY);  /* due 11-10, rotated 11-15: 5 days late */
    key(f, "r-never", 35 * DAY, 5 * DAY); /* due 11-05, never rotated */
    key(f, "r-emerg", 365 * DAY, 7 * DAY);
    /* r-ok: manual rotation 2023-11-02, 30 s. */
    f->now = from + DAY;
    assert_ok(kms_key_rotate(f->k, &f->admin, "r-ok", KMS_ROTATION_MANUAL, "monthly", NULL));
    /* r-late: the scheduler ran on 11-15. */
    f->now = from + 14 * DAY;
    kms_schedule_opts o = {.jitter_window_s = -1, .max_rotations = 1};
    kms_schedule_result res;
    /* max 1: r-never (longer overdue) goes first; then r-late. */
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(res.rotated, 1);
    assert_int_equal(primary_of(f, "r-never"), 2);
    f->now = from + 15 * DAY;
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(primary_of(f, "r-late"), 2);
    /* r-emerg: two emergency rotations on 11-20. */
    f->now = from + 19 * DAY;
    assert_ok(kms_key_rotate(f->k, &f->admin, "r-emerg", KMS_ROTATION_EMERGENCY, "leak", NULL));
    f->now = from + 19 * DAY + HOUR;
    assert_ok(kms_key_rotate(f->k, &f->admin, "r-emerg", KMS_ROTATION_EMERGENCY, "leak 2", NULL));
    /* A rollback on 11-21 of r-ok's manual rotation. */
    f->now = from + 20 * DAY;
    assert_ok(kms_key_rollback(f->k, &f->admin, "r-ok", "bad", NULL));
    /* Outside the month: a rotation in December does not count. */
    f->now = to + DAY;
    assert_ok(kms_key_rotate(f->k, &f->admin, "r-ok", KMS_ROTATION_MANUAL, NULL, NULL));

    kms_report rep;
    assert_ok(kms_report_build(f->k, from, to, &rep));
    assert_int_equal(rep.days, 30);
    assert_int_equal(rep.total, 6);
    assert_int_equal(rep.by_type[KMS_ROTATION_MANUAL], 1);
    assert_int_equal(rep.by_type[KMS_ROTATION_SCHEDULED], 2);
    assert_int_equal(rep.by_type[KMS_ROTATION_EMERGENCY], 2);
    assert_int_equal(rep.by_type[KMS_ROTATION_ROLLBACK], 1);
    assert_int_equal(rep.by_status[KMS_ROTATION_SUCCEEDED], 5);
    assert_int_equal(rep.by_status[KMS_ROTATION_ROLLED_BACK], 1);
    /* 5 of 6 finished rotations succeeded; the rolled back one counts against. */
    assert_true(rep.success_rate > 0.8333 && rep.success_rate < 0.8334);
    assert_int_equal(rep.timed, 6);
    assert_int_equal(rep.per_day[1], 1);
    assert_int_equal(rep.per_day[14], 1);
    assert_int_equal(rep.per_day[15], 1);
    assert_int_equal(rep.per_day[19], 2);
    assert_int_equal(rep.per_day[20], 1);
    assert_int_equal(rep.n_emergencies, 2);
    assert_int_equal(rep.emergencies_within_objective, 2);
    assert_string_equal(rep.emergencies[0].reason, "leak");
    /* Compliance over November: r-ok and r-emerg in policy; r-late overdue
     * from 11-10 to 11-16 (6 days); r-never from 11-05 to 11-15 (10 days). */
    assert_int_equal(rep.keys, 4);
    assert_int_equal(rep.keys_within_policy, 2);
    assert_int_equal(rep.n_out_of_policy, 2);
    const kms_report_key *late = NULL, *never = NULL;
    for (size_t i = 0; i < rep.n_out_of_policy; i++) {
        if (strcmp(rep.out_of_policy[i].name, "r-late") == 0)
            late = &rep.out_of_policy[i];
        if (strcmp(rep.out_of_policy[i].name, "r-never") == 0)
            never = &rep.out_of_policy[i];
    }
    assert_non_null(late);
    assert_non_null(never);
    assert_int_equal(late->overdue_since, from - 31 * DAY + 40 * DAY);
    assert_int_equal(late->overdue_s, from + 15 * DAY - (from + 9 * DAY));
    assert_false(late->still_overdue);
    assert_int_equal(never->overdue_since, from + 4 * DAY);
    assert_int_equal(never->overdue_s, 10 * DAY);
    /* Due in the next 30 days from now (12-02): r-never (due 12-20) and
     * r-late (due 12-26); r-ok was just rotated, r-emerg in a year. */
    assert_int_equal(rep.n_due, 2);
    assert_int_equal(rep.overdue_now, 0);
    kms_report_free(&rep);

    /* Bad periods. (Durations with known values: test_report_durations.) */
    assert_err(kms_report_build(f->k, to, from, &rep), KMS_ERR_INVALID_ARGUMENT);
    assert_err(kms_report_build(f->k, from, from + 40 * DAY, &rep), KMS_ERR_INVALID_ARGUMENT);
}

static void audit_add(kms_fx *f, const char *identity, const char *source, const char *op,
                      const char *key, uint32_t version, uint32_t items, const char *result)
{
    kms_audit_record r;
    memset(&r, 0, sizeof(r));
    snprintf(r.identity, sizeof(r.identity), "%s", identity);
    snprintf(r.source, sizeof(r.source), "%s", source);
    snprintf(r.operation, sizeof(r.operation), "%s", op);
    snprintf(r.key, sizeof(r.key), "%s", key);
    snprintf(r.result, sizeof(r.result), "%s", result);
    r.version = version;
    r.items = items;
    r.status = strcmp(result, "ok") == 0 ? 200 : 403;
    assert_ok(kms_audit_append(f->k, &r));
}

static const kms_usage_row *row_of(const kms_usage_report *u, const char *id, const char *op,
                                   const char *src)
{
    for (size_t i = 0; i < u->n; i++)
        if (strcmp(u->rows[i].identity, id) == 0 && strcmp(u->rows[i].operation, op) == 0 &&
            strcmp(u->rows[i].source, src) == 0)
            return &u->rows[i];
    return NULL;
}

/* Emergency rotation: v1 compromised, a new primary, the rotation record
 * timed, and the usage report of v1 over the look-back from the audit log:
 * per identity, operation and address (port dropped), count, items, first
 * and last use; nothing outside the window, no other version, no other key,
 * no admin record. Then per-version uses in the last 30 days. */
static void test_emergency_usage_report(void **state)
{
    kms_fx *f = *state;
    kms_audit_config ac = {.enabled = true};
    assert_ok(kms_audit_start(f->k, &ac));
    key(f, "pay", 90 * DAY, 7 * DAY);
    key(f, "other", 90 * DAY, 7 * DAY);
    int64_t t0 = f->now;
    /* 10 days before the incident: outside a 7-day look-back. */
    audit_add(f, "app-a", "10.0.0.1:40000", "unwrap", "pay", 1, 0, "ok");
    f->now = t0 + 5 * DAY;
    audit_add(f, "app-a", "10.0.0.1:40001", "unwrap", "pay", 1, 0, "ok");
    audit_add(f, "app-b", "[::1]:5000", "batch.unwrap", "pay", 1, 50, "ok");
    audit_add(f, "app-a", "10.0.0.1:40002", "wrap", "pay", 1, 0, "ok");
    f->now = t0 + 8 * DAY;
    audit_add(f, "app-a", "10.0.0.1:40003", "unwrap", "pay", 1, 0, "ok");
    audit_add(f, "app-a", "10.0.0.1:40004", "unwrap", "pay", 1, 0, "version_disabled");
    audit_add(f, "app-c", "10.0.0.9:1", "unwrap", "other", 1, 0, "ok");   /* other key */
    audit_add(f, "admin", "10.0.0.2:1", "key.update", "pay", 1, 0, "ok"); /* not a use */
    f->now = t0 + 10 * DAY;
    kms_rotation_info ri;
    assert_ok(kms_key_rotate(f->k, &f->admin, "pay", KMS_ROTATION_EMERGENCY, "INC-7", &ri));
    assert_int_equal(ri.type, KMS_ROTATION_EMERGENCY);
    assert_int_equal(ri.from_version, 1);
    assert_int_equal(ri.to_version, 2);
    assert_int_equal(ri.started_at, f->now);
    assert_int_equal(ri.finished_at, f->now);
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "pay", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_COMPROMISED);
    audit_add(f, "app-a", "10.0.0.1:40005", "wrap", "pay", 2, 0, "ok"); /* v2: not counted */

    kms_usage_report u;
    assert_ok(kms_usage_report_build(f->k, "pay", 1, f->now - 7 * DAY, f->now, &u));
    assert_false(u.truncated);
    assert_int_equal(u.n, 3);
    const kms_usage_row *a = row_of(&u, "app-a", "unwrap", "10.0.0.1");
    assert_non_null(a);
    assert_int_equal(a->count, 3);
    assert_int_equal(a->items, 3);
    assert_int_equal(a->failures, 1);
    assert_int_equal(a->first, t0 + 5 * DAY);
    assert_int_equal(a->last, t0 + 8 * DAY);
    const kms_usage_row *b = row_of(&u, "app-b", "batch.unwrap", "::1");
    assert_non_null(b);
    assert_int_equal(b->count, 1);
    assert_int_equal(b->items, 50);
    const kms_usage_row *w = row_of(&u, "app-a", "wrap", "10.0.0.1");
    assert_non_null(w);
    assert_int_equal(w->count, 1);
    kms_usage_report_free(&u);

    /* A longer look-back reaches the first use. */
    assert_ok(kms_usage_report_build(f->k, "pay", 1, f->now - 30 * DAY, f->now, &u));
    a = row_of(&u, "app-a", "unwrap", "10.0.0.1");
    assert_non_null(a);
    assert_int_equal(a->count, 4);
    assert_int_equal(a->first, t0);
    kms_usage_report_free(&u);

    /* Per version, last 30 days: v1 has 1+1+50+1+1+1 items, v2 one. */
    uint64_t *uses = NULL;
    assert_ok(kms_version_recent_uses(f->k, "pay", 2, 0, &uses));
    assert_int_equal(uses[0], 55);
    assert_int_equal(uses[1], 1);
    free(uses);
    /* 21 days on, the first uses leave the 30-day window. */
    f->now = t0 + 31 * DAY;
    assert_ok(kms_version_recent_uses(f->k, "pay", 2, 0, &uses));
    assert_int_equal(uses[0], 54);
    free(uses);
    assert_err(kms_usage_report_build(f->k, "Bad Name", 1, 0, f->now, &u),
               KMS_ERR_KEY_NAME_INVALID);
}

/* The bisection that skips records before the window on a long log. */
static void test_usage_long_log(void **state)
{
    kms_fx *f = *state;
    kms_audit_config ac = {.enabled = true};
    assert_ok(kms_audit_start(f->k, &ac));
    key(f, "long", 90 * DAY, 7 * DAY);
    int64_t t0 = f->now;
    for (int i = 0; i < 300; i++) {
        f->now = t0 + i * HOUR;
        audit_add(f, i % 2 ? "x" : "y", "127.0.0.1:1", "unwrap", "long", 1, 0, "ok");
    }
    kms_usage_report u;
    /* The last 10 hours: records 290..299. */
    assert_ok(kms_usage_report_build(f->k, "long", 1, f->now - 9 * HOUR, f->now, &u));
    assert_int_equal(u.n, 2);
    assert_int_equal(u.rows[0].count + u.rows[1].count, 10);
    assert_int_equal(u.rows[0].first,
                     t0 + 290 * HOUR + (strcmp(u.rows[0].identity, "x") ? 0 : HOUR));
    kms_usage_report_free(&u);
    assert_ok(kms_usage_report_build(f->k, "long", 1, 0, f->now, &u));
    assert_int_equal(u.rows[0].count + u.rows[1].count, 300);
    kms_usage_report_free(&u);
}

typedef struct {
    const kms_rec_rotation *recs;
    size_t n;
} put_tx;

static kms_result put_txn(kms_txn *t, void *arg)
{
    put_tx *x = arg;
    for (size_t i = 0; i < x->n; i++)
        KMS_GUARD(kms_rotation_put(t, &x->recs[i]));
    return KMS_OK_RESULT;
}

/* Durations, success rate and the 4-hour objective on records with known
 * start and finish times (written straight into the store). */
static void test_report_durations(void **state)
{
    kms_fx *f = *state;
    int64_t from, to;
    assert_ok(kms_month_parse("2024-03", &from, &to));
    static const struct {
        kms_rotation_type type;
        kms_rotation_status status;
        int64_t start, dur; /* dur < 0: not finished */
    } h[] = {
        {KMS_ROTATION_MANUAL, KMS_ROTATION_SUCCEEDED, 1 * DAY, 60},
        {KMS_ROTATION_MANUAL, KMS_ROTATION_SUCCEEDED, 2 * DAY, 120},
        {KMS_ROTATION_SCHEDULED, KMS_ROTATION_SUCCEEDED, 3 * DAY, 30},
        {KMS_ROTATION_EMERGENCY, KMS_ROTATION_SUCCEEDED, 4 * DAY, 5 * HOUR},
        {KMS_ROTATION_EMERGENCY, KMS_ROTATION_SUCCEEDED, 5 * DAY, HOUR},
        {KMS_ROTATION_EMERGENCY, KMS_ROTATION_STARTED, 6 * DAY, -1},
        {KMS_ROTATION_MASTER, KMS_ROTATION_SUCCEEDED, 7 * DAY, 600},
        {KMS_ROTATION_MANUAL, KMS_ROTATION_FAILED, 8 * DAY, 10},
        {KMS_ROTATION_MANUAL, KMS_ROTATION_SUCCEEDED, -DAY, 99999}, /* February */
    };
    kms_rec_rotation recs[sizeof(h) / sizeof(*h)];
    memset(recs, 0, sizeof(recs));
    for (size_t i = 0; i < sizeof(h) / sizeof(*h); i++) {
        kms_rotation_info *ri = &recs[i].info;
        snprintf(ri->id, sizeof(ri->id), "%032zx", i + 1);
        snprintf(ri->key, sizeof(ri->key), "%s", h[i].type == KMS_ROTATION_MASTER ? "" : "hist");
        ri->type = h[i].type;
        ri->status = h[i].status;
        ri->from_version = (uint32_t)i + 1;
        ri->to_version = (uint32_t)i + 2;
        ri->started_at = from + h[i].start;
        ri->finished_at = h[i].dur >= 0 ? ri->started_at + h[i].dur : 0;
        snprintf(ri->initiator, sizeof(ri->initiator), "admin");
    }
    put_tx x = {recs, sizeof(h) / sizeof(*h)};
    assert_ok(kms_write(f->k, put_txn, &x, false));
    f->now = to + DAY;
    kms_report rep;
    assert_ok(kms_report_build(f->k, from, to, &rep));
    assert_int_equal(rep.days, 31);
    assert_int_equal(rep.total, 8);
    assert_int_equal(rep.by_status[KMS_ROTATION_SUCCEEDED], 6);
    assert_int_equal(rep.by_status[KMS_ROTATION_FAILED], 1);
    assert_int_equal(rep.by_status[KMS_ROTATION_STARTED], 1);
    assert_int_equal(rep.by_type[KMS_ROTATION_MASTER], 1);
    assert_true(rep.success_rate > 6.0 / 7 - 1e-9 && rep.success_rate < 6.0 / 7 + 1e-9);
    /* Timed: 10, 30, 60, 120, 600, 3600, 18000. */
    assert_int_equal(rep.timed, 7);
    assert_true(rep.median_duration_s == 120.0);
    assert_true(rep.mean_duration_s > 22420.0 / 7 - 1e-6 &&
                rep.mean_duration_s < 22420.0 / 7 + 1e-6);
    assert_int_equal(rep.max_duration_s, 18000);
    assert_int_equal(rep.n_emergencies, 3);
    assert_int_equal(rep.emergencies_within_objective, 1);
    assert_int_equal(rep.per_day[4], 1);
    kms_report_free(&rep);
    /* February holds the one rotation before March. */
    assert_ok(kms_month_parse("2024-02", &from, &to));
    assert_ok(kms_report_build(f->k, from, to, &rep));
    assert_int_equal(rep.total, 1);
    assert_true(rep.median_duration_s == 99999.0);
    assert_int_equal(rep.days, 29);
    kms_report_free(&rep);
}

typedef struct {
    int ok, failed;
    char last_failed[64];
    kms_err err;
} notes;

static void note(void *arg, const char *key, const kms_rotation_info *ri, kms_err err)
{
    notes *n = arg;
    if (ri != NULL) {
        assert_int_equal(err, KMS_OK);
        assert_string_equal(ri->key, key);
        n->ok++;
    } else {
        kms_fault_disarm();
        n->failed++;
        n->err = err;
        snprintf(n->last_failed, sizeof(n->last_failed), "%s", key);
    }
}

/* The HSM fails one generation during a tick: that key's rotation is
 * recorded as failed and reported, the tick stops rotating (the other due
 * key waits: against a failing HSM it would only fail too), and the next
 * tick rotates both. */
static void test_tick_hsm_failure(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new_ex(0, true);
    key(f, "h-a", 10 * DAY, DAY);
    key(f, "h-b", 10 * DAY, DAY);
    f->now += 10 * DAY;
    notes n = {0};
    kms_schedule_opts o = {.jitter_window_s = -1, .notify = note, .notify_arg = &n};
    kms_schedule_result res;
    kms_fault_reset();
    /* Sticky (the HSM layer retries once), disarmed by the first failure's
     * notification, so that exactly the first key's rotation fails. */
    kms_fault_arm_sticky("C_GenerateKey", 1, 0x30 /* CKR_DEVICE_ERROR */);
    kms_result r = kms_schedule_tick(f->k, &o, &res);
    assert_int_not_equal(r.err, KMS_OK);
    assert_true(kms_fault_fired() >= 1);
    assert_int_equal(res.failed, 1);
    assert_int_equal(res.rotated, 0);
    assert_int_equal(res.deferred, 1);
    assert_int_equal(n.failed, 1);
    assert_int_equal(n.ok, 0);
    assert_string_equal(n.last_failed, "h-a"); /* same due time: name order */
    assert_int_equal(primary_of(f, "h-a"), 1);
    assert_int_equal(primary_of(f, "h-b"), 1);
    kms_rotation_filter rf = {.key = "h-a", .status = KMS_ROTATION_FAILED};
    kms_rotation_info *rs = NULL;
    size_t cnt = 0;
    assert_ok(kms_rotations_list(f->k, &rf, &rs, &cnt));
    assert_int_equal(cnt, 1);
    assert_int_equal(rs[0].type, KMS_ROTATION_SCHEDULED);
    assert_string_equal(rs[0].initiator, "system");
    free(rs);
    /* The next tick retries. */
    f->now += 60;
    assert_ok(kms_schedule_tick(f->k, &o, &res));
    assert_int_equal(res.rotated, 2);
    assert_int_equal(n.ok, 2);
    assert_int_equal(primary_of(f, "h-a"), 2);
    assert_int_equal(primary_of(f, "h-b"), 2);
    kms_fx_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_status_edges, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_rotates_due_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_jitter_spreads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backlog_bounded, setup, teardown),
        cmocka_unit_test(test_tick_hsm_failure),
        cmocka_unit_test_setup_teardown(test_two_processes_never_twice, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_grace_and_destroy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rollback_after_scheduled, setup, teardown),
        cmocka_unit_test(test_month_parse),
        cmocka_unit_test_setup_teardown(test_report_numbers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_report_durations, setup, teardown),
        cmocka_unit_test_setup_teardown(test_emergency_usage_report, setup, teardown),
        cmocka_unit_test_setup_teardown(test_usage_long_log, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
