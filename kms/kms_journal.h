/*
 * The audit journal (internal to kms/; docs/audit.md, "Durability").
 *
 * A preallocated file next to the LMDB store, shared by every process that
 * has the store open, where audit records become durable before their
 * answers are sent: a group of records is one write at the end of the
 * file and one fdatasync of the one or two pages it touched, instead of
 * an LMDB commit that rewrites several scattered pages. The records move
 * into LMDB later in large batches (kms_audit.c, "ingest"); the journal
 * is then reused from its start.
 *
 * Layout: a header file (path.head) shared through mmap by the processes
 * that have the journal open holds the append position and the chain tail
 * (never synced, and never trusted after every process has gone, see
 * recovery below); the journal file holds frames, 8-byte aligned:
 *
 *   u32 magic | u32 len | u64 seq | prev[32] | hash[32] | bytes[len] | pad
 *
 * with hash = SHA-256(prev || bytes), which is the audit chain's own link
 * (kms_audit.h), so that a frame checks itself and its predecessor: a
 * torn or stale frame fails the hash or does not continue the chain, and
 * a scan from the start stops there. Integers are in the host's byte
 * order: only the machine that wrote a journal reads it.
 *
 * Locks (open file description locks, so that they also exclude other
 * kms instances of the same process, each paired with a mutex for the
 * threads of one instance):
 *   append: held while frames are written and the header updated;
 *   ingest: held while frames are copied into LMDB and while the file is
 *           reset (taken after append when both are needed);
 *   alive:  shared by every instance for as long as it has the file open;
 *           an instance that gets it exclusively is alone, and marks the
 *           header for recovery before anyone appends.
 * A writer marks the header dirty before it writes and clean after; an
 * instance that finds it dirty (a writer died, or nobody had the file
 * open) rebuilds it from a scan of the frames (kms_audit.c).
 */
#ifndef KMS_JOURNAL_H
#define KMS_JOURNAL_H

#include "kms_buf.h"
#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_JOURNAL_HASH_BYTES    32
#define KMS_JOURNAL_DATA_OFF      0u
#define KMS_JOURNAL_FRAME_HEAD    80u
#define KMS_JOURNAL_MIN_BYTES     (64u * 1024u)
#define KMS_JOURNAL_DEFAULT_BYTES (8u * 1024u * 1024u)

typedef struct kms_journal kms_journal;

typedef struct {
    uint64_t seq;
    const uint8_t *prev; /* KMS_JOURNAL_HASH_BYTES */
    const uint8_t *hash; /* followed at once by bytes: hash || bytes */
    const uint8_t *bytes;
    uint32_t len;
    uint64_t next; /* offset of the following frame */
} kms_jframe;

/* Opens (creating and zero-filling to `bytes` if missing or shorter) the
 * journal at path and takes the alive lock. */
KMS_RESULT kms_journal_open(const char *path, uint64_t bytes, kms_journal **out);
void kms_journal_close(kms_journal *j);

/* ---- append side: everything below under the append lock ---- */
KMS_RESULT kms_journal_lock(kms_journal *j);
void kms_journal_unlock(kms_journal *j);
/* The header needs rebuilding before it can be used. */
bool kms_journal_dirty(const kms_journal *j);
void kms_journal_tail(const kms_journal *j, uint64_t *seq, uint8_t hash[KMS_JOURNAL_HASH_BYTES]);
/* Bytes for frames in all. */
uint64_t kms_journal_room_total(const kms_journal *j);
/* Bytes left for frames after the current end. */
uint64_t kms_journal_room(const kms_journal *j);
/* Sets end and tail and marks the header clean (after a rebuild, or
 * end = KMS_JOURNAL_DATA_OFF to reuse the file; the ingest lock must be
 * held too when end moves back). */
void kms_journal_set(kms_journal *j, uint64_t end, uint64_t seq,
                     const uint8_t hash[KMS_JOURNAL_HASH_BYTES]);
/* Writes the frames of b (kms_journal_frame_put) at the end, then
 * publishes the new end and tail. KMS_ERR_STORE_FULL if they do not fit. */
KMS_RESULT kms_journal_write(kms_journal *j, const kms_buf *b, uint64_t seq,
                             const uint8_t hash[KMS_JOURNAL_HASH_BYTES]);
/* fdatasync: every frame written before it, by any process, is durable. */
KMS_RESULT kms_journal_sync(kms_journal *j);

/* Appends one frame to b. */
KMS_RESULT kms_journal_frame_put(kms_buf *b, uint64_t seq, const uint8_t *prev, const uint8_t *hash,
                                 const uint8_t *bytes, size_t len);
/* The size of a frame holding len bytes. */
uint64_t kms_journal_frame_size(size_t len);

/* ---- reading (frames below the published end never change while the
 * ingest lock is held) ---- */
uint64_t kms_journal_end(const kms_journal *j);
/* The frame at off if it is whole and its hash holds, within limit. */
bool kms_journal_frame(const kms_journal *j, uint64_t off, uint64_t limit, kms_jframe *f);
/* The longest run of frames from the start that continue one another:
 * n frames, the last one's seq and hash, the first one's seq, and where
 * the run ends. */
typedef struct {
    uint64_t n, first_seq, last_seq, end;
    uint8_t last_hash[KMS_JOURNAL_HASH_BYTES];
} kms_jscan;
void kms_journal_scan(const kms_journal *j, kms_jscan *s);

/* ---- ingest lock and the position of the next frame to ingest ---- */
KMS_RESULT kms_journal_ingest_lock(kms_journal *j);
void kms_journal_ingest_unlock(kms_journal *j);
/* Where the frame after `seq` starts, if the last ingest left that hint. */
bool kms_journal_hint(const kms_journal *j, uint64_t seq, uint64_t *off);
void kms_journal_hint_set(kms_journal *j, uint64_t seq, uint64_t off);
/* Nothing was written since the last ingest ended (under the ingest lock). */
bool kms_journal_ingested(const kms_journal *j);

#endif
