#include "kms_store.h"

#include "kms_buf.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Retries of one transaction for map growth or a full reader table, so
 * that no loop is unbounded. Doubling from 64 KiB reaches 64 GiB in 20. */
#define KMS_STORE_RETRIES_MAX 40
#define KMS_STORE_GEN_FILE    "kms-cache.gen"

struct kms_store {
    MDB_env *env;
    MDB_dbi dbi[KMS_DB_COUNT];
    MDB_dbi main_dbi;
    size_t map_max;
    size_t soft_pages; /* pages ordinary writes may fill; the rest is the reserve */
    size_t psize;
    /* Every transaction holds this shared; growing the map takes it
     * exclusive, because mdb_env_set_mapsize() requires that this process
     * has no transaction open (lmdb.h). */
    pthread_rwlock_t grow_lock;
    _Atomic uint64_t *gen;
    int gen_fd;
};

struct kms_txn {
    kms_store *s;
    MDB_txn *txn;
    bool map_full; /* a put hit MDB_MAP_FULL: grow and run again */
};

/* LMDB's free-page database, as mdb_stat(1) reads it: not in lmdb.h. */
#define KMS_STORE_FREE_DBI ((MDB_dbi)0)

/* The reserve: what a reclaiming write (pruning) may use once ordinary
 * writes have filled the store. A write frees nothing before it commits,
 * and the pages the last commits freed stay unusable while the previous
 * snapshot may be read, so a store filled to its last page cannot even
 * delete. 1/64 of the maximum, at least 32 pages (at most a quarter of
 * the map) and at most 64 MiB: a cut of one record needs about ten. */
#define KMS_STORE_RESERVE_DIV   64
#define KMS_STORE_RESERVE_MIN   32
#define KMS_STORE_RESERVE_MAX_B ((size_t)64 << 20)

static const char *const kms_db_names[KMS_DB_COUNT] = {
    [KMS_DB_META] = "meta",       [KMS_DB_KEYS] = "keys",           [KMS_DB_VERSIONS] = "versions",
    [KMS_DB_MASTERS] = "masters", [KMS_DB_ROTATIONS] = "rotations", [KMS_DB_AUDIT] = "audit",
};

/* The one place MDB_* codes become project errors. */
static kms_result kms_store_error(int rc, const char *what, const char *file, int line)
{
    kms_err e;
    switch (rc) {
    case MDB_MAP_FULL:
        e = KMS_ERR_STORE_FULL;
        break;
    case MDB_READERS_FULL:
    case MDB_TXN_FULL:
    case MDB_BAD_RSLOT:
        e = KMS_ERR_STORE_BUSY;
        break;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_BAD_VALSIZE:
    case MDB_INCOMPATIBLE:
        e = KMS_ERR_STORE_CORRUPT;
        break;
    case MDB_VERSION_MISMATCH:
    case MDB_INVALID:
        e = KMS_ERR_STORE_SCHEMA;
        break;
    case ENOMEM:
        e = KMS_ERR_NO_MEMORY;
        break;
    case ENOSPC:
    case EIO:
        e = KMS_ERR_IO;
        break;
    default:
        e = KMS_ERR_STORE;
        break;
    }
    return kms_error_raisef(e, file, line, "%s: %s", what, mdb_strerror(rc));
}
#define KMS_MDB_BAIL(rc, what) return kms_store_error((rc), (what), __FILE__, __LINE__)

static kms_result kms_store_gen_open(kms_store *s, const char *path)
{
    char p[4096];
    int n = snprintf(p, sizeof(p), "%s/%s", path, KMS_STORE_GEN_FILE);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(p), KMS_ERR_CONFIG);
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    KMS_ENSURE_MSG(fd >= 0, KMS_ERR_IO, "open %s: %s", p, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 ||
        (st.st_size < (off_t)sizeof(uint64_t) && ftruncate(fd, (off_t)sizeof(uint64_t)) != 0)) {
        close(fd);
        KMS_BAIL_MSG(KMS_ERR_IO, "size %s: %s", p, strerror(errno));
    }
    void *m = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        close(fd);
        KMS_BAIL_MSG(KMS_ERR_IO, "mmap %s: %s", p, strerror(errno));
    }
    s->gen = m;
    s->gen_fd = fd;
    return KMS_OK_RESULT;
}

static kms_result kms_store_init_dbs(kms_store *s)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_txn_begin");
    for (int i = 0; i < KMS_DB_COUNT; i++) {
        rc = mdb_dbi_open(txn, kms_db_names[i], MDB_CREATE, &s->dbi[i]);
        if (rc != MDB_SUCCESS) {
            mdb_txn_abort(txn);
            KMS_MDB_BAIL(rc, "mdb_dbi_open");
        }
    }
    if ((rc = mdb_dbi_open(txn, NULL, 0, &s->main_dbi)) != MDB_SUCCESS) {
        mdb_txn_abort(txn);
        KMS_MDB_BAIL(rc, "mdb_dbi_open");
    }
    /* Schema: meta["schema"] = u32 BE. Absent means a new store. */
    static const char schema_key[] = "schema";
    MDB_val k = {sizeof(schema_key) - 1, (void *)schema_key};
    MDB_val v;
    rc = mdb_get(txn, s->dbi[KMS_DB_META], &k, &v);
    if (rc == MDB_NOTFOUND) {
        uint8_t be[4] = {0, 0, 0, KMS_STORE_SCHEMA_VERSION};
        v.mv_size = sizeof(be);
        v.mv_data = be;
        rc = mdb_put(txn, s->dbi[KMS_DB_META], &k, &v, 0);
    } else if (rc == MDB_SUCCESS) {
        const uint8_t *b = v.mv_data;
        uint32_t ver =
            v.mv_size == 4
                ? ((uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3])
                : 0;
        if (ver != KMS_STORE_SCHEMA_VERSION) {
            mdb_txn_abort(txn);
            KMS_BAIL_MSG(KMS_ERR_STORE_SCHEMA, "store schema version %u, this build reads %u", ver,
                         KMS_STORE_SCHEMA_VERSION);
        }
    }
    if (rc != MDB_SUCCESS) {
        mdb_txn_abort(txn);
        KMS_MDB_BAIL(rc, "schema");
    }
    rc = mdb_txn_commit(txn);
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_txn_commit");
    return KMS_OK_RESULT;
}

static size_t kms_store_soft_pages(size_t map_max, size_t psize)
{
    size_t pages = map_max / psize;
    size_t reserve = pages / KMS_STORE_RESERVE_DIV;
    size_t floor = KMS_STORE_RESERVE_MIN < pages / 4 ? KMS_STORE_RESERVE_MIN : pages / 4;
    if (reserve < floor)
        reserve = floor;
    if (reserve > KMS_STORE_RESERVE_MAX_B / psize)
        reserve = KMS_STORE_RESERVE_MAX_B / psize;
    return pages - reserve;
}

/* Pages the transaction's trees hold (the free list's own pages included,
 * the free pages themselves not), plus the two meta pages. Each count is
 * kept in the tree's root record, so this costs a few loads. */
static size_t kms_store_live_pages(const kms_store *s, MDB_txn *txn)
{
    size_t n = 2;
    MDB_stat st;
    if (mdb_stat(txn, KMS_STORE_FREE_DBI, &st) == MDB_SUCCESS)
        n += st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages;
    if (mdb_stat(txn, s->main_dbi, &st) == MDB_SUCCESS)
        n += st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages;
    for (int i = 0; i < KMS_DB_COUNT; i++) {
        if (mdb_stat(txn, s->dbi[i], &st) == MDB_SUCCESS)
            n += st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages;
    }
    return n;
}

KMS_RESULT kms_store_open(const char *path, size_t map_initial, size_t map_max, kms_store **out)
{
    KMS_ENSURE(path != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(map_initial <= map_max, KMS_ERR_CONFIG);
    kms_store *s = calloc(1, sizeof(*s));
    KMS_ENSURE(s != NULL, KMS_ERR_NO_MEMORY);
    s->gen_fd = -1;
    s->map_max = map_max;
    pthread_rwlock_init(&s->grow_lock, NULL);
    kms_result r;
    int rc = mdb_env_create(&s->env);
    if (rc != MDB_SUCCESS) {
        s->env = NULL;
        r = kms_store_error(rc, "mdb_env_create", __FILE__, __LINE__);
        goto fail;
    }
    if ((rc = mdb_env_set_maxdbs(s->env, KMS_DB_COUNT)) != MDB_SUCCESS ||
        (rc = mdb_env_set_mapsize(s->env, map_initial)) != MDB_SUCCESS) {
        r = kms_store_error(rc, "mdb_env_set", __FILE__, __LINE__);
        goto fail;
    }
    /* MDB_NOTLS: read transactions are not tied to a thread's slot, so a
     * transaction may be used by whichever pool thread runs the request. */
    rc = mdb_env_open(s->env, path, MDB_NOTLS, 0600);
    if (rc != MDB_SUCCESS) {
        r = kms_store_error(rc, "mdb_env_open", __FILE__, __LINE__);
        goto fail;
    }
    KMS_GUARD_GOTO(r, kms_store_init_dbs(s), fail);
    KMS_GUARD_GOTO(r, kms_store_gen_open(s, path), fail);
    MDB_stat st;
    mdb_env_stat(s->env, &st);
    s->psize = st.ms_psize;
    s->soft_pages = kms_store_soft_pages(map_max, st.ms_psize);
    *out = s;
    return KMS_OK_RESULT;
fail:
    kms_store_close(s);
    return r;
}

void kms_store_close(kms_store *s)
{
    if (s == NULL)
        return;
    if (s->env != NULL)
        mdb_env_close(s->env);
    if (s->gen != NULL)
        munmap((void *)s->gen, sizeof(uint64_t));
    if (s->gen_fd >= 0)
        close(s->gen_fd);
    pthread_rwlock_destroy(&s->grow_lock);
    free(s);
}

uint64_t kms_store_gen(kms_store *s)
{
    return atomic_load_explicit(s->gen, memory_order_acquire);
}

void kms_store_gen_bump(kms_store *s)
{
    atomic_fetch_add_explicit(s->gen, 1, memory_order_acq_rel);
}

/* Grows the map with no transaction of this process open. */
static kms_result kms_store_grow(kms_store *s)
{
    pthread_rwlock_wrlock(&s->grow_lock);
    MDB_envinfo info;
    mdb_env_info(s->env, &info);
    size_t cur = info.me_mapsize;
    kms_result r = KMS_OK_RESULT;
    if (cur >= s->map_max) {
        r = kms_error_raisef(KMS_ERR_STORE_FULL, __FILE__, __LINE__,
                             "map size %zu reached the configured maximum", cur);
    } else {
        size_t next = cur > s->map_max / 2 ? s->map_max : cur * 2;
        int rc = mdb_env_set_mapsize(s->env, next);
        if (rc != MDB_SUCCESS)
            r = kms_store_error(rc, "mdb_env_set_mapsize", __FILE__, __LINE__);
    }
    pthread_rwlock_unlock(&s->grow_lock);
    return r;
}

/* Another process grew the map: adopt its size (mapsize 0 = current). */
static void kms_store_adopt(kms_store *s)
{
    pthread_rwlock_wrlock(&s->grow_lock);
    (void)mdb_env_set_mapsize(s->env, 0);
    pthread_rwlock_unlock(&s->grow_lock);
}

typedef enum { KMS_RUN_READ, KMS_RUN_WRITE, KMS_RUN_RECLAIM } kms_run_kind;

static kms_result kms_store_run(kms_store *s, kms_store_fn fn, void *arg, kms_run_kind kind)
{
    bool write = kind != KMS_RUN_READ;
    for (int attempt = 0; attempt < KMS_STORE_RETRIES_MAX; attempt++) {
        struct kms_txn t = {.s = s};
        pthread_rwlock_rdlock(&s->grow_lock);
        int rc = mdb_txn_begin(s->env, NULL, write ? 0 : MDB_RDONLY, &t.txn);
        if (rc != MDB_SUCCESS) {
            pthread_rwlock_unlock(&s->grow_lock);
            if (rc == MDB_READERS_FULL) {
                /* Slots of dead processes are reclaimed, then retried. */
                int dead = 0;
                mdb_reader_check(s->env, &dead);
                if (dead == 0 && attempt > 2)
                    KMS_MDB_BAIL(rc, "mdb_txn_begin");
                continue;
            }
            if (rc == MDB_MAP_RESIZED) {
                kms_store_adopt(s);
                continue;
            }
            KMS_MDB_BAIL(rc, "mdb_txn_begin");
        }
        size_t live_before = kind == KMS_RUN_WRITE ? kms_store_live_pages(s, t.txn) : 0;
        kms_result r = fn(&t, arg);
        if (kms_is_ok(r) && kind == KMS_RUN_WRITE) {
            /* An ordinary write may not grow into the reserve; one that
             * frees pages or only rewrites them still commits. */
            size_t live = kms_store_live_pages(s, t.txn);
            if (live > s->soft_pages && live > live_before)
                r = kms_error_raisef(KMS_ERR_STORE_FULL, __FILE__, __LINE__,
                                     "%zu pages in use, %zu allowed: the rest of "
                                     "store_map_size_max is kept for pruning",
                                     live, s->soft_pages);
        }
        if (!kms_is_ok(r) || !write) {
            mdb_txn_abort(t.txn);
            pthread_rwlock_unlock(&s->grow_lock);
            if (t.map_full) {
                KMS_GUARD(kms_store_grow(s));
                continue;
            }
            /* r is a plain error code; nothing in it points at t. */
            // cppcheck-suppress returnDanglingLifetime
            return r;
        }
        rc = mdb_txn_commit(t.txn);
        pthread_rwlock_unlock(&s->grow_lock);
        if (rc == MDB_MAP_FULL) {
            KMS_GUARD(kms_store_grow(s));
            continue;
        }
        if (rc != MDB_SUCCESS)
            KMS_MDB_BAIL(rc, "mdb_txn_commit");
        return KMS_OK_RESULT;
    }
    KMS_BAIL_MSG(KMS_ERR_STORE_BUSY, "transaction retried too often");
}

KMS_RESULT kms_store_read(kms_store *s, kms_store_fn fn, void *arg)
{
    return kms_store_run(s, fn, arg, KMS_RUN_READ);
}

KMS_RESULT kms_store_write(kms_store *s, kms_store_fn fn, void *arg)
{
    return kms_store_run(s, fn, arg, KMS_RUN_WRITE);
}

KMS_RESULT kms_store_reclaim(kms_store *s, kms_store_fn fn, void *arg)
{
    return kms_store_run(s, fn, arg, KMS_RUN_RECLAIM);
}

KMS_RESULT kms_txn_get(kms_txn *t, kms_db db, const void *key, size_t klen, const uint8_t **val,
                       size_t *vlen, bool *found)
{
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_get(t->txn, t->s->dbi[db], &k, &v);
    if (rc == MDB_NOTFOUND) {
        *found = false;
        *val = NULL;
        *vlen = 0;
        return KMS_OK_RESULT;
    }
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_get");
    *found = true;
    *val = v.mv_data;
    *vlen = v.mv_size;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_txn_put(kms_txn *t, kms_db db, const void *key, size_t klen, const void *val,
                       size_t vlen, bool no_overwrite)
{
    MDB_val k = {klen, (void *)key}, v = {vlen, (void *)val};
    int rc = mdb_put(t->txn, t->s->dbi[db], &k, &v, no_overwrite ? MDB_NOOVERWRITE : 0);
    if (rc == MDB_KEYEXIST)
        KMS_BAIL(KMS_ERR_KEY_EXISTS);
    if (rc == MDB_MAP_FULL)
        t->map_full = true;
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_put");
    return KMS_OK_RESULT;
}

KMS_RESULT kms_txn_del(kms_txn *t, kms_db db, const void *key, size_t klen)
{
    MDB_val k = {klen, (void *)key};
    int rc = mdb_del(t->txn, t->s->dbi[db], &k, NULL);
    if (rc == MDB_NOTFOUND)
        return KMS_OK_RESULT;
    if (rc == MDB_MAP_FULL)
        t->map_full = true;
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_del");
    return KMS_OK_RESULT;
}

KMS_RESULT kms_txn_scan(kms_txn *t, kms_db db, const void *start, size_t start_len,
                        const void *prefix, size_t prefix_len, kms_scan_fn fn, void *arg)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(t->txn, t->s->dbi[db], &c);
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_cursor_open");
    MDB_val k = {start_len, (void *)start}, v;
    rc = start != NULL && start_len > 0 ? mdb_cursor_get(c, &k, &v, MDB_SET_RANGE)
                                        : mdb_cursor_get(c, &k, &v, MDB_FIRST);
    kms_result r = KMS_OK_RESULT;
    while (rc == MDB_SUCCESS) {
        if (prefix != NULL &&
            (k.mv_size < prefix_len || memcmp(k.mv_data, prefix, prefix_len) != 0))
            break;
        bool stop = false;
        r = fn(k.mv_data, k.mv_size, v.mv_data, v.mv_size, arg, &stop);
        if (!kms_is_ok(r) || stop)
            break;
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(c);
    if (!kms_is_ok(r))
        return r;
    if (rc != MDB_SUCCESS && rc != MDB_NOTFOUND)
        KMS_MDB_BAIL(rc, "mdb_cursor_get");
    return KMS_OK_RESULT;
}

KMS_RESULT kms_txn_count(kms_txn *t, kms_db db, size_t *n)
{
    MDB_stat st;
    int rc = mdb_stat(t->txn, t->s->dbi[db], &st);
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_stat");
    *n = st.ms_entries;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_store_backup(kms_store *s, const char *dir)
{
    KMS_ENSURE(dir != NULL, KMS_ERR_INVALID_ARGUMENT);
    DIR *d = opendir(dir);
    KMS_ENSURE_MSG(d != NULL, KMS_ERR_IO, "backup directory %s: %s", dir, strerror(errno));
    struct dirent *e;
    bool empty = true;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            empty = false;
            break;
        }
    }
    closedir(d);
    KMS_ENSURE_MSG(empty, KMS_ERR_INVALID_ARGUMENT, "backup directory %s is not empty", dir);
    pthread_rwlock_rdlock(&s->grow_lock);
    int rc = mdb_env_copy2(s->env, dir, MDB_CP_COMPACT);
    pthread_rwlock_unlock(&s->grow_lock);
    if (rc != MDB_SUCCESS)
        KMS_MDB_BAIL(rc, "mdb_env_copy2");
    return KMS_OK_RESULT;
}

static kms_result kms_store_live_txn(kms_txn *t, void *arg)
{
    *(size_t *)arg = kms_store_live_pages(t->s, t->txn);
    return KMS_OK_RESULT;
}

void kms_store_sizes(kms_store *s, size_t *map_size, size_t *used_bytes, size_t *limit_bytes)
{
    MDB_envinfo info;
    mdb_env_info(s->env, &info);
    *map_size = info.me_mapsize;
    /* What the trees hold, which pruning lowers; the file's high-water
     * mark (last_pgno) never comes down and is the fallback only. */
    size_t live = 0;
    if (!kms_is_ok(kms_store_read(s, kms_store_live_txn, &live)))
        live = info.me_last_pgno + 1;
    *used_bytes = live * s->psize;
    *limit_bytes = s->soft_pages * s->psize;
}
