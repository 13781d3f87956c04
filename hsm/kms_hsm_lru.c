/* The LRU cache of unwrapped version secrets (kms_hsm_lru.h). */
#define _GNU_SOURCE
#include "kms_hsm_lru.h"

#include "kms_rand.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct kms_hsm_lru_entry {
    uint8_t uid[KMS_HSM_UID_BYTES];
    CK_OBJECT_HANDLE handle;
    kms_hsm_secret_type type;
    uint64_t gen;
    unsigned refs;
    bool loading; /* claimed by a miss, not yet filled */
    bool linked;  /* in the table (and, unless loading, in the LRU list) */
    kms_hsm_lru_entry *hnext;
    kms_hsm_lru_entry *prev, *next; /* LRU: head = most recent */
};

struct kms_hsm_lru {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* a loading entry was filled or abandoned */
    kms_hsm_lru_entry **buckets;
    size_t mask;
    uint64_t seed;
    kms_hsm_lru_entry lru; /* sentinel */
    size_t size;           /* filled entries in the LRU list */
    size_t capacity;
    uint64_t hits, misses, evictions;
    kms_hsm_lru_destroy_fn destroy;
    void *ctx;
};

KMS_RESULT kms_hsm_lru_new(size_t capacity, kms_hsm_lru_destroy_fn destroy, void *ctx,
                           kms_hsm_lru **out)
{
    KMS_ENSURE(capacity > 0 && capacity <= ((size_t)1 << 24), KMS_ERR_INVALID_ARGUMENT);
    size_t nb = 16;
    while (nb < 2 * capacity)
        nb <<= 1;
    kms_hsm_lru *c = calloc(1, sizeof(*c));
    KMS_ENSURE(c != NULL, KMS_ERR_NO_MEMORY);
    c->buckets = calloc(nb, sizeof(*c->buckets));
    if (c->buckets == NULL) {
        free(c);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    kms_result r = kms_rand_bytes(&c->seed, sizeof(c->seed));
    if (!kms_is_ok(r)) {
        free(c->buckets);
        free(c);
        return r;
    }
    c->mask = nb - 1;
    c->capacity = capacity;
    c->lru.prev = c->lru.next = &c->lru;
    c->destroy = destroy;
    c->ctx = ctx;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    *out = c;
    return KMS_OK_RESULT;
}

/* uids are random, but they come from storage: key the bucket choice with a
 * per-process seed so that no stored set of uids can force long chains. */
static size_t cache_bucket(const kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES])
{
    uint64_t a, b;
    memcpy(&a, uid, 8);
    memcpy(&b, uid + 8, 8);
    uint64_t h = (a ^ c->seed) * 0x9e3779b97f4a7c15ull;
    h ^= (b + (c->seed >> 17)) * 0xc2b2ae3d27d4eb4full;
    h ^= h >> 29;
    return (size_t)h & c->mask;
}

static kms_hsm_lru_entry *cache_find(kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES])
{
    for (kms_hsm_lru_entry *e = c->buckets[cache_bucket(c, uid)]; e != NULL; e = e->hnext)
        if (memcmp(e->uid, uid, KMS_HSM_UID_BYTES) == 0)
            return e;
    return NULL;
}

static void lru_unlink(kms_hsm_lru_entry *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_front(kms_hsm_lru *c, kms_hsm_lru_entry *e)
{
    e->next = c->lru.next;
    e->prev = &c->lru;
    c->lru.next->prev = e;
    c->lru.next = e;
}

/* Removes e from the table and, if filled, from the LRU list. */
static void cache_unlink(kms_hsm_lru *c, kms_hsm_lru_entry *e)
{
    kms_hsm_lru_entry **pp = &c->buckets[cache_bucket(c, e->uid)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    e->hnext = NULL;
    if (!e->loading) {
        lru_unlink(e);
        c->size--;
    }
    e->linked = false;
}

/* Victims collected under the mutex, destroyed after it is released. */
typedef struct {
    CK_OBJECT_HANDLE handle[4];
    uint64_t gen[4];
    size_t n;
} cache_victims;

static void victims_add(cache_victims *v, kms_hsm_lru_entry *e)
{
    if (v->n < KMS_ARRAY_LEN(v->handle)) {
        v->handle[v->n] = e->handle;
        v->gen[v->n] = e->gen;
        v->n++;
    }
    free(e);
}

static void victims_destroy(kms_hsm_lru *c, cache_victims *v)
{
    for (size_t i = 0; i < v->n; i++)
        c->destroy(c->ctx, v->handle[i], v->gen[i]);
}

KMS_RESULT kms_hsm_lru_acquire(kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES],
                               kms_hsm_lru_entry **out, bool *claimed)
{
    pthread_mutex_lock(&c->mu);
    kms_hsm_lru_entry *e;
    /* Bounded: a loading entry is filled or abandoned by its claimer, which
     * holds no cache lock while unwrapping. */
    while ((e = cache_find(c, uid)) != NULL && e->loading)
        pthread_cond_wait(&c->cv, &c->mu);
    if (e != NULL) {
        e->refs++;
        lru_unlink(e);
        lru_push_front(c, e);
        c->hits++;
        pthread_mutex_unlock(&c->mu);
        *out = e;
        *claimed = false;
        return KMS_OK_RESULT;
    }
    e = calloc(1, sizeof(*e));
    if (e == NULL) {
        pthread_mutex_unlock(&c->mu);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    memcpy(e->uid, uid, KMS_HSM_UID_BYTES);
    e->refs = 1;
    e->loading = true;
    e->linked = true;
    size_t b = cache_bucket(c, uid);
    e->hnext = c->buckets[b];
    c->buckets[b] = e;
    c->misses++;
    pthread_mutex_unlock(&c->mu);
    *out = e;
    *claimed = true;
    return KMS_OK_RESULT;
}

void kms_hsm_lru_fill(kms_hsm_lru *c, kms_hsm_lru_entry *e, CK_OBJECT_HANDLE h,
                      kms_hsm_secret_type type, uint64_t gen)
{
    cache_victims v = {.n = 0};
    pthread_mutex_lock(&c->mu);
    e->handle = h;
    e->type = type;
    e->gen = gen;
    e->loading = false;
    lru_push_front(c, e);
    c->size++;
    /* Evict from the tail. A pinned victim is unlinked now and destroyed by
     * its last release; e itself (the head, pinned) is never a victim while
     * capacity >= 1. */
    while (c->size > c->capacity) {
        kms_hsm_lru_entry *t = c->lru.prev;
        cache_unlink(c, t);
        c->evictions++;
        if (t->refs == 0)
            victims_add(&v, t);
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    victims_destroy(c, &v);
}

void kms_hsm_lru_abandon(kms_hsm_lru *c, kms_hsm_lru_entry *e)
{
    pthread_mutex_lock(&c->mu);
    if (e->linked)
        cache_unlink(c, e);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    free(e);
}

void kms_hsm_lru_release(kms_hsm_lru *c, kms_hsm_lru_entry *e, bool drop)
{
    cache_victims v = {.n = 0};
    pthread_mutex_lock(&c->mu);
    if (drop && e->linked) {
        cache_unlink(c, e);
        c->evictions++;
    }
    if (--e->refs == 0 && !e->linked)
        victims_add(&v, e);
    pthread_mutex_unlock(&c->mu);
    victims_destroy(c, &v);
}

CK_OBJECT_HANDLE kms_hsm_lru_entry_handle(const kms_hsm_lru_entry *e)
{
    return e->handle;
}

kms_hsm_secret_type kms_hsm_lru_entry_type(const kms_hsm_lru_entry *e)
{
    return e->type;
}

void kms_hsm_lru_evict(kms_hsm_lru *c, const uint8_t uid[KMS_HSM_UID_BYTES])
{
    cache_victims v = {.n = 0};
    pthread_mutex_lock(&c->mu);
    kms_hsm_lru_entry *e = cache_find(c, uid);
    if (e != NULL && !e->loading) {
        cache_unlink(c, e);
        c->evictions++;
        if (e->refs == 0)
            victims_add(&v, e);
    }
    pthread_mutex_unlock(&c->mu);
    victims_destroy(c, &v);
}

void kms_hsm_lru_clear(kms_hsm_lru *c)
{
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i <= c->mask; i++) {
        kms_hsm_lru_entry *e = c->buckets[i];
        while (e != NULL) {
            kms_hsm_lru_entry *n = e->hnext;
            free(e);
            e = n;
        }
        c->buckets[i] = NULL;
    }
    c->lru.prev = c->lru.next = &c->lru;
    c->size = 0;
    pthread_mutex_unlock(&c->mu);
}

void kms_hsm_lru_free(kms_hsm_lru *c)
{
    if (c == NULL)
        return;
    kms_hsm_lru_clear(c);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c->buckets);
    free(c);
}

void kms_hsm_lru_stats_get(kms_hsm_lru *c, kms_hsm_lru_stats *out)
{
    pthread_mutex_lock(&c->mu);
    out->hits = c->hits;
    out->misses = c->misses;
    out->evictions = c->evictions;
    out->size = c->size;
    pthread_mutex_unlock(&c->mu);
}
