/* kms/ on a real SoftHSM token: keys, every operation, batch, persistence,
 * map growth, backup, and the consistency check. */
#include "kms_test_fixture.h"

#include <dirent.h>
#include <lmdb.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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

static void test_create_get_list(void **state)
{
    kms_fx *f = *state;
    kms_key_spec s = {.name = "orders.dek", .purpose = KMS_PURPOSE_ENCRYPT};
    kms_key_info ki;
    assert_ok(kms_key_create(f->k, &f->admin, &s, &ki));
    assert_string_equal(ki.name, "orders.dek");
    assert_int_equal(ki.primary_version, 1);
    assert_int_equal(ki.latest_version, 1);
    assert_int_equal(ki.rotation_period_s, 90 * 86400);
    assert_int_equal(ki.warning_window_s, 7 * 86400);
    assert_int_equal(ki.created_at, KMS_FX_T0);
    assert_err(kms_key_create(f->k, &f->admin, &s, NULL), KMS_ERR_KEY_EXISTS);
    kms_key_spec bad = {.name = "Bad_Name", .purpose = KMS_PURPOSE_ENCRYPT};
    assert_err(kms_key_create(f->k, &f->admin, &bad, NULL), KMS_ERR_KEY_NAME_INVALID);
    bad.name = "ok-name";
    bad.purpose = 9;
    assert_err(kms_key_create(f->k, &f->admin, &bad, NULL), KMS_ERR_INVALID_ARGUMENT);
    bad.purpose = KMS_PURPOSE_MAC;
    bad.rotation_period_s = 100;
    bad.warning_window_s = 200;
    assert_err(kms_key_create(f->k, &f->admin, &bad, NULL), KMS_ERR_INVALID_ARGUMENT);

    kms_key_info got;
    assert_ok(kms_key_get(f->k, "orders.dek", &got));
    assert_memory_equal(&got, &ki, sizeof(got));
    assert_err(kms_key_get(f->k, "nope", &got), KMS_ERR_KEY_NOT_FOUND);

    char name[32];
    for (int i = 0; i < 25; i++) {
        snprintf(name, sizeof(name), "list-%02d", i);
        kms_fx_key(f, name, i % 2 ? KMS_PURPOSE_MAC : KMS_PURPOSE_ENCRYPT);
    }
    /* Pagination: pages of 10 in name order cover every key once. */
    size_t seen = 0;
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "list-";
    for (int page = 0; page < 10; page++) {
        kms_key_info *keys = NULL;
        size_t n = 0;
        assert_ok(kms_key_list(f->k, after, 10, &keys, &n));
        for (size_t i = 0; i < n; i++) {
            if (strncmp(keys[i].name, "list-", 5) != 0)
                continue;
            snprintf(name, sizeof(name), "list-%02zu", seen);
            assert_string_equal(keys[i].name, name);
            seen++;
        }
        if (n > 0)
            snprintf(after, sizeof(after), "%s", keys[n - 1].name);
        free(keys);
        if (n < 10)
            break;
    }
    assert_int_equal(seen, 25);
    kms_key_info *all = NULL;
    size_t n = 0;
    assert_err(kms_key_list(f->k, NULL, 5000, &all, &n), KMS_ERR_LIMIT_EXCEEDED);

    kms_version_info *vs = NULL;
    assert_ok(kms_key_versions(f->k, "orders.dek", &vs, &n));
    assert_int_equal(n, 1);
    assert_int_equal(vs[0].version, 1);
    assert_int_equal(vs[0].state, KMS_VERSION_ACTIVE);
    assert_int_equal(vs[0].primary_at, KMS_FX_T0);
    assert_int_equal(vs[0].master_version, 1);
    free(vs);
    kms_version_info vi;
    assert_err(kms_version_get(f->k, "orders.dek", 2, &vi), KMS_ERR_VERSION_NOT_FOUND);
    assert_err(kms_key_versions(f->k, "nope", &vs, &n), KMS_ERR_KEY_NOT_FOUND);
}

static void test_wrap_unwrap_encrypt_decrypt(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "ops", KMS_PURPOSE_ENCRYPT);
    uint8_t dek[32];
    for (size_t i = 0; i < sizeof(dek); i++)
        dek[i] = (uint8_t)(i * 7 + 1);
    const uint8_t ctx[] = "tenant=42";
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v = 0;
    assert_ok(kms_wrap(f->k, &f->app, "ops", dek, sizeof(dek), ctx, sizeof(ctx), &tok, &v));
    assert_int_equal(v, 1);
    assert_int_equal(tok.len, 8 + 3 + 12 + 32 + 16);

    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    assert_ok(kms_unwrap(f->k, &f->app, "ops", tok.data, tok.len, ctx, sizeof(ctx), &pt, &v));
    assert_int_equal(pt.len, sizeof(dek));
    assert_memory_equal(pt.data, dek, sizeof(dek));

    /* The text form works as input too. */
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_token_to_text(tok.data, tok.len, &text));
    kms_buf_reset(&pt);
    assert_ok(kms_unwrap(f->k, &f->app, "ops", text.data, text.len, ctx, sizeof(ctx), &pt, &v));
    assert_memory_equal(pt.data, dek, sizeof(dek));

    /* Wrong or missing context: the single token error. */
    kms_buf_reset(&pt);
    assert_err(kms_unwrap(f->k, &f->app, "ops", tok.data, tok.len, NULL, 0, &pt, &v),
               KMS_ERR_TOKEN_INVALID);
    assert_int_equal(pt.len, 0);

    /* Limits. */
    uint8_t big[KMS_ENCRYPT_PLAINTEXT_MAX_BYTES + 1] = {0};
    kms_buf_reset(&tok);
    assert_err(kms_wrap(f->k, &f->app, "ops", dek, 0, NULL, 0, &tok, &v), KMS_ERR_INVALID_ARGUMENT);
    assert_err(kms_wrap(f->k, &f->app, "ops", big, 1025, NULL, 0, &tok, &v),
               KMS_ERR_LIMIT_EXCEEDED);
    assert_err(kms_wrap(f->k, &f->app, "ops", dek, 32, big, KMS_CONTEXT_MAX_BYTES + 1, &tok, &v),
               KMS_ERR_LIMIT_EXCEEDED);
    assert_err(kms_encrypt(f->k, &f->app, "ops", big, sizeof(big), NULL, 0, &tok, &v),
               KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(tok.len, 0);
    assert_err(kms_wrap(f->k, &f->app, "nope", dek, 32, NULL, 0, &tok, &v), KMS_ERR_KEY_NOT_FOUND);

    /* encrypt/decrypt of a 64 KiB field. */
    assert_ok(kms_encrypt(f->k, &f->app, "ops", big, sizeof(big) - 1, ctx, 3, &tok, &v));
    kms_buf_reset(&pt);
    assert_ok(kms_decrypt(f->k, &f->app, "ops", tok.data, tok.len, ctx, 3, &pt, &v));
    assert_int_equal(pt.len, sizeof(big) - 1);
    assert_memory_equal(pt.data, big, pt.len);

    /* Purpose. */
    kms_fx_key(f, "ops-mac", KMS_PURPOSE_MAC);
    kms_buf_reset(&tok);
    assert_err(kms_wrap(f->k, &f->app, "ops-mac", dek, 32, NULL, 0, &tok, &v), KMS_ERR_KEY_PURPOSE);
    assert_err(kms_mac(f->k, &f->app, "ops", dek, 32, &tok, &v), KMS_ERR_KEY_PURPOSE);
}

static void test_datakey(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "dk", KMS_PURPOSE_ENCRYPT);
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    assert_ok(kms_datakey(f->k, &f->app, "dk", 32, NULL, 0, &tok, &pt, &v));
    assert_int_equal(pt.len, 32);
    kms_buf back KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&back, 0);
    assert_ok(kms_unwrap(f->k, &f->app, "dk", tok.data, tok.len, NULL, 0, &back, &v));
    assert_memory_equal(back.data, pt.data, 32);
    /* Without the plaintext. */
    kms_buf_reset(&tok);
    assert_ok(kms_datakey(f->k, &f->app, "dk", 16, (const uint8_t *)"c", 1, &tok, NULL, &v));
    kms_buf_reset(&back);
    assert_ok(
        kms_unwrap(f->k, &f->app, "dk", tok.data, tok.len, (const uint8_t *)"c", 1, &back, &v));
    assert_int_equal(back.len, 16);
    assert_err(kms_datakey(f->k, &f->app, "dk", 15, NULL, 0, &tok, NULL, &v),
               KMS_ERR_INVALID_ARGUMENT);
    assert_err(kms_datakey(f->k, &f->app, "dk", 65, NULL, 0, &tok, NULL, &v),
               KMS_ERR_INVALID_ARGUMENT);
}

static void test_rewrap_after_rotate(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "rw", KMS_PURPOSE_ENCRYPT);
    const uint8_t dek[16] = "0123456789abcdef";
    kms_buf t1 KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, "rw", dek, 16, (const uint8_t *)"x", 1, &t1, &v));
    kms_rotation_info ri;
    f->now += 10;
    assert_ok(kms_key_rotate(f->k, &f->admin, "rw", KMS_ROTATION_MANUAL, "test", &ri));
    assert_int_equal(ri.from_version, 1);
    assert_int_equal(ri.to_version, 2);
    assert_int_equal(ri.status, KMS_ROTATION_SUCCEEDED);
    assert_string_equal(ri.initiator, "admin");

    kms_buf t2 KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t from, to;
    bool changed;
    assert_ok(kms_rewrap(f->k, &f->app, "rw", t1.data, t1.len, (const uint8_t *)"x", 1, &t2, &from,
                         &to, &changed));
    assert_true(changed);
    assert_int_equal(from, 1);
    assert_int_equal(to, 2);
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    assert_ok(kms_unwrap(f->k, &f->app, "rw", t2.data, t2.len, (const uint8_t *)"x", 1, &pt, &v));
    assert_int_equal(v, 2);
    assert_memory_equal(pt.data, dek, 16);
    /* Already under the primary: unchanged, same bytes. */
    kms_buf t3 KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_rewrap(f->k, &f->app, "rw", t2.data, t2.len, (const uint8_t *)"x", 1, &t3, &from,
                         &to, &changed));
    assert_false(changed);
    assert_int_equal(t3.len, t2.len);
    assert_memory_equal(t3.data, t2.data, t2.len);
    /* The old token still unwraps. */
    kms_buf_reset(&pt);
    assert_ok(kms_unwrap(f->k, &f->app, "rw", t1.data, t1.len, (const uint8_t *)"x", 1, &pt, &v));
    assert_int_equal(v, 1);
    /* Wrong context on rewrap. */
    kms_buf_reset(&t3);
    assert_err(kms_rewrap(f->k, &f->app, "rw", t1.data, t1.len, NULL, 0, &t3, &from, &to, &changed),
               KMS_ERR_TOKEN_INVALID);
}

static void test_mac_verify(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "hook", KMS_PURPOSE_MAC);
    const uint8_t msg[] = "payload";
    kms_buf m1 KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    assert_ok(kms_mac(f->k, &f->app, "hook", msg, sizeof(msg), &m1, &v));
    assert_int_equal(m1.len, 8 + 4 + 32);
    bool valid = false;
    assert_ok(kms_verify(f->k, &f->app, "hook", msg, sizeof(msg), m1.data, m1.len, &valid, &v));
    assert_true(valid);
    assert_ok(kms_key_rotate(f->k, &f->admin, "hook", KMS_ROTATION_MANUAL, NULL, NULL));
    kms_buf m2 KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_mac(f->k, &f->app, "hook", msg, sizeof(msg), &m2, &v));
    assert_int_equal(v, 2);
    /* Both versions verify across the rotation. */
    assert_ok(kms_verify(f->k, &f->app, "hook", msg, sizeof(msg), m1.data, m1.len, &valid, &v));
    assert_true(valid);
    assert_int_equal(v, 1);
    assert_ok(kms_verify(f->k, &f->app, "hook", msg, sizeof(msg), m2.data, m2.len, &valid, &v));
    assert_true(valid);
    /* A wrong message or MAC: valid = false, not an error. */
    assert_ok(kms_verify(f->k, &f->app, "hook", msg, 3, m2.data, m2.len, &valid, &v));
    assert_false(valid);
    m2.data[m2.len - 1] ^= 1;
    assert_ok(kms_verify(f->k, &f->app, "hook", msg, sizeof(msg), m2.data, m2.len, &valid, &v));
    assert_false(valid);
    /* Malformed or another key's token: the token error. */
    assert_err(kms_verify(f->k, &f->app, "hook", msg, sizeof(msg), m2.data, m2.len - 1, &valid, &v),
               KMS_ERR_TOKEN_INVALID);
    kms_fx_key(f, "hook2", KMS_PURPOSE_MAC);
    assert_err(kms_verify(f->k, &f->app, "hook2", msg, sizeof(msg), m1.data, m1.len, &valid, &v),
               KMS_ERR_TOKEN_INVALID);
}

static void test_batch(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "batch", KMS_PURPOSE_ENCRYPT);
    enum { N = 6 };
    uint8_t deks[N][32];
    kms_batch_item items[N] = {0};
    for (int i = 0; i < N; i++) {
        memset(deks[i], i + 1, 32);
        items[i].in = deks[i];
        items[i].in_len = 32;
    }
    items[2].in_len = 0;    /* bad: empty */
    items[4].in_len = 2000; /* bad: too long */
    kms_batch_result res[N] = {0};
    assert_ok(kms_batch(f->k, &f->app, KMS_OP_WRAP, "batch", items, N, res));
    for (int i = 0; i < N; i++) {
        if (i == 2)
            assert_int_equal(res[i].err, KMS_ERR_INVALID_ARGUMENT);
        else if (i == 4)
            assert_int_equal(res[i].err, KMS_ERR_LIMIT_EXCEEDED);
        else
            assert_int_equal(res[i].err, KMS_OK);
    }
    /* Unwrap them back, with one tampered token in the middle. */
    kms_batch_item back[N] = {0};
    for (int i = 0; i < N; i++) {
        back[i].in = res[i].out.data;
        back[i].in_len = res[i].out.len;
    }
    uint8_t bad[256];
    memcpy(bad, res[1].out.data, res[1].out.len);
    bad[res[1].out.len - 1] ^= 0x80;
    back[1].in = bad;
    kms_batch_result out[N] = {0};
    assert_ok(kms_batch(f->k, &f->app, KMS_OP_UNWRAP, "batch", back, N, out));
    assert_int_equal(out[0].err, KMS_OK);
    assert_memory_equal(out[0].out.data, deks[0], 32);
    assert_true(out[0].out.secret);
    assert_int_equal(out[1].err, KMS_ERR_TOKEN_INVALID);
    assert_int_equal(out[1].out.len, 0);
    assert_int_equal(out[2].err, KMS_ERR_TOKEN_INVALID); /* empty input */
    assert_int_equal(out[3].err, KMS_OK);
    assert_memory_equal(out[3].out.data, deks[3], 32);
    kms_batch_results_free(out, N);
    kms_batch_results_free(res, N);

    /* Whole-request failures. */
    assert_err(kms_batch(f->k, &f->app, KMS_OP_WRAP, "nope", items, N, res), KMS_ERR_KEY_NOT_FOUND);
    assert_err(kms_batch(f->k, &f->app, KMS_OP_MAC, "batch", items, N, res), KMS_ERR_KEY_PURPOSE);
    assert_err(kms_batch(f->k, &f->app, KMS_OP_WRAP, "batch", items, KMS_BATCH_MAX_ITEMS + 1, res),
               KMS_ERR_LIMIT_EXCEEDED);
}

static void test_reopen_persistence(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "persist", KMS_PURPOSE_ENCRYPT);
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    const uint8_t dek[8] = "abcdefgh";
    for (int i = 0; i < 5; i++) {
        kms_buf_reset(&tok);
        assert_ok(kms_wrap(f->k, &f->app, "persist", dek, 8, NULL, 0, &tok, &v));
    }
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "persist", 1, &vi));
    assert_int_equal(vi.encryptions, 5);
    assert_int_equal(vi.last_used_at, f->now);
    kms_fx_reopen(f);
    assert_ok(kms_version_get(f->k, "persist", 1, &vi));
    /* A clean close gives back the unused reservation: exact. */
    assert_int_equal(vi.encryptions, 5);
    assert_int_equal(vi.last_used_at, f->now);
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, 0);
    assert_ok(kms_unwrap(f->k, &f->app, "persist", tok.data, tok.len, NULL, 0, &pt, &v));
    assert_ok(kms_wrap(f->k, &f->app, "persist", dek, 8, NULL, 0, &tok, &v));
    assert_ok(kms_version_get(f->k, "persist", 1, &vi));
    assert_int_equal(vi.encryptions, 6);
}

static void test_backup(void **state)
{
    kms_fx *f = *state;
    char dir[600];
    snprintf(dir, sizeof(dir), "%s/backup", f->tok.dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    assert_ok(kms_backup(f->k, dir));
    char p[700];
    snprintf(p, sizeof(p), "%s/data.mdb", dir);
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_true(st.st_size > 0);
    /* Not into a non-empty directory. */
    assert_err(kms_backup(f->k, dir), KMS_ERR_INVALID_ARGUMENT);
    kms_stats s;
    assert_ok(kms_stats_get(f->k, &s));
    assert_true(s.keys > 0);
    assert_true(s.store_used_bytes > 0 && s.store_used_bytes <= s.store_map_size);
    assert_true(s.store_limit_bytes > s.store_used_bytes);
    assert_ok(kms_ready(f->k));
}

static void test_check_orphan(void **state)
{
    kms_fx *f = *state;
    kms_check_report rep;
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
    assert_int_equal(rep.masters, 1);
    /* Plant an orphan master object straight on the token. */
    uint8_t id[KMS_HSM_ID_BYTES];
    assert_ok(kms_hsm_master_create(kms_hsm_of(f->k), id));
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 1);
    assert_int_equal(rep.orphan_objects, 1);
    assert_int_equal(rep.repaired, 0);
    assert_ok(kms_check(f->k, true, &rep));
    assert_int_equal(rep.orphan_objects, 1);
    assert_int_equal(rep.repaired, 1);
    bool exists = true;
    assert_ok(kms_hsm_master_exists(kms_hsm_of(f->k), id, &exists));
    assert_false(exists);
    assert_ok(kms_check(f->k, false, &rep));
    assert_int_equal(rep.problems, 0);
}

static void test_tiny_map_grows(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(64 * 1024);
    char name[32];
    enum { KEYS = 300 };
    for (int i = 0; i < KEYS; i++) {
        snprintf(name, sizeof(name), "tiny-%03d", i);
        kms_fx_key(f, name, KMS_PURPOSE_ENCRYPT);
    }
    kms_stats s;
    assert_ok(kms_stats_get(f->k, &s));
    assert_true(s.store_map_size > 64 * 1024);
    kms_fx_reopen(f);
    kms_buf tok KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    for (int i = 0; i < KEYS; i++) {
        snprintf(name, sizeof(name), "tiny-%03d", i);
        kms_key_info ki;
        assert_ok(kms_key_get(f->k, name, &ki));
        if (i % 30 == 0) {
            kms_buf_reset(&tok);
            assert_ok(kms_wrap(f->k, &f->app, name, (const uint8_t *)"k", 1, NULL, 0, &tok, &v));
        }
    }
    kms_fx_free(f);

    /* A maximum that is reached: store_full, and nothing half-written. */
    f = kms_fx_new(64 * 1024);
    kms_close(f->k);
    f->k = NULL;
    f->cfg.map_size_max = 256 * 1024;
    assert_ok(kms_open(&f->cfg, &f->k));
    kms_result r = KMS_OK_RESULT;
    int made = 0;
    for (int i = 0; i < 5000 && kms_is_ok(r); i++) {
        snprintf(name, sizeof(name), "full-%04d", i);
        kms_key_spec ks = {.name = name, .purpose = KMS_PURPOSE_ENCRYPT};
        r = kms_key_create(f->k, &f->admin, &ks, NULL);
        if (kms_is_ok(r))
            made++;
    }
    assert_int_equal(r.err, KMS_ERR_STORE_FULL);
    assert_true(made > 100);
    kms_key_info ki;
    assert_err(kms_key_get(f->k, name, &ki), KMS_ERR_KEY_NOT_FOUND);
    snprintf(name, sizeof(name), "full-%04d", made - 1);
    assert_ok(kms_key_get(f->k, name, &ki));
    kms_fx_free(f);
}

/* Another process (kmsd's worker processes share one store) rotates a key
 * and changes a version's state: this process's cache follows at once. */
static void test_cross_process_cache(void **state)
{
    kms_fx *f = *state;
    kms_fx_key(f, "xproc", KMS_PURPOSE_ENCRYPT);
    kms_close(f->k);
    f->k = NULL;
    int go[2], done[2];
    assert_int_equal(pipe(go), 0);
    assert_int_equal(pipe(done), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char c;
        if (read(go[0], &c, 1) != 1)
            _exit(2);
        kms *k = NULL;
        if (!kms_is_ok(kms_open(&f->cfg, &k)))
            _exit(3);
        int rc = 0;
        if (!kms_is_ok(kms_key_rotate(k, &f->admin, "xproc", KMS_ROTATION_MANUAL, NULL, NULL)))
            rc = 4;
        kms_close(k);
        if (write(done[1], "d", 1) != 1)
            rc = 5;
        _exit(rc);
    }
    assert_ok(kms_open(&f->cfg, &f->k));
    kms_buf t1 KMS_DEFER(kms_buf_cleanup) = {0};
    uint32_t v;
    assert_ok(kms_wrap(f->k, &f->app, "xproc", (const uint8_t *)"k", 1, NULL, 0, &t1, &v));
    assert_int_equal(v, 1);
    assert_int_equal(write(go[1], "g", 1), 1);
    char c;
    assert_int_equal(read(done[0], &c, 1), 1);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    kms_buf t2 KMS_DEFER(kms_buf_cleanup) = {0};
    assert_ok(kms_wrap(f->k, &f->app, "xproc", (const uint8_t *)"k", 1, NULL, 0, &t2, &v));
    assert_int_equal(v, 2);
    close(go[0]);
    close(go[1]);
    close(done[0]);
    close(done[1]);
}

typedef struct {
    kms_fx *f;
    int n;
    int failures;
} hammer_arg;

static void *hammer(void *p)
{
    hammer_arg *a = p;
    kms_buf t = {0};
    kms_buf pt;
    kms_buf_init_secret(&pt, 0);
    uint32_t v;
    for (int i = 0; i < a->n; i++) {
        kms_buf_reset(&t);
        kms_buf_reset(&pt);
        if (!kms_is_ok(kms_wrap(a->f->k, &a->f->app, "hammer", (const uint8_t *)"dek", 3, NULL, 0,
                                &t, &v)) ||
            !kms_is_ok(
                kms_unwrap(a->f->k, &a->f->app, "hammer", t.data, t.len, NULL, 0, &pt, &v)) ||
            pt.len != 3)
            a->failures++;
    }
    kms_buf_free(&t);
    kms_buf_free(&pt);
    return NULL;
}

/* Threads share the counter: with a tiny reservation, every encryption is
 * counted exactly once. */
static void test_threads_count_exactly(void **state)
{
    kms_fx *f = *state;
    kms_close(f->k);
    f->k = NULL;
    f->cfg.counter_reservation = 7;
    assert_ok(kms_open(&f->cfg, &f->k));
    kms_fx_key(f, "hammer", KMS_PURPOSE_ENCRYPT);
    enum { THREADS = 4, PER = 500 };
    pthread_t th[THREADS];
    hammer_arg args[THREADS];
    for (int i = 0; i < THREADS; i++) {
        args[i] = (hammer_arg){.f = f, .n = PER};
        assert_int_equal(pthread_create(&th[i], NULL, hammer, &args[i]), 0);
    }
    /* Meanwhile, admin changes bump the cache generation. */
    for (int i = 0; i < 5; i++)
        kms_fx_key(f,
                   i == 0   ? "hammer-a"
                   : i == 1 ? "hammer-b"
                   : i == 2 ? "hammer-c"
                   : i == 3 ? "hammer-d"
                            : "hammer-e",
                   KMS_PURPOSE_MAC);
    for (int i = 0; i < THREADS; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(args[i].failures, 0);
    }
    kms_version_info vi;
    assert_ok(kms_version_get(f->k, "hammer", 1, &vi));
    assert_int_equal(vi.encryptions, THREADS * PER);
    kms_fx_reopen(f);
    assert_ok(kms_version_get(f->k, "hammer", 1, &vi));
    assert_int_equal(vi.encryptions, THREADS * PER);
    f->cfg.counter_reservation = 0;
}

/* A store written by another schema version is refused. */
static void test_schema_refused(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    kms_close(f->k);
    f->k = NULL;
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_open(env, f->store, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    uint8_t two[4] = {0, 0, 0, 2};
    MDB_val k = {6, "schema"}, v = {4, two};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    assert_err(kms_open(&f->cfg, &f->k), KMS_ERR_STORE_SCHEMA);
    assert_null(f->k);
    kms_fx_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_get_list),
        cmocka_unit_test(test_wrap_unwrap_encrypt_decrypt),
        cmocka_unit_test(test_datakey),
        cmocka_unit_test(test_rewrap_after_rotate),
        cmocka_unit_test(test_mac_verify),
        cmocka_unit_test(test_batch),
        cmocka_unit_test(test_reopen_persistence),
        cmocka_unit_test(test_backup),
        cmocka_unit_test(test_check_orphan),
        cmocka_unit_test(test_cross_process_cache),
        cmocka_unit_test(test_threads_count_exactly),
        cmocka_unit_test(test_tiny_map_grows),
        cmocka_unit_test(test_schema_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
