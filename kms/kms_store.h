/*
 * The LMDB layer of kms/ (internal). One environment per kms instance,
 * opened once with MDB_NOTLS; every named database opened once, in one
 * transaction, at start (after knot's knot_lmdb.c). MDB_* codes are
 * translated to the project's error table here and nowhere else.
 *
 * Transactions are run through callbacks so that the store can own the
 * retry policy: on MDB_MAP_FULL the write transaction is aborted, the map
 * grows (doubling, up to the configured maximum) while no transaction of
 * this process is open, and the callback runs again from the start. A
 * callback therefore must not have side effects outside the transaction.
 */
#ifndef KMS_STORE_H
#define KMS_STORE_H

#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kms_store kms_store;
typedef struct kms_txn kms_txn;

typedef enum {
    KMS_DB_META = 0,
    KMS_DB_KEYS,
    KMS_DB_VERSIONS,
    KMS_DB_MASTERS,
    KMS_DB_ROTATIONS,
    KMS_DB_AUDIT,
    KMS_DB_COUNT
} kms_db;

#define KMS_STORE_SCHEMA_VERSION 1

KMS_RESULT kms_store_open(const char *path, size_t map_initial, size_t map_max, kms_store **out);
void kms_store_close(kms_store *s);

typedef kms_result (*kms_store_fn)(kms_txn *t, void *arg);
/* Runs fn in a read-only transaction. */
KMS_RESULT kms_store_read(kms_store *s, kms_store_fn fn, void *arg);
/* Runs fn in a write transaction and commits if it succeeded; aborts
 * otherwise. fn may run more than once (map growth). A write that would
 * leave the store holding more than the maximum less a reserve (1/64 of
 * it, at least 32 pages, at most 64 MiB) fails with KMS_ERR_STORE_FULL,
 * unless it holds no more pages than before. */
KMS_RESULT kms_store_write(kms_store *s, kms_store_fn fn, void *arg);
/* The same for a write that exists to free space (pruning): it may use
 * the reserve, so that a store full of ordinary writes can still be cut. */
KMS_RESULT kms_store_reclaim(kms_store *s, kms_store_fn fn, void *arg);

/* Values point into the map: valid until the transaction ends. */
KMS_RESULT kms_txn_get(kms_txn *t, kms_db db, const void *key, size_t klen, const uint8_t **val,
                       size_t *vlen, bool *found);
/* no_overwrite: an existing key fails with KMS_ERR_KEY_EXISTS. */
KMS_RESULT kms_txn_put(kms_txn *t, kms_db db, const void *key, size_t klen, const void *val,
                       size_t vlen, bool no_overwrite);
KMS_RESULT kms_txn_del(kms_txn *t, kms_db db, const void *key, size_t klen);

/* Visits records in key order from the first key >= start (NULL: from the
 * beginning) while they start with prefix (NULL: any). fn sets *stop to end
 * the scan early. */
typedef kms_result (*kms_scan_fn)(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                                  void *arg, bool *stop);
KMS_RESULT kms_txn_scan(kms_txn *t, kms_db db, const void *start, size_t start_len,
                        const void *prefix, size_t prefix_len, kms_scan_fn fn, void *arg);
KMS_RESULT kms_txn_count(kms_txn *t, kms_db db, size_t *n);

/* Hot backup with compaction into dir (which must exist and be empty). */
KMS_RESULT kms_store_backup(kms_store *s, const char *dir);
/* The map's current size; the bytes the store's pages hold (pruning lowers
 * it); and what ordinary writes may fill (the maximum less the reserve). */
void kms_store_sizes(kms_store *s, size_t *map_size, size_t *used_bytes, size_t *limit_bytes);

/* Cross-process cache generation: every committed change of metadata bumps
 * it, and every process compares it with the generation its in-memory
 * cache was loaded at. Lives in a small shared file next to the LMDB
 * environment, so that checking it costs one atomic load. */
uint64_t kms_store_gen(kms_store *s);
void kms_store_gen_bump(kms_store *s);

#endif /* KMS_STORE_H */
