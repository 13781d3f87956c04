/*
 * Version states on a real token: for each state, each operation's result
 * with its exact error; transitions and their guards; deprecation grace and
 * destruction with an injected clock; rollback; emergency rotation;
 * min_decryption_version; the encryption counter limits.
 */
#include "kms_test_fixture.h"

#include "kms_internal.h"

#include <sys/wait.h>
#include <unistd.h>

#define DAY INT64_C(86400)

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

static const uint8_t ctx[] = "c";

typedef struct {
    kms_buf wrapped; /* under v1 */
    kms_buf field;   /* encrypt under v1 */
} toks;

/* Key `name` with v1 tokens, rotated so that v2 is primary. */
static void make(kms_fx *f, const char *name, toks *t)
{
    kms_fx_key(f, name, KMS_PURPOSE_ENCRYPT);
    kms_buf_init(&t->wrapped, 0);
    kms_buf_init(&t->field, 0);
    const uint8_t dek[32] = "0123456789abcdef0123456789abcdef";
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, name, dek, 32, ctx, 1, &t->wrapped, &v));
    assert_ok(kms_encrypt(f->k, &f->app, name, dek, 5, ctx, 1, &t->field, &v));
    assert_ok(kms_key_rotate(f->k, &f->admin, name, KMS_ROTATION_MANUAL, NULL, NULL));
}

static void toks_free(toks *t)
{
    kms_buf_free(&t->wrapped);
    kms_buf_free(&t->field);
}

/* Expected results of: unwrap, decrypt, rewrap by app, rewrap by migrator,
 * unwrap by migrator. */
static void expect_ops(kms_fx *f, const char *name, toks *t, kms_err unwrap, kms_err rewrap_app,
                       kms_err rewrap_mig, kms_err unwrap_mig)
{
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v, from, to;
    bool changed;
    assert_err(kms_unwrap(f->k, &f->app, name, t->wrapped.data, t->wrapped.len, ctx, 1, &pt, &v),
               unwrap);
    kms_buf_reset(&pt);
    assert_err(kms_decrypt(f->k, &f->app, name, t->field.data, t->field.len, ctx, 1, &pt, &v),
               unwrap);
    assert_err(kms_rewrap(f->k, &f->app, name, t->wrapped.data, t->wrapped.len, ctx, 1, &out, &from,
                          &to, &changed),
               rewrap_app);
    kms_buf_reset(&out);
    assert_err(kms_rewrap(f->k, &f->migrator, name, t->wrapped.data, t->wrapped.len, ctx, 1, &out,
                          &from, &to, &changed),
               rewrap_mig);
    if (rewrap_mig == KMS_OK) {
        assert_true(changed);
        assert_int_equal(from, 1);
        assert_int_equal(to, 2);
    }
    kms_buf_reset(&pt);
    assert_err(
        kms_unwrap(f->k, &f->migrator, name, t->wrapped.data, t->wrapped.len, ctx, 1, &pt, &v),
        unwrap_mig);
    /* New encryptions always use the primary, whatever v1's state. */
    kms_buf_reset(&out);
    assert_ok(kms_wrap(f->k, &f->app, name, (const uint8_t *)"x", 1, NULL, 0, &out, &v));
    assert_int_equal(v, 2);
}

static kms_version_state state_of(kms_fx *f, const char *name, uint32_t version)
{
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, name, version, &vi));
    return vi.state;
}

static kms_result act(kms_fx *f, const char *name, uint32_t v, kms_version_action a, int64_t arg)
{
    kms_version_info vi;
    return kms_version_set_state(f->k, &f->admin, name, v, a, arg, "test", &vi);
}

static void test_matrix(void **state)
{
    kms_fx *f = *state;
    toks t;
    const kms_err OK = KMS_OK;

    make(f, "m-active", &t);
    expect_ops(f, "m-active", &t, OK, OK, OK, OK);
    toks_free(&t);

    make(f, "m-deprecated", &t);
    assert_ok(act(f, "m-deprecated", 1, KMS_ACTION_DEPRECATE, 10 * DAY));
    assert_int_equal(state_of(f, "m-deprecated", 1), KMS_VERSION_DEPRECATED);
    expect_ops(f, "m-deprecated", &t, OK, OK, OK, OK);
    toks_free(&t);

    make(f, "m-compromised", &t);
    assert_ok(act(f, "m-compromised", 1, KMS_ACTION_COMPROMISE, 0));
    const kms_err C = KMS_ERR_VERSION_COMPROMISED;
    /* Only the migrator's rewrap may read a compromised version. */
    expect_ops(f, "m-compromised", &t, C, C, OK, C);
    toks_free(&t);

    make(f, "m-disabled", &t);
    assert_ok(act(f, "m-disabled", 1, KMS_ACTION_DISABLE, 0));
    const kms_err D = KMS_ERR_VERSION_DISABLED;
    expect_ops(f, "m-disabled", &t, D, D, D, D);
    assert_ok(act(f, "m-disabled", 1, KMS_ACTION_ENABLE, 0));
    expect_ops(f, "m-disabled", &t, OK, OK, OK, OK);
    toks_free(&t);

    make(f, "m-below-min", &t);
    kms_key_update u = {.min_decryption_version = 2, .deletion_protection = -1};
    assert_ok(kms_key_update_policy(f->k, &f->admin, "m-below-min", &u, NULL));
    const kms_err B = KMS_ERR_VERSION_BELOW_MINIMUM;
    expect_ops(f, "m-below-min", &t, B, B, B, B);
    toks_free(&t);

    make(f, "m-pending", &t);
    assert_ok(kms_key_update_policy(f->k, &f->admin, "m-pending", &u, NULL));
    assert_ok(act(f, "m-pending", 1, KMS_ACTION_SCHEDULE_DESTROY, 7 * DAY));
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "m-pending", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DISABLED);
    assert_int_equal(vi.destroy_at, f->now + 7 * DAY);
    expect_ops(f, "m-pending", &t, D, D, D, D);

    /* The wait passes: destroyed on access, irreversibly. */
    f->now += 7 * DAY;
    const kms_err X = KMS_ERR_VERSION_DESTROYED;
    expect_ops(f, "m-pending", &t, X, X, X, X);
    assert_ok(kms_version_get(f->k, "m-pending", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DESTROYED);
    assert_err(act(f, "m-pending", 1, KMS_ACTION_ENABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "m-pending", 1, KMS_ACTION_CANCEL_DESTROY, 0), KMS_ERR_STATE_TRANSITION);
    kms_fx_reopen(f);
    expect_ops(f, "m-pending", &t, X, X, X, X);
    toks_free(&t);

    /* Unknown version of the right key. */
    assert_err(act(f, "m-active", 9, KMS_ACTION_DISABLE, 0), KMS_ERR_VERSION_NOT_FOUND);
    assert_err(act(f, "nope", 1, KMS_ACTION_DISABLE, 0), KMS_ERR_KEY_NOT_FOUND);
}

static void test_mac_states(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "mac-st", KMS_PURPOSE_MAC);
    kms_buf m KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    bool valid;
    assert_ok(kms_mac(f->k, &f->app, "mac-st", ctx, 1, &m, &v));
    assert_ok(kms_key_rotate(f->k, &f->admin, "mac-st", KMS_ROTATION_MANUAL, NULL, NULL));
    assert_ok(act(f, "mac-st", 1, KMS_ACTION_DEPRECATE, 2 * DAY));
    assert_ok(kms_verify(f->k, &f->app, "mac-st", ctx, 1, m.data, m.len, &valid, &v));
    assert_true(valid);
    /* Verify accepts the old secret during its grace period only. */
    f->now += 2 * DAY;
    assert_err(kms_verify(f->k, &f->app, "mac-st", ctx, 1, m.data, m.len, &valid, &v),
               KMS_ERR_VERSION_DISABLED);
    assert_ok(act(f, "mac-st", 1, KMS_ACTION_ENABLE, 0));
    assert_ok(act(f, "mac-st", 1, KMS_ACTION_COMPROMISE, 0));
    assert_err(kms_verify(f->k, &f->migrator, "mac-st", ctx, 1, m.data, m.len, &valid, &v),
               KMS_ERR_VERSION_COMPROMISED);
}

static void test_transitions(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "tr", KMS_PURPOSE_ENCRYPT);
    /* The primary cannot leave active. */
    assert_err(act(f, "tr", 1, KMS_ACTION_DISABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_COMPROMISE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_DEPRECATE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 0), KMS_ERR_STATE_TRANSITION);
    assert_ok(kms_key_rotate(f->k, &f->admin, "tr", KMS_ROTATION_MANUAL, NULL, NULL));
    assert_err(act(f, "tr", 1, KMS_ACTION_ENABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_CANCEL_DESTROY, 0), KMS_ERR_STATE_TRANSITION);
    /* Destruction guards. */
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 0), KMS_ERR_PROTECTED); /* >= min */
    kms_key_update u = {.min_decryption_version = 3, .deletion_protection = -1};
    assert_err(kms_key_update_policy(f->k, &f->admin, "tr", &u, NULL), KMS_ERR_CONFLICT);
    u.min_decryption_version = 2;
    u.deletion_protection = 1;
    kms_key_info ki;
    assert_ok(kms_key_update_policy(f->k, &f->admin, "tr", &u, &ki));
    assert_int_equal(ki.min_decryption_version, 2);
    assert_true(ki.deletion_protection);
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 0), KMS_ERR_PROTECTED);
    u = (kms_key_update){.deletion_protection = 0};
    assert_ok(kms_key_update_policy(f->k, &f->admin, "tr", &u, NULL));
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 6 * DAY), KMS_ERR_INVALID_ARGUMENT);
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 31 * DAY), KMS_ERR_INVALID_ARGUMENT);
    kms_version_info vi;
    assert_ok(
        kms_version_set_state(f->k, &f->admin, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 0, NULL, &vi));
    assert_int_equal(vi.destroy_at, f->now + 30 * DAY);
    assert_int_equal(vi.state, KMS_VERSION_DISABLED);
    assert_err(act(f, "tr", 1, KMS_ACTION_SCHEDULE_DESTROY, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_ENABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_ok(
        kms_version_set_state(f->k, &f->admin, "tr", 1, KMS_ACTION_CANCEL_DESTROY, 0, NULL, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DISABLED);
    assert_int_equal(vi.destroy_at, 0);
    assert_ok(act(f, "tr", 1, KMS_ACTION_ENABLE, 0));
    assert_int_equal(state_of(f, "tr", 1), KMS_VERSION_ACTIVE);
    /* Compromised never goes back to active. */
    assert_ok(act(f, "tr", 1, KMS_ACTION_COMPROMISE, 0));
    assert_err(act(f, "tr", 1, KMS_ACTION_DISABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_ENABLE, 0), KMS_ERR_STATE_TRANSITION);
    assert_err(act(f, "tr", 1, KMS_ACTION_DEPRECATE, -1), KMS_ERR_INVALID_ARGUMENT);
}

static void test_deprecation_grace_and_check(void **state)
{
    kms_fx *f = *state;
    toks t;
    make(f, "grace", &t);
    assert_ok(act(f, "grace", 1, KMS_ACTION_DEPRECATE, 0)); /* 30 days */
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "grace", 1, &vi));
    assert_int_equal(vi.grace_until, f->now + 30 * DAY);
    assert_int_equal(vi.deprecated_at, f->now);
    f->now += 30 * DAY - 1;
    expect_ops(f, "grace", &t, KMS_OK, KMS_OK, KMS_OK, KMS_OK);
    f->now += 1;
    const kms_err D = KMS_ERR_VERSION_DISABLED;
    expect_ops(f, "grace", &t, D, D, D, D);
    assert_int_equal(state_of(f, "grace", 1), KMS_VERSION_DISABLED);
    /* kms_check persists it; enable brings it back. */
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_true(rep.problems >= 1);
    assert_ok(kms_check(f->k, true, &rep));
    assert_true(rep.repaired >= 1);
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
    assert_int_equal(state_of(f, "grace", 1), KMS_VERSION_DISABLED);
    assert_ok(act(f, "grace", 1, KMS_ACTION_ENABLE, 0));
    expect_ops(f, "grace", &t, KMS_OK, KMS_OK, KMS_OK, KMS_OK);
    toks_free(&t);
}

static void test_destroy_by_check(void **state)
{
    kms_fx *f = *state;
    toks t;
    make(f, "destroy", &t);
    kms_key_update u = {.min_decryption_version = 2, .deletion_protection = -1};
    assert_ok(kms_key_update_policy(f->k, &f->admin, "destroy", &u, NULL));
    assert_ok(act(f, "destroy", 1, KMS_ACTION_SCHEDULE_DESTROY, 8 * DAY));
    f->now += 8 * DAY;
    kms_check_report rep;
    assert_ok(kms_check(f->k, true, &rep));
    assert_true(rep.repaired >= 1);
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "destroy", 1, &vi));
    assert_int_equal(vi.state, KMS_VERSION_DESTROYED);
    const kms_err X = KMS_ERR_VERSION_DESTROYED;
    expect_ops(f, "destroy", &t, X, X, X, X);
    toks_free(&t);
}

static void test_rollback(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "rb", KMS_PURPOSE_ENCRYPT);
    kms_buf t3 KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    assert_ok(kms_key_rotate(f->k, &f->admin, "rb", KMS_ROTATION_MANUAL, NULL, NULL));
    kms_rotation_info r3;
    assert_ok(kms_key_rotate(f->k, &f->admin, "rb", KMS_ROTATION_MANUAL, "bad one", &r3));
    assert_ok(kms_wrap(f->k, &f->app, "rb", (const uint8_t *)"k", 1, NULL, 0, &t3, &v));
    assert_int_equal(v, 3);
    kms_rotation_info ri;
    assert_ok(kms_key_rollback(f->k, &f->admin, "rb", "revert", &ri));
    assert_int_equal(ri.type, KMS_ROTATION_ROLLBACK);
    assert_int_equal(ri.from_version, 3);
    assert_int_equal(ri.to_version, 2);
    kms_key_info ki;
    assert_ok(kms_key_get(f->k, "rb", &ki));
    assert_int_equal(ki.primary_version, 2);
    assert_int_equal(ki.latest_version, 3);
    /* The newer version stays decryptable; new encryptions use 2. */
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    assert_ok(kms_unwrap(f->k, &f->app, "rb", t3.data, t3.len, NULL, 0, &pt, &v));
    assert_int_equal(v, 3);
    kms_buf t KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_wrap(f->k, &f->app, "rb", (const uint8_t *)"k", 1, NULL, 0, &t, &v));
    assert_int_equal(v, 2);
    /* The rotation that made 3 primary is rolled back. */
    kms_rotation_filter flt = {.key = "rb"};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &flt, &list, &n));
    assert_int_equal(n, 3);
    bool found = false;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(list[i].id, r3.id) == 0) {
            assert_int_equal(list[i].status, KMS_ROTATION_ROLLED_BACK);
            found = true;
        }
    }
    assert_true(found);
    free(list);
    /* A disabled version is skipped; none left gives conflict. */
    assert_ok(kms_key_rollback(f->k, &f->admin, "rb", NULL, &ri));
    assert_int_equal(ri.to_version, 1);
    assert_err(kms_key_rollback(f->k, &f->admin, "rb", NULL, &ri), KMS_ERR_CONFLICT);
    /* Rotate forward again: version 4, latest+1. */
    assert_ok(kms_key_rotate(f->k, &f->admin, "rb", KMS_ROTATION_MANUAL, NULL, &ri));
    assert_int_equal(ri.to_version, 4);
    assert_ok(act(f, "rb", 3, KMS_ACTION_DISABLE, 0));
    assert_ok(act(f, "rb", 2, KMS_ACTION_DISABLE, 0));
    assert_ok(kms_key_rollback(f->k, &f->admin, "rb", NULL, &ri));
    assert_int_equal(ri.to_version, 1);
}

static void test_emergency(void **state)
{
    kms_fx *f = *state;
    toks t;
    kms_fx_key(f, "em", KMS_PURPOSE_ENCRYPT);
    kms_buf_init(&t.wrapped, 0);
    kms_buf_init(&t.field, 0);
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, "em", (const uint8_t *)"k", 1, ctx, 1, &t.wrapped, &v));
    assert_ok(kms_encrypt(f->k, &f->app, "em", (const uint8_t *)"k", 1, ctx, 1, &t.field, &v));
    kms_rotation_info ri;
    assert_ok(kms_key_rotate(f->k, &f->admin, "em", KMS_ROTATION_EMERGENCY, "leak", &ri));
    assert_int_equal(ri.type, KMS_ROTATION_EMERGENCY);
    assert_int_equal(state_of(f, "em", 1), KMS_VERSION_COMPROMISED);
    const kms_err C = KMS_ERR_VERSION_COMPROMISED;
    expect_ops(f, "em", &t, C, C, KMS_OK, C);
    kms_rotation_filter flt = {.key = "em", .type = KMS_ROTATION_EMERGENCY};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &flt, &list, &n));
    assert_int_equal(n, 1);
    assert_string_equal(list[0].reason, "leak");
    free(list);
    assert_err(kms_key_rotate(f->k, &f->admin, "em", KMS_ROTATION_ROLLBACK, NULL, &ri),
               KMS_ERR_INVALID_ARGUMENT);
    toks_free(&t);
}

static void test_counter_limits(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "lim", KMS_PURPOSE_ENCRYPT);
    kms_buf t KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    assert_ok(kms_test_counter_set(f->k, "lim", 1, KMS_ENCRYPTIONS_SOFT_LIMIT - 2));
    assert_ok(kms_wrap(f->k, &f->app, "lim", (const uint8_t *)"k", 1, NULL, 0, &t, &v));
    kms_key_info ki;
    assert_ok(kms_key_get(f->k, "lim", &ki));
    assert_int_equal(ki.primary_version, 1);
    /* The encryption that reaches the soft limit rotates the key. */
    assert_ok(kms_wrap(f->k, &f->app, "lim", (const uint8_t *)"k", 1, NULL, 0, &t, &v));
    assert_int_equal(v, 1);
    assert_ok(kms_key_get(f->k, "lim", &ki));
    assert_int_equal(ki.primary_version, 2);
    kms_rotation_filter flt = {.key = "lim"};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &flt, &list, &n));
    assert_int_equal(n, 1);
    assert_int_equal(list[0].type, KMS_ROTATION_SCHEDULED);
    assert_string_equal(list[0].initiator, "system");
    assert_string_equal(list[0].reason, "encryption limit");
    free(list);
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "lim", 1, &vi));
    assert_int_equal(vi.encryptions, KMS_ENCRYPTIONS_SOFT_LIMIT);
    /* At the hard limit encryption under the version fails. */
    assert_ok(kms_test_counter_set(f->k, "lim", 2, KMS_ENCRYPTIONS_HARD_LIMIT));
    assert_err(kms_wrap(f->k, &f->app, "lim", (const uint8_t *)"k", 1, NULL, 0, &t, &v),
               KMS_ERR_VERSION_EXHAUSTED);
    /* Counters survive a reopen, never lower. */
    kms_fx_reopen(f);
    assert_ok(kms_version_get(f->k, "lim", 1, &vi));
    assert_true(vi.encryptions >= KMS_ENCRYPTIONS_SOFT_LIMIT);
}

static void test_reservation_bound(void **state)
{
    kms_fx *f = *state;
    kms_close(f->k);
    f->k = NULL;
    f->cfg.counter_reservation = 10;
    assert_ok(kms_open(&f->cfg, &f->k));
    kms_fx_key(f, "resv", KMS_PURPOSE_ENCRYPT);
    kms_buf t KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    for (int i = 0; i < 25; i++) {
        kms_buf_reset(&t);
        assert_ok(kms_wrap(f->k, &f->app, "resv", (const uint8_t *)"k", 1, NULL, 0, &t, &v));
    }
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "resv", 1, &vi));
    assert_int_equal(vi.encryptions, 25);
    kms_fx_reopen(f);
    assert_ok(kms_version_get(f->k, "resv", 1, &vi));
    assert_int_equal(vi.encryptions, 25);

    /* A crash (a child that exits without kms_close): what LMDB holds is
     * the reservation, at or above the count and less than one reservation
     * over it. */
    kms_close(f->k);
    f->k = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kms *c = NULL;
        if (!kms_is_ok(kms_open(&f->cfg, &c)))
            _exit(2);
        kms_buf ct = {0};
        for (int i = 0; i < 13; i++) {
            kms_buf_reset(&ct);
            if (!kms_is_ok(kms_wrap(c, &f->app, "resv", (const uint8_t *)"k", 1, NULL, 0, &ct, &v)))
                _exit(3);
        }
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_ok(kms_open(&f->cfg, &f->k));
    assert_ok(kms_version_get(f->k, "resv", 1, &vi));
    assert_true(vi.encryptions >= 25 + 13);
    assert_true(vi.encryptions < 25 + 13 + 10);
    /* A stale rotation record or other damage? None: the crash was clean
     * for the store. */
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
    f->cfg.counter_reservation = 0;
}

static void test_due_and_overdue(void **state)
{
    kms_fx *f = *state;
    kms_stats s0, s;
    assert_ok(kms_stats_get(f->k, &s0));
    kms_key_spec spec = {.name = "due",
                         .purpose = KMS_PURPOSE_ENCRYPT,
                         .rotation_period_s = 10 * DAY,
                         .warning_window_s = 2 * DAY};
    assert_ok(kms_key_create(f->k, &f->admin, &spec, NULL));
    assert_ok(kms_stats_get(f->k, &s));
    assert_int_equal(s.keys, s0.keys + 1);
    assert_int_equal(s.keys_due, s0.keys_due);
    f->now += 8 * DAY;
    assert_ok(kms_stats_get(f->k, &s));
    assert_int_equal(s.keys_due, s0.keys_due + 1);
    f->now += 2 * DAY;
    assert_ok(kms_stats_get(f->k, &s));
    assert_true(s.keys_overdue >= 1);
    /* Rotating resets the clock of the policy. */
    kms_stats before = s;
    assert_ok(kms_key_rotate(f->k, &f->admin, "due", KMS_ROTATION_SCHEDULED, NULL, NULL));
    assert_ok(kms_stats_get(f->k, &s));
    assert_int_equal(s.keys_overdue, before.keys_overdue - 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matrix),
        cmocka_unit_test(test_mac_states),
        cmocka_unit_test(test_transitions),
        cmocka_unit_test(test_deprecation_grace_and_check),
        cmocka_unit_test(test_destroy_by_check),
        cmocka_unit_test(test_rollback),
        cmocka_unit_test(test_emergency),
        cmocka_unit_test(test_counter_limits),
        cmocka_unit_test(test_reservation_bound),
        cmocka_unit_test(test_due_and_overdue),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
