/*
 * The audit trail of kms/ (kms_audit.h) on a real SoftHSM token: group
 * commit from many threads, the chain, signed heads verified with OpenSSL
 * and the public key alone, filters, pruning with a signed anchor, and a
 * full store refusing records (then recovering once pruning frees room),
 * and the journal: a killed writer's records recovered, a torn frame
 * ignored, a small journal reused by several processes at once, and a
 * journal that does not continue a restored store refused.
 */
#include "kms_audit.h"
#include "kms_hash.h"
#include "kms_test_fixture.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static kms_audit_config audit_on = {.enabled = true};

static void rec_fill(kms_audit_record *r, const char *identity, const char *op, const char *key,
                     uint32_t version)
{
    memset(r, 0, sizeof(*r));
    snprintf(r->identity, sizeof(r->identity), "%s", identity);
    snprintf(r->source, sizeof(r->source), "127.0.0.1:4242");
    snprintf(r->request_id, sizeof(r->request_id), "req-%u", version);
    snprintf(r->operation, sizeof(r->operation), "%s", op);
    snprintf(r->key, sizeof(r->key), "%s", key);
    snprintf(r->result, sizeof(r->result), "ok");
    r->version = version;
    r->status = 200;
}

/* Appends wraps of "app" on "orders", versions first..last. */
static void append_wraps(kms *k, unsigned first, unsigned last)
{
    for (unsigned v = first; v <= last; v++) {
        kms_audit_record r;
        rec_fill(&r, "app", "wrap", "orders", v);
        assert_ok(kms_audit_append(k, &r));
    }
}

/* Recomputes the chain over every stored record from the anchor. */
typedef struct {
    uint8_t h[KMS_AUDIT_HASH_BYTES];
    uint64_t expect_seq;
    size_t n;
} chain_check;

static kms_result chain_visit(uint64_t seq, const uint8_t *bytes, size_t len,
                              const uint8_t hash[KMS_AUDIT_HASH_BYTES], void *arg, bool *stop)
{
    (void)stop;
    chain_check *c = arg;
    assert_int_equal(seq, c->expect_seq);
    /* "prev" is the last field: its hex must be the running hash. */
    char hex[2 * KMS_AUDIT_HASH_BYTES + 1];
    kms_hex_encode(c->h, KMS_AUDIT_HASH_BYTES, hex);
    assert_true(len > 2 * KMS_AUDIT_HASH_BYTES + 2);
    assert_memory_equal(bytes + len - 2 - 2 * KMS_AUDIT_HASH_BYTES, hex, 2 * KMS_AUDIT_HASH_BYTES);
    kms_iov parts[2] = {{c->h, KMS_AUDIT_HASH_BYTES}, {bytes, len}};
    assert_ok(kms_sha256_iov(parts, 2, c->h));
    assert_memory_equal(c->h, hash, KMS_AUDIT_HASH_BYTES);
    c->expect_seq++;
    c->n++;
    return KMS_OK_RESULT;
}

static void chain_verify(kms *k, size_t expect_n)
{
    kms_audit_signed anchor;
    assert_ok(kms_audit_anchor_get(k, &anchor));
    chain_check c = {.expect_seq = anchor.seq + 1};
    memcpy(c.h, anchor.hash, sizeof(c.h));
    assert_ok(kms_audit_scan_raw(k, anchor.seq, 0, chain_visit, &c));
    assert_int_equal(c.n, expect_n);
    uint64_t seq;
    uint8_t head[KMS_AUDIT_HASH_BYTES];
    assert_ok(kms_audit_head_get(k, &seq, head));
    assert_int_equal(seq, c.expect_seq - 1);
    assert_memory_equal(head, c.h, sizeof(head));
}

static bool sig_verify(kms *k, const kms_audit_signed *s)
{
    char *pem = NULL;
    assert_ok(kms_audit_public_key_pem(k, &pem));
    BIO *bio = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    assert_non_null(pkey);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    assert_int_equal(EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pkey), 1);
    int ok = EVP_DigestVerify(md, s->sig, s->sig_len, (const uint8_t *)s->msg, s->msg_len);
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    free(pem);
    return ok == 1;
}

typedef struct {
    kms *k;
    unsigned id;
    unsigned n;
} writer_arg;

static void *writer_main(void *p)
{
    writer_arg *w = p;
    for (unsigned i = 0; i < w->n; i++) {
        kms_audit_record r;
        char who[32];
        snprintf(who, sizeof(who), "app-%u", w->id);
        rec_fill(&r, who, "wrap", "orders", i + 1);
        kms_result res = kms_audit_append(w->k, &r);
        if (!kms_is_ok(res) || r.seq == 0)
            return (void *)1;
    }
    return NULL;
}

static void test_group_commit_chain(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    assert_ok(kms_audit_start(f->k, &audit_on));
    enum { THREADS = 8, PER = 200 };
    pthread_t t[THREADS];
    writer_arg w[THREADS];
    for (unsigned i = 0; i < THREADS; i++) {
        w[i] = (writer_arg){.k = f->k, .id = i, .n = PER};
        assert_int_equal(pthread_create(&t[i], NULL, writer_main, &w[i]), 0);
    }
    for (unsigned i = 0; i < THREADS; i++) {
        void *rv;
        pthread_join(t[i], &rv);
        assert_null(rv);
    }
    chain_verify(f->k, THREADS * PER);

    /* Filters: one identity, paging with after_seq. */
    kms_audit_filter flt = {.identity = "app-3", .limit = 150};
    kms_audit_record *v = NULL;
    size_t n = 0;
    assert_ok(kms_audit_query(f->k, &flt, &v, &n));
    assert_int_equal(n, 150);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(v[i].identity, "app-3");
        assert_string_equal(v[i].operation, "wrap");
        assert_int_equal(v[i].status, 200);
        if (i > 0)
            assert_true(v[i].seq > v[i - 1].seq);
    }
    flt.after_seq = v[n - 1].seq;
    free(v);
    assert_ok(kms_audit_query(f->k, &flt, &v, &n));
    assert_int_equal(n, PER - 150);
    free(v);
    kms_audit_filter byver = {.version = 7, .key = "orders"};
    assert_ok(kms_audit_query(f->k, &byver, &v, &n));
    assert_int_equal(n, THREADS);
    free(v);
    kms_audit_filter none = {.key = "other"};
    assert_ok(kms_audit_query(f->k, &none, &v, &n));
    assert_int_equal(n, 0);
    assert_null(v);

    /* A signed head verifies with the public key alone; a changed message
     * does not. */
    kms_audit_signed h;
    assert_ok(kms_audit_head_sign(f->k, &h));
    assert_int_equal(h.seq, THREADS * PER);
    assert_true(sig_verify(f->k, &h));
    kms_audit_signed bad = h;
    bad.msg[20] ^= 1;
    assert_false(sig_verify(f->k, &bad));
    kms_audit_signed *heads = NULL;
    assert_ok(kms_audit_heads_list(f->k, 1, UINT64_MAX, 10, &heads, &n));
    assert_true(n >= 1);
    assert_int_equal(heads[n - 1].seq, h.seq);
    assert_memory_equal(heads[n - 1].sig, h.sig, h.sig_len);
    free(heads);

    /* The signing key survives a restart (found by its recorded CKA_ID). */
    char *pem1 = NULL, *pem2 = NULL;
    assert_ok(kms_audit_public_key_pem(f->k, &pem1));
    kms_fx_reopen(f);
    assert_ok(kms_audit_start(f->k, &audit_on));
    assert_ok(kms_audit_public_key_pem(f->k, &pem2));
    assert_string_equal(pem1, pem2);
    free(pem1);
    free(pem2);
    kms_audit_record r;
    rec_fill(&r, "admin", "key.rotate", "orders", 1);
    r.to_version = 2;
    assert_ok(kms_audit_append(f->k, &r));
    assert_int_equal(r.seq, THREADS * PER + 1);
    chain_verify(f->k, THREADS * PER + 1);
    kms_fx_free(f);
}

static void test_escaping_roundtrip(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    assert_ok(kms_audit_start(f->k, &audit_on));
    kms_audit_record r;
    rec_fill(&r, "CN=\"x\\y\",O=\x01\xc3\xa9", "unwrap", "k", 3);
    snprintf(r.result, sizeof(r.result), "forbidden");
    r.status = 403;
    r.time = 12345;
    assert_ok(kms_audit_append(f->k, &r));
    kms_audit_filter flt = {0};
    kms_audit_record *v = NULL;
    size_t n = 0;
    assert_ok(kms_audit_query(f->k, &flt, &v, &n));
    assert_int_equal(n, 1);
    assert_string_equal(v[0].identity, r.identity);
    assert_string_equal(v[0].result, "forbidden");
    assert_int_equal(v[0].time, 12345);
    assert_int_equal(v[0].status, 403);
    assert_memory_equal(v[0].hash, r.hash, KMS_AUDIT_HASH_BYTES);
    free(v);
    chain_verify(f->k, 1);
    kms_fx_free(f);
}

static void test_prune_anchor(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    /* Retention off: the committer prunes by itself once an hour when it
     * is on; here the test calls the pruning directly. */
    assert_ok(kms_audit_start(f->k, &audit_on));
    for (unsigned i = 0; i < 30; i++) {
        kms_audit_record r;
        rec_fill(&r, "app", "wrap", "k", 1);
        f->now = KMS_FX_T0 + i * 100;
        assert_ok(kms_audit_append(f->k, &r));
    }
    /* Records with time < T0 + 2000 (seq 1..20) go. */
    f->now = KMS_FX_T0 + 3000;
    uint64_t removed = 0;
    assert_ok(kms_audit_retention_run(f->k, &removed)); /* retention 0: keep all */
    assert_int_equal(removed, 0);
    assert_ok(kms_audit_prune(f->k, KMS_FX_T0 + 2000, &removed));
    assert_int_equal(removed, 20);
    kms_audit_signed anchor;
    assert_ok(kms_audit_anchor_get(f->k, &anchor));
    assert_int_equal(anchor.seq, 20);
    assert_true(anchor.sig_len > 0);
    assert_true(sig_verify(f->k, &anchor));
    chain_verify(f->k, 10);
    /* Pruning again removes nothing; appends continue the chain. */
    assert_ok(kms_audit_prune(f->k, KMS_FX_T0 + 2000, &removed));
    assert_int_equal(removed, 0);
    kms_audit_record r;
    rec_fill(&r, "app", "wrap", "k", 1);
    assert_ok(kms_audit_append(f->k, &r));
    assert_int_equal(r.seq, 31);
    chain_verify(f->k, 11);
    kms_fx_free(f);
}

/* The audit device fails: a store at its map maximum. Once the journal
 * cannot hand its records over, appends are refused with
 * audit_unavailable and kms_audit_ready says so before any operation
 * runs; once pruning frees pages, the ingester's retry succeeds, every
 * journaled record reaches the store, and records are accepted again. */
static void test_store_full_refuses(void **state)
{
    (void)state;
    kms_fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(kms_test_token_setup(&f->tok, false), 0);
    snprintf(f->store, sizeof(f->store), "%s/store", f->tok.dir);
    f->now = KMS_FX_T0;
    f->cfg.store_path = f->store;
    f->cfg.hsm = f->tok.cfg;
    f->cfg.clock = kms_fx_clock;
    f->cfg.clock_arg = f;
    f->cfg.map_size_initial = 256 * 1024;
    f->cfg.map_size_max = 512 * 1024;
    f->admin = (kms_caller){.identity = "admin"};
    assert_ok(kms_open(&f->cfg, &f->k));
    assert_ok(kms_audit_start(f->k, &audit_on));
    assert_ok(kms_audit_ready(f->k));
    kms_result res = KMS_OK_RESULT;
    unsigned written = 0;
    for (unsigned i = 0; i < 20000 && kms_is_ok(res); i++) {
        kms_audit_record r;
        rec_fill(&r, "app-with-a-rather-long-identity-to-fill-pages-faster", "wrap", "k", i);
        res = kms_audit_append(f->k, &r);
        if (kms_is_ok(res))
            written++;
        if (i % 200 == 0)
            f->now++;
    }
    assert_int_equal(res.err, KMS_ERR_AUDIT_UNAVAILABLE);
    assert_true(written > 100);
    assert_err(kms_audit_ready(f->k), KMS_ERR_AUDIT_UNAVAILABLE);
    kms_audit_record r;
    rec_fill(&r, "app", "wrap", "k", 1);
    assert_err(kms_audit_append(f->k, &r), KMS_ERR_AUDIT_UNAVAILABLE);
    /* Every record answered is durable: the store holds a chained prefix,
     * the journal the rest, none of which is lost. */
    uint64_t in_store;
    uint8_t h[KMS_AUDIT_HASH_BYTES];
    assert_ok(kms_audit_head_get(f->k, &in_store, h));
    assert_true(in_store > 100 && in_store <= written);
    chain_verify(f->k, in_store);

    /* Space back: prune all but the youngest second of records; the
     * ingester's retry clears the failure. (In a map this small, what the
     * journal took in during the last ingest interval can be as much as
     * half the store.) The prune commits although ordinary writes filled
     * the store: they stopped short of its reserve. */
    uint64_t removed = 0;
    assert_ok(kms_audit_prune(f->k, f->now, &removed));
    assert_true(removed > 0);
    bool ready = false;
    for (int i = 0; i < 100 && !ready; i++) {
        ready = kms_is_ok(kms_audit_ready(f->k));
        if (!ready)
            usleep(50 * 1000);
    }
    assert_true(ready);
    rec_fill(&r, "app", "wrap", "k", 1);
    assert_ok(kms_audit_append(f->k, &r));
    chain_verify(f->k, written - removed + 1);
    kms_fx_free(f);
}

static void test_not_started_and_off(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    kms_audit_record r;
    rec_fill(&r, "app", "wrap", "k", 1);
    assert_err(kms_audit_append(f->k, &r), KMS_ERR_AUDIT_UNAVAILABLE);
    assert_err(kms_audit_ready(f->k), KMS_ERR_AUDIT_UNAVAILABLE);
    kms_audit_config off = {.enabled = false};
    assert_ok(kms_audit_start(f->k, &off));
    assert_false(kms_audit_enabled(f->k));
    assert_ok(kms_audit_ready(f->k));
    assert_ok(kms_audit_append(f->k, &r));
    assert_int_equal(r.seq, 0);
    kms_fx_free(f);
}

/* kms_audit_submit: the asynchronous form kmsd uses (its request
 * threads do not wait for the commit). Every record is answered exactly
 * once, in submission order, and extends the chain; a submit that cannot
 * be queued fails at once and never calls back. */
#define SUBMITS 300

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned done, ok;
    uint64_t last_seq;
    bool in_order;
} submit_state;

typedef struct {
    submit_state *st;
    kms_audit_record rec;
} submit_item;

static void submit_done(void *arg, kms_err res)
{
    submit_item *it = arg;
    submit_state *st = it->st;
    pthread_mutex_lock(&st->mu);
    if (res == KMS_OK) {
        st->ok++;
        if (it->rec.seq != st->last_seq + 1)
            st->in_order = false;
        st->last_seq = it->rec.seq;
    }
    st->done++;
    pthread_cond_signal(&st->cv);
    pthread_mutex_unlock(&st->mu);
}

static void test_submit_async(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    submit_state st = {
        .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .in_order = true};
    submit_item *items = calloc(SUBMITS, sizeof(*items));
    assert_non_null(items);
    /* Not started: refused, no callback. */
    rec_fill(&items[0].rec, "app", "wrap", "orders", 1);
    items[0].st = &st;
    assert_err(kms_audit_submit(f->k, &items[0].rec, false, submit_done, &items[0]),
               KMS_ERR_AUDIT_UNAVAILABLE);
    assert_ok(kms_audit_start(f->k, &audit_on));
    for (unsigned i = 0; i < SUBMITS; i++) {
        items[i].st = &st;
        rec_fill(&items[i].rec, "app", i % 2 ? "unwrap" : "wrap", "orders", i + 1);
        /* Half of them announced first, as kmsd does for each request. */
        bool announced = i % 2 == 0;
        if (announced)
            kms_audit_announce(f->k);
        assert_ok(kms_audit_submit(f->k, &items[i].rec, announced, submit_done, &items[i]));
    }
    pthread_mutex_lock(&st.mu);
    while (st.done < SUBMITS)
        pthread_cond_wait(&st.cv, &st.mu);
    pthread_mutex_unlock(&st.mu);
    assert_int_equal(st.ok, SUBMITS);
    assert_true(st.in_order);
    assert_int_equal(st.last_seq, SUBMITS);
    chain_verify(f->k, SUBMITS);
    kms_audit_stop(f->k);
    assert_err(kms_audit_submit(f->k, &items[0].rec, false, submit_done, &items[0]),
               KMS_ERR_AUDIT_UNAVAILABLE);
    assert_int_equal(st.done, SUBMITS);
    free(items);
    kms_fx_free(f);
}

/* An announced request that never produces a record (its client went
 * away) must not hold commits back for more than the gather bound, and a
 * withdrawal ends it. Sequential appends behind it all complete, and
 * withdrawing more than was announced is harmless. */
static void test_announce_never_blocks(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    assert_ok(kms_audit_start(f->k, &audit_on));
    kms_audit_announce(f->k);
    kms_audit_announce(f->k);
    for (unsigned i = 0; i < 20; i++) {
        kms_audit_record r;
        rec_fill(&r, "app", "wrap", "orders", i + 1);
        assert_ok(kms_audit_append(f->k, &r));
        assert_int_equal(r.seq, i + 1);
    }
    kms_audit_withdraw(f->k);
    kms_audit_withdraw(f->k);
    kms_audit_withdraw(f->k);
    kms_audit_record r;
    rec_fill(&r, "app", "wrap", "orders", 21);
    kms_audit_announce(f->k);
    assert_ok(kms_audit_append_announced(f->k, &r, true));
    assert_int_equal(r.seq, 21);
    chain_verify(f->k, 21);
    kms_fx_free(f);
}

/* ---- the journal (kms_journal.h) ---- */

/* Where the run of chained frames from the journal's start ends. */
static uint64_t journal_frames_end(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    uint64_t off = 0, seq = 0;
    for (;;) {
        uint8_t h[16];
        if (pread(fd, h, sizeof(h), (off_t)off) != (ssize_t)sizeof(h) || memcmp(h, "KRM1", 4) != 0)
            break;
        uint32_t len;
        uint64_t s;
        memcpy(&len, h + 4, 4);
        memcpy(&s, h + 8, 8);
        if (seq != 0 && s != seq + 1)
            break;
        seq = s;
        off += (80 + (uint64_t)len + 7) & ~(uint64_t)7;
    }
    close(fd);
    return off;
}

/* A process killed right after its appends were answered leaves the last
 * records in the journal only; the next start moves them into the store.
 * Junk after them (a write cut short, never answered) is ignored and then
 * overwritten. */
static void test_journal_recovers_killed_writer(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    kms_close(f->k);
    f->k = NULL;
    enum { N = 300 };
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kms *k = NULL;
        if (!kms_is_ok(kms_open(&f->cfg, &k)) || !kms_is_ok(kms_audit_start(k, &audit_on)))
            _exit(2);
        for (unsigned i = 0; i < N; i++) {
            kms_audit_record r;
            rec_fill(&r, "app", "wrap", "orders", i + 1);
            if (!kms_is_ok(kms_audit_append(k, &r)))
                _exit(3);
        }
        raise(SIGKILL); /* answered, then gone: no stop, no last ingest */
        _exit(4);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    char jp[PATH_MAX];
    snprintf(jp, sizeof(jp), "%s/audit.journal", f->store);
    uint64_t end = journal_frames_end(jp);
    assert_true(end > 0);
    uint8_t junk[200];
    memset(junk, 0x5a, sizeof(junk));
    memcpy(junk, "KRM1", 4);
    int fd = open(jp, O_WRONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, junk, sizeof(junk), (off_t)end), (ssize_t)sizeof(junk));
    close(fd);

    assert_ok(kms_open(&f->cfg, &f->k));
    uint64_t seq;
    uint8_t h[KMS_AUDIT_HASH_BYTES];
    assert_ok(kms_audit_head_get(f->k, &seq, h)); /* audit not started: the store alone */
    assert_true(seq < N);                         /* the last ones were in the journal only */
    assert_ok(kms_audit_start(f->k, &audit_on));
    chain_verify(f->k, N);
    kms_audit_record r;
    rec_fill(&r, "app", "wrap", "orders", N + 1);
    assert_ok(kms_audit_append(f->k, &r));
    assert_int_equal(r.seq, N + 1);
    chain_verify(f->k, N + 1);
    kms_fx_free(f);
}

/* Several processes append at once through a small journal, which is
 * handed over to the store and reused many times while they do: one
 * chain, every record once. */
static void test_journal_recycles_across_processes(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    kms_audit_config small = {.enabled = true, .journal_bytes = 64 * 1024};
    /* The signing key is made now: SoftHSM in a process that starts while
     * another writes the token's files can miss the token. */
    assert_ok(kms_audit_start(f->k, &small));
    kms_close(f->k);
    f->k = NULL;
    enum { PROCS = 3, PER = 400 };
    /* The processes open the token one at a time (SoftHSM's C_Initialize in
     * one process can miss the token while another reads or writes its
     * files), then all start appending at once when the go pipe closes. */
    int ready[2], go[2];
    assert_int_equal(pipe(ready), 0);
    assert_int_equal(pipe(go), 0);
    pid_t pids[PROCS];
    for (unsigned p = 0; p < PROCS; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);
        if (pids[p] == 0) {
            close(ready[0]);
            close(go[1]);
            kms *k = NULL;
            kms_result res = kms_open(&f->cfg, &k);
            if (kms_is_ok(res))
                res = kms_audit_start(k, &small);
            if (!kms_is_ok(res)) {
                fprintf(stderr, "process %u: %s (%s)\n", p, kms_error_code(res.err),
                        kms_error_detail());
                _exit(2);
            }
            char c = 1, g;
            if (write(ready[1], &c, 1) != 1 || read(go[0], &g, 1) != 0)
                _exit(4);
            char who[32];
            snprintf(who, sizeof(who), "proc-%u", p);
            for (unsigned i = 0; i < PER; i++) {
                kms_audit_record r;
                rec_fill(&r, who, "wrap", "orders", i + 1);
                res = kms_audit_append(k, &r);
                if (!kms_is_ok(res) || r.seq == 0) {
                    fprintf(stderr, "process %u, record %u: %s (%s)\n", p, i,
                            kms_error_code(res.err), kms_error_detail());
                    _exit(3);
                }
            }
            kms_close(k);
            _exit(0);
        }
        /* Bounded: a process that failed to open never writes. */
        struct pollfd pfd = {.fd = ready[0], .events = POLLIN};
        assert_int_equal(poll(&pfd, 1, 60 * 1000), 1);
        char c;
        assert_int_equal(read(ready[0], &c, 1), 1);
    }
    close(go[1]); /* go */
    close(go[0]);
    close(ready[0]);
    close(ready[1]);
    for (unsigned p = 0; p < PROCS; p++) {
        int st = 0;
        assert_int_equal(waitpid(pids[p], &st, 0), pids[p]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    assert_ok(kms_open(&f->cfg, &f->k));
    assert_ok(kms_audit_start(f->k, &small));
    chain_verify(f->k, PROCS * PER);
    for (unsigned p = 0; p < PROCS; p++) {
        char who[32];
        snprintf(who, sizeof(who), "proc-%u", p);
        kms_audit_filter flt = {.identity = who, .limit = 1000};
        kms_audit_record *v = NULL;
        size_t n = 0;
        assert_ok(kms_audit_query(f->k, &flt, &v, &n));
        assert_int_equal(n, PER);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(v[i].version, i + 1); /* each process's records in its order */
        free(v);
    }
    kms_fx_free(f);
}

/* A store restored from an older backup next to a journal that has moved
 * on (reused since) does not continue the journal's chain: the audit does
 * not start, and says why; with the journal moved aside it does. */
static void test_journal_refuses_a_gap(void **state)
{
    (void)state;
    kms_fx *f = kms_fx_new(0);
    kms_audit_config small = {.enabled = true, .journal_bytes = 64 * 1024};
    assert_ok(kms_audit_start(f->k, &small));
    append_wraps(f->k, 1, 5);
    char backup[PATH_MAX / 2];
    snprintf(backup, sizeof(backup), "%s/backup", f->tok.dir);
    assert_int_equal(mkdir(backup, 0700), 0);
    assert_ok(kms_backup(f->k, backup));
    append_wraps(f->k, 6, 400); /* 400 frames: the 64 KiB journal is reused */
    kms_close(f->k);
    f->k = NULL;

    char src[PATH_MAX], dst[PATH_MAX + 32];
    snprintf(src, sizeof(src), "%s/data.mdb", backup);
    snprintf(dst, sizeof(dst), "%s/data.mdb", f->store);
    assert_int_equal(rename(src, dst), 0);
    assert_ok(kms_open(&f->cfg, &f->k));
    assert_err(kms_audit_start(f->k, &small), KMS_ERR_STORE_CORRUPT);
    char jp[PATH_MAX + 32], aside[PATH_MAX + 32];
    snprintf(jp, sizeof(jp), "%s/audit.journal", f->store);
    snprintf(aside, sizeof(aside), "%s/audit.journal.aside", f->tok.dir);
    assert_int_equal(rename(jp, aside), 0);
    assert_ok(kms_audit_start(f->k, &small));
    chain_verify(f->k, 5);
    kms_fx_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_commit_chain),
        cmocka_unit_test(test_escaping_roundtrip),
        cmocka_unit_test(test_prune_anchor),
        cmocka_unit_test(test_store_full_refuses),
        cmocka_unit_test(test_not_started_and_off),
        cmocka_unit_test(test_submit_async),
        cmocka_unit_test(test_announce_never_blocks),
        cmocka_unit_test(test_journal_recovers_killed_writer),
        cmocka_unit_test(test_journal_recycles_across_processes),
        cmocka_unit_test(test_journal_refuses_a_gap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
