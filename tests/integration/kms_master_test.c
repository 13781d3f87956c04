/*
 * Master rotation on a real token: 50 keys x 3 versions, every earlier
 * token still decrypts, the old master object is gone; an interrupted
 * rotation (the HSM starts failing mid-way, through the fault module) is
 * finished by calling kms_master_rotate again, and by kms_open.
 */
#include "kms_test_fixture.h"

#include "kms_fault.h"

#include <p11-kit/pkcs11.h>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define KEYS     50
#define VERSIONS 3

typedef struct {
    kms_fx *f;
    kms_buf toks[KEYS][VERSIONS];
    kms_buf macs[VERSIONS];
} mstate;

static int setup(void **state)
{
    mstate *s = calloc(1, sizeof(*s));
    s->f = kms_fx_new_ex(0, true);
    kms_fx *f = s->f;
    char name[32];
    uint32_t v;
    kms_fx_key(f, "m-mac", KMS_PURPOSE_MAC);
    for (int i = 0; i < KEYS; i++) {
        snprintf(name, sizeof(name), "mk-%02d", i);
        kms_fx_key(f, name, KMS_PURPOSE_ENCRYPT);
    }
    for (int ver = 0; ver < VERSIONS; ver++) {
        if (ver > 0) {
            for (int i = 0; i < KEYS; i++) {
                snprintf(name, sizeof(name), "mk-%02d", i);
                assert_ok(kms_key_rotate(f->k, &f->admin, name, KMS_ROTATION_MANUAL, NULL, NULL));
            }
            assert_ok(kms_key_rotate(f->k, &f->admin, "m-mac", KMS_ROTATION_MANUAL, NULL, NULL));
        }
        for (int i = 0; i < KEYS; i++) {
            snprintf(name, sizeof(name), "mk-%02d", i);
            kms_buf_init(&s->toks[i][ver], 0);
            assert_ok(kms_wrap(f->k, &f->app, name, (const uint8_t *)name, strlen(name),
                               (const uint8_t *)"ctx", 3, &s->toks[i][ver], &v));
            assert_int_equal(v, ver + 1);
        }
        kms_buf_init(&s->macs[ver], 0);
        assert_ok(kms_mac(f->k, &f->app, "m-mac", (const uint8_t *)"m", 1, &s->macs[ver], &v));
    }
    *state = s;
    return 0;
}

static int teardown(void **state)
{
    mstate *s = *state;
    for (int i = 0; i < KEYS; i++)
        for (int v = 0; v < VERSIONS; v++)
            kms_buf_free(&s->toks[i][v]);
    for (int v = 0; v < VERSIONS; v++)
        kms_buf_free(&s->macs[v]);
    kms_fx_free(s->f);
    free(s);
    return 0;
}

static void all_readable(mstate *s)
{
    kms_fx *f = s->f;
    char name[32];
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    for (int i = 0; i < KEYS; i++) {
        snprintf(name, sizeof(name), "mk-%02d", i);
        for (int ver = 0; ver < VERSIONS; ver++) {
            kms_buf_reset(&pt);
            assert_ok(kms_unwrap(f->k, &f->app, name, s->toks[i][ver].data, s->toks[i][ver].len,
                                 (const uint8_t *)"ctx", 3, &pt, &v));
            assert_int_equal(v, ver + 1);
            assert_int_equal(pt.len, strlen(name));
            assert_memory_equal(pt.data, name, pt.len);
        }
    }
    for (int ver = 0; ver < VERSIONS; ver++) {
        bool valid = false;
        assert_ok(kms_verify(f->k, &f->app, "m-mac", (const uint8_t *)"m", 1, s->macs[ver].data,
                             s->macs[ver].len, &valid, &v));
        assert_true(valid);
    }
}

static size_t token_masters(kms_fx *f)
{
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t n = 0;
    assert_ok(kms_hsm_master_list(kms_hsm_of(f->k), &ids, &n));
    free(ids);
    return n;
}

static void expect_masters(kms_fx *f, uint32_t current, size_t total)
{
    kms_master_info *m = NULL;
    size_t n = 0;
    assert_ok(kms_master_list(f->k, &m, &n));
    assert_int_equal(n, total);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(m[i].version, i + 1);
        if (m[i].version == current) {
            assert_true(m[i].current);
            assert_int_equal(m[i].retired_at, 0);
            assert_int_equal(m[i].versions_wrapped, KEYS * VERSIONS + VERSIONS);
        } else {
            assert_false(m[i].current);
            assert_true(m[i].retired_at != 0);
            assert_int_equal(m[i].versions_wrapped, 0);
        }
    }
    free(m);
    assert_int_equal(token_masters(f), 1);
}

/* Exactly `total` master rotation records, every one succeeded. */
static void expect_master_rotations_succeeded(kms_fx *f, size_t total)
{
    kms_rotation_filter flt = {.type = KMS_ROTATION_MASTER};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &flt, &list, &n));
    assert_int_equal(n, total);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(list[i].status, KMS_ROTATION_SUCCEEDED);
    free(list);
}

static void test_rotate(void **state)
{
    mstate *s = *state;
    kms_fx *f = s->f;
    all_readable(s);
    expect_masters(f, 1, 1);
    kms_rotation_info ri;
    f->now += 100;
    assert_ok(kms_master_rotate(f->k, &f->admin, "yearly", &ri));
    assert_int_equal(ri.type, KMS_ROTATION_MASTER);
    assert_int_equal(ri.status, KMS_ROTATION_SUCCEEDED);
    assert_int_equal(ri.from_version, 1);
    assert_int_equal(ri.to_version, 2);
    assert_string_equal(ri.key, "");
    expect_masters(f, 2, 2);
    all_readable(s);
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "mk-07", 2, &vi));
    assert_int_equal(vi.master_version, 2);
    /* New keys land under the new master too. */
    kms_fx_key(f, "after-rotation", KMS_PURPOSE_ENCRYPT);
    assert_ok(kms_version_get(f->k, "after-rotation", 1, &vi));
    assert_int_equal(vi.master_version, 2);
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
}

static void test_interrupted_then_called_again(void **state)
{
    mstate *s = *state;
    kms_fx *f = s->f;
    kms_fault_reset();
    /* The HSM starts failing after 60 rewraps (each rewrap wraps once). */
    kms_fault_arm_sticky("C_WrapKey", 61, CKR_GENERAL_ERROR);
    kms_rotation_info ri;
    kms_result r = kms_master_rotate(f->k, &f->admin, "interrupted", &ri);
    assert_false(kms_is_ok(r));
    kms_fault_disarm();
    /* Mid-way: two masters on the token, everything still readable. */
    assert_int_equal(token_masters(f), 2);
    all_readable(s);
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 1); /* the interrupted rotation */
    assert_ok(kms_master_rotate(f->k, &f->admin, NULL, &ri));
    assert_int_equal(ri.to_version, 3);
    assert_int_equal(ri.status, KMS_ROTATION_SUCCEEDED);
    kms_master_info *m = NULL;
    size_t n = 0;
    assert_ok(kms_master_list(f->k, &m, &n));
    assert_int_equal(n, 3);
    assert_true(m[2].current);
    free(m);
    assert_int_equal(token_masters(f), 1);
    all_readable(s);
}

static void test_interrupted_then_reopen(void **state)
{
    mstate *s = *state;
    kms_fx *f = s->f;
    kms_fault_reset();
    kms_fault_arm_sticky("C_WrapKey", 30, CKR_GENERAL_ERROR);
    kms_rotation_info ri;
    assert_false(kms_is_ok(kms_master_rotate(f->k, &f->admin, NULL, &ri)));
    kms_fault_disarm();
    /* kms_open finishes it. */
    kms_fx_reopen(f);
    kms_master_info *m = NULL;
    size_t n = 0;
    assert_ok(kms_master_list(f->k, &m, &n));
    assert_int_equal(n, 4);
    assert_true(m[3].current);
    free(m);
    assert_int_equal(token_masters(f), 1);
    all_readable(s);
    expect_master_rotations_succeeded(f, 3);
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
}

static void test_rotation_hsm_failure_is_clean(void **state)
{
    mstate *s = *state;
    kms_fx *f = s->f;
    /* A key rotation whose generation fails: clean error, record failed,
     * no new version. */
    kms_fault_reset();
    kms_fault_arm_sticky("C_GenerateKey", 1, CKR_GENERAL_ERROR);
    kms_rotation_info ri;
    kms_result r = kms_key_rotate(f->k, &f->admin, "mk-01", KMS_ROTATION_MANUAL, NULL, &ri);
    kms_fault_disarm();
    assert_false(kms_is_ok(r));
    kms_key_info ki;
    assert_ok(kms_key_get(f->k, "mk-01", &ki));
    assert_int_equal(ki.latest_version, VERSIONS);
    kms_rotation_filter flt = {.key = "mk-01", .status = KMS_ROTATION_FAILED};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_ok(kms_rotations_list(f->k, &flt, &list, &n));
    assert_int_equal(n, 1);
    free(list);
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
    all_readable(s);
}

/* A process that joined a master rotation (target 5) stalls in the middle
 * of a pass; meanwhile another process finishes that rotation and runs the
 * next one (to 6), retiring and destroying master 5. When the first wakes,
 * its part must end at once without moving anything: a version under 6
 * moved back under 5 would be wrapped under a destroyed master. The stall
 * is the fault module's delay on the late process's 10th C_WrapKey; the
 * other process is this one. The late process used to grind through the
 * rest of its pass and up to 64 more, each version waiting out the token
 * search's settling time for masters that were gone (kms_multiproc_test
 * found it). */
static void test_late_joiner_after_next_rotation(void **state)
{
    mstate *s = *state;
    kms_fx *f = s->f;
    kms_close(f->k); /* the child opens its own: no store or module inherited */
    f->k = NULL;
    kms_fault_reset();
    kms_fault_arm("C_WrapKey", 10, 0, 4000);
    pid_t late = fork();
    assert_true(late >= 0);
    if (late == 0) {
        kms *k = NULL;
        int rc = 1;
        kms_result r = kms_open(&f->cfg, &k);
        if (kms_is_ok(r)) {
            kms_rotation_info ri;
            r = kms_master_rotate(k, &f->admin, "late joiner", &ri);
            rc = kms_is_ok(r) ? 0 : 2;
            kms_close(k);
        }
        if (!kms_is_ok(r))
            fprintf(stderr, "late process: %s (%s)\n", kms_error_code(r.err), kms_error_detail());
        _exit(rc);
    }
    /* Wait until the late process is stalled inside its pass. */
    for (int i = 0; i < 3000 && kms_fault_fired() == 0; i++)
        usleep(10 * 1000);
    bool stalled = kms_fault_fired() == 1;
    kms *other = NULL;
    kms_result r = stalled ? kms_open(&f->cfg, &other) : KMS_OK_RESULT;
    kms_rotation_info ri = {0};
    if (stalled && kms_is_ok(r))
        r = kms_master_rotate(other, &f->admin, "next", &ri);
    kms_close(other);
    /* The late process wakes after its delay and must finish promptly. */
    int status = 0;
    pid_t got = 0;
    for (int i = 0; i < 600 && got == 0; i++) {
        got = waitpid(late, &status, WNOHANG);
        if (got == 0)
            usleep(100 * 1000);
    }
    if (got == 0) {
        (void)kill(late, SIGKILL);
        (void)waitpid(late, &status, 0);
        fail_msg("the late process did not end within 60 s of its stall");
    }
    assert_true(stalled);
    assert_ok(r);
    assert_int_equal(ri.to_version, 6);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);

    assert_ok(kms_open(&f->cfg, &f->k));
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
    /* Every version under master 6; 5 and older retired and off the token. */
    kms_master_info *m = NULL;
    size_t n = 0;
    assert_ok(kms_master_list(f->k, &m, &n));
    assert_int_equal(n, 6);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(m[i].current, m[i].version == 6);
        assert_int_equal(m[i].versions_wrapped, m[i].version == 6 ? rep.versions : 0);
    }
    free(m);
    assert_int_equal(token_masters(f), 1);
    all_readable(s);
    /* The late joiner's rotation (to 5) and the next (to 6) succeeded, as
     * the three before them. */
    expect_master_rotations_succeeded(f, 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rotate),
        cmocka_unit_test(test_interrupted_then_called_again),
        cmocka_unit_test(test_interrupted_then_reopen),
        cmocka_unit_test(test_rotation_hsm_failure_is_clean),
        cmocka_unit_test(test_late_joiner_after_next_rotation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
