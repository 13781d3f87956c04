/*
 * The audit trail (issue 4 section 5): one record per API request, durable
 * before the request's response is sent, hash-chained, the chain head signed
 * by an EC P-256 key held in the HSM. Format and verification: docs/audit.md.
 *
 * Records live in the LMDB `audit` database of the kms instance, keyed by a
 * big-endian u64 sequence number (1, 2, ...). A record is stored as its
 * canonical bytes, a compact JSON object with a fixed field order that ends
 * with the chain hash before it ("prev"); the chain is
 *     hash_0 = 32 zero bytes,  hash_i = SHA-256(hash_{i-1} || record_i)
 * so that an auditor can re-hash an exported record with sha256sum.
 *
 * Writers (request threads of any process sharing the store) call
 * kms_audit_append(), which queues the record and blocks until one
 * committer thread of the process has written it, with everything else
 * queued at that moment, to the store's audit journal and synced it
 * (group commit, kms_journal.h). The chain tail is read under the
 * journal's lock, shared by every process, so processes sharing the store
 * extend one chain; the records move into LMDB later, in batches, and
 * every reader below moves them first.
 *
 * All functions are thread-safe.
 */
#ifndef KMS_AUDIT_H
#define KMS_AUDIT_H

#include "kms.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_AUDIT_HASH_BYTES           32
#define KMS_AUDIT_SOURCE_MAX_BYTES     63 /* "[v6 address]:port" */
#define KMS_AUDIT_REQUEST_ID_MAX_BYTES 63
#define KMS_AUDIT_OPERATION_MAX_BYTES  31   /* "wrap", "key.rotate", "audit.query", ... */
#define KMS_AUDIT_RESULT_MAX_BYTES     31   /* "ok" or an error name of crypto/kms_error.c */
#define KMS_AUDIT_SIG_MAX_BYTES        80   /* DER ECDSA P-256 signature: at most 72 */
#define KMS_AUDIT_RECORD_MAX_BYTES     4096 /* canonical bytes of one record */
#define KMS_AUDIT_QUERY_MAX            10000
#define KMS_AUDIT_QUERY_DEFAULT        1000

typedef struct {
    int64_t from, to;      /* record time range, inclusive; 0 = open */
    const char *identity;  /* exact match; NULL = any */
    const char *key;       /* exact match; NULL = any */
    const char *operation; /* exact match; NULL = any */
    uint32_t version;      /* matches version or to_version; 0 = any */
    size_t limit;          /* 0 = KMS_AUDIT_QUERY_DEFAULT; capped at KMS_AUDIT_QUERY_MAX */
    uint64_t after_seq;    /* only records with seq > after_seq (paging) */
} kms_audit_filter;

typedef struct {
    uint64_t seq;                              /* assigned by kms_audit_append */
    int64_t time;                              /* Unix seconds; 0 on append = the kms clock now */
    char identity[KMS_IDENTITY_MAX_BYTES + 1]; /* "" if unauthenticated */
    char source[KMS_AUDIT_SOURCE_MAX_BYTES + 1];
    char request_id[KMS_AUDIT_REQUEST_ID_MAX_BYTES + 1];
    char operation[KMS_AUDIT_OPERATION_MAX_BYTES + 1];
    char key[KMS_KEY_NAME_MAX_BYTES + 1]; /* "" if none */
    uint32_t version;                     /* version used (from_version for rewrap); 0 none */
    uint32_t to_version;                  /* rewrap / rotate target; 0 none */
    uint32_t items;                       /* batch items; 0 for single operations */
    uint16_t status;                      /* HTTP status answered */
    char result[KMS_AUDIT_RESULT_MAX_BYTES + 1]; /* "ok" or the error name */
    /* Filled by queries: the chain hash after this record (hash_seq). */
    uint8_t hash[KMS_AUDIT_HASH_BYTES];
} kms_audit_record;

/* Upper bounds (seconds) of the histogram buckets of kms_audit_counters;
 * a last bucket takes what is above. */
#define KMS_AUDIT_BUCKETS 12
extern const double kms_audit_buckets[KMS_AUDIT_BUCKETS];

/* What the durable trail costs, only ever increased: records written,
 * journal syncs and their time, records refused because their write or
 * sync failed, and per record the wait from its submission until it was
 * durable (the latency the trail adds to an answer). Kept in the audit's
 * own state unless kms_audit_config.counters points elsewhere (kmsd's
 * worker processes count into a slot each of one shared mapping, as
 * kms_hsm_counters). */
typedef struct kms_audit_counters {
    _Atomic uint64_t records;
    _Atomic uint64_t refused;
    _Atomic uint64_t sync_ns;
    _Atomic uint64_t sync_bucket[KMS_AUDIT_BUCKETS + 1];
    _Atomic uint64_t wait_ns;
    _Atomic uint64_t wait_bucket[KMS_AUDIT_BUCKETS + 1];
} kms_audit_counters;

typedef struct {
    bool enabled;                /* false: audit off (benchmarks only, docs/audit.md) */
    uint32_t sign_every_records; /* sign the head after this many records; 0 = 10000 */
    int64_t sign_every_s;        /* ... or this many seconds; 0 = 300 */
    int64_t retention_s;         /* records older than this may be pruned; 0 = keep forever */
    uint64_t journal_bytes;      /* size of the store's audit journal; 0 = 8 MiB, at least 64 KiB */
    kms_audit_counters *counters; /* where to count; NULL: in the audit's state. Must outlive it */
} kms_audit_config;

/* Starts the audit of this kms instance: finds (or on first start creates)
 * the signing key in the HSM, starts the committer thread. Before this call
 * (and after kms_audit_stop) kms_audit_append fails with
 * KMS_ERR_AUDIT_UNAVAILABLE. With enabled = false, appends succeed without
 * writing anything. */
KMS_RESULT kms_audit_start(kms *k, const kms_audit_config *cfg);
/* Drains the queue and stops the committer. kms_close calls it. */
void kms_audit_stop(kms *k);
bool kms_audit_enabled(kms *k);

/* Moves every record journaled by any process into the store (readers of
 * the trail and kms_backup do this first). A no-op when the audit is off
 * or not started. */
KMS_RESULT kms_audit_flush(kms *k);

/* Fast check before running an operation: fails with
 * KMS_ERR_AUDIT_UNAVAILABLE when the last commit failed and the store has
 * not recovered, or when the store has no room left for records. */
KMS_RESULT kms_audit_ready(kms *k);

/* Appends r to the chain and returns once it is durable (written to the
 * journal and synced). Sets r->seq (and r->time when it was 0) and r->hash. Strings are
 * truncated to their fields. KMS_ERR_AUDIT_UNAVAILABLE if the record
 * could not be written. */
KMS_RESULT kms_audit_append(kms *k, kms_audit_record *r);
/* The same for a record announced with kms_audit_announce: the
 * announcement ends when the record is queued. */
KMS_RESULT kms_audit_append_announced(kms *k, kms_audit_record *r, bool announced);

/* Called exactly once when the record submitted with it is durable (res
 * KMS_OK, on the audit's syncer thread) or could not be written
 * (KMS_ERR_AUDIT_UNAVAILABLE, on the syncer's thread or on the thread that
 * tried the write). It must be quick and must not block or call into the
 * audit. */
typedef void (*kms_audit_done_fn)(void *arg, kms_err res);

/* The asynchronous form of kms_audit_append, for callers that must not
 * hold a thread while the record is committed (kmsd suspends the request's
 * connection instead). Queues r and returns at once; r must stay valid and
 * untouched until done(arg, ...) runs, by which time r->seq, r->time and
 * r->hash are set as kms_audit_append sets them. announced: as for
 * kms_audit_append_announced. Fails without calling done when the audit is
 * not started or is stopping (KMS_ERR_AUDIT_UNAVAILABLE) or is off
 * (KMS_ERR_INVALID_ARGUMENT: nothing to wait for; callers check
 * kms_audit_enabled first). */
KMS_RESULT kms_audit_submit(kms *k, kms_audit_record *r, bool announced, kms_audit_done_fn done,
                            void *arg);

/* For a thread that writes records itself (kmsd's server threads, once per
 * pass of their event loop): kms_audit_queue is kms_audit_submit without
 * waking the committer, and kms_audit_write_queued writes every queued
 * record into the journal on the calling thread (the syncer then makes
 * them durable and calls done). A pass that queued a record must end with
 * kms_audit_write_queued, or the record waits until another writer takes
 * it. The writer holds that thread's buffers; kms_audit_writer_new
 * returns NULL when the audit is off or memory is short (then use
 * kms_audit_submit). */
typedef struct kms_audit_writer kms_audit_writer;
KMS_RESULT kms_audit_queue(kms *k, kms_audit_record *r, bool announced, kms_audit_done_fn done,
                           void *arg);
kms_audit_writer *kms_audit_writer_new(kms *k);
void kms_audit_write_queued(kms_audit_writer *w);
void kms_audit_writer_free(kms_audit_writer *w);

/* Group-commit hint. A caller that will produce a record soon (kmsd: a
 * request has arrived) announces it; before each commit the committer
 * waits, at most about as long as its last commit took (and never over
 * 1 ms), for the records of announced requests, so that concurrent
 * requests share one synced commit instead of paying for one each. Every
 * announcement is matched by exactly one kms_audit_submit with announced =
 * true, or by kms_audit_withdraw when no record follows. Without
 * announcements every commit starts at once. No-ops when the audit is off. */
void kms_audit_announce(kms *k);
void kms_audit_withdraw(kms *k);

/* Records matching f in sequence order, at most the limit. *out is
 * malloc'd (NULL when *n is 0); free() it. Page on with
 * after_seq = the last seq returned. */
KMS_RESULT kms_audit_query(kms *k, const kms_audit_filter *f, kms_audit_record **out, size_t *n);

/* A chain position signed in the HSM: the head (periodically, at every
 * export) or the anchor left by pruning. The signed message is the
 * canonical JSON
 *   {"type":"kmsd-audit-head","seq":S,"hash":"<hex>","time":T}
 * (msg, msg_len) and sig is the DER ECDSA signature over SHA-256(msg). */
typedef struct {
    uint64_t seq;                       /* last record covered; 0 = empty chain */
    uint8_t hash[KMS_AUDIT_HASH_BYTES]; /* hash_seq */
    int64_t time;                       /* when it was signed */
    char msg[192];
    size_t msg_len;
    uint8_t sig[KMS_AUDIT_SIG_MAX_BYTES];
    size_t sig_len;
} kms_audit_signed;

/* Signs the current head now and stores it. */
KMS_RESULT kms_audit_head_sign(kms *k, kms_audit_signed *out);
/* The chain position before the first stored record: seq 0 and hash_0 on a
 * chain never pruned, else the signed anchor pruning left. */
KMS_RESULT kms_audit_anchor_get(kms *k, kms_audit_signed *out);
/* Stored signed heads with from_seq <= seq <= to_seq, oldest first, at most
 * max. *out malloc'd; free() it. */
KMS_RESULT kms_audit_heads_list(kms *k, uint64_t from_seq, uint64_t to_seq, size_t max,
                                kms_audit_signed **out, size_t *n);
/* The chain head (last seq and hash_seq), unsigned. */
KMS_RESULT kms_audit_head_get(kms *k, uint64_t *seq, uint8_t hash[KMS_AUDIT_HASH_BYTES]);

/* The signing key's public key as a PEM SubjectPublicKeyInfo ("-----BEGIN
 * PUBLIC KEY-----"). *pem is malloc'd; free() it. */
KMS_RESULT kms_audit_public_key_pem(kms *k, char **pem);
/* DER ECDSA signature over SHA-256(msg) with the HSM signing key. */
KMS_RESULT kms_audit_sign(kms *k, const uint8_t *msg, size_t msg_len,
                          uint8_t sig[KMS_AUDIT_SIG_MAX_BYTES], size_t *sig_len);

/* Raw access for exports: visits stored records with
 * after_seq < seq <= last_seq (0 = no bound) in order, with their canonical
 * bytes (valid only during the call) and the chain hash after each. */
typedef kms_result (*kms_audit_raw_fn)(uint64_t seq, const uint8_t *bytes, size_t len,
                                       const uint8_t hash[KMS_AUDIT_HASH_BYTES], void *arg,
                                       bool *stop);
KMS_RESULT kms_audit_scan_raw(kms *k, uint64_t after_seq, uint64_t last_seq, kms_audit_raw_fn fn,
                              void *arg);

/* Parses canonical record bytes into r (r->hash left zero). */
KMS_RESULT kms_audit_record_parse(const uint8_t *bytes, size_t len, kms_audit_record *r);

/* Removes records older than `before` (Unix seconds) from the start of the
 * chain, and stores a signed anchor for the chain position before the
 * first record kept. *removed may be NULL. */
KMS_RESULT kms_audit_prune(kms *k, int64_t before, uint64_t *removed);
/* Prune by the configured retention (no-op when retention_s is 0). */
KMS_RESULT kms_audit_retention_run(kms *k, uint64_t *removed);

#endif /* KMS_AUDIT_H */
