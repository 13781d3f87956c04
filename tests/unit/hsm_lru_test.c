/* The LRU cache of unwrapped version secrets (hsm/kms_hsm_lru.h), without a
 * token: the destroy callback records what a real cache would destroy. */
#define _GNU_SOURCE
#include "kms_hsm_lru.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

typedef struct {
    CK_OBJECT_HANDLE destroyed[256];
    size_t n;
    pthread_mutex_t mu;
} sink;

static void sink_destroy(void *ctx, CK_OBJECT_HANDLE h, uint64_t gen)
{
    sink *s = ctx;
    pthread_mutex_lock(&s->mu);
    s->destroyed[s->n++] = h;
    pthread_mutex_unlock(&s->mu);
}

static void uid_of(uint8_t uid[KMS_HSM_UID_BYTES], unsigned i)
{
    memset(uid, 0, KMS_HSM_UID_BYTES);
    memcpy(uid, &i, sizeof(i));
}

/* Acquires uid i; on a miss fills it with handle 1000 + i. */
static kms_hsm_lru_entry *use(kms_hsm_lru *c, unsigned i, bool *claimed)
{
    uint8_t uid[KMS_HSM_UID_BYTES];
    uid_of(uid, i);
    kms_hsm_lru_entry *e;
    assert_int_equal(kms_hsm_lru_acquire(c, uid, &e, claimed).err, KMS_OK);
    if (*claimed)
        kms_hsm_lru_fill(c, e, 1000 + i, KMS_HSM_SECRET_AES256, 1);
    assert_int_equal(kms_hsm_lru_entry_handle(e), 1000 + i);
    return e;
}

static void test_lru_order_and_bound(void **state)
{
    sink s = {.n = 0, .mu = PTHREAD_MUTEX_INITIALIZER};
    kms_hsm_lru *c;
    assert_int_equal(kms_hsm_lru_new(3, sink_destroy, &s, &c).err, KMS_OK);
    bool claimed;
    for (unsigned i = 1; i <= 3; i++) {
        kms_hsm_lru_release(c, use(c, i, &claimed), false);
        assert_true(claimed);
    }
    /* Touch 1: 2 is now the least recently used. */
    kms_hsm_lru_release(c, use(c, 1, &claimed), false);
    assert_false(claimed);
    kms_hsm_lru_release(c, use(c, 4, &claimed), false);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.destroyed[0], 1002);
    kms_hsm_lru_stats st;
    kms_hsm_lru_stats_get(c, &st);
    assert_int_equal(st.size, 3);
    assert_int_equal(st.hits, 1);
    assert_int_equal(st.misses, 4);
    assert_int_equal(st.evictions, 1);

    /* A pinned entry is evicted but destroyed only on its last release. */
    kms_hsm_lru_entry *pinned = use(c, 3, &claimed); /* 3 is MRU now */
    for (unsigned i = 5; i <= 7; i++)
        kms_hsm_lru_release(c, use(c, i, &claimed), false);
    kms_hsm_lru_stats_get(c, &st);
    assert_int_equal(st.size, 3);
    for (size_t i = 0; i < s.n; i++)
        assert_int_not_equal(s.destroyed[i], 1003);
    kms_hsm_lru_release(c, pinned, false);
    assert_int_equal(s.destroyed[s.n - 1], 1003);

    /* Explicit eviction; a dropped (stale) handle. */
    uint8_t uid[KMS_HSM_UID_BYTES];
    uid_of(uid, 7);
    size_t before = s.n;
    kms_hsm_lru_evict(c, uid);
    assert_int_equal(s.n, before + 1);
    assert_int_equal(s.destroyed[s.n - 1], 1007);
    kms_hsm_lru_entry *e = use(c, 6, &claimed);
    assert_false(claimed);
    kms_hsm_lru_release(c, e, true);
    assert_int_equal(s.destroyed[s.n - 1], 1006);
    e = use(c, 6, &claimed);
    assert_true(claimed);
    kms_hsm_lru_release(c, e, false);

    /* clear forgets without destroying (the objects died with their session). */
    before = s.n;
    kms_hsm_lru_clear(c);
    kms_hsm_lru_stats_get(c, &st);
    assert_int_equal(st.size, 0);
    assert_int_equal(s.n, before);
    kms_hsm_lru_free(c);
}

typedef struct {
    kms_hsm_lru *c;
    bool claimed;
    CK_OBJECT_HANDLE h;
} waiter;

static void *wait_for_uid(void *arg)
{
    waiter *w = arg;
    uint8_t uid[KMS_HSM_UID_BYTES];
    uid_of(uid, 42);
    kms_hsm_lru_entry *e;
    assert_int_equal(kms_hsm_lru_acquire(w->c, uid, &e, &w->claimed).err, KMS_OK);
    if (w->claimed)
        kms_hsm_lru_fill(w->c, e, 9999, KMS_HSM_SECRET_AES256, 1);
    w->h = kms_hsm_lru_entry_handle(e);
    kms_hsm_lru_release(w->c, e, false);
    return NULL;
}

/* Concurrent misses for one uid: one unwrap, the others wait for it; an
 * abandoned claim passes to a waiter. */
static void test_lru_single_flight(void **state)
{
    sink s = {.n = 0, .mu = PTHREAD_MUTEX_INITIALIZER};
    kms_hsm_lru *c;
    assert_int_equal(kms_hsm_lru_new(8, sink_destroy, &s, &c).err, KMS_OK);
    uint8_t uid[KMS_HSM_UID_BYTES];
    uid_of(uid, 42);
    kms_hsm_lru_entry *e;
    bool claimed;
    assert_int_equal(kms_hsm_lru_acquire(c, uid, &e, &claimed).err, KMS_OK);
    assert_true(claimed);
    waiter w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (waiter){.c = c};
        assert_int_equal(pthread_create(&t[i], NULL, wait_for_uid, &w[i]), 0);
    }
    usleep(50 * 1000);
    kms_hsm_lru_fill(c, e, 4242, KMS_HSM_SECRET_AES256, 1);
    kms_hsm_lru_release(c, e, false);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        assert_false(w[i].claimed);
        assert_int_equal(w[i].h, 4242);
    }
    kms_hsm_lru_stats st;
    kms_hsm_lru_stats_get(c, &st);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.hits, 4);

    /* Abandon: exactly one waiter claims next. */
    kms_hsm_lru_evict(c, uid);
    assert_int_equal(kms_hsm_lru_acquire(c, uid, &e, &claimed).err, KMS_OK);
    assert_true(claimed);
    for (int i = 0; i < 2; i++) {
        w[i] = (waiter){.c = c};
        assert_int_equal(pthread_create(&t[i], NULL, wait_for_uid, &w[i]), 0);
    }
    usleep(50 * 1000);
    kms_hsm_lru_abandon(c, e);
    int claimers = 0;
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        claimers += w[i].claimed;
        assert_int_equal(w[i].h, 9999);
    }
    assert_int_equal(claimers, 1);
    kms_hsm_lru_free(c);
}

static void test_lru_bad_capacity(void **state)
{
    kms_hsm_lru *c = NULL;
    assert_int_equal(kms_hsm_lru_new(0, sink_destroy, NULL, &c).err, KMS_ERR_INVALID_ARGUMENT);
    assert_null(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lru_order_and_bound),
        cmocka_unit_test(test_lru_single_flight),
        cmocka_unit_test(test_lru_bad_capacity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
