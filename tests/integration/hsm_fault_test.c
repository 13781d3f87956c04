/*
 * hsm/ under injected PKCS#11 faults (libkmsfault.so in front of SoftHSM).
 *
 * Torture loop (after curl's runtests -t): count the PKCS#11 calls of a
 * scenario, then re-run it failing each call in turn with
 * CKR_DEVICE_ERROR. Every run must end in success (the layer recovered and
 * retried an idempotent operation) or a clean KMS_ERR_HSM_UNAVAILABLE,
 * leave no object behind, and the next operation must succeed.
 */
#define _GNU_SOURCE
#include "kms_fault.h"
#include "kms_hsm.h"
#include "kms_test_hsm.h"

#include <p11-kit/pkcs11.h>

#include <pthread.h>
#include <stdatomic.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#define OK(x)          assert_int_equal((x).err, KMS_OK)
#define FAILS(x, code) assert_int_equal((x).err, (code))

typedef struct {
    kms_test_token t;
    kms_hsm *hsm;
    uint8_t master[KMS_HSM_ID_BYTES];
    uint8_t master2[KMS_HSM_ID_BYTES];
    kms_buf blob;
    kms_hsm_key_ref ref;
    uint8_t nonce[KMS_HSM_NONCE_BYTES];
    uint8_t ct[32 + KMS_HSM_TAG_BYTES];
    size_t masters; /* master keys on the token */
} fixture;

static const uint8_t pt[32] = "thirty-two bytes of a data key!";

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(kms_test_token_setup(&f->t, true), 0);
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    OK(kms_hsm_master_create(f->hsm, f->master));
    OK(kms_hsm_master_create(f->hsm, f->master2));
    f->masters = 2;
    kms_buf_init(&f->blob, KMS_HSM_WRAPPED_MAX_BYTES);
    OK(kms_hsm_secret_generate(f->hsm, f->master, KMS_HSM_SECRET_AES256, &f->blob));
    memcpy(f->ref.master_id, f->master, KMS_HSM_ID_BYTES);
    f->ref.type = KMS_HSM_SECRET_AES256;
    f->ref.wrapped = f->blob.data;
    f->ref.wrapped_len = f->blob.len;
    OK(kms_hsm_random(f->hsm, f->ref.uid, sizeof(f->ref.uid)));
    OK(kms_hsm_aead_encrypt(f->hsm, &f->ref, f->nonce, NULL, 0, pt, sizeof(pt), f->ct));
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    kms_hsm_close(f->hsm);
    kms_buf_free(&f->blob);
    kms_test_token_teardown(&f->t);
    free(f);
    return 0;
}

/* Scenarios start from a cold cache for their own uid, so that each one
 * includes the unwrap. */
static void fresh_uid(fixture *f)
{
    kms_hsm_cache_evict(f->hsm, f->ref.uid);
    f->ref.uid[0]++;
}

static kms_result sc_encrypt(fixture *f)
{
    uint8_t ct[sizeof(f->ct)];
    return kms_hsm_aead_encrypt(f->hsm, &f->ref, f->nonce, NULL, 0, pt, sizeof(pt), ct);
}

static kms_result sc_decrypt(fixture *f)
{
    uint8_t out[sizeof(pt)];
    kms_result r =
        kms_hsm_aead_decrypt(f->hsm, &f->ref, f->nonce, NULL, 0, f->ct, sizeof(f->ct), out);
    if (kms_is_ok(r))
        assert_memory_equal(out, pt, sizeof(pt));
    return r;
}

static kms_result sc_mac(fixture *f)
{
    /* Uses an HMAC secret generated in the scenario itself. */
    kms_buf b;
    kms_buf_init(&b, KMS_HSM_WRAPPED_MAX_BYTES);
    kms_result r = kms_hsm_secret_generate(f->hsm, f->master, KMS_HSM_SECRET_HMAC256, &b);
    if (kms_is_ok(r)) {
        kms_hsm_key_ref m = {
            .type = KMS_HSM_SECRET_HMAC256, .wrapped = b.data, .wrapped_len = b.len};
        memcpy(m.master_id, f->master, KMS_HSM_ID_BYTES);
        memcpy(m.uid, f->ref.uid, KMS_HSM_UID_BYTES);
        m.uid[15] ^= 0x5a;
        kms_iov parts[] = {{"a", 1}, {"b", 1}};
        uint8_t mac[KMS_HSM_MAC_BYTES];
        r = kms_hsm_mac_sign(f->hsm, &m, parts, 2, mac);
        kms_hsm_cache_evict(f->hsm, m.uid);
    }
    kms_buf_free(&b);
    return r;
}

static kms_result sc_generate(fixture *f)
{
    kms_buf b;
    kms_buf_init(&b, KMS_HSM_WRAPPED_MAX_BYTES);
    kms_result r = kms_hsm_secret_generate(f->hsm, f->master, KMS_HSM_SECRET_AES256, &b);
    if (kms_is_ok(r))
        assert_int_equal(b.len, 40);
    else
        assert_int_equal(b.len, 0);
    kms_buf_free(&b);
    return r;
}

static kms_result sc_rewrap(fixture *f)
{
    kms_buf b;
    kms_buf_init(&b, KMS_HSM_WRAPPED_MAX_BYTES);
    kms_result r = kms_hsm_secret_rewrap(f->hsm, &f->ref, f->master2, &b);
    if (kms_is_ok(r))
        assert_int_equal(b.len, 40);
    kms_buf_free(&b);
    return r;
}

static kms_result sc_master_create(fixture *f)
{
    uint8_t id[KMS_HSM_ID_BYTES];
    kms_result r = kms_hsm_master_create(f->hsm, id);
    /* master_create is not retried (it is not idempotent): on failure the
     * key may or may not exist, and the caller records only what it got. */
    if (kms_is_ok(r))
        f->masters++;
    return r;
}

/* A cold start: open a second handle (C_Initialize, slots, token, login,
 * sessions, master search) and encrypt with it. Its close runs after the
 * fault is disarmed (sc_open_after): a failed C_Finalize would leave SoftHSM
 * initialised for the rest of the process, which no real caller sees. */
static kms_hsm *sc_open_handle;

static kms_result sc_open(fixture *f)
{
    sc_open_handle = NULL;
    kms_result r = kms_hsm_open(&f->t.cfg, &sc_open_handle);
    if (!kms_is_ok(r)) {
        assert_null(sc_open_handle);
        return r;
    }
    uint8_t ct[sizeof(f->ct)];
    return kms_hsm_aead_encrypt(sc_open_handle, &f->ref, f->nonce, NULL, 0, pt, sizeof(pt), ct);
}

static void sc_open_after(fixture *f)
{
    kms_hsm_close(sc_open_handle);
    sc_open_handle = NULL;
}

typedef kms_result (*scenario)(fixture *);

/* Objects on the token right now must be the masters plus the cached
 * session objects: nothing leaked by a failed run. A master_create whose
 * C_GenerateKey succeeded but was reported lost cannot be told apart, so the
 * count of masters is taken from the token's list. */
static void check_no_object_leak(fixture *f)
{
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t masters = 0, objects = 0;
    OK(kms_hsm_master_list(f->hsm, &ids, &masters));
    free(ids);
    OK(kms_hsm_object_count(f->hsm, &objects));
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_int_equal(objects, masters + st.cache_size);
}

static void torture_one(fixture *f, const char *name, scenario run, void (*after)(fixture *),
                        kms_err also_allowed, unsigned long ckr)
{
    fresh_uid(f);
    kms_fault_reset();
    OK(run(f));
    uint64_t n = kms_fault_calls();
    if (after != NULL)
        after(f);
    assert_true(n > 0);
    unsigned ok = 0, unavailable = 0;
    for (uint64_t i = 1; i <= n; i++) {
        fresh_uid(f);
        kms_fault_reset();
        kms_fault_arm(NULL, i, ckr, 0);
        kms_result r = run(f);
        assert_int_equal(kms_fault_fired(), 1);
        if (kms_is_ok(r)) {
            ok++;
        } else {
            /* The one clean error for a device fault (or, for a cold start,
             * the module's C_Initialize failing). */
            if (r.err != also_allowed)
                assert_int_equal(r.err, KMS_ERR_HSM_UNAVAILABLE);
            unavailable++;
        }
        kms_fault_disarm();
        if (after != NULL)
            after(f);
        /* The next operation after the fault succeeds. */
        OK(sc_decrypt(f));
        OK(run(f));
        if (after != NULL)
            after(f);
    }
    check_no_object_leak(f);
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    print_message("torture %-13s rv 0x%03lx: %3llu calls, %u recovered in-call, %u unavailable\n",
                  name, ckr, (unsigned long long)n, ok, unavailable);
    if (after == NULL)
        assert_true(st.recoveries >= n);
}

/* Each call failed in turn with a session loss, a device error, and a
 * removed device (which makes the layer finalise and re-initialise). */
static void torture_ex(fixture *f, const char *name, scenario run, void (*after)(fixture *),
                       kms_err also_allowed)
{
    static const unsigned long codes[] = {CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID,
                                          CKR_DEVICE_REMOVED};
    for (size_t c = 0; c < sizeof(codes) / sizeof(codes[0]); c++)
        torture_one(f, name, run, after, also_allowed, codes[c]);
}

static void torture(fixture *f, const char *name, scenario run)
{
    torture_ex(f, name, run, NULL, KMS_ERR_HSM_UNAVAILABLE);
}

static void test_torture_open(void **state)
{
    torture_ex(*state, "open+encrypt", sc_open, sc_open_after, KMS_ERR_HSM_MODULE);
}

static void test_torture_encrypt(void **state)
{
    torture(*state, "encrypt", sc_encrypt);
}

static void test_torture_decrypt(void **state)
{
    torture(*state, "decrypt", sc_decrypt);
}

static void test_torture_mac(void **state)
{
    torture(*state, "generate+mac", sc_mac);
}

static void test_torture_generate(void **state)
{
    torture(*state, "generate", sc_generate);
}

static void test_torture_rewrap(void **state)
{
    torture(*state, "rewrap", sc_rewrap);
}

static void test_torture_master_create(void **state)
{
    torture(*state, "master_create", sc_master_create);
}

/* A device removed and put back: every call fails until it returns; the
 * same handle recovers by itself, without a re-open. */
static void test_sticky_device_removed(void **state)
{
    fixture *f = *state;
    kms_fault_reset();
    kms_fault_arm_sticky(NULL, 1, CKR_DEVICE_REMOVED);
    for (int i = 0; i < 3; i++)
        FAILS(sc_decrypt(f), KMS_ERR_HSM_UNAVAILABLE);
    FAILS(kms_hsm_ping(f->hsm), KMS_ERR_HSM_UNAVAILABLE);
    uint64_t fired = kms_fault_fired();
    /* Back-off: a dead HSM is not hammered. */
    usleep(300 * 1000);
    for (int i = 0; i < 50; i++)
        assert_int_equal(kms_hsm_ping(f->hsm).err, KMS_ERR_HSM_UNAVAILABLE);
    assert_true(kms_fault_fired() - fired < 20);
    kms_fault_disarm();

    kms_result r = kms_hsm_ping(f->hsm);
    for (int i = 0; i < 100 && !kms_is_ok(r); i++) {
        usleep(100 * 1000);
        r = kms_hsm_ping(f->hsm);
    }
    OK(r);
    OK(sc_decrypt(f));
    OK(sc_encrypt(f));
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_true(st.recoveries >= 1);
    assert_int_equal(st.sessions_open, 4 + 1);
    check_no_object_leak(f);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A slow HSM shows in the latency the layer counts. */
static void test_delay_counted(void **state)
{
    fixture *f = *state;
    OK(sc_encrypt(f)); /* warm the cache */
    kms_hsm_stats a, b;
    kms_hsm_stats_get(f->hsm, &a);
    kms_fault_reset();
    kms_fault_arm("C_Encrypt", 1, CKR_OK, 250);
    double t0 = now_s();
    OK(sc_encrypt(f));
    double dt = now_s() - t0;
    kms_hsm_stats_get(f->hsm, &b);
    assert_int_equal(kms_fault_fired(), 1);
    assert_true(dt >= 0.25);
    assert_true(b.call_ns - a.call_ns >= 250ull * 1000 * 1000);
    assert_int_equal(b.errors, a.errors);
    kms_fault_disarm();
}

/* Non-transient errors do not tear the pool down, and a session whose
 * operation may still be active is not reused. */
static void test_non_transient(void **state)
{
    fixture *f = *state;
    OK(sc_encrypt(f));
    kms_hsm_stats a, b;
    kms_hsm_stats_get(f->hsm, &a);
    kms_fault_reset();
    kms_fault_arm("C_Encrypt", 1, CKR_ARGUMENTS_BAD, 0);
    FAILS(sc_encrypt(f), KMS_ERR_HSM_FAILED);
    kms_fault_arm("C_Login", 1, CKR_PIN_INCORRECT, 0);
    for (int i = 0; i < 8; i++)
        OK(sc_encrypt(f)); /* every pool session, including the dropped one */
    kms_hsm_stats_get(f->hsm, &b);
    assert_int_equal(b.recoveries, a.recoveries);
    kms_fault_arm("C_UnwrapKey", 1, CKR_KEY_HANDLE_INVALID, 0);
    fresh_uid(f);
    OK(sc_decrypt(f)); /* master re-found after a stale handle */
    kms_fault_disarm();
}

typedef struct {
    fixture *f;
    int id;
    unsigned ok, unavailable, other;
} hammer_arg;

static _Atomic int hammer_done;

static void *hammer(void *p)
{
    hammer_arg *a = p;
    fixture *f = a->f;
    for (int i = 0; i < 500; i++) {
        kms_hsm_key_ref ref = f->ref;
        ref.uid[1] = (uint8_t)(a->id * 8 + i % 8); /* 32 uids, cache churn */
        uint8_t nonce[KMS_HSM_NONCE_BYTES] = {(uint8_t)a->id, (uint8_t)i};
        uint8_t ct[sizeof(pt) + KMS_HSM_TAG_BYTES], out[sizeof(pt)];
        kms_result r = kms_hsm_aead_encrypt(f->hsm, &ref, nonce, NULL, 0, pt, sizeof(pt), ct);
        if (kms_is_ok(r))
            r = kms_hsm_aead_decrypt(f->hsm, &ref, nonce, NULL, 0, ct, sizeof(ct), out);
        if (kms_is_ok(r) && memcmp(out, pt, sizeof(pt)) == 0)
            a->ok++;
        else if (r.err == KMS_ERR_HSM_UNAVAILABLE)
            a->unavailable++;
        else
            a->other++;
    }
    atomic_fetch_add(&hammer_done, 1);
    return NULL;
}

/* Recovery while other threads are mid-operation: a device error every
 * 40th call, 4 threads. Nothing but success or the clean 503 error; after
 * the faults stop, everything works and nothing leaked. */
static void test_concurrent_recovery(void **state)
{
    fixture *f = *state;
    atomic_store(&hammer_done, 0);
    kms_fault_reset();
    /* One-shot faults, re-armed by this controller loop while the
     * threads run. */
    kms_fault_arm(NULL, 40, CKR_DEVICE_ERROR, 0);
    pthread_t t[4];
    hammer_arg a[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (hammer_arg){.f = f, .id = i};
        assert_int_equal(pthread_create(&t[i], NULL, hammer, &a[i]), 0);
    }
    /* Re-arm after each injected fault until the threads are done
     * (bounded: 10 s). */
    uint64_t seen = 0;
    for (int k = 0; k < 20000 && atomic_load(&hammer_done) < 4; k++) {
        usleep(500);
        uint64_t fired = kms_fault_fired();
        if (fired != seen) {
            seen = fired;
            kms_fault_arm(NULL, 40, CKR_DEVICE_ERROR, 0);
        }
    }
    unsigned ok = 0, unavailable = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(a[i].other, 0);
        ok += a[i].ok;
        unavailable += a[i].unavailable;
    }
    kms_fault_disarm();
    print_message("concurrent recovery: %u ok, %u unavailable, %llu faults injected\n", ok,
                  unavailable, (unsigned long long)kms_fault_fired());
    assert_true(kms_fault_fired() > 0);
    kms_result r = kms_hsm_ping(f->hsm);
    for (int i = 0; i < 100 && !kms_is_ok(r); i++) {
        usleep(100 * 1000);
        r = kms_hsm_ping(f->hsm);
    }
    OK(r);
    OK(sc_decrypt(f));
    check_no_object_leak(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_torture_encrypt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_decrypt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_mac, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_generate, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_rewrap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_master_create, setup, teardown),
        cmocka_unit_test_setup_teardown(test_torture_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sticky_device_removed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_recovery, setup, teardown),
        cmocka_unit_test_setup_teardown(test_delay_counted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_non_transient, setup, teardown),
    };
    /* KMS_TEST_FILTER=test_name runs one test (debugging). */
    if (getenv("KMS_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("KMS_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
