/* The LMDB layer's reserve: ordinary writes stop short of the map's
 * maximum, so that a write that frees space (pruning) still commits in a
 * store they filled; a write that holds no more pages than before commits
 * at the limit too. */
#include "kms_store.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#define MAP_MAX   (512 * 1024)
#define BATCH     20
#define VALUE_LEN 300

typedef struct {
    char dir[64];
    kms_store *s;
} fx;

static int fx_setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/kms-store-test.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(kms_store_open(f->dir, 64 * 1024, MAP_MAX, &f->s).err, KMS_OK);
    *state = f;
    return 0;
}

static int fx_teardown(void **state)
{
    fx *f = *state;
    kms_store_close(f->s);
    char p[128];
    static const char *const files[] = {"data.mdb", "lock.mdb", "kms-cache.gen"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", f->dir, files[i]);
        unlink(p);
    }
    rmdir(f->dir);
    free(f);
    return 0;
}

static void key_of(uint64_t n, uint8_t key[8])
{
    for (int i = 7; i >= 0; i--, n >>= 8)
        key[i] = (uint8_t)n;
}

typedef struct {
    uint64_t first, count;
    uint8_t fill;
} span;

static kms_result put_span(kms_txn *t, void *arg)
{
    const span *a = arg;
    uint8_t v[VALUE_LEN];
    memset(v, a->fill, sizeof(v));
    for (uint64_t i = a->first; i < a->first + a->count; i++) {
        uint8_t key[8];
        key_of(i, key);
        kms_result r = kms_txn_put(t, KMS_DB_AUDIT, key, sizeof(key), v, sizeof(v), false);
        if (!kms_is_ok(r))
            return r;
    }
    return KMS_OK_RESULT;
}

static kms_result del_span(kms_txn *t, void *arg)
{
    const span *a = arg;
    for (uint64_t i = a->first; i < a->first + a->count; i++) {
        uint8_t key[8];
        key_of(i, key);
        kms_result r = kms_txn_del(t, KMS_DB_AUDIT, key, sizeof(key));
        if (!kms_is_ok(r))
            return r;
    }
    return KMS_OK_RESULT;
}

static kms_result count_audit(kms_txn *t, void *arg)
{
    return kms_txn_count(t, KMS_DB_AUDIT, arg);
}

/* Fills the store with ordinary writes, in batches and then one record at
 * a time; returns the records written. */
static uint64_t fill(kms_store *s)
{
    uint64_t n = 0;
    uint64_t step = BATCH;
    for (int i = 0; i < 20000; i++) {
        span a = {.first = n, .count = step, .fill = 'a'};
        kms_result r = kms_store_write(s, put_span, &a);
        if (!kms_is_ok(r)) {
            assert_int_equal(r.err, KMS_ERR_STORE_FULL);
            if (step == 1)
                return n;
            step = 1;
            continue;
        }
        n += step;
    }
    fail_msg("a %d-byte map never filled", MAP_MAX);
    return 0;
}

static void test_reserve_kept_for_reclaim(void **state)
{
    fx *f = *state;
    uint64_t n = fill(f->s);
    assert_true(n > 200);
    /* Nothing of the refused write is in the store. */
    size_t count = 0;
    assert_int_equal(kms_store_read(f->s, count_audit, &count).err, KMS_OK);
    assert_int_equal(count, n);
    /* The gauges: the limit is the maximum less the reserve, and the store
     * holds it to within the record that no longer fitted. */
    size_t map, used, limit;
    kms_store_sizes(f->s, &map, &used, &limit);
    assert_int_equal(map, MAP_MAX);
    assert_true(limit < MAP_MAX && limit >= MAP_MAX * 3 / 4);
    assert_true(used <= limit && used + 2 * 4096 > limit);
    /* Ordinary writes that add stay refused. */
    span one = {.first = n, .count = 1, .fill = 'a'};
    assert_int_equal(kms_store_write(f->s, put_span, &one).err, KMS_ERR_STORE_FULL);

    /* What frees space commits, in steps: the first record, then a large
     * cut (the pages the first step freed are reusable by then). */
    span first = {.first = 0, .count = 1};
    assert_int_equal(kms_store_reclaim(f->s, del_span, &first).err, KMS_OK);
    span half = {.first = 1, .count = n / 2 - 1};
    assert_int_equal(kms_store_reclaim(f->s, del_span, &half).err, KMS_OK);
    assert_int_equal(kms_store_read(f->s, count_audit, &count).err, KMS_OK);
    assert_int_equal(count, n - n / 2);
    /* What the store holds came down with the cut (the file's high-water
     * mark does not). */
    size_t used_after;
    kms_store_sizes(f->s, &map, &used_after, &limit);
    assert_true(used_after < used * 3 / 4);

    /* Room again for ordinary writes, up to the same limit. */
    uint64_t again = 0;
    for (;;) {
        span a = {.first = n + again, .count = BATCH, .fill = 'b'};
        kms_result r = kms_store_write(f->s, put_span, &a);
        if (!kms_is_ok(r)) {
            assert_int_equal(r.err, KMS_ERR_STORE_FULL);
            break;
        }
        again += BATCH;
    }
    assert_true(again >= n / 4);
}

/* At the limit, an ordinary write that rewrites records in place or
 * removes some commits: it does not grow the store. */
static void test_rewrite_and_delete_at_limit(void **state)
{
    fx *f = *state;
    uint64_t n = fill(f->s);
    span rewrite = {.first = n - BATCH, .count = BATCH, .fill = 'c'};
    assert_int_equal(kms_store_write(f->s, put_span, &rewrite).err, KMS_OK);
    span drop = {.first = 0, .count = BATCH};
    assert_int_equal(kms_store_write(f->s, del_span, &drop).err, KMS_OK);
    size_t count = 0;
    assert_int_equal(kms_store_read(f->s, count_audit, &count).err, KMS_OK);
    assert_int_equal(count, n - BATCH);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_reserve_kept_for_reclaim, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_rewrite_and_delete_at_limit, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
