/*
 * HSM torture at the domain level (label hsm-fault).
 *
 * For each scenario (key create, rotate, master rotation over a handful of
 * keys, wrap, datakey, unwrap, rewrap) the test first counts the PKCS#11 calls the
 * scenario makes through the fault-injecting module, then re-runs it once
 * per call i = 1..N with call i failing with CKR_DEVICE_ERROR (for the data
 * operations, a second pass with CKR_SESSION_HANDLE_INVALID), in two shapes:
 *   - sticky: every call from the ith on fails, as when the device goes
 *     away, so the HSM layer's single retry after recovery fails too and the
 *     domain's own error paths run. The operation must fail with a clean HSM
 *     error of the table (never invalid_token, key_not_found or internal),
 *     unless the calls from i on were only best-effort clean-up (destroying
 *     a temporary or a retired object): then its result must be right;
 *   - one-shot: only call i fails; the HSM layer may absorb it by its
 *     documented retry after recovery, and then the result must be right.
 * After every faulted run:
 *   - LMDB is unchanged or holds the complete new state (kms_key_get and
 *     kms_key_versions compared with the snapshot taken before), and no
 *     rotation record is left `started` (a master rotation cut short may stay
 *     pending until the next call finishes it, as kms.h documents);
 *   - after disarming, the same operation succeeds (waiting out the HSM
 *     layer's recovery back-off, bounded), a master rotation leaves every
 *     version under the one current master and no stray object on the token
 *     (kms_check repairs what a failed best-effort destroy left), and every
 *     token made before still unwraps to its plaintext.
 * Each run uses a fresh kms_open, so the call sequence (cold handle cache,
 * fresh sessions) is the same in the counting run and the faulted runs.
 * ASan's leak checker covers the error paths (the suite runs it with
 * detect_leaks=1).
 *
 * Shape after curl's `runtests -t` torture mode.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms.h"
#include "kms_fault.h"
#include "kms_rand.h"
#include "kms_test_hsm.h"
#include "stress_util.h"

/* Faulted runs per scenario and pass: every call when the scenario makes at
 * most this many, otherwise this many evenly spread over 1..N (first and last
 * included). The sanitizer build is slower, so it samples more sparsely and
 * has a longer budget; the budget stops the test early (with a message)
 * rather than letting it run away. */
#ifdef KMS_SANITIZE
#define TORTURE_MAX_POINTS 40
#define TORTURE_BUDGET_S   90.0
#else
#define TORTURE_MAX_POINTS 64
#define TORTURE_BUDGET_S   50.0
#endif

#define KNOWN_MAX        48
#define MASTER_KEYS      5
#define RETRY_DEADLINE_S 10.0

static const kms_caller caller = {.identity = "stress-torture", .request_id = "torture"};

typedef struct {
    char key[KMS_KEY_NAME_MAX_BYTES + 1];
    uint8_t pt[32];
    uint8_t ctx[8];
    kms_buf token;
} known_token;

typedef struct {
    kms_test_token t;
    char store[400];
    kms_config cfg;
    kms *k;
    known_token known[KNOWN_MAX];
    size_t n_known;
    /* fixtures made once */
    kms_buf v1_token; /* under "data" version 1 (for rewrap) */
    uint8_t v1_pt[32];
    kms_buf cur_token; /* under "data" primary (for unwrap) */
    uint8_t cur_pt[32];
    double started;
    /* Sticky: every call from the ith on fails (the device went away), so
     * the HSM layer's one retry after recovery fails too and the domain's
     * own error paths run. One-shot: only call i fails, which the HSM
     * layer may absorb by that retry. */
    bool sticky;
    unsigned runs, absorbed, not_reached;
    size_t leftovers; /* token objects kms_check had to clean up */
} torture;

static const uint8_t fixed_ctx[8] = {'t', 'o', 'r', 't', 'u', 'r', 'e', '!'};

/* ---- helpers ---- */

static void tt_open(torture *T)
{
    kms_result r = kms_open(&T->cfg, &T->k);
    if (!kms_is_ok(r)) {
        fail_msg("kms_open: %s (%s at %s)", kms_error_code(r.err), kms_error_detail(),
                 kms_error_location());
    }
}

static void tt_close(torture *T)
{
    kms_close(T->k);
    T->k = NULL;
}

static bool tt_sticky; /* mirrors torture.sticky for tt_arm */

static void tt_arm(unsigned long ckr, uint64_t fail_at)
{
    kms_fault_reset();
    if (fail_at > 0 && tt_sticky) {
        kms_fault_arm_sticky(NULL, fail_at, ckr);
    } else if (fail_at > 0) {
        kms_fault_arm(NULL, fail_at, ckr, 0);
    }
}

/* What a faulted run may answer: the HSM errors of the table. A device or
 * session fault must never surface as a verdict about the caller's data
 * (invalid_token), a missing key, or an internal error. */
static void tt_assert_clean_error(const char *what, uint64_t i, unsigned long ckr, kms_result r)
{
    switch (r.err) {
    case KMS_ERR_HSM_UNAVAILABLE:
    case KMS_ERR_HSM_BUSY:
    case KMS_ERR_HSM_FAILED:
        return;
    default:
        fail_msg("%s: fault 0x%lx at call %llu gave %s (%s at %s), expected an HSM error", what,
                 ckr, (unsigned long long)i, kms_error_code(r.err), kms_error_detail(),
                 kms_error_location());
    }
}

/* No rotation record left `started`. allow_master: a master rotation cut
 * short by the HSM is by design left pending, to be finished by the next
 * kms_master_rotate or kms_open (kms.h), so its one record may stay
 * `started` until then. */
static void tt_started_rotations(torture *T, bool allow_master)
{
    kms_rotation_filter f = {.status = KMS_ROTATION_STARTED};
    kms_rotation_info *list = NULL;
    size_t n = 0;
    assert_true(kms_is_ok(kms_rotations_list(T->k, &f, &list, &n)));
    bool ok = n == 0 || (allow_master && n == 1 && list[0].type == KMS_ROTATION_MASTER);
    if (!ok) {
        fail_msg("%zu rotation record(s) left `started` (first: key '%s' %u->%u)", n, list[0].key,
                 list[0].from_version, list[0].to_version);
    }
    free(list);
}

static void tt_no_started_rotations(torture *T)
{
    tt_started_rotations(T, false);
}

static void tt_unwrap_expect(torture *T, const char *key, const uint8_t *tok, size_t tok_len,
                             const uint8_t *pt, size_t pt_len, const uint8_t *ctx, size_t ctx_len)
{
    kms_buf out;
    kms_buf_init_secret(&out, 0);
    uint32_t v = 0;
    kms_result r = kms_unwrap(T->k, &caller, key, tok, tok_len, ctx, ctx_len, &out, &v);
    if (!kms_is_ok(r)) {
        kms_buf_free(&out);
        fail_msg("unwrap of a token of '%s' failed: %s (%s)", key, kms_error_code(r.err),
                 kms_error_detail());
    }
    assert_int_equal(out.len, pt_len);
    assert_memory_equal(out.data, pt, pt_len);
    kms_buf_free(&out);
}

static void tt_check_known(torture *T)
{
    for (size_t i = 0; i < T->n_known; i++) {
        known_token *kt = &T->known[i];
        tt_unwrap_expect(T, kt->key, kt->token.data, kt->token.len, kt->pt, sizeof(kt->pt), kt->ctx,
                         sizeof(kt->ctx));
    }
}

/* Wraps a fresh random DEK under key and remembers it (bounded list). */
static void tt_wrap_remember(torture *T, const char *key)
{
    known_token *kt = &T->known[T->n_known < KNOWN_MAX ? T->n_known : KNOWN_MAX - 1];
    if (T->n_known == KNOWN_MAX) {
        kms_buf_free(&kt->token);
    }
    snprintf(kt->key, sizeof(kt->key), "%s", key);
    assert_true(kms_is_ok(kms_rand_bytes(kt->pt, sizeof(kt->pt))));
    assert_true(kms_is_ok(kms_rand_bytes(kt->ctx, sizeof(kt->ctx))));
    kms_buf_init(&kt->token, 0);
    uint32_t v = 0;
    kms_result r = kms_wrap(T->k, &caller, key, kt->pt, sizeof(kt->pt), kt->ctx, sizeof(kt->ctx),
                            &kt->token, &v);
    if (!kms_is_ok(r)) {
        fail_msg("wrap under '%s': %s (%s)", key, kms_error_code(r.err), kms_error_detail());
    }
    if (T->n_known < KNOWN_MAX) {
        T->n_known++;
    }
}

/* Runs op until it succeeds, waiting out the HSM layer's recovery back-off
 * (transient errors only), within RETRY_DEADLINE_S. */
#define TT_RETRY(what, expr)                                                                   \
    do {                                                                                       \
        double tt_deadline_ = stress_now_s() + RETRY_DEADLINE_S;                               \
        for (;;) {                                                                             \
            kms_result tt_r_ = (expr);                                                         \
            if (kms_is_ok(tt_r_))                                                              \
                break;                                                                         \
            if (!kms_error_is_transient(tt_r_.err) || stress_now_s() > tt_deadline_)           \
                fail_msg("%s after disarming: %s (%s at %s)", what, kms_error_code(tt_r_.err), \
                         kms_error_detail(), kms_error_location());                            \
            struct timespec tt_ts_ = {0, 20 * 1000 * 1000};                                    \
            nanosleep(&tt_ts_, NULL);                                                          \
        }                                                                                      \
    } while (0)

static void tt_snap(torture *T, const char *key, stress_key_snap *s)
{
    kms_result r = stress_key_snap_take(T->k, key, s);
    if (!kms_is_ok(r)) {
        fail_msg("snapshot of '%s': %s (%s)", key, kms_error_code(r.err), kms_error_detail());
    }
}

/* After a faulted data operation the key's durable state must not move. */
static void tt_assert_unchanged(torture *T, const char *key, const stress_key_snap *before)
{
    stress_key_snap after;
    tt_snap(T, key, &after);
    bool same = stress_key_same(before, &after, false);
    stress_key_snap_free(&after);
    assert_true(same);
}

/* The result of a faulted run: returns true if the operation reported
 * success (then the caller checks its output). */
static bool tt_outcome(torture *T, const char *what, uint64_t i, unsigned long ckr, kms_result r)
{
    uint64_t fired = kms_fault_fired();
    kms_fault_disarm();
    if (i == 0) { /* the counting run */
        if (!kms_is_ok(r)) {
            fail_msg("%s without a fault: %s (%s at %s)", what, kms_error_code(r.err),
                     kms_error_detail(), kms_error_location());
        }
        return true;
    }
    T->runs++;
    if (fired == 0) {
        /* The run made fewer calls than the counting run; nothing was
         * injected, so it must simply have worked. */
        T->not_reached++;
        if (!kms_is_ok(r)) {
            fail_msg("%s: no fault fired (i=%llu) yet it failed: %s", what, (unsigned long long)i,
                     kms_error_code(r.err));
        }
        return true;
    }
    if (kms_is_ok(r)) {
        /* One-shot: absorbed by the HSM layer's retry. Sticky: the calls
         * from i on were best-effort clean-up (destroying a temporary or a
         * retired object). Either way the caller checks the output. */
        T->absorbed++;
        return true;
    }
    tt_assert_clean_error(what, i, ckr, r);
    return false;
}

/* ---- scenarios. Each returns the PKCS#11 calls its operation made. ---- */

static uint64_t scen_create(torture *T, unsigned long ckr, uint64_t i)
{
    char name[64];
    static unsigned seq;
    snprintf(name, sizeof(name), "create-%u-%lx-%llu", seq++, ckr, (unsigned long long)i);
    kms_key_spec spec = {.name = name, .purpose = KMS_PURPOSE_ENCRYPT};
    kms_key_info info;

    tt_arm(ckr, i);
    kms_result r = kms_key_create(T->k, &caller, &spec, &info);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "create", i, ckr, r);

    stress_key_snap s;
    tt_snap(T, name, &s);
    if (ok) {
        assert_true(s.exists);
    }
    if (s.exists) { /* complete: one version, primary, active */
        assert_int_equal(s.info.primary_version, 1);
        assert_int_equal(s.info.latest_version, 1);
        assert_int_equal(s.n, 1);
        assert_int_equal(s.versions[0].version, 1);
        assert_int_equal(s.versions[0].state, KMS_VERSION_ACTIVE);
    }
    bool existed = s.exists;
    stress_key_snap_free(&s);
    tt_no_started_rotations(T);

    if (!existed) {
        TT_RETRY("create", kms_key_create(T->k, &caller, &spec, &info));
    }
    tt_wrap_remember(T, name);
    return calls;
}

static uint64_t scen_rotate(torture *T, unsigned long ckr, uint64_t i)
{
    const char *name = "rot";
    stress_key_snap before, after;
    kms_rotation_info rot;
    tt_snap(T, name, &before);
    assert_true(before.exists);

    tt_arm(ckr, i);
    kms_result r = kms_key_rotate(T->k, &caller, name, KMS_ROTATION_MANUAL, "torture", &rot);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "rotate", i, ckr, r);

    tt_snap(T, name, &after);
    bool unchanged = stress_key_same(&before, &after, false);
    bool complete = after.n == before.n + 1 &&
                    after.info.latest_version == before.info.latest_version + 1 &&
                    after.info.primary_version == after.info.latest_version &&
                    after.versions[after.n - 1].version == after.info.latest_version &&
                    after.versions[after.n - 1].state == KMS_VERSION_ACTIVE;
    for (size_t v = 0; complete && v < before.n; v++) {
        complete = stress_version_same(&before.versions[v], &after.versions[v], false);
    }
    if (!(unchanged || complete) || (ok && !complete)) {
        fail_msg("rotate, fault at call %llu (%s): LMDB neither unchanged nor complete "
                 "(versions %zu -> %zu, primary %u -> %u)",
                 (unsigned long long)i, ok ? "reported ok" : kms_error_code(r.err), before.n,
                 after.n, before.info.primary_version, after.info.primary_version);
    }
    stress_key_snap_free(&before);
    stress_key_snap_free(&after);
    tt_no_started_rotations(T);

    TT_RETRY("rotate", kms_key_rotate(T->k, &caller, name, KMS_ROTATION_MANUAL, "torture", &rot));
    tt_no_started_rotations(T);
    tt_wrap_remember(T, name);
    return calls;
}

/* Every key of the store, in name order. */
static size_t tt_all_keys(torture *T, kms_key_info **keys)
{
    size_t n = 0;
    assert_true(kms_is_ok(stress_key_list_all(T->k, keys, &n)));
    return n;
}

static bool tt_master_known(const kms_master_info *m, size_t n, uint32_t version)
{
    for (size_t i = 0; i < n; i++) {
        if (m[i].version == version) {
            return true;
        }
    }
    return false;
}

/* After a successful master rotation: one current master, every version
 * wrapped under it, and the token holds exactly the masters LMDB still
 * uses (no orphan left by the faulted attempt). */
static void tt_assert_master_complete(torture *T)
{
    kms_master_info *m = NULL;
    size_t nm = 0;
    assert_true(kms_is_ok(kms_master_list(T->k, &m, &nm)));
    uint32_t current = 0;
    size_t live = 0, currents = 0;
    for (size_t i = 0; i < nm; i++) {
        if (m[i].current) {
            current = m[i].version;
            currents++;
        }
        if (m[i].retired_at == 0) {
            live++;
        }
    }
    free(m);
    assert_int_equal(currents, 1);

    kms_key_info *keys = NULL;
    size_t nk = tt_all_keys(T, &keys);
    for (size_t i = 0; i < nk; i++) {
        kms_version_info *v = NULL;
        size_t nv = 0;
        assert_true(kms_is_ok(kms_key_versions(T->k, keys[i].name, &v, &nv)));
        for (size_t j = 0; j < nv; j++) {
            if (v[j].state != KMS_VERSION_DESTROYED && v[j].master_version != current) {
                fail_msg("key '%s' v%u still under master %u, current is %u", keys[i].name,
                         v[j].version, v[j].master_version, current);
            }
        }
        free(v);
    }
    free(keys);

    /* A fault in a best-effort step (destroying the retired master) may
     * leave its object on the token; kms_check finds and removes it. */
    kms_check_report rep;
    memset(&rep, 0, sizeof(rep));
    assert_true(kms_is_ok(kms_check(T->k, false, &rep)));
    if (rep.problems > 0) {
        T->leftovers += rep.problems;
        memset(&rep, 0, sizeof(rep));
        assert_true(kms_is_ok(kms_check(T->k, true, &rep)));
        memset(&rep, 0, sizeof(rep));
        assert_true(kms_is_ok(kms_check(T->k, false, &rep)));
        if (rep.problems != 0) {
            fail_msg("kms_check repair left %zu problem(s): %s", rep.problems, rep.summary);
        }
    }
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t nids = 0;
    assert_true(kms_is_ok(kms_hsm_master_list(kms_hsm_of(T->k), &ids, &nids)));
    free(ids);
    if (nids != live) {
        fail_msg("token holds %zu master objects, LMDB has %zu masters in use", nids, live);
    }
}

static uint64_t scen_master(torture *T, unsigned long ckr, uint64_t i)
{
    kms_key_info *keys = NULL;
    size_t nk = tt_all_keys(T, &keys);
    stress_key_snap *before = calloc(nk, sizeof(*before));
    assert_non_null(before);
    for (size_t j = 0; j < nk; j++) {
        tt_snap(T, keys[j].name, &before[j]);
    }
    kms_rotation_info rot;

    tt_arm(ckr, i);
    kms_result r = kms_master_rotate(T->k, &caller, "torture", &rot);
    uint64_t calls = kms_fault_calls();
    (void)tt_outcome(T, "master rotate", i, ckr, r);

    /* Interrupted or not, every key and version is as before except the
     * master each version is wrapped under, which must name a master LMDB
     * knows. */
    kms_master_info *m = NULL;
    size_t nm = 0;
    assert_true(kms_is_ok(kms_master_list(T->k, &m, &nm)));
    for (size_t j = 0; j < nk; j++) {
        stress_key_snap after;
        tt_snap(T, keys[j].name, &after);
        if (!stress_key_same(&before[j], &after, true)) {
            fail_msg("master rotate, fault at call %llu: key '%s' changed", (unsigned long long)i,
                     keys[j].name);
        }
        for (size_t v = 0; v < after.n; v++) {
            assert_true(tt_master_known(m, nm, after.versions[v].master_version));
        }
        stress_key_snap_free(&after);
        stress_key_snap_free(&before[j]);
    }
    free(m);
    free(before);
    free(keys);
    tt_started_rotations(T, true);

    TT_RETRY("master rotate", kms_master_rotate(T->k, &caller, "torture", &rot));
    tt_no_started_rotations(T);
    tt_assert_master_complete(T);
    return calls;
}

static uint64_t scen_wrap(torture *T, unsigned long ckr, uint64_t i)
{
    stress_key_snap before;
    tt_snap(T, "data", &before);
    uint8_t pt[32];
    assert_true(kms_is_ok(kms_rand_bytes(pt, sizeof(pt))));
    kms_buf tok;
    kms_buf_init(&tok, 0);
    uint32_t v = 0;

    tt_arm(ckr, i);
    kms_result r =
        kms_wrap(T->k, &caller, "data", pt, sizeof(pt), fixed_ctx, sizeof(fixed_ctx), &tok, &v);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "wrap", i, ckr, r);
    if (ok) {
        assert_int_equal(v, before.info.primary_version);
        tt_unwrap_expect(T, "data", tok.data, tok.len, pt, sizeof(pt), fixed_ctx,
                         sizeof(fixed_ctx));
    } else {
        assert_int_equal(tok.len, 0);
    }
    tt_assert_unchanged(T, "data", &before);
    stress_key_snap_free(&before);

    kms_buf_reset(&tok);
    TT_RETRY("wrap", kms_wrap(T->k, &caller, "data", pt, sizeof(pt), fixed_ctx, sizeof(fixed_ctx),
                              &tok, &v));
    tt_unwrap_expect(T, "data", tok.data, tok.len, pt, sizeof(pt), fixed_ctx, sizeof(fixed_ctx));
    kms_buf_free(&tok);
    return calls;
}

/* datakey: the HSM's RNG (C_GenerateRandom) and then a wrap. */
static uint64_t scen_datakey(torture *T, unsigned long ckr, uint64_t i)
{
    stress_key_snap before;
    tt_snap(T, "data", &before);
    kms_buf tok, pt;
    kms_buf_init(&tok, 0);
    kms_buf_init_secret(&pt, 0);
    uint32_t v = 0;

    tt_arm(ckr, i);
    kms_result r =
        kms_datakey(T->k, &caller, "data", 32, fixed_ctx, sizeof(fixed_ctx), &tok, &pt, &v);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "datakey", i, ckr, r);
    if (ok) {
        assert_int_equal(pt.len, 32);
        tt_unwrap_expect(T, "data", tok.data, tok.len, pt.data, pt.len, fixed_ctx,
                         sizeof(fixed_ctx));
    } else {
        assert_int_equal(tok.len, 0);
        assert_int_equal(pt.len, 0);
    }
    tt_assert_unchanged(T, "data", &before);
    stress_key_snap_free(&before);

    kms_buf_reset(&tok);
    kms_buf_reset(&pt);
    TT_RETRY("datakey",
             kms_datakey(T->k, &caller, "data", 32, fixed_ctx, sizeof(fixed_ctx), &tok, &pt, &v));
    tt_unwrap_expect(T, "data", tok.data, tok.len, pt.data, pt.len, fixed_ctx, sizeof(fixed_ctx));
    kms_buf_free(&tok);
    kms_buf_free(&pt);
    return calls;
}

static uint64_t scen_unwrap(torture *T, unsigned long ckr, uint64_t i)
{
    stress_key_snap before;
    tt_snap(T, "data", &before);
    kms_buf out;
    kms_buf_init_secret(&out, 0);
    uint32_t v = 0;

    tt_arm(ckr, i);
    kms_result r = kms_unwrap(T->k, &caller, "data", T->cur_token.data, T->cur_token.len, fixed_ctx,
                              sizeof(fixed_ctx), &out, &v);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "unwrap", i, ckr, r);
    if (ok) {
        assert_int_equal(out.len, sizeof(T->cur_pt));
        assert_memory_equal(out.data, T->cur_pt, sizeof(T->cur_pt));
    } else {
        assert_int_equal(out.len, 0);
    }
    tt_assert_unchanged(T, "data", &before);
    stress_key_snap_free(&before);

    kms_buf_reset(&out);
    TT_RETRY("unwrap", kms_unwrap(T->k, &caller, "data", T->cur_token.data, T->cur_token.len,
                                  fixed_ctx, sizeof(fixed_ctx), &out, &v));
    assert_int_equal(out.len, sizeof(T->cur_pt));
    assert_memory_equal(out.data, T->cur_pt, sizeof(T->cur_pt));
    kms_buf_free(&out);
    return calls;
}

static uint64_t scen_rewrap(torture *T, unsigned long ckr, uint64_t i)
{
    stress_key_snap before;
    tt_snap(T, "data", &before);
    kms_buf out;
    kms_buf_init(&out, 0);
    uint32_t from = 0, to = 0;
    bool changed = false;

    tt_arm(ckr, i);
    kms_result r = kms_rewrap(T->k, &caller, "data", T->v1_token.data, T->v1_token.len, fixed_ctx,
                              sizeof(fixed_ctx), &out, &from, &to, &changed);
    uint64_t calls = kms_fault_calls();
    bool ok = tt_outcome(T, "rewrap", i, ckr, r);
    if (ok) {
        assert_true(changed);
        assert_int_equal(from, 1);
        assert_int_equal(to, before.info.primary_version);
        tt_unwrap_expect(T, "data", out.data, out.len, T->v1_pt, sizeof(T->v1_pt), fixed_ctx,
                         sizeof(fixed_ctx));
    } else {
        assert_int_equal(out.len, 0);
    }
    tt_assert_unchanged(T, "data", &before);
    stress_key_snap_free(&before);

    kms_buf_reset(&out);
    TT_RETRY("rewrap", kms_rewrap(T->k, &caller, "data", T->v1_token.data, T->v1_token.len,
                                  fixed_ctx, sizeof(fixed_ctx), &out, &from, &to, &changed));
    assert_true(changed);
    tt_unwrap_expect(T, "data", out.data, out.len, T->v1_pt, sizeof(T->v1_pt), fixed_ctx,
                     sizeof(fixed_ctx));
    kms_buf_free(&out);
    return calls;
}

/* ---- driver ---- */

typedef uint64_t (*scenario_fn)(torture *T, unsigned long ckr, uint64_t i);

static uint64_t tt_once(torture *T, scenario_fn fn, unsigned long ckr, uint64_t i)
{
    tt_open(T);
    uint64_t calls = fn(T, ckr, i);
    tt_check_known(T);
    tt_close(T);
    return calls;
}

static void tt_torture_pass(torture *T, const char *name, scenario_fn fn, unsigned long ckr,
                            bool sticky)
{
    double t0 = stress_now_s();
    T->sticky = tt_sticky = false;
    uint64_t n = tt_once(T, fn, 0, 0);
    assert_true(n > 0);
    T->sticky = tt_sticky = sticky;
    uint64_t points = n <= TORTURE_MAX_POINTS ? n : TORTURE_MAX_POINTS;
    unsigned before_runs = T->runs, before_abs = T->absorbed, before_nr = T->not_reached;
    for (uint64_t p = 0; p < points; p++) {
        uint64_t i = points == n ? p + 1 : 1 + p * (n - 1) / (points - 1);
        if (stress_now_s() - T->started > TORTURE_BUDGET_S) {
            print_message("torture: time budget of %.0f s reached in %s; stopping early\n",
                          TORTURE_BUDGET_S, name);
            break;
        }
        (void)tt_once(T, fn, ckr, i);
    }
    T->sticky = tt_sticky = false;
    print_message("torture %-13s %-8s ckr=0x%03lx: %3llu calls, %3u faulted runs (%u succeeded "
                  "anyway, %u not reached) in %.2f s\n",
                  name, sticky ? "sticky" : "one-shot", ckr, (unsigned long long)n,
                  T->runs - before_runs, T->absorbed - before_abs, T->not_reached - before_nr,
                  stress_now_s() - t0);
}

/* Both fault shapes for one scenario and CK_RV. */
static void tt_torture(torture *T, const char *name, scenario_fn fn, unsigned long ckr)
{
    tt_torture_pass(T, name, fn, ckr, true);
    tt_torture_pass(T, name, fn, ckr, false);
}

static int setup(void **state)
{
    torture *T = calloc(1, sizeof(*T));
    if (T == NULL || kms_test_token_setup(&T->t, true) != 0) {
        free(T);
        return -1;
    }
    snprintf(T->store, sizeof(T->store), "%s/store", T->t.dir);
    if (stress_mkdir(T->store) != 0) {
        return -1;
    }
    stress_config_init(&T->cfg, T->store, &T->t.cfg);
    T->started = stress_now_s();
    *state = T;
    return 0;
}

static int teardown(void **state)
{
    torture *T = *state;
    if (T->k != NULL) {
        kms_close(T->k);
    }
    for (size_t i = 0; i < T->n_known; i++) {
        kms_buf_free(&T->known[i].token);
    }
    kms_buf_free(&T->v1_token);
    kms_buf_free(&T->cur_token);
    kms_test_token_teardown(&T->t);
    free(T);
    return 0;
}

static void create_key(torture *T, const char *name, unsigned rotations)
{
    kms_key_spec spec = {.name = name, .purpose = KMS_PURPOSE_ENCRYPT};
    kms_key_info info;
    kms_rotation_info rot;
    assert_true(kms_is_ok(kms_key_create(T->k, &caller, &spec, &info)));
    for (unsigned i = 0; i < rotations; i++) {
        assert_true(
            kms_is_ok(kms_key_rotate(T->k, &caller, name, KMS_ROTATION_MANUAL, "fixture", &rot)));
    }
}

static void test_torture(void **state)
{
    torture *T = *state;
    const unsigned long dev = CKR_DEVICE_ERROR, sess = CKR_SESSION_HANDLE_INVALID;

    /* Fixtures: "rot" for rotations; "data" with a token under version 1
     * and one under version 2 (primary); MASTER_KEYS keys of two versions
     * each for the master rotation. */
    tt_open(T);
    create_key(T, "rot", 0);
    create_key(T, "data", 0);
    uint32_t v = 0;
    kms_buf_init(&T->v1_token, 0);
    kms_buf_init(&T->cur_token, 0);
    assert_true(kms_is_ok(kms_rand_bytes(T->v1_pt, sizeof(T->v1_pt))));
    assert_true(kms_is_ok(kms_rand_bytes(T->cur_pt, sizeof(T->cur_pt))));
    assert_true(kms_is_ok(kms_wrap(T->k, &caller, "data", T->v1_pt, sizeof(T->v1_pt), fixed_ctx,
                                   sizeof(fixed_ctx), &T->v1_token, &v)));
    assert_int_equal(v, 1);
    kms_rotation_info rot;
    assert_true(
        kms_is_ok(kms_key_rotate(T->k, &caller, "data", KMS_ROTATION_MANUAL, "fixture", &rot)));
    assert_true(kms_is_ok(kms_wrap(T->k, &caller, "data", T->cur_pt, sizeof(T->cur_pt), fixed_ctx,
                                   sizeof(fixed_ctx), &T->cur_token, &v)));
    assert_int_equal(v, 2);
    tt_wrap_remember(T, "data");

    /* The master rotation rewraps every version of the store: run it while
     * the store is small (the keys above plus MASTER_KEYS of two versions
     * each) and settled, so each run does the same work. */
    for (int i = 0; i < MASTER_KEYS; i++) {
        char name[32];
        snprintf(name, sizeof(name), "master-%d", i);
        create_key(T, name, 0);
        tt_wrap_remember(T, name); /* a token under version 1 ... */
        assert_true(
            kms_is_ok(kms_key_rotate(T->k, &caller, name, KMS_ROTATION_MANUAL, "fixture", &rot)));
        tt_wrap_remember(T, name); /* ... and one under version 2 */
    }
    tt_close(T);
    tt_torture(T, "master-rotate", scen_master, dev);

    tt_torture(T, "wrap", scen_wrap, dev);
    tt_torture(T, "wrap", scen_wrap, sess);
    tt_torture(T, "datakey", scen_datakey, dev);
    tt_torture(T, "datakey", scen_datakey, sess);
    tt_torture(T, "unwrap", scen_unwrap, dev);
    tt_torture(T, "unwrap", scen_unwrap, sess);
    tt_torture(T, "rewrap", scen_rewrap, dev);
    tt_torture(T, "rewrap", scen_rewrap, sess);
    tt_torture(T, "create", scen_create, dev);
    tt_torture(T, "rotate", scen_rotate, dev);

    print_message("torture: %u faulted runs, %u succeeded anyway (absorbed or best-effort "
                  "step), %u not reached, %zu leftover token object(s) cleaned by kms_check, "
                  "%zu tokens re-checked after each run, %.1f s\n",
                  T->runs, T->absorbed, T->not_reached, T->leftovers, T->n_known,
                  stress_now_s() - T->started);
    assert_true(T->runs > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_torture, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
