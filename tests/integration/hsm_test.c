/*
 * hsm/ against a real SoftHSM token made for each test (kms_test_hsm.h).
 */
#define _GNU_SOURCE
#include "kms_hsm.h"
#include "kms_test_hsm.h"

#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

typedef struct {
    kms_test_token t;
    kms_hsm *hsm;
    uint8_t master[KMS_HSM_ID_BYTES];
} fixture;

#define OK(x)          assert_int_equal((x).err, KMS_OK)
#define FAILS(x, code) assert_int_equal((x).err, (code))

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(kms_test_token_setup(&f->t, false), 0);
    *state = f;
    return 0;
}

static int setup_open(void **state)
{
    setup(state);
    fixture *f = *state;
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    OK(kms_hsm_master_create(f->hsm, f->master));
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    kms_hsm_close(f->hsm);
    kms_test_token_teardown(&f->t);
    free(f);
    return 0;
}

/* A version secret generated under master, with a fresh random uid. */
typedef struct {
    kms_hsm_key_ref ref;
    kms_buf blob;
} secret;

static void secret_make(kms_hsm *hsm, const uint8_t master[KMS_HSM_ID_BYTES],
                        kms_hsm_secret_type type, secret *s)
{
    memset(s, 0, sizeof(*s));
    kms_buf_init(&s->blob, KMS_HSM_WRAPPED_MAX_BYTES);
    OK(kms_hsm_secret_generate(hsm, master, type, &s->blob));
    OK(kms_hsm_random(hsm, s->ref.uid, sizeof(s->ref.uid)));
    memcpy(s->ref.master_id, master, KMS_HSM_ID_BYTES);
    s->ref.type = type;
    s->ref.wrapped = s->blob.data;
    s->ref.wrapped_len = s->blob.len;
}

static void secret_free(secret *s)
{
    kms_buf_free(&s->blob);
}

static void test_open_close(void **state)
{
    fixture *f = *state;
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_int_equal(st.sessions_open, 4 + 1); /* pool + owner */
    assert_true(st.calls > 0);
    OK(kms_hsm_ping(f->hsm));
    kms_hsm_close(f->hsm);
    f->hsm = NULL;
}

static void test_uri_rejects_pin(void **state)
{
    fixture *f = *state;
    char uri[160];
    kms_hsm_config cfg = f->t.cfg;
    snprintf(uri, sizeof(uri), "%s?pin-value=1234", f->t.token_uri);
    cfg.token_uri = uri;
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_CONFIG);
    snprintf(uri, sizeof(uri), "%s?pin-source=file:/etc/passwd", f->t.token_uri);
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_CONFIG);
    cfg.token_uri = "not a uri";
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_CONFIG);
    cfg = f->t.cfg;
    cfg.pin_env = "KMS_TEST_NOT_BOTH";
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_CONFIG);
    assert_null(f->hsm);
}

static void test_wrong_pin(void **state)
{
    fixture *f = *state;
    char path[400];
    snprintf(path, sizeof(path), "%s/wrong-pin", f->t.dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "00000000", 8), 8);
    close(fd);
    kms_hsm_config cfg = f->t.cfg;
    cfg.pin_file = path;
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_HSM_PIN);
    assert_null(f->hsm);
}

static void test_pin_env(void **state)
{
    fixture *f = *state;
    char pin[128] = {0};
    FILE *fp = fopen(f->t.pin_path, "r");
    assert_non_null(fp);
    assert_non_null(fgets(pin, sizeof(pin), fp));
    fclose(fp);
    assert_int_equal(setenv("KMS_TEST_HSM_PIN", pin, 1), 0);
    kms_hsm_config cfg = f->t.cfg;
    cfg.pin_file = NULL;
    cfg.pin_env = "KMS_TEST_HSM_PIN";
    OK(kms_hsm_open(&cfg, &f->hsm));
    assert_null(getenv("KMS_TEST_HSM_PIN"));
    OK(kms_hsm_ping(f->hsm));
}

static void test_token_not_found(void **state)
{
    fixture *f = *state;
    kms_hsm_config cfg = f->t.cfg;
    cfg.token_uri = "pkcs11:token=no-such-token";
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_HSM_TOKEN_NOT_FOUND);
    cfg = f->t.cfg;
    cfg.module = "/nonexistent/libnothing.so";
    FAILS(kms_hsm_open(&cfg, &f->hsm), KMS_ERR_HSM_MODULE);
    assert_null(f->hsm);
}

static bool list_has(uint8_t (*ids)[KMS_HSM_ID_BYTES], size_t n, const uint8_t *id)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(ids[i], id, KMS_HSM_ID_BYTES) == 0)
            return true;
    return false;
}

static void test_master_lifecycle(void **state)
{
    fixture *f = *state;
    uint8_t m2[KMS_HSM_ID_BYTES];
    OK(kms_hsm_master_create(f->hsm, m2));
    assert_memory_not_equal(m2, f->master, KMS_HSM_ID_BYTES);
    bool exists = false;
    OK(kms_hsm_master_exists(f->hsm, m2, &exists));
    assert_true(exists);

    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t n = 0;
    OK(kms_hsm_master_list(f->hsm, &ids, &n));
    assert_int_equal(n, 2);
    assert_true(list_has(ids, n, f->master));
    assert_true(list_has(ids, n, m2));
    free(ids);

    OK(kms_hsm_master_destroy(f->hsm, m2));
    OK(kms_hsm_master_exists(f->hsm, m2, &exists));
    assert_false(exists);
    OK(kms_hsm_master_list(f->hsm, &ids, &n));
    assert_int_equal(n, 1);
    assert_true(list_has(ids, n, f->master));
    free(ids);
    FAILS(kms_hsm_master_destroy(f->hsm, m2), KMS_ERR_HSM_OBJECT_MISSING);

    /* A secret under a master that is gone. */
    kms_buf blob;
    kms_buf_init(&blob, KMS_HSM_WRAPPED_MAX_BYTES);
    FAILS(kms_hsm_secret_generate(f->hsm, m2, KMS_HSM_SECRET_AES256, &blob),
          KMS_ERR_HSM_OBJECT_MISSING);
    assert_int_equal(blob.len, 0);
    kms_buf_free(&blob);

    /* Master keys persist across a re-open of the token. */
    kms_hsm_close(f->hsm);
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    OK(kms_hsm_master_exists(f->hsm, f->master, &exists));
    assert_true(exists);
}

static void test_aead(void **state)
{
    fixture *f = *state;
    secret s;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s);
    /* RFC 5649: a 32-byte key wraps to 40 bytes. */
    assert_int_equal(s.blob.len, 40);

    uint8_t nonce[KMS_HSM_NONCE_BYTES];
    OK(kms_hsm_random(f->hsm, nonce, sizeof(nonce)));
    static const uint8_t aad[] = "key=orders,version=1";
    static const uint8_t pt[] = "a 32-byte data encryption key!!";
    uint8_t ct[sizeof(pt) + KMS_HSM_TAG_BYTES];
    OK(kms_hsm_aead_encrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), pt, sizeof(pt), ct));
    assert_memory_not_equal(ct, pt, sizeof(pt));
    uint8_t out[sizeof(pt)];
    OK(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), ct, sizeof(ct), out));
    assert_memory_equal(out, pt, sizeof(pt));

    /* Wrong AAD, every flipped bit of ciphertext and tag, a wrong nonce, a
     * truncation: the one token error, and nothing written. */
    memset(out, 0xAA, sizeof(out));
    FAILS(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad) - 1, ct, sizeof(ct), out),
          KMS_ERR_TOKEN_INVALID);
    for (size_t i = 0; i < sizeof(ct) * 8; i += 7) {
        ct[i / 8] ^= (uint8_t)(1u << (i % 8));
        FAILS(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), ct, sizeof(ct), out),
              KMS_ERR_TOKEN_INVALID);
        ct[i / 8] ^= (uint8_t)(1u << (i % 8));
    }
    nonce[0] ^= 1;
    FAILS(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), ct, sizeof(ct), out),
          KMS_ERR_TOKEN_INVALID);
    nonce[0] ^= 1;
    FAILS(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), ct, 15, out),
          KMS_ERR_TOKEN_INVALID);
    for (size_t i = 0; i < sizeof(out); i++)
        assert_int_equal(out[i], 0xAA);

    /* Another key's ciphertext. */
    secret s2;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s2);
    FAILS(kms_hsm_aead_decrypt(f->hsm, &s2.ref, nonce, aad, sizeof(aad), ct, sizeof(ct), out),
          KMS_ERR_TOKEN_INVALID);

    /* Empty plaintext, no AAD; a larger message (scratch off the stack). */
    uint8_t tag[KMS_HSM_TAG_BYTES];
    OK(kms_hsm_aead_encrypt(f->hsm, &s.ref, nonce, NULL, 0, NULL, 0, tag));
    OK(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, NULL, 0, tag, sizeof(tag), out));
    size_t big = 64 * 1024;
    uint8_t *bp = calloc(1, big), *bc = calloc(1, big + 16), *bo = calloc(1, big);
    assert_true(bp && bc && bo);
    memset(bp, 'x', big);
    OK(kms_hsm_aead_encrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), bp, big, bc));
    OK(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, aad, sizeof(aad), bc, big + 16, bo));
    assert_memory_equal(bp, bo, big);
    free(bp);
    free(bc);
    free(bo);

    /* A corrupt wrapped blob does not unwrap. */
    secret bad;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &bad);
    bad.blob.data[5] ^= 1;
    kms_hsm_stats before, after;
    kms_hsm_stats_get(f->hsm, &before);
    FAILS(kms_hsm_aead_encrypt(f->hsm, &bad.ref, nonce, NULL, 0, pt, sizeof(pt), ct),
          KMS_ERR_HSM_FAILED);
    OK(kms_hsm_ping(f->hsm));
    kms_hsm_stats_get(f->hsm, &after);
    assert_int_equal(after.recoveries, before.recoveries); /* no pool teardown */

    /* An HMAC secret cannot encrypt. */
    secret m;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_HMAC256, &m);
    FAILS(kms_hsm_aead_encrypt(f->hsm, &m.ref, nonce, NULL, 0, pt, sizeof(pt), ct),
          KMS_ERR_INVALID_ARGUMENT);
    secret_free(&m);
    secret_free(&bad);
    secret_free(&s2);
    secret_free(&s);
}

static void test_hmac(void **state)
{
    fixture *f = *state;
    secret s, s2;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_HMAC256, &s);
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_HMAC256, &s2);
    kms_iov split[] = {{"web", 3}, {"", 0}, {"hook-body", 9}};
    kms_iov whole[] = {{"webhook-body", 12}};
    uint8_t a[KMS_HSM_MAC_BYTES], b[KMS_HSM_MAC_BYTES], c[KMS_HSM_MAC_BYTES];
    OK(kms_hsm_mac_sign(f->hsm, &s.ref, split, 3, a));
    OK(kms_hsm_mac_sign(f->hsm, &s.ref, whole, 1, b));
    assert_memory_equal(a, b, sizeof(a));
    OK(kms_hsm_mac_sign(f->hsm, &s2.ref, whole, 1, c));
    assert_memory_not_equal(b, c, sizeof(b));
    kms_iov other[] = {{"webhook-bodY", 12}};
    OK(kms_hsm_mac_sign(f->hsm, &s.ref, other, 1, c));
    assert_memory_not_equal(b, c, sizeof(b));
    /* An AES secret cannot MAC. */
    secret e;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &e);
    FAILS(kms_hsm_mac_sign(f->hsm, &e.ref, whole, 1, c), KMS_ERR_INVALID_ARGUMENT);
    secret_free(&e);
    secret_free(&s);
    secret_free(&s2);
}

static void test_rewrap(void **state)
{
    fixture *f = *state;
    secret s;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s);
    uint8_t nonce[KMS_HSM_NONCE_BYTES] = {1, 2, 3};
    static const uint8_t pt[] = "rotate me";
    uint8_t ct[sizeof(pt) + KMS_HSM_TAG_BYTES], out[sizeof(pt)];
    OK(kms_hsm_aead_encrypt(f->hsm, &s.ref, nonce, NULL, 0, pt, sizeof(pt), ct));

    secret h;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_HMAC256, &h);
    kms_iov msg[] = {{"m", 1}};
    uint8_t mac1[KMS_HSM_MAC_BYTES], mac2[KMS_HSM_MAC_BYTES];
    OK(kms_hsm_mac_sign(f->hsm, &h.ref, msg, 1, mac1));

    uint8_t m2[KMS_HSM_ID_BYTES];
    OK(kms_hsm_master_create(f->hsm, m2));
    kms_buf nb, nh;
    kms_buf_init(&nb, KMS_HSM_WRAPPED_MAX_BYTES);
    kms_buf_init(&nh, KMS_HSM_WRAPPED_MAX_BYTES);
    OK(kms_hsm_secret_rewrap(f->hsm, &s.ref, m2, &nb));
    OK(kms_hsm_secret_rewrap(f->hsm, &h.ref, m2, &nh));
    assert_int_equal(nb.len, 40);
    assert_false(nb.len == s.blob.len && memcmp(nb.data, s.blob.data, nb.len) == 0);

    /* The old master goes; the new blobs (fresh uids: not cached) still
     * open the old ciphertext and give the same MAC. */
    OK(kms_hsm_master_destroy(f->hsm, f->master));
    kms_hsm_key_ref r = s.ref, rh = h.ref;
    OK(kms_hsm_random(f->hsm, r.uid, sizeof(r.uid)));
    OK(kms_hsm_random(f->hsm, rh.uid, sizeof(rh.uid)));
    memcpy(r.master_id, m2, sizeof(m2));
    memcpy(rh.master_id, m2, sizeof(m2));
    r.wrapped = nb.data;
    r.wrapped_len = nb.len;
    rh.wrapped = nh.data;
    rh.wrapped_len = nh.len;
    OK(kms_hsm_aead_decrypt(f->hsm, &r, nonce, NULL, 0, ct, sizeof(ct), out));
    assert_memory_equal(out, pt, sizeof(pt));
    OK(kms_hsm_mac_sign(f->hsm, &rh, msg, 1, mac2));
    assert_memory_equal(mac1, mac2, sizeof(mac1));

    /* The old blob's master is gone: evicted, it cannot come back. */
    kms_hsm_cache_evict(f->hsm, s.ref.uid);
    FAILS(kms_hsm_aead_decrypt(f->hsm, &s.ref, nonce, NULL, 0, ct, sizeof(ct), out),
          KMS_ERR_HSM_OBJECT_MISSING);
    /* A rewrap leaves no temporary object behind: 1 master + 3 cached. */
    size_t objects = 0;
    OK(kms_hsm_object_count(f->hsm, &objects));
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_int_equal(objects, 1 + st.cache_size);
    kms_buf_free(&nb);
    kms_buf_free(&nh);
    secret_free(&s);
    secret_free(&h);
}

static void test_cache_bounded(void **state)
{
    fixture *f = *state;
    f->t.cfg.cache_capacity = 8;
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    OK(kms_hsm_master_create(f->hsm, f->master));
    enum { N = 100 };
    secret *s = calloc(N, sizeof(*s));
    assert_non_null(s);
    uint8_t nonce[KMS_HSM_NONCE_BYTES] = {0};
    uint8_t pt[16] = "sixteen bytes..", ct[N][32], out[16];
    for (int i = 0; i < N; i++) {
        secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s[i]);
        OK(kms_hsm_aead_encrypt(f->hsm, &s[i].ref, nonce, NULL, 0, pt, sizeof(pt), ct[i]));
        kms_hsm_stats st;
        kms_hsm_stats_get(f->hsm, &st);
        assert_true(st.cache_size <= 8);
    }
    size_t objects = 0;
    OK(kms_hsm_object_count(f->hsm, &objects));
    assert_true(objects <= 1 + 8);
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_int_equal(st.cache_misses, N);
    assert_int_equal(st.cache_evictions, N - 8);
    /* Evicted ones come back transparently; recent ones hit. */
    for (int i = 0; i < N; i++) {
        OK(kms_hsm_aead_decrypt(f->hsm, &s[i].ref, nonce, NULL, 0, ct[i], sizeof(ct[i]), out));
        assert_memory_equal(out, pt, sizeof(pt));
    }
    OK(kms_hsm_aead_decrypt(f->hsm, &s[N - 1].ref, nonce, NULL, 0, ct[N - 1], 32, out));
    kms_hsm_stats st2;
    kms_hsm_stats_get(f->hsm, &st2);
    assert_int_equal(st2.cache_misses, 2 * N);
    assert_int_equal(st2.cache_hits, 1);
    OK(kms_hsm_object_count(f->hsm, &objects));
    assert_int_equal(objects, 1 + st2.cache_size);
    for (int i = 0; i < N; i++)
        secret_free(&s[i]);
    free(s);
}

typedef struct {
    kms_hsm *hsm;
    secret *secrets;
    int nsecrets;
    int id;
    int failures;
} worker;

static void *hammer(void *arg)
{
    worker *w = arg;
    for (int i = 0; i < 150; i++) {
        secret *s = &w->secrets[(i + w->id) % w->nsecrets];
        uint8_t nonce[KMS_HSM_NONCE_BYTES] = {(uint8_t)w->id, (uint8_t)i};
        uint8_t pt[24], ct[40], out[24];
        memset(pt, w->id + i, sizeof(pt));
        if (!kms_is_ok(kms_hsm_aead_encrypt(w->hsm, &s->ref, nonce, pt, 3, pt, sizeof(pt), ct)) ||
            !kms_is_ok(kms_hsm_aead_decrypt(w->hsm, &s->ref, nonce, pt, 3, ct, sizeof(ct), out)) ||
            memcmp(out, pt, sizeof(pt)) != 0)
            w->failures++;
    }
    return NULL;
}

static void test_threads(void **state)
{
    fixture *f = *state;
    /* Capacity 3 for 6 secrets: evictions under pinned entries. */
    f->t.cfg.cache_capacity = 3;
    f->t.cfg.pool_size = 2;
    OK(kms_hsm_open(&f->t.cfg, &f->hsm));
    OK(kms_hsm_master_create(f->hsm, f->master));
    secret s[6];
    for (int i = 0; i < 6; i++)
        secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s[i]);
    pthread_t tid[4];
    worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker){.hsm = f->hsm, .secrets = s, .nsecrets = 6, .id = i};
        assert_int_equal(pthread_create(&tid[i], NULL, hammer, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(tid[i], NULL);
        assert_int_equal(w[i].failures, 0);
    }
    kms_hsm_stats st;
    kms_hsm_stats_get(f->hsm, &st);
    assert_true(st.cache_size <= 3);
    size_t objects = 0;
    OK(kms_hsm_object_count(f->hsm, &objects));
    assert_int_equal(objects, 1 + st.cache_size);
    for (int i = 0; i < 6; i++)
        secret_free(&s[i]);
}

static void test_two_handles(void **state)
{
    fixture *f = *state;
    kms_hsm *b = NULL;
    OK(kms_hsm_open(&f->t.cfg, &b));
    secret s;
    secret_make(f->hsm, f->master, KMS_HSM_SECRET_AES256, &s);
    uint8_t nonce[KMS_HSM_NONCE_BYTES] = {9};
    uint8_t ct[4 + 16], out[4];
    OK(kms_hsm_aead_encrypt(f->hsm, &s.ref, nonce, NULL, 0, (const uint8_t *)"abcd", 4, ct));
    OK(kms_hsm_aead_decrypt(b, &s.ref, nonce, NULL, 0, ct, sizeof(ct), out));
    assert_memory_equal(out, "abcd", 4);
    /* Closing one leaves the other working (module initialised twice,
     * finalised once per handle). */
    kms_hsm_close(f->hsm);
    f->hsm = b;
    OK(kms_hsm_aead_decrypt(b, &s.ref, nonce, NULL, 0, ct, sizeof(ct), out));
    OK(kms_hsm_ping(b));
    secret_free(&s);
}

static void test_random(void **state)
{
    fixture *f = *state;
    uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
    OK(kms_hsm_random(f->hsm, a, sizeof(a)));
    OK(kms_hsm_random(f->hsm, b, sizeof(b)));
    assert_memory_not_equal(a, zero, 32);
    assert_memory_not_equal(a, b, 32);
    OK(kms_hsm_random(f->hsm, a, 0));
}

static void test_bench_raw(void **state)
{
    fixture *f = *state;
    double enc1, enc2, dec1, dec2;
    OK(kms_hsm_bench_raw(f->hsm, KMS_HSM_RAW_ENCRYPT, 32, 1, 1.0, &enc1));
    OK(kms_hsm_bench_raw(f->hsm, KMS_HSM_RAW_ENCRYPT, 32, 2, 1.0, &enc2));
    OK(kms_hsm_bench_raw(f->hsm, KMS_HSM_RAW_DECRYPT, 32, 1, 1.0, &dec1));
    OK(kms_hsm_bench_raw(f->hsm, KMS_HSM_RAW_DECRYPT, 32, 2, 1.0, &dec2));
    print_message("bench_raw AES-256-GCM 32 B: encrypt %.0f ops/s (1 thread), %.0f (2 threads); "
                  "decrypt %.0f (1), %.0f (2)\n",
                  enc1, enc2, dec1, dec2);
    assert_true(enc1 > 0 && enc2 > 0 && dec1 > 0 && dec2 > 0);
    /* The benchmark's session keys are gone with its sessions. */
    size_t objects = 0;
    OK(kms_hsm_object_count(f->hsm, &objects));
    assert_int_equal(objects, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_open_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_uri_rejects_pin, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_pin, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pin_env, setup, teardown),
        cmocka_unit_test_setup_teardown(test_token_not_found, setup, teardown),
        cmocka_unit_test_setup_teardown(test_master_lifecycle, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_aead, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_hmac, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_rewrap, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_cache_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_handles, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_random, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_bench_raw, setup_open, teardown),
    };
    /* KMS_TEST_FILTER=test_name runs one test (debugging). */
    if (getenv("KMS_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("KMS_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
