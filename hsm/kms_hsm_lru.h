/*
 * hsm/ internal: the bounded LRU cache of unwrapped version secrets, keyed
 * by the caller's 16-byte uid (hash table + doubly linked list, O(1)).
 *
 * An entry is pinned (refs > 0) while an operation uses its handle, so an
 * eviction never destroys an object under a running C_EncryptInit: an
 * evicted pinned entry is unlinked and its object destroyed by the last
 * release. A miss claims the uid with a `loading` entry, so concurrent misses
 * for one uid wait for the single unwrap instead of each making an object.
 * Objects are destroyed through the callback given at creation, always
 * outside the cache's mutex.
 */
#ifndef KMS_HSM_LRU_H
#define KMS_HSM_LRU_H

#include "kms_hsm.h"

#include <p11-kit/pkcs11.h>

typedef struct kms_hsm_lru kms_hsm_lru;
typedef struct kms_hsm_lru_entry kms_hsm_lru_entry;

/* Destroys a cached object; gen is the pool generation it was made in. */
typedef void (*kms_hsm_lru_destroy_fn)(void *ctx, CK_OBJECT_HANDLE h, uint64_t gen);

KMS_RESULT kms_hsm_lru_new(size_t capacity, kms_hsm_lru_destroy_fn destroy, void *ctx,
                           kms_hsm_lru **out);
/* Frees every entry without destroying objects (they died with their
 * session). No entry may be pinned. */
void kms_hsm_lru_free(kms_hsm_lru *c);

/* Returns the uid's entry pinned. *claimed = false: a hit, the handle is
 * ready. *claimed = true: a miss, the caller must unwrap and then call
 * kms_hsm_lru_fill or kms_hsm_lru_abandon. */
KMS_RESULT kms_hsm_lru_acquire(kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES],
                               kms_hsm_lru_entry **out, bool *claimed);
void kms_hsm_lru_fill(kms_hsm_lru *c, kms_hsm_lru_entry *e, CK_OBJECT_HANDLE h,
                      kms_hsm_secret_type type, uint64_t gen);
void kms_hsm_lru_abandon(kms_hsm_lru *c, kms_hsm_lru_entry *e);
/* Unpins; with drop = true also evicts (the handle proved invalid). */
void kms_hsm_lru_release(kms_hsm_lru *c, kms_hsm_lru_entry *e, bool drop);

CK_OBJECT_HANDLE kms_hsm_lru_entry_handle(const kms_hsm_lru_entry *e);
kms_hsm_secret_type kms_hsm_lru_entry_type(const kms_hsm_lru_entry *e);

void kms_hsm_lru_evict(kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES]);
/* Forgets every entry without destroying objects (after the owner session
 * and its objects are gone). No entry may be pinned. */
void kms_hsm_lru_clear(kms_hsm_lru *c);

typedef struct {
    uint64_t hits, misses, evictions;
    size_t size;
} kms_hsm_lru_stats;
void kms_hsm_lru_stats_get(kms_hsm_lru *c, kms_hsm_lru_stats *out);

#endif /* KMS_HSM_LRU_H */
