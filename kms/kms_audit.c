/*
 * The audit trail (kms_audit.h, docs/audit.md).
 *
 * Layout in LMDB:
 *   audit["<u64 BE seq>"]    = hash_seq (32 bytes) || canonical record bytes
 *   meta["audit.tail"]       = u64 BE seq || hash_seq      (the stored chain head)
 *   meta["audit.anchor"]     = signed position before the first stored record
 *   meta["audit.head.<seq>"] = signed heads (u64 BE seq in the key)
 *   meta["audit.sigkey"]     = CKA_ID of the HSM signing key pair
 *
 * Group commit: request threads queue a waiter (and either block on it or,
 * through kms_audit_submit, go on and are called back); one committer
 * thread per process takes everything queued, numbers and chains it after
 * the tail under the journal's append lock (shared by every process, so
 * they extend one chain), writes it to the journal, syncs, and tells each
 * waiter the result. An ingester thread moves journaled records into the
 * LMDB audit database in batches; readers do so first (docs/audit.md,
 * "Durability: the audit journal").
 */
#define _GNU_SOURCE
#include "kms_audit.h"
#include "kms_internal.h"

#include "kms_hash.h"
#include "kms_journal.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define AUDIT_BATCH_MAX 4096
/* Ingest: records per LMDB transaction, and how often at most. */
#define AUDIT_INGEST_MAX      4096
#define AUDIT_INGEST_EVERY_MS 100
#define AUDIT_SIGN_EVERY_N    10000u
#define AUDIT_SIGN_EVERY_S    300
#define AUDIT_PROBE_EVERY_MS  500
/* Longest wait for announced records before a commit (see gather below). */
#define AUDIT_GATHER_MAX_NS    1000000L
#define AUDIT_PRUNE_BATCH      20000
#define AUDIT_PRUNE_EVERY_S    3600
#define AUDIT_HEAD_VALUE_BYTES (8 + KMS_AUDIT_HASH_BYTES + 8 + 2 + KMS_AUDIT_SIG_MAX_BYTES)

static const char audit_key_tail[] = "audit.tail";
static const char audit_key_anchor[] = "audit.anchor";
static const char audit_key_sigkey[] = "audit.sigkey";
static const char audit_head_prefix[] = "audit.head.";
#define AUDIT_HEAD_PREFIX_BYTES (sizeof(audit_head_prefix) - 1)

typedef struct audit_waiter {
    kms_audit_record *rec;
    kms_audit_done_fn done; /* called once, on the syncer thread (or on the writer's, if the
                               write fails) */
    void *arg;
    uint64_t submitted_ns; /* CLOCK_MONOTONIC, for kms_audit_counters.wait_* */
    struct audit_waiter *next;
} audit_waiter;

struct kms_audit {
    kms_audit_config cfg;
    uint8_t sigkey[KMS_HSM_ID_BYTES];

    pthread_mutex_t mu;
    pthread_cond_t work; /* committer waits: queue non-empty or stop */
    audit_waiter *head, *tail;
    /* Written into the journal, waiting for the syncer's next sync, in the
     * order written (so in sequence order): one sync covers every record
     * written before it starts. */
    audit_waiter *written, *written_tail;
    pthread_cond_t sync_cv; /* syncer waits: written non-empty or sync_stop */
    bool sync_stop;
    pthread_t syncer;
    bool syncer_started;
    /* Group-commit hint: requests announced (kms_audit_announce) whose
     * record is not queued yet, and whether the committer is waiting for
     * them. */
    uint64_t outstanding;
    bool gathering;
    int64_t last_commit_ns;
    bool stopping;
    bool failed;        /* the last append failed; cleared by a probe or append */
    bool ingest_failed; /* the last ingest failed; cleared by the next one */
    pthread_t thread;
    bool thread_started;
    kms_journal *journal;
    size_t batch_max; /* records per append: a batch always fits the journal */
    /* The ingester waits on ingest_cv for records journaled (to_ingest). */
    pthread_cond_t ingest_cv;
    uint64_t to_ingest;
    bool ingester_idle; /* waiting for records, not for its interval */
    bool ingest_stop;
    pthread_t ingester;
    bool ingester_started;

    /* Syncer-thread state (no lock). */
    uint64_t unsigned_records;
    int64_t last_signed;
    int64_t last_pruned;
    /* What the writers and the syncer did: records written, journal
     * writes, syncs, and what the ingests moved; logged at stop, so that
     * group sizes can be read off a run. */
    _Atomic uint64_t n_records, n_commits, n_syncs;
    _Atomic uint64_t n_ingests, n_ingested;
    /* Serialises signing and pruning of this process. */
    pthread_mutex_t sign_mu;
    kms_audit_counters own_counters;
    kms_audit_counters *c; /* own_counters unless the configuration names others */
};

const double kms_audit_buckets[KMS_AUDIT_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                     0.01,   0.025,   0.05,   0.1,   0.25,   1};

static uint64_t audit_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void audit_observe(_Atomic uint64_t *sum_ns, _Atomic uint64_t *bucket, uint64_t ns)
{
    size_t i = 0;
    while (i < KMS_AUDIT_BUCKETS && (double)ns > kms_audit_buckets[i] * 1e9)
        i++;
    atomic_fetch_add_explicit(&bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(sum_ns, ns, memory_order_relaxed);
}

/* Counts what the trail cost the records of a sync: the sync's time and
 * each record's wait. */
static void audit_count_sync(struct kms_audit *a, audit_waiter *list, uint64_t t0, uint64_t t1)
{
    kms_audit_counters *c = a->c;
    audit_observe(&c->sync_ns, c->sync_bucket, t1 - t0);
    for (audit_waiter *w = list; w != NULL; w = w->next)
        audit_observe(&c->wait_ns, c->wait_bucket, t1 > w->submitted_ns ? t1 - w->submitted_ns : 0);
}

static void audit_count_refused(struct kms_audit *a, const audit_waiter *list)
{
    uint64_t n = 0;
    for (const audit_waiter *w = list; w != NULL; w = w->next)
        n++;
    atomic_fetch_add_explicit(&a->c->refused, n, memory_order_relaxed);
}

static KMS_RESULT audit_ingest(kms *k);

KMS_RESULT kms_audit_flush(kms *k)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    return audit_ingest(k);
}

/* Readers first move what the journal holds into the store, so that they
 * see every answered request. Best effort: when the store takes no
 * records (kms_audit_ready says so), they read what it has, which is a
 * consistent prefix of the chain. */
static void audit_catch_up(kms *k)
{
    kms_result r = audit_ingest(k);
    (void)r;
}

/* ---- canonical record bytes ---- */

/* The escaping is part of the format: bytes 0x20..0x7e other than '"' and
 * '\' stand for themselves, '"' and '\' are escaped with a backslash, every
 * other byte is \u00XX (lowercase hex). One byte string has one encoding,
 * and the result is valid JSON (RFC 8259 section 7). */
static KMS_RESULT audit_put_str(kms_buf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    KMS_GUARD(kms_buf_append_u8(b, '"'));
    const unsigned char *p = (const unsigned char *)s;
    for (;;) {
        /* The run of bytes written as they are, in one append. */
        const unsigned char *run = p;
        while (*p >= 0x20 && *p <= 0x7e && *p != '"' && *p != '\\') {
            p++;
        }
        KMS_GUARD(kms_buf_append(b, run, (size_t)(p - run)));
        if (*p == 0) {
            break;
        }
        if (*p == '"' || *p == '\\') {
            uint8_t e[2] = {'\\', *p};
            KMS_GUARD(kms_buf_append(b, e, 2));
        } else {
            uint8_t e[6] = {'\\', 'u', '0', '0', (uint8_t)hex[*p >> 4], (uint8_t)hex[*p & 15]};
            KMS_GUARD(kms_buf_append(b, e, 6));
        }
        p++;
    }
    return kms_buf_append_u8(b, '"');
}

static KMS_RESULT audit_put_lit(kms_buf *b, const char *lit)
{
    return kms_buf_append(b, lit, strlen(lit));
}

/* Decimal, as printf's %llu: no sign, no leading zeros. */
static KMS_RESULT audit_put_u64(kms_buf *b, uint64_t v)
{
    char d[20];
    size_t i = sizeof(d);
    do {
        d[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    return kms_buf_append(b, d + i, sizeof(d) - i);
}

/* Decimal, as printf's %lld. */
static KMS_RESULT audit_put_i64(kms_buf *b, int64_t v)
{
    if (v < 0) {
        KMS_GUARD(kms_buf_append_u8(b, '-'));
        return audit_put_u64(b, (uint64_t)0 - (uint64_t)v);
    }
    return audit_put_u64(b, (uint64_t)v);
}

/* {"seq":S,"time":T,"identity":"","source":"","request_id":"","operation":"",
 *  "key":"","version":V,"to_version":V,"items":N,"status":S,"result":"",
 *  "prev":"<64 hex>"}
 * Appended piece by piece rather than through printf: two formatting passes
 * per piece cost more than the rest of a record's encoding and hashing. */
static KMS_RESULT audit_encode(const kms_audit_record *r, const uint8_t prev[KMS_AUDIT_HASH_BYTES],
                               kms_buf *b)
{
    char prev_hex[2 * KMS_AUDIT_HASH_BYTES + 1];
    kms_hex_encode(prev, KMS_AUDIT_HASH_BYTES, prev_hex);
    KMS_GUARD(audit_put_lit(b, "{\"seq\":"));
    KMS_GUARD(audit_put_u64(b, r->seq));
    KMS_GUARD(audit_put_lit(b, ",\"time\":"));
    KMS_GUARD(audit_put_i64(b, r->time));
    const struct {
        const char *name; /* the field's name with its comma, quotes and colon */
        const char *s;    /* a string field, or NULL for the number n */
        uint64_t n;
    } fields[] = {
        {",\"identity\":", r->identity, 0},
        {",\"source\":", r->source, 0},
        {",\"request_id\":", r->request_id, 0},
        {",\"operation\":", r->operation, 0},
        {",\"key\":", r->key, 0},
        {",\"version\":", NULL, r->version},
        {",\"to_version\":", NULL, r->to_version},
        {",\"items\":", NULL, r->items},
        {",\"status\":", NULL, r->status},
        {",\"result\":", r->result, 0},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(fields); i++) {
        KMS_GUARD(audit_put_lit(b, fields[i].name));
        KMS_GUARD(fields[i].s != NULL ? audit_put_str(b, fields[i].s)
                                      : audit_put_u64(b, fields[i].n));
    }
    KMS_GUARD(audit_put_lit(b, ",\"prev\":\""));
    KMS_GUARD(kms_buf_append(b, prev_hex, 2 * KMS_AUDIT_HASH_BYTES));
    return audit_put_lit(b, "\"}");
}

/* The strict reader of exactly what audit_encode writes. */
typedef struct {
    const char *p, *end;
} audit_rd;

static KMS_RESULT audit_rd_lit(audit_rd *d, const char *lit)
{
    size_t n = strlen(lit);
    KMS_ENSURE((size_t)(d->end - d->p) >= n && memcmp(d->p, lit, n) == 0, KMS_ERR_STORE_CORRUPT);
    d->p += n;
    return KMS_OK_RESULT;
}

static KMS_RESULT audit_rd_u64(audit_rd *d, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    const char *start = d->p;
    while (d->p < d->end && *d->p >= '0' && *d->p <= '9') {
        uint64_t dig = (uint64_t)(*d->p - '0');
        KMS_ENSURE(v <= (max - dig) / 10, KMS_ERR_STORE_CORRUPT);
        v = v * 10 + dig;
        d->p++;
    }
    KMS_ENSURE(d->p > start && d->p - start <= 20, KMS_ERR_STORE_CORRUPT);
    *out = v;
    return KMS_OK_RESULT;
}

static KMS_RESULT audit_rd_i64(audit_rd *d, int64_t *out)
{
    bool neg = d->p < d->end && *d->p == '-';
    if (neg)
        d->p++;
    uint64_t v;
    KMS_GUARD(audit_rd_u64(d, (uint64_t)INT64_MAX, &v));
    *out = neg ? -(int64_t)v : (int64_t)v;
    return KMS_OK_RESULT;
}

static int audit_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static KMS_RESULT audit_rd_str(audit_rd *d, char *out, size_t cap)
{
    KMS_GUARD(audit_rd_lit(d, "\""));
    size_t n = 0;
    for (;;) {
        KMS_ENSURE(d->p < d->end, KMS_ERR_STORE_CORRUPT);
        char c = *d->p++;
        if (c == '"')
            break;
        if (c == '\\') {
            KMS_ENSURE(d->p < d->end, KMS_ERR_STORE_CORRUPT);
            char e = *d->p++;
            if (e == '"' || e == '\\') {
                c = e;
            } else {
                KMS_ENSURE(e == 'u' && d->end - d->p >= 4 && d->p[0] == '0' && d->p[1] == '0',
                           KMS_ERR_STORE_CORRUPT);
                int hi = audit_hexval(d->p[2]), lo = audit_hexval(d->p[3]);
                KMS_ENSURE(hi >= 0 && lo >= 0, KMS_ERR_STORE_CORRUPT);
                c = (char)(hi << 4 | lo);
                KMS_ENSURE(c != 0, KMS_ERR_STORE_CORRUPT);
                d->p += 4;
            }
        }
        KMS_ENSURE(n + 1 < cap, KMS_ERR_STORE_CORRUPT);
        out[n++] = c;
    }
    out[n] = 0;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_record_parse(const uint8_t *bytes, size_t len, kms_audit_record *r)
{
    KMS_ENSURE(bytes != NULL && r != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(r, 0, sizeof(*r));
    audit_rd d = {(const char *)bytes, (const char *)bytes + len};
    uint64_t v;
    KMS_GUARD(audit_rd_lit(&d, "{\"seq\":"));
    KMS_GUARD(audit_rd_u64(&d, UINT64_MAX, &r->seq));
    KMS_GUARD(audit_rd_lit(&d, ",\"time\":"));
    KMS_GUARD(audit_rd_i64(&d, &r->time));
    KMS_GUARD(audit_rd_lit(&d, ",\"identity\":"));
    KMS_GUARD(audit_rd_str(&d, r->identity, sizeof(r->identity)));
    KMS_GUARD(audit_rd_lit(&d, ",\"source\":"));
    KMS_GUARD(audit_rd_str(&d, r->source, sizeof(r->source)));
    KMS_GUARD(audit_rd_lit(&d, ",\"request_id\":"));
    KMS_GUARD(audit_rd_str(&d, r->request_id, sizeof(r->request_id)));
    KMS_GUARD(audit_rd_lit(&d, ",\"operation\":"));
    KMS_GUARD(audit_rd_str(&d, r->operation, sizeof(r->operation)));
    KMS_GUARD(audit_rd_lit(&d, ",\"key\":"));
    KMS_GUARD(audit_rd_str(&d, r->key, sizeof(r->key)));
    KMS_GUARD(audit_rd_lit(&d, ",\"version\":"));
    KMS_GUARD(audit_rd_u64(&d, UINT32_MAX, &v));
    r->version = (uint32_t)v;
    KMS_GUARD(audit_rd_lit(&d, ",\"to_version\":"));
    KMS_GUARD(audit_rd_u64(&d, UINT32_MAX, &v));
    r->to_version = (uint32_t)v;
    KMS_GUARD(audit_rd_lit(&d, ",\"items\":"));
    KMS_GUARD(audit_rd_u64(&d, UINT32_MAX, &v));
    r->items = (uint32_t)v;
    KMS_GUARD(audit_rd_lit(&d, ",\"status\":"));
    KMS_GUARD(audit_rd_u64(&d, UINT16_MAX, &v));
    r->status = (uint16_t)v;
    KMS_GUARD(audit_rd_lit(&d, ",\"result\":"));
    KMS_GUARD(audit_rd_str(&d, r->result, sizeof(r->result)));
    KMS_GUARD(audit_rd_lit(&d, ",\"prev\":\""));
    KMS_ENSURE(d.end - d.p == 2 * KMS_AUDIT_HASH_BYTES + 2, KMS_ERR_STORE_CORRUPT);
    return KMS_OK_RESULT;
}

/* ---- small LMDB helpers ---- */

static void audit_be64(uint64_t v, uint8_t out[8])
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t audit_rd_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static KMS_RESULT audit_tail_get(kms_txn *t, uint64_t *seq, uint8_t hash[KMS_AUDIT_HASH_BYTES])
{
    const uint8_t *v;
    size_t vlen;
    bool found;
    KMS_GUARD(
        kms_txn_get(t, KMS_DB_META, audit_key_tail, sizeof(audit_key_tail) - 1, &v, &vlen, &found));
    if (!found) {
        *seq = 0;
        memset(hash, 0, KMS_AUDIT_HASH_BYTES);
        return KMS_OK_RESULT;
    }
    KMS_ENSURE_MSG(vlen == 8 + KMS_AUDIT_HASH_BYTES, KMS_ERR_STORE_CORRUPT, "audit tail malformed");
    *seq = audit_rd_be64(v);
    memcpy(hash, v + 8, KMS_AUDIT_HASH_BYTES);
    return KMS_OK_RESULT;
}

static KMS_RESULT audit_tail_put(kms_txn *t, uint64_t seq, const uint8_t hash[KMS_AUDIT_HASH_BYTES])
{
    uint8_t v[8 + KMS_AUDIT_HASH_BYTES];
    audit_be64(seq, v);
    memcpy(v + 8, hash, KMS_AUDIT_HASH_BYTES);
    return kms_txn_put(t, KMS_DB_META, audit_key_tail, sizeof(audit_key_tail) - 1, v, sizeof(v),
                       false);
}

/* ---- signed positions ---- */

static void audit_signed_msg(kms_audit_signed *s)
{
    char hex[2 * KMS_AUDIT_HASH_BYTES + 1];
    kms_hex_encode(s->hash, KMS_AUDIT_HASH_BYTES, hex);
    int n = snprintf(s->msg, sizeof(s->msg),
                     "{\"type\":\"kmsd-audit-head\",\"seq\":%" PRIu64
                     ",\"hash\":\"%s\",\"time\":%" PRId64 "}",
                     s->seq, hex, s->time);
    s->msg_len = n > 0 && (size_t)n < sizeof(s->msg) ? (size_t)n : 0;
}

static void audit_signed_encode(const kms_audit_signed *s, uint8_t *v, size_t *vlen)
{
    audit_be64(s->seq, v);
    memcpy(v + 8, s->hash, KMS_AUDIT_HASH_BYTES);
    audit_be64((uint64_t)s->time, v + 8 + KMS_AUDIT_HASH_BYTES);
    v[8 + KMS_AUDIT_HASH_BYTES + 8] = (uint8_t)(s->sig_len >> 8);
    v[8 + KMS_AUDIT_HASH_BYTES + 9] = (uint8_t)s->sig_len;
    memcpy(v + 8 + KMS_AUDIT_HASH_BYTES + 10, s->sig, s->sig_len);
    *vlen = 8 + KMS_AUDIT_HASH_BYTES + 10 + s->sig_len;
}

static KMS_RESULT audit_signed_decode(const uint8_t *v, size_t vlen, kms_audit_signed *s)
{
    memset(s, 0, sizeof(*s));
    const size_t fixed = 8 + KMS_AUDIT_HASH_BYTES + 10;
    KMS_ENSURE_MSG(vlen >= fixed, KMS_ERR_STORE_CORRUPT, "signed audit head malformed");
    s->seq = audit_rd_be64(v);
    memcpy(s->hash, v + 8, KMS_AUDIT_HASH_BYTES);
    s->time = (int64_t)audit_rd_be64(v + 8 + KMS_AUDIT_HASH_BYTES);
    s->sig_len = (size_t)v[fixed - 2] << 8 | v[fixed - 1];
    KMS_ENSURE_MSG(s->sig_len <= KMS_AUDIT_SIG_MAX_BYTES && vlen == fixed + s->sig_len,
                   KMS_ERR_STORE_CORRUPT, "signed audit head malformed");
    memcpy(s->sig, v + fixed, s->sig_len);
    audit_signed_msg(s);
    return KMS_OK_RESULT;
}

/* ---- the signing key ---- */

typedef struct {
    uint8_t id[KMS_HSM_ID_BYTES];
    bool found;
} audit_sigkey_arg;

static kms_result audit_sigkey_read(kms_txn *t, void *argp)
{
    audit_sigkey_arg *a = argp;
    const uint8_t *v;
    size_t vlen;
    KMS_GUARD(kms_txn_get(t, KMS_DB_META, audit_key_sigkey, sizeof(audit_key_sigkey) - 1, &v, &vlen,
                          &a->found));
    if (a->found) {
        KMS_ENSURE_MSG(vlen == KMS_HSM_ID_BYTES, KMS_ERR_STORE_CORRUPT, "audit.sigkey malformed");
        memcpy(a->id, v, KMS_HSM_ID_BYTES);
    }
    return KMS_OK_RESULT;
}

static kms_result audit_sigkey_write(kms_txn *t, void *argp)
{
    audit_sigkey_arg *a = argp;
    return kms_txn_put(t, KMS_DB_META, audit_key_sigkey, sizeof(audit_key_sigkey) - 1, a->id,
                       KMS_HSM_ID_BYTES, true);
}

static KMS_RESULT audit_sigkey_setup(kms *k, uint8_t id[KMS_HSM_ID_BYTES])
{
    audit_sigkey_arg a = {0};
    KMS_GUARD(kms_store_read(k->store, audit_sigkey_read, &a));
    if (!a.found) {
        KMS_GUARD(kms_hsm_signkey_create(k->hsm, a.id));
        kms_result r = kms_store_write(k->store, audit_sigkey_write, &a);
        if (r.err == KMS_ERR_KEY_EXISTS) {
            /* Another process of this store created one first: use it (the
             * pair made here stays unused on the token). */
            KMS_GUARD(kms_store_read(k->store, audit_sigkey_read, &a));
        } else {
            KMS_GUARD(r);
        }
    }
    bool exists = false;
    KMS_GUARD(kms_hsm_signkey_exists(k->hsm, a.id, &exists));
    KMS_ENSURE_MSG(exists, KMS_ERR_HSM_OBJECT_MISSING,
                   "the audit signing key recorded in the store is not on the token");
    memcpy(id, a.id, KMS_HSM_ID_BYTES);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_sign(kms *k, const uint8_t *msg, size_t msg_len,
                          uint8_t sig[KMS_AUDIT_SIG_MAX_BYTES], size_t *sig_len)
{
    KMS_ENSURE(k->audit != NULL, KMS_ERR_AUDIT_UNAVAILABLE);
    uint8_t digest[KMS_SHA256_BYTES];
    KMS_GUARD(kms_sha256(msg, msg_len, digest));
    return kms_hsm_signkey_sign(k->hsm, k->audit->sigkey, digest, sig, sig_len);
}

static void audit_bio_free(BIO **b)
{
    BIO_free(*b);
}
static void audit_pkey_free(EVP_PKEY **p)
{
    EVP_PKEY_free(*p);
}

KMS_RESULT kms_audit_public_key_pem(kms *k, char **pem)
{
    KMS_ENSURE(k->audit != NULL, KMS_ERR_AUDIT_UNAVAILABLE);
    kms_buf der KMS_DEFER(kms_buf_cleanup) = {0};
    KMS_GUARD(kms_hsm_signkey_public(k->hsm, k->audit->sigkey, &der));
    const unsigned char *p = der.data;
    EVP_PKEY *pkey KMS_DEFER(audit_pkey_free) = d2i_PUBKEY(NULL, &p, (long)der.len);
    KMS_ENSURE(pkey != NULL, KMS_ERR_CRYPTO);
    BIO *bio KMS_DEFER(audit_bio_free) = BIO_new(BIO_s_mem());
    KMS_ENSURE(bio != NULL, KMS_ERR_NO_MEMORY);
    KMS_GUARD_OSSL(PEM_write_bio_PUBKEY(bio, pkey), KMS_ERR_CRYPTO);
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    KMS_ENSURE(n > 0, KMS_ERR_CRYPTO);
    /* A memory BIO's bytes are not NUL-terminated: copy exactly n. */
    *pem = malloc((size_t)n + 1);
    KMS_ENSURE(*pem != NULL, KMS_ERR_NO_MEMORY);
    memcpy(*pem, data, (size_t)n);
    (*pem)[n] = '\0';
    return KMS_OK_RESULT;
}

/* ---- head and anchor ---- */

typedef struct {
    uint64_t seq;
    uint8_t hash[KMS_AUDIT_HASH_BYTES];
} audit_pos;

static kms_result audit_tail_read(kms_txn *t, void *argp)
{
    audit_pos *p = argp;
    return audit_tail_get(t, &p->seq, p->hash);
}

KMS_RESULT kms_audit_head_get(kms *k, uint64_t *seq, uint8_t hash[KMS_AUDIT_HASH_BYTES])
{
    audit_catch_up(k);
    audit_pos p;
    KMS_GUARD(kms_store_read(k->store, audit_tail_read, &p));
    *seq = p.seq;
    memcpy(hash, p.hash, KMS_AUDIT_HASH_BYTES);
    return KMS_OK_RESULT;
}

static kms_result audit_head_store(kms_txn *t, void *argp)
{
    const kms_audit_signed *s = argp;
    uint8_t key[AUDIT_HEAD_PREFIX_BYTES + 8];
    memcpy(key, audit_head_prefix, AUDIT_HEAD_PREFIX_BYTES);
    audit_be64(s->seq, key + AUDIT_HEAD_PREFIX_BYTES);
    uint8_t v[AUDIT_HEAD_VALUE_BYTES];
    size_t vlen;
    audit_signed_encode(s, v, &vlen);
    return kms_txn_put(t, KMS_DB_META, key, sizeof(key), v, vlen, false);
}

static KMS_RESULT audit_position_sign(kms *k, kms_audit_signed *s)
{
    s->time = kms_now(k);
    audit_signed_msg(s);
    KMS_ENSURE(s->msg_len > 0, KMS_ERR_INTERNAL);
    return kms_audit_sign(k, (const uint8_t *)s->msg, s->msg_len, s->sig, &s->sig_len);
}

KMS_RESULT kms_audit_head_sign(kms *k, kms_audit_signed *out)
{
    KMS_ENSURE(k->audit != NULL, KMS_ERR_AUDIT_UNAVAILABLE);
    kms_audit_signed s = {0};
    KMS_GUARD(kms_audit_head_get(k, &s.seq, s.hash));
    KMS_GUARD(audit_position_sign(k, &s));
    KMS_GUARD(kms_store_write(k->store, audit_head_store, &s));
    if (out != NULL)
        *out = s;
    return KMS_OK_RESULT;
}

typedef struct {
    kms_audit_signed *s;
    bool found;
} audit_anchor_arg;

static kms_result audit_anchor_read(kms_txn *t, void *argp)
{
    audit_anchor_arg *a = argp;
    const uint8_t *v;
    size_t vlen;
    KMS_GUARD(kms_txn_get(t, KMS_DB_META, audit_key_anchor, sizeof(audit_key_anchor) - 1, &v, &vlen,
                          &a->found));
    if (a->found)
        KMS_GUARD(audit_signed_decode(v, vlen, a->s));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_anchor_get(kms *k, kms_audit_signed *out)
{
    memset(out, 0, sizeof(*out));
    audit_anchor_arg a = {.s = out};
    KMS_GUARD(kms_store_read(k->store, audit_anchor_read, &a));
    if (!a.found)
        audit_signed_msg(out); /* seq 0, hash_0: the genesis, unsigned */
    return KMS_OK_RESULT;
}

typedef struct {
    uint64_t from, to;
    size_t max;
    kms_audit_signed *v;
    size_t n;
} audit_heads_arg;

static kms_result audit_heads_visit(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *argp, bool *stop)
{
    audit_heads_arg *a = argp;
    KMS_ENSURE(klen == AUDIT_HEAD_PREFIX_BYTES + 8, KMS_ERR_STORE_CORRUPT);
    uint64_t seq = audit_rd_be64(key + AUDIT_HEAD_PREFIX_BYTES);
    if (seq > a->to || a->n == a->max) {
        *stop = true;
        return KMS_OK_RESULT;
    }
    return audit_signed_decode(val, vlen, &a->v[a->n++]);
}

static kms_result audit_heads_read(kms_txn *t, void *argp)
{
    audit_heads_arg *a = argp;
    a->n = 0;
    uint8_t start[AUDIT_HEAD_PREFIX_BYTES + 8];
    memcpy(start, audit_head_prefix, AUDIT_HEAD_PREFIX_BYTES);
    audit_be64(a->from, start + AUDIT_HEAD_PREFIX_BYTES);
    return kms_txn_scan(t, KMS_DB_META, start, sizeof(start), audit_head_prefix,
                        AUDIT_HEAD_PREFIX_BYTES, audit_heads_visit, a);
}

KMS_RESULT kms_audit_heads_list(kms *k, uint64_t from_seq, uint64_t to_seq, size_t max,
                                kms_audit_signed **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (max == 0 || from_seq > to_seq)
        return KMS_OK_RESULT;
    KMS_ENSURE(max <= 100000, KMS_ERR_LIMIT_EXCEEDED);
    audit_heads_arg a = {.from = from_seq, .to = to_seq, .max = max};
    a.v = calloc(max, sizeof(*a.v));
    KMS_ENSURE(a.v != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = kms_store_read(k->store, audit_heads_read, &a);
    if (!kms_is_ok(r) || a.n == 0) {
        free(a.v);
        return r;
    }
    *out = a.v;
    *n = a.n;
    return KMS_OK_RESULT;
}

/* ---- append: the committer, the journal and the ingester ---- */

typedef struct {
    struct kms_audit *a;
    audit_waiter *list; /* taken from the queue */
    size_t count;
    kms_buf scratch; /* one record's canonical bytes */
    kms_buf frames;  /* the batch's journal frames */
} audit_batch;

static void audit_batch_init(audit_batch *b, struct kms_audit *a)
{
    *b = (audit_batch){.a = a};
    kms_buf_init(&b->scratch, 2 * KMS_AUDIT_RECORD_MAX_BYTES);
    kms_buf_init(&b->frames, 0);
}

static void audit_batch_free(audit_batch *b)
{
    kms_buf_free(&b->frames);
    kms_buf_free(&b->scratch);
}

/* Moves up to a->batch_max queued waiters into b; true if more are
 * queued. */
static bool audit_batch_take(audit_batch *b)
{
    struct kms_audit *a = b->a;
    pthread_mutex_lock(&a->mu);
    audit_waiter *first = a->head, *last = first;
    size_t count = first != NULL ? 1 : 0;
    while (last != NULL && last->next != NULL && count < a->batch_max) {
        last = last->next;
        count++;
    }
    if (last != NULL) {
        a->head = last->next;
        if (a->head == NULL)
            a->tail = NULL;
        last->next = NULL;
    }
    bool more = a->head != NULL;
    pthread_mutex_unlock(&a->mu);
    b->list = first;
    b->count = count;
    return more;
}

/* Ingest: journaled records move into LMDB in order, each one checked
 * against the store's chain tail (a journal that does not continue the
 * store's chain is refused, never merged). */
typedef struct {
    kms_journal *j;
    size_t n;     /* records ingested by this transaction */
    uint64_t seq; /* the store's tail after it */
    uint8_t hash[KMS_AUDIT_HASH_BYTES];
    uint64_t off; /* where the frame after seq starts */
    size_t max;   /* records per transaction */
    bool more;    /* stopped at max */
} audit_ingest_arg;

static kms_result audit_ingest_write(kms_txn *t, void *argp)
{
    audit_ingest_arg *g = argp;
    KMS_GUARD(audit_tail_get(t, &g->seq, g->hash));
    uint64_t end = kms_journal_end(g->j);
    uint64_t off;
    if (!kms_journal_hint(g->j, g->seq, &off))
        off = KMS_JOURNAL_DATA_OFF;
    g->n = 0;
    kms_jframe f;
    while (off < end && g->n < g->max) {
        KMS_ENSURE_MSG(kms_journal_frame(g->j, off, end, &f), KMS_ERR_STORE_CORRUPT,
                       "audit journal: damaged record at offset %" PRIu64, off);
        if (f.seq > g->seq) {
            KMS_ENSURE_MSG(f.seq == g->seq + 1 &&
                               memcmp(f.prev, g->hash, KMS_AUDIT_HASH_BYTES) == 0,
                           KMS_ERR_STORE_CORRUPT,
                           "audit journal: record %" PRIu64
                           " does not continue the store's chain (tail %" PRIu64 ")",
                           f.seq, g->seq);
            uint8_t key[8];
            audit_be64(f.seq, key);
            /* The frame holds hash || bytes, the stored value, in one run. */
            KMS_GUARD(kms_txn_put(t, KMS_DB_AUDIT, key, sizeof(key), f.hash,
                                  KMS_AUDIT_HASH_BYTES + f.len, true));
            g->seq = f.seq;
            memcpy(g->hash, f.hash, KMS_AUDIT_HASH_BYTES);
            g->n++;
        }
        off = f.next;
    }
    g->off = off;
    g->more = off < end;
    return g->n > 0 ? audit_tail_put(t, g->seq, g->hash) : KMS_OK_RESULT;
}

/* Under the ingest lock: everything below the journal's end into the
 * store, in transactions durable when they commit (so the journal may be
 * reused as soon as they have). */
static KMS_RESULT audit_ingest_locked(kms *k, audit_ingest_arg *g)
{
    struct kms_audit *a = k->audit;
    *g = (audit_ingest_arg){.j = a->journal, .max = AUDIT_INGEST_MAX};
    do {
        kms_result r = kms_store_write(k->store, audit_ingest_write, g);
        if (r.err == KMS_ERR_STORE_FULL && g->max > 1) {
            /* As much as fits: pages freed by pruning become reusable only
             * after a later transaction commits, so a small one first. */
            g->max /= 2;
            g->more = true;
            continue;
        }
        KMS_GUARD(r);
        kms_journal_hint_set(a->journal, g->seq, g->off);
        atomic_fetch_add_explicit(&a->n_ingested, g->n, memory_order_relaxed);
        if (g->max < AUDIT_INGEST_MAX)
            g->max *= 2;
    } while (g->more);
    atomic_fetch_add_explicit(&a->n_ingests, 1, memory_order_relaxed);
    return KMS_OK_RESULT;
}

/* Moves every journaled record the store lacks into it. Readers call it
 * first so that they see every answered request. */
static KMS_RESULT audit_ingest(kms *k)
{
    struct kms_audit *a = k->audit;
    if (a == NULL || a->journal == NULL)
        return KMS_OK_RESULT;
    KMS_GUARD(kms_journal_ingest_lock(a->journal));
    audit_ingest_arg g;
    /* Readers call this often (a usage report bisects with queries): with
     * nothing new they take no LMDB write transaction. */
    kms_result r = kms_journal_ingested(a->journal) ? KMS_OK_RESULT : audit_ingest_locked(k, &g);
    kms_journal_ingest_unlock(a->journal);
    return r;
}

/* Under the append lock: once every record is in the store, the journal
 * starts over from its beginning. */
static KMS_RESULT audit_journal_recycle(kms *k)
{
    kms_journal *j = k->audit->journal;
    KMS_GUARD(kms_journal_ingest_lock(j));
    audit_ingest_arg g;
    kms_result r = audit_ingest_locked(k, &g);
    if (kms_is_ok(r)) {
        uint64_t seq;
        uint8_t hash[KMS_AUDIT_HASH_BYTES];
        kms_journal_tail(j, &seq, hash);
        if (g.seq == seq && memcmp(g.hash, hash, KMS_AUDIT_HASH_BYTES) == 0)
            kms_journal_set(j, KMS_JOURNAL_DATA_OFF, seq, hash);
        else
            r = kms_error_raisef(KMS_ERR_STORE_CORRUPT, __FILE__, __LINE__,
                                 "audit journal: the store's tail %" PRIu64
                                 " is not the journal's %" PRIu64 " after ingesting",
                                 g.seq, seq);
    }
    kms_journal_ingest_unlock(j);
    return r;
}

/* Under the append lock, when the header may be stale (first opener, or a
 * writer died mid-append): the end and tail from a scan of the frames and
 * the store's own tail. Frames the store already has are dropped. */
static KMS_RESULT audit_journal_rebuild(kms *k)
{
    kms_journal *j = k->audit->journal;
    KMS_GUARD(kms_journal_ingest_lock(j));
    kms_jscan s;
    kms_journal_scan(j, &s);
    audit_pos p;
    kms_result r = kms_store_read(k->store, audit_tail_read, &p);
    if (kms_is_ok(r) && (s.n == 0 || s.last_seq <= p.seq)) {
        kms_journal_set(j, KMS_JOURNAL_DATA_OFF, p.seq, p.hash);
    } else if (kms_is_ok(r)) {
        if (s.first_seq > p.seq + 1)
            r = kms_error_raisef(KMS_ERR_STORE_CORRUPT, __FILE__, __LINE__,
                                 "audit journal starts at record %" PRIu64
                                 " but the store ends at %" PRIu64
                                 ": records are missing (a store restored next to a newer "
                                 "journal? docs/runbook.md, backup and restore)",
                                 s.first_seq, p.seq);
        else
            kms_journal_set(j, s.end, s.last_seq, s.last_hash);
    }
    kms_journal_ingest_unlock(j);
    return r;
}

/* Under the append lock: numbers, chains and frames the batch, and writes
 * it at the journal's end (the whole batch always fits an empty journal:
 * batch_max). */
static KMS_RESULT audit_append_locked(kms *k, audit_batch *b)
{
    kms_journal *j = k->audit->journal;
    if (kms_journal_dirty(j))
        KMS_GUARD(audit_journal_rebuild(k));
    uint64_t seq;
    uint8_t hash[KMS_AUDIT_HASH_BYTES];
    kms_journal_tail(j, &seq, hash);
    kms_buf_reset(&b->frames);
    for (audit_waiter *w = b->list; w != NULL; w = w->next) {
        kms_audit_record *r = w->rec;
        r->seq = ++seq;
        kms_buf_reset(&b->scratch);
        KMS_GUARD(audit_encode(r, hash, &b->scratch));
        kms_iov parts[2] = {{hash, KMS_AUDIT_HASH_BYTES}, {b->scratch.data, b->scratch.len}};
        KMS_GUARD(kms_sha256_iov(parts, 2, r->hash));
        KMS_GUARD(
            kms_journal_frame_put(&b->frames, seq, hash, r->hash, b->scratch.data, b->scratch.len));
        memcpy(hash, r->hash, KMS_AUDIT_HASH_BYTES);
    }
    if (b->frames.len > kms_journal_room(j))
        KMS_GUARD(audit_journal_recycle(k));
    return kms_journal_write(j, &b->frames, seq, hash);
}

/* Writes the batch into the journal under the append lock and hands it
 * to the syncer, still under the lock so that the syncer's list keeps the
 * order of the writes (waiters are called back in sequence order). Not
 * yet durable: the syncer's next sync makes it so. */
static KMS_RESULT audit_write(kms *k, audit_batch *b)
{
    struct kms_audit *a = k->audit;
    kms_journal *j = a->journal;
    KMS_GUARD(kms_journal_lock(j));
    kms_result r = audit_append_locked(k, b);
    if (kms_is_ok(r)) {
        audit_waiter *last = b->list;
        while (last->next != NULL)
            last = last->next;
        pthread_mutex_lock(&a->mu);
        bool idle = a->written == NULL;
        if (a->written_tail != NULL)
            a->written_tail->next = b->list;
        else
            a->written = b->list;
        a->written_tail = last;
        if (idle)
            pthread_cond_signal(&a->sync_cv);
        pthread_mutex_unlock(&a->mu);
    }
    kms_journal_unlock(j);
    return r;
}

static void audit_maybe_sign(kms *k, size_t written)
{
    struct kms_audit *a = k->audit;
    a->unsigned_records += written;
    int64_t now = kms_now(k);
    if (a->unsigned_records == 0)
        return;
    if (a->unsigned_records < a->cfg.sign_every_records &&
        now - a->last_signed < a->cfg.sign_every_s)
        return;
    pthread_mutex_lock(&a->sign_mu);
    kms_result r = kms_audit_head_sign(k, NULL);
    pthread_mutex_unlock(&a->sign_mu);
    if (kms_is_ok(r)) {
        a->unsigned_records = 0;
        a->last_signed = now;
    } else {
        /* Not fatal to the requests: records are durable and chained; the
         * next head signed covers them. Retry after the period. */
        a->last_signed = now;
        fprintf(stderr, "kmsd: audit: signing the chain head failed: %s (%s)\n",
                kms_error_code(r.err), kms_error_detail());
    }
}

/* Retention runs in the committer's idle time, once an hour (and once
 * soon after start): pruning is one write transaction per batch. */
static void audit_maybe_prune(kms *k)
{
    struct kms_audit *a = k->audit;
    if (a->cfg.retention_s == 0)
        return;
    int64_t now = kms_now(k);
    if (a->last_pruned != 0 && now - a->last_pruned < AUDIT_PRUNE_EVERY_S)
        return;
    a->last_pruned = now;
    uint64_t removed = 0;
    kms_result r = kms_audit_retention_run(k, &removed);
    if (!kms_is_ok(r))
        fprintf(stderr, "kmsd: audit: retention pruning failed: %s (%s)\n", kms_error_code(r.err),
                kms_error_detail());
}

/* A CLOCK_MONOTONIC deadline ns from now (the work conditions use it). */
static struct timespec audit_deadline(long ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += ns;
    while (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* Tells every waiter of a list its result and frees it. */
static void audit_release(audit_waiter *list, kms_err res)
{
    /* Each waiter is told on its own (no broadcast that wakes the writers
     * still queued for the next commit). */
    for (audit_waiter *w = list; w != NULL;) {
        audit_waiter *next = w->next;
        w->done(w->arg, res);
        free(w);
        w = next;
    }
}

/* Takes up to batch_max queued records and writes them into the journal,
 * on the calling thread; they go to the syncer, which calls their waiters
 * back once they are durable. A failed write is told to its waiters at
 * once. Called by the committer and by server threads at the end of their
 * pass (kms_audit_write_queued). True if more records stay queued. */
static bool audit_write_queued(kms *k, audit_batch *b)
{
    struct kms_audit *a = k->audit;
    bool more = audit_batch_take(b);
    if (b->count == 0)
        return more;
    kms_result r = audit_write(k, b);
    if (kms_is_ok(r)) {
        atomic_fetch_add_explicit(&a->n_commits, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&a->n_records, b->count, memory_order_relaxed);
        atomic_fetch_add_explicit(&a->c->records, b->count, memory_order_relaxed);
    } else {
        /* Visible to kms_audit_ready before any waiter learns of it. */
        pthread_mutex_lock(&a->mu);
        a->failed = true;
        pthread_mutex_unlock(&a->mu);
        fprintf(stderr, "kmsd: audit: writing %zu record(s) failed: %s (%s)\n", b->count,
                kms_error_code(r.err), kms_error_detail());
        audit_count_refused(a, b->list);
        audit_release(b->list, KMS_ERR_AUDIT_UNAVAILABLE);
    }
    b->list = NULL;
    b->count = 0;
    return more;
}

/* The committer writes the records queued by threads that do not write
 * their own (kms_audit_submit): after a gather, so that concurrent
 * requests share one write and one sync. */
static void *audit_committer(void *argp)
{
    kms *k = argp;
    struct kms_audit *a = k->audit;
    audit_batch b;
    audit_batch_init(&b, a);
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (a->head == NULL && !a->stopping)
            pthread_cond_wait(&a->work, &a->mu);
        if (a->head == NULL && a->stopping)
            break;
        /* Gather: requests announced as being processed will queue their
         * records within microseconds. Waiting for them, at most about as
         * long as one sync takes, lets them share this write and its sync
         * instead of each paying for one of their own; with nothing
         * announced (one client, idle service) the write starts at once. */
        if (a->outstanding > 0 && a->last_commit_ns > 0 && !a->stopping) {
            long wait = a->last_commit_ns < AUDIT_GATHER_MAX_NS ? (long)a->last_commit_ns
                                                                : AUDIT_GATHER_MAX_NS;
            struct timespec ts = audit_deadline(wait);
            a->gathering = true;
            while (a->outstanding > 0 && !a->stopping) {
                if (pthread_cond_timedwait(&a->work, &a->mu, &ts) == ETIMEDOUT)
                    break;
            }
            a->gathering = false;
        }
        pthread_mutex_unlock(&a->mu);
        (void)audit_write_queued(k, &b);
        pthread_mutex_lock(&a->mu);
    }
    pthread_mutex_unlock(&a->mu);
    audit_batch_free(&b);
    return NULL;
}

/* The syncer: one fdatasync covers every record written before it starts;
 * their waiters are called back after it. The only thread of the process
 * that syncs the journal, so that a write-back error is reported to the
 * sync that covers it: on a failure every record written so far is
 * refused (an error seen by one sync is not seen again by the next), and
 * requests are refused until a sync succeeds again. In idle time: the
 * retry of a failed sync, head signing and retention. */
static void *audit_syncer(void *argp)
{
    kms *k = argp;
    struct kms_audit *a = k->audit;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (a->written == NULL && !a->sync_stop) {
            struct timespec ts = audit_deadline(AUDIT_PROBE_EVERY_MS * 1000000L);
            if (pthread_cond_timedwait(&a->sync_cv, &a->mu, &ts) != ETIMEDOUT)
                continue;
            bool failed = a->failed;
            pthread_mutex_unlock(&a->mu);
            if (failed) {
                /* Recovery: the journal takes a sync again. */
                kms_result pr = kms_journal_sync(a->journal);
                pthread_mutex_lock(&a->mu);
                if (kms_is_ok(pr))
                    a->failed = false;
            } else {
                audit_maybe_sign(k, 0);
                audit_maybe_prune(k);
                pthread_mutex_lock(&a->mu);
            }
        }
        if (a->written == NULL && a->sync_stop)
            break;
        audit_waiter *list = a->written;
        a->written = a->written_tail = NULL;
        pthread_mutex_unlock(&a->mu);

        size_t n = 0;
        for (audit_waiter *w = list; w != NULL; w = w->next)
            n++;
        uint64_t t0 = audit_mono_ns();
        kms_result r = kms_journal_sync(a->journal);
        uint64_t t1 = audit_mono_ns();
        int64_t took = (int64_t)(t1 - t0);
        atomic_fetch_add_explicit(&a->n_syncs, 1, memory_order_relaxed);

        pthread_mutex_lock(&a->mu);
        a->last_commit_ns = took;
        if (kms_is_ok(r)) {
            /* A failure is cleared only by a sync that succeeds. */
            a->failed = false;
            /* Woken only from idle: while it waits out its interval the
             * ingester needs no signal per sync (a context switch each). */
            if (a->to_ingest == 0 && a->ingester_idle)
                pthread_cond_signal(&a->ingest_cv);
            a->to_ingest += n;
            pthread_mutex_unlock(&a->mu);
            audit_count_sync(a, list, t0, t1);
            audit_release(list, KMS_OK);
            audit_maybe_sign(k, n);
        } else {
            /* Records written while the failing sync ran may have lost
             * their pages with it: refused as well. */
            a->failed = true;
            audit_waiter *more = a->written;
            a->written = a->written_tail = NULL;
            pthread_mutex_unlock(&a->mu);
            fprintf(stderr, "kmsd: audit: syncing %zu record(s) failed: %s (%s)\n", n,
                    kms_error_code(r.err), kms_error_detail());
            audit_count_refused(a, list);
            audit_count_refused(a, more);
            audit_release(list, KMS_ERR_AUDIT_UNAVAILABLE);
            audit_release(more, KMS_ERR_AUDIT_UNAVAILABLE);
        }
        pthread_mutex_lock(&a->mu);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* Moves journaled records into the store at most every AUDIT_INGEST_EVERY_MS,
 * off the answers' path. While that fails (a full store), requests are
 * refused and the ingest is retried every AUDIT_PROBE_EVERY_MS. */
static void *audit_ingester(void *argp)
{
    kms *k = argp;
    struct kms_audit *a = k->audit;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        a->ingester_idle = true;
        while (a->to_ingest == 0 && !a->ingest_failed && !a->ingest_stop)
            pthread_cond_wait(&a->ingest_cv, &a->mu);
        a->ingester_idle = false;
        if (a->ingest_stop)
            break;
        /* While the store takes no records, retry at the probe's pace: each
         * attempt on a full store tries ever smaller transactions. */
        long every_ms = a->ingest_failed ? AUDIT_PROBE_EVERY_MS : AUDIT_INGEST_EVERY_MS;
        struct timespec ts = audit_deadline(every_ms * 1000000L);
        while (!a->ingest_stop && pthread_cond_timedwait(&a->ingest_cv, &a->mu, &ts) != ETIMEDOUT) {
        }
        if (a->ingest_stop)
            break;
        a->to_ingest = 0;
        pthread_mutex_unlock(&a->mu);
        kms_result r = audit_ingest(k);
        pthread_mutex_lock(&a->mu);
        if (!kms_is_ok(r) && !a->ingest_failed)
            fprintf(stderr,
                    "kmsd: audit: moving journaled records into the store failed: %s (%s); "
                    "requests are refused until it succeeds\n",
                    kms_error_code(r.err), kms_error_detail());
        else if (kms_is_ok(r) && a->ingest_failed)
            fprintf(stderr, "kmsd: audit: journaled records are in the store again\n");
        a->ingest_failed = !kms_is_ok(r);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

static void audit_copy(char *dst, size_t cap, const char *src)
{
    if (src == NULL) {
        dst[0] = 0;
        return;
    }
    size_t n = strnlen(src, cap - 1);
    memmove(dst, src, n);
    dst[n] = 0;
}

static KMS_RESULT audit_submit(kms *k, kms_audit_record *r, bool announced, kms_audit_done_fn done,
                               void *arg, bool wake)
{
    KMS_ENSURE(k != NULL && r != NULL && done != NULL, KMS_ERR_INVALID_ARGUMENT);
    struct kms_audit *a = k->audit;
    KMS_ENSURE_MSG(a != NULL, KMS_ERR_AUDIT_UNAVAILABLE, "audit not started");
    KMS_ENSURE(a->cfg.enabled, KMS_ERR_INVALID_ARGUMENT);
    /* Terminate every field where its array ends (callers fill them with
     * strncpy-like copies; a missing NUL must not run into the next). */
    audit_copy(r->identity, sizeof(r->identity), r->identity);
    audit_copy(r->source, sizeof(r->source), r->source);
    audit_copy(r->request_id, sizeof(r->request_id), r->request_id);
    audit_copy(r->operation, sizeof(r->operation), r->operation);
    audit_copy(r->key, sizeof(r->key), r->key);
    audit_copy(r->result, sizeof(r->result), r->result);
    if (r->time == 0)
        r->time = kms_now(k);
    audit_waiter *w = malloc(sizeof(*w));
    KMS_ENSURE(w != NULL, KMS_ERR_NO_MEMORY);
    *w = (audit_waiter){.rec = r, .done = done, .arg = arg, .submitted_ns = audit_mono_ns()};
    pthread_mutex_lock(&a->mu);
    if (announced && a->outstanding > 0)
        a->outstanding--;
    if (a->stopping || a->ingest_failed) {
        bool stopping = a->stopping;
        if (a->gathering && a->outstanding == 0)
            pthread_cond_signal(&a->work);
        pthread_mutex_unlock(&a->mu);
        free(w);
        /* A store that takes no records: the journal would only fill. */
        KMS_BAIL_MSG(KMS_ERR_AUDIT_UNAVAILABLE,
                     stopping ? "audit stopping" : "the audit store takes no records");
    }
    bool idle = a->head == NULL;
    if (a->tail != NULL)
        a->tail->next = w;
    else
        a->head = w;
    a->tail = w;
    /* The committer sleeps on an empty queue, or gathers until the last
     * announced record arrives: one signal per batch either way. */
    if ((wake && idle) || (a->gathering && a->outstanding == 0))
        pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_submit(kms *k, kms_audit_record *r, bool announced, kms_audit_done_fn done,
                            void *arg)
{
    return audit_submit(k, r, announced, done, arg, true);
}

KMS_RESULT kms_audit_queue(kms *k, kms_audit_record *r, bool announced, kms_audit_done_fn done,
                           void *arg)
{
    return audit_submit(k, r, announced, done, arg, false);
}

struct kms_audit_writer {
    kms *k;
    audit_batch b;
};

kms_audit_writer *kms_audit_writer_new(kms *k)
{
    if (k == NULL || k->audit == NULL || !k->audit->cfg.enabled)
        return NULL;
    kms_audit_writer *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->k = k;
    audit_batch_init(&w->b, k->audit);
    return w;
}

void kms_audit_writer_free(kms_audit_writer *w)
{
    if (w == NULL)
        return;
    audit_batch_free(&w->b);
    free(w);
}

void kms_audit_write_queued(kms_audit_writer *w)
{
    struct kms_audit *a = w->k->audit;
    if (!audit_write_queued(w->k, &w->b))
        return;
    /* More than one batch was queued: the committer takes the rest. */
    pthread_mutex_lock(&a->mu);
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
}

void kms_audit_announce(kms *k)
{
    struct kms_audit *a = k != NULL ? k->audit : NULL;
    if (a == NULL || !a->cfg.enabled)
        return;
    pthread_mutex_lock(&a->mu);
    a->outstanding++;
    pthread_mutex_unlock(&a->mu);
}

void kms_audit_withdraw(kms *k)
{
    struct kms_audit *a = k != NULL ? k->audit : NULL;
    if (a == NULL || !a->cfg.enabled)
        return;
    pthread_mutex_lock(&a->mu);
    if (a->outstanding > 0)
        a->outstanding--;
    if (a->gathering && a->outstanding == 0)
        pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
}

/* A blocking append is a submit and a wait on a condition of its own. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    kms_err res;
} audit_sync;

static void audit_sync_done(void *arg, kms_err res)
{
    audit_sync *s = arg;
    pthread_mutex_lock(&s->mu);
    s->res = res;
    s->done = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

KMS_RESULT kms_audit_append(kms *k, kms_audit_record *r)
{
    return kms_audit_append_announced(k, r, false);
}

KMS_RESULT kms_audit_append_announced(kms *k, kms_audit_record *r, bool announced)
{
    KMS_ENSURE(k != NULL && r != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(k->audit != NULL, KMS_ERR_AUDIT_UNAVAILABLE, "audit not started");
    if (!k->audit->cfg.enabled)
        return KMS_OK_RESULT;
    audit_sync s = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    KMS_GUARD(kms_audit_submit(k, r, announced, audit_sync_done, &s));
    pthread_mutex_lock(&s.mu);
    while (!s.done)
        pthread_cond_wait(&s.cv, &s.mu);
    pthread_mutex_unlock(&s.mu);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
    if (s.res != KMS_OK)
        return kms_error_raisef(KMS_ERR_AUDIT_UNAVAILABLE, __FILE__, __LINE__,
                                "the audit record could not be written");
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_ready(kms *k)
{
    struct kms_audit *a = k->audit;
    KMS_ENSURE_MSG(a != NULL, KMS_ERR_AUDIT_UNAVAILABLE, "audit not started");
    if (!a->cfg.enabled)
        return KMS_OK_RESULT;
    pthread_mutex_lock(&a->mu);
    bool bad = a->failed || a->ingest_failed || a->stopping;
    pthread_mutex_unlock(&a->mu);
    KMS_ENSURE_MSG(!bad, KMS_ERR_AUDIT_UNAVAILABLE, "the audit log cannot be written");
    return KMS_OK_RESULT;
}

bool kms_audit_enabled(kms *k)
{
    return k->audit != NULL && k->audit->cfg.enabled;
}

/* Opens the store's journal, rebuilds its header if it may be stale, and
 * moves whatever an earlier run left in it into the store, so that the
 * store is whole before the first request. */
static KMS_RESULT audit_journal_open(kms *k)
{
    struct kms_audit *a = k->audit;
    char path[4096];
    KMS_ENSURE_MSG(snprintf(path, sizeof(path), "%s/audit.journal", k->store_path) <
                       (int)sizeof(path),
                   KMS_ERR_CONFIG, "store path too long");
    KMS_GUARD(kms_journal_open(path, a->cfg.journal_bytes, &a->journal));
    uint64_t fit = kms_journal_room_total(a->journal) / 2 /
                   kms_journal_frame_size(2 * KMS_AUDIT_RECORD_MAX_BYTES);
    a->batch_max = fit < 1 ? 1 : fit > AUDIT_BATCH_MAX ? AUDIT_BATCH_MAX : (size_t)fit;
    KMS_GUARD(kms_journal_lock(a->journal));
    kms_result r = kms_journal_dirty(a->journal) ? audit_journal_rebuild(k) : KMS_OK_RESULT;
    kms_journal_unlock(a->journal);
    KMS_GUARD(r);
    return audit_ingest(k);
}

KMS_RESULT kms_audit_start(kms *k, const kms_audit_config *cfg)
{
    KMS_ENSURE(k != NULL && cfg != NULL && k->audit == NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(cfg->sign_every_s >= 0 && cfg->retention_s >= 0, KMS_ERR_CONFIG);
    struct kms_audit *a = calloc(1, sizeof(*a));
    KMS_ENSURE(a != NULL, KMS_ERR_NO_MEMORY);
    a->cfg = *cfg;
    a->c = cfg->counters != NULL ? cfg->counters : &a->own_counters;
    if (a->cfg.sign_every_records == 0)
        a->cfg.sign_every_records = AUDIT_SIGN_EVERY_N;
    if (a->cfg.sign_every_s == 0)
        a->cfg.sign_every_s = AUDIT_SIGN_EVERY_S;
    if (cfg->enabled) {
        kms_result r = audit_sigkey_setup(k, a->sigkey);
        if (!kms_is_ok(r)) {
            free(a);
            return r;
        }
    }
    pthread_mutex_init(&a->mu, NULL);
    pthread_mutex_init(&a->sign_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->work, &ca);
    pthread_cond_init(&a->sync_cv, &ca);
    pthread_cond_init(&a->ingest_cv, &ca);
    pthread_condattr_destroy(&ca);
    a->last_signed = kms_now(k);
    /* The first pruning a minute after start, then hourly. */
    a->last_pruned = a->last_signed - AUDIT_PRUNE_EVERY_S + 60;
    k->audit = a;
    if (!cfg->enabled)
        return KMS_OK_RESULT;
    kms_result r = audit_journal_open(k);
    if (!kms_is_ok(r)) {
        kms_audit_stop(k);
        return r;
    }
    if (pthread_create(&a->ingester, NULL, audit_ingester, k) != 0) {
        kms_audit_stop(k);
        KMS_BAIL_MSG(KMS_ERR_INTERNAL, "audit ingester thread: %s", strerror(errno));
    }
    a->ingester_started = true;
    if (pthread_create(&a->syncer, NULL, audit_syncer, k) != 0) {
        kms_audit_stop(k);
        KMS_BAIL_MSG(KMS_ERR_INTERNAL, "audit syncer thread: %s", strerror(errno));
    }
    a->syncer_started = true;
    if (pthread_create(&a->thread, NULL, audit_committer, k) != 0) {
        kms_audit_stop(k);
        KMS_BAIL_MSG(KMS_ERR_INTERNAL, "audit committer thread: %s", strerror(errno));
    }
    a->thread_started = true;
    return KMS_OK_RESULT;
}

void kms_audit_stop(kms *k)
{
    if (k == NULL || k->audit == NULL)
        return;
    struct kms_audit *a = k->audit;
    pthread_mutex_lock(&a->mu);
    a->stopping = true;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    if (a->thread_started)
        pthread_join(a->thread, NULL);
    /* Then the syncer, once it has synced what the committer wrote last. */
    pthread_mutex_lock(&a->mu);
    a->sync_stop = true;
    pthread_cond_signal(&a->sync_cv);
    pthread_mutex_unlock(&a->mu);
    if (a->syncer_started)
        pthread_join(a->syncer, NULL);
    pthread_mutex_lock(&a->mu);
    a->ingest_stop = true;
    pthread_cond_signal(&a->ingest_cv);
    pthread_mutex_unlock(&a->mu);
    if (a->ingester_started)
        pthread_join(a->ingester, NULL);
    if (a->journal != NULL) {
        /* Everything journaled into the store before the last signed
         * head: a clean stop leaves the store whole by itself. */
        kms_result r = audit_ingest(k);
        if (!kms_is_ok(r))
            fprintf(stderr,
                    "kmsd: audit: journaled records stay in the journal (%s: %s); the next "
                    "start moves them\n",
                    kms_error_code(r.err), kms_error_detail());
    }
    uint64_t n_commits = atomic_load(&a->n_commits), n_syncs = atomic_load(&a->n_syncs);
    if (n_commits > 0)
        fprintf(stderr,
                "kmsd: audit: %llu records in %llu journal writes (%.1f per write) and %llu "
                "syncs (%.1f per sync); %llu records moved into the store in %llu ingests\n",
                (unsigned long long)atomic_load(&a->n_records), (unsigned long long)n_commits,
                (double)atomic_load(&a->n_records) / (double)n_commits, (unsigned long long)n_syncs,
                n_syncs > 0 ? (double)atomic_load(&a->n_records) / (double)n_syncs : 0.0,
                (unsigned long long)atomic_load(&a->n_ingested),
                (unsigned long long)atomic_load(&a->n_ingests));
    /* A last signed head, so that a clean shutdown leaves the whole chain
     * covered by a signature. */
    if (a->cfg.enabled && a->unsigned_records > 0) {
        kms_result r = kms_audit_head_sign(k, NULL);
        (void)r;
    }
    kms_journal_close(a->journal);
    pthread_cond_destroy(&a->ingest_cv);
    pthread_cond_destroy(&a->sync_cv);
    pthread_cond_destroy(&a->work);
    pthread_mutex_destroy(&a->sign_mu);
    pthread_mutex_destroy(&a->mu);
    k->audit = NULL;
    free(a);
}

/* ---- reading ---- */

typedef struct {
    const kms_audit_filter *f;
    size_t limit;
    kms_audit_record *v;
    size_t n;
} audit_query_arg;

static bool audit_match(const kms_audit_filter *f, const kms_audit_record *r)
{
    if (f->from != 0 && r->time < f->from)
        return false;
    if (f->to != 0 && r->time > f->to)
        return false;
    if (f->identity != NULL && strcmp(f->identity, r->identity) != 0)
        return false;
    if (f->key != NULL && strcmp(f->key, r->key) != 0)
        return false;
    if (f->operation != NULL && strcmp(f->operation, r->operation) != 0)
        return false;
    if (f->version != 0 && f->version != r->version && f->version != r->to_version)
        return false;
    return true;
}

static kms_result audit_query_visit(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *argp, bool *stop)
{
    audit_query_arg *a = argp;
    KMS_ENSURE_MSG(klen == 8 && vlen > KMS_AUDIT_HASH_BYTES, KMS_ERR_STORE_CORRUPT,
                   "audit record malformed");
    kms_audit_record *r = &a->v[a->n];
    KMS_GUARD(kms_audit_record_parse(val + KMS_AUDIT_HASH_BYTES, vlen - KMS_AUDIT_HASH_BYTES, r));
    KMS_ENSURE_MSG(r->seq == audit_rd_be64(key), KMS_ERR_STORE_CORRUPT,
                   "audit record seq mismatch");
    if (!audit_match(a->f, r))
        return KMS_OK_RESULT;
    memcpy(r->hash, val, KMS_AUDIT_HASH_BYTES);
    if (++a->n == a->limit)
        *stop = true;
    return KMS_OK_RESULT;
}

static kms_result audit_query_read(kms_txn *t, void *argp)
{
    audit_query_arg *a = argp;
    a->n = 0;
    uint8_t start[8];
    audit_be64(a->f->after_seq == UINT64_MAX ? UINT64_MAX : a->f->after_seq + 1, start);
    return kms_txn_scan(t, KMS_DB_AUDIT, start, sizeof(start), NULL, 0, audit_query_visit, a);
}

KMS_RESULT kms_audit_query(kms *k, const kms_audit_filter *f, kms_audit_record **out, size_t *n)
{
    KMS_ENSURE(k != NULL && f != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    *out = NULL;
    *n = 0;
    size_t limit = f->limit == 0 ? KMS_AUDIT_QUERY_DEFAULT : f->limit;
    if (limit > KMS_AUDIT_QUERY_MAX)
        limit = KMS_AUDIT_QUERY_MAX;
    if (f->after_seq == UINT64_MAX)
        return KMS_OK_RESULT;
    audit_catch_up(k);
    /* One slot more than the limit: the visitor parses into v[n] before it
     * knows whether the record matches. */
    audit_query_arg a = {.f = f, .limit = limit};
    a.v = calloc(limit + 1, sizeof(*a.v));
    KMS_ENSURE(a.v != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = kms_store_read(k->store, audit_query_read, &a);
    if (!kms_is_ok(r) || a.n == 0) {
        free(a.v);
        return r;
    }
    *out = a.v;
    *n = a.n;
    return KMS_OK_RESULT;
}

typedef struct {
    uint64_t after, last;
    kms_audit_raw_fn fn;
    void *arg;
} audit_raw_arg;

static kms_result audit_raw_visit(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                  void *argp, bool *stop)
{
    audit_raw_arg *a = argp;
    KMS_ENSURE_MSG(klen == 8 && vlen > KMS_AUDIT_HASH_BYTES, KMS_ERR_STORE_CORRUPT,
                   "audit record malformed");
    uint64_t seq = audit_rd_be64(key);
    if (a->last != 0 && seq > a->last) {
        *stop = true;
        return KMS_OK_RESULT;
    }
    return a->fn(seq, val + KMS_AUDIT_HASH_BYTES, vlen - KMS_AUDIT_HASH_BYTES, val, a->arg, stop);
}

static kms_result audit_raw_read(kms_txn *t, void *argp)
{
    audit_raw_arg *a = argp;
    uint8_t start[8];
    audit_be64(a->after + 1, start);
    return kms_txn_scan(t, KMS_DB_AUDIT, start, sizeof(start), NULL, 0, audit_raw_visit, a);
}

KMS_RESULT kms_audit_scan_raw(kms *k, uint64_t after_seq, uint64_t last_seq, kms_audit_raw_fn fn,
                              void *arg)
{
    KMS_ENSURE(k != NULL && fn != NULL, KMS_ERR_INVALID_ARGUMENT);
    if (after_seq == UINT64_MAX)
        return KMS_OK_RESULT;
    audit_catch_up(k);
    audit_raw_arg a = {.after = after_seq, .last = last_seq, .fn = fn, .arg = arg};
    return kms_store_read(k->store, audit_raw_read, &a);
}

/* ---- retention ---- */

typedef struct {
    int64_t before;
    uint64_t first;                     /* first stored seq */
    uint64_t cut;                       /* last seq to remove; 0 = none */
    uint8_t hash[KMS_AUDIT_HASH_BYTES]; /* hash_cut */
    size_t seen;
    size_t max; /* records per cut */
} audit_cut_arg;

static kms_result audit_cut_visit(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                  void *argp, bool *stop)
{
    audit_cut_arg *a = argp;
    KMS_ENSURE_MSG(klen == 8 && vlen > KMS_AUDIT_HASH_BYTES, KMS_ERR_STORE_CORRUPT,
                   "audit record malformed");
    kms_audit_record r;
    KMS_GUARD(kms_audit_record_parse(val + KMS_AUDIT_HASH_BYTES, vlen - KMS_AUDIT_HASH_BYTES, &r));
    /* Only a prefix of the chain is pruned: the first record young enough
     * ends the cut, whatever follows it. */
    if (r.time >= a->before || a->seen == a->max) {
        *stop = true;
        return KMS_OK_RESULT;
    }
    if (a->seen == 0)
        a->first = audit_rd_be64(key);
    a->seen++;
    a->cut = audit_rd_be64(key);
    memcpy(a->hash, val, KMS_AUDIT_HASH_BYTES);
    return KMS_OK_RESULT;
}

static kms_result audit_cut_find(kms_txn *t, void *argp)
{
    audit_cut_arg *a = argp;
    a->cut = 0;
    a->seen = 0;
    return kms_txn_scan(t, KMS_DB_AUDIT, NULL, 0, NULL, 0, audit_cut_visit, a);
}

typedef struct {
    uint64_t first, cut;
    const kms_audit_signed *anchor;
} audit_prune_arg;

static kms_result audit_prune_write(kms_txn *t, void *argp)
{
    audit_prune_arg *a = argp;
    /* The anchor and the removal commit together: a crash leaves either the
     * old start with the old anchor, or the new start with the new one. */
    uint8_t v[AUDIT_HEAD_VALUE_BYTES];
    size_t vlen;
    audit_signed_encode(a->anchor, v, &vlen);
    KMS_GUARD(kms_txn_put(t, KMS_DB_META, audit_key_anchor, sizeof(audit_key_anchor) - 1, v, vlen,
                          false));
    for (uint64_t s = a->first; s <= a->cut; s++) {
        uint8_t key[8];
        audit_be64(s, key);
        KMS_GUARD(kms_txn_del(t, KMS_DB_AUDIT, key, sizeof(key)));
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_audit_prune(kms *k, int64_t before, uint64_t *removed)
{
    KMS_ENSURE(k != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(k->audit != NULL && k->audit->cfg.enabled, KMS_ERR_AUDIT_UNAVAILABLE,
                   "audit not started");
    if (removed != NULL)
        *removed = 0;
    struct kms_audit *a = k->audit;
    pthread_mutex_lock(&a->sign_mu);
    kms_result r = KMS_OK_RESULT;
    size_t max = AUDIT_PRUNE_BATCH;
    for (;;) {
        audit_cut_arg c = {.before = before, .max = max};
        r = kms_store_read(k->store, audit_cut_find, &c);
        if (!kms_is_ok(r) || c.cut == 0)
            break;
        kms_audit_signed anchor = {.seq = c.cut};
        memcpy(anchor.hash, c.hash, KMS_AUDIT_HASH_BYTES);
        r = audit_position_sign(k, &anchor);
        if (!kms_is_ok(r))
            break;
        audit_prune_arg p = {.first = c.first, .cut = c.cut, .anchor = &anchor};
        r = kms_store_reclaim(k->store, audit_prune_write, &p);
        if (r.err == KMS_ERR_STORE_FULL && max > 1) {
            /* A store at its maximum: removing records rewrites pages too,
             * and the pages it frees are reusable only by later
             * transactions. Smaller cuts first, then larger again. */
            max /= 2;
            continue;
        }
        if (!kms_is_ok(r))
            break;
        if (removed != NULL)
            *removed += c.cut - c.first + 1;
        if (c.seen < max)
            break; /* the cut ended at a young record */
        if (max < AUDIT_PRUNE_BATCH)
            max *= 2;
    }
    pthread_mutex_unlock(&a->sign_mu);
    return r;
}

KMS_RESULT kms_audit_retention_run(kms *k, uint64_t *removed)
{
    if (removed != NULL)
        *removed = 0;
    KMS_ENSURE(k != NULL && k->audit != NULL, KMS_ERR_AUDIT_UNAVAILABLE);
    if (k->audit->cfg.retention_s == 0)
        return KMS_OK_RESULT;
    return kms_audit_prune(k, kms_now(k) - k->audit->cfg.retention_s, removed);
}
