/*
 * The audit journal: a preallocated, shared, append-only file of chained
 * frames (kms_journal.h).
 */
#define _GNU_SOURCE
#include "kms_journal.h"

#include "kms_hash.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define JOURNAL_MAGIC       UINT64_C(0x314c4e524a534d4b) /* "KMSJRNL1" */
#define JOURNAL_FRAME_MAGIC UINT32_C(0x314d524b)         /* "KRM1" */
#define JOURNAL_FRAME_MAX   (1u << 20)

/* Lock bytes (beyond the header's fields, anywhere is fine). */
enum { LOCK_APPEND = 0, LOCK_INGEST = 1, LOCK_ALIVE = 2 };

/* The header file, shared by every process that maps it. It is a file
 * of its own so that the journal's fdatasync writes only the pages of the
 * frames: the header changes with every append, and is never synced (it
 * is rebuilt whenever it may be stale). */
typedef struct {
    uint64_t magic;
    uint64_t size;
    _Atomic uint64_t end; /* published after the frames below it are written */
    uint64_t dirty;
    uint64_t tail_seq;
    uint8_t tail_hash[KMS_JOURNAL_HASH_BYTES];
    uint64_t hint_seq, hint_off; /* under the ingest lock */
} journal_head;

struct kms_journal {
    int fd;  /* the frames */
    int hfd; /* the header, and the locks */
    uint8_t *map;
    uint64_t size;
    journal_head *h;
    pthread_mutex_t append_mu, ingest_mu;
};

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static int journal_ofd_lock(int fd, short type, int byte, bool wait)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    for (;;) {
        if (fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Zero-fills [from, to): real blocks, so that a later write in place and
 * its fdatasync change no file metadata. */
static kms_result journal_fill(int fd, uint64_t from, uint64_t to)
{
    static const uint8_t zeros[64 * 1024];
    while (from < to) {
        size_t n = to - from < sizeof(zeros) ? (size_t)(to - from) : sizeof(zeros);
        ssize_t w = pwrite(fd, zeros, n, (off_t)from);
        if (w < 0 && errno == EINTR)
            continue;
        KMS_ENSURE_MSG(w > 0, w < 0 && errno == ENOSPC ? KMS_ERR_STORE_FULL : KMS_ERR_IO,
                       "audit journal: filling: %s", strerror(errno));
        from += (uint64_t)w;
    }
    return KMS_OK_RESULT;
}

/* Makes a new file's directory entry durable. */
static void journal_sync_dir(const char *path)
{
    char *copy = strdup(path);
    if (copy == NULL)
        return;
    int dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    free(copy);
}

KMS_RESULT kms_journal_open(const char *path, uint64_t bytes, kms_journal **out)
{
    KMS_ENSURE(path != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    if (bytes == 0)
        bytes = KMS_JOURNAL_DEFAULT_BYTES;
    KMS_ENSURE_MSG(bytes >= KMS_JOURNAL_MIN_BYTES && bytes <= (UINT64_C(1) << 32), KMS_ERR_CONFIG,
                   "audit journal size %llu outside [%u, 4 GiB]", (unsigned long long)bytes,
                   KMS_JOURNAL_MIN_BYTES);
    bytes &= ~(uint64_t)4095;
    kms_journal *j = calloc(1, sizeof(*j));
    KMS_ENSURE(j != NULL, KMS_ERR_NO_MEMORY);
    j->fd = -1;
    j->hfd = -1;
    pthread_mutex_init(&j->append_mu, NULL);
    pthread_mutex_init(&j->ingest_mu, NULL);
    kms_result r = KMS_OK_RESULT;
    char hpath[4096];
    if (snprintf(hpath, sizeof(hpath), "%s.head", path) >= (int)sizeof(hpath)) {
        r = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__, "audit journal path too long");
        goto fail;
    }
    j->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    j->hfd = j->fd < 0 ? -1 : open(hpath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (j->fd < 0 || j->hfd < 0) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal %s: %s", path,
                             strerror(errno));
        goto fail;
    }
    /* Alone: nobody else has the journal open, so its header is not to be
     * trusted (the last holder may have died, or the machine restarted).
     * Others wait here while the one alone prepares the files. */
    bool alone = journal_ofd_lock(j->hfd, F_WRLCK, LOCK_ALIVE, false) == 0;
    if (!alone && journal_ofd_lock(j->hfd, F_RDLCK, LOCK_ALIVE, true) != 0) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal lock: %s",
                             strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(j->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal %s: not a file", path);
        goto fail;
    }
    if (alone && (uint64_t)st.st_size < bytes) {
        bool fresh = st.st_size == 0;
        KMS_GUARD_GOTO(r, journal_fill(j->fd, (uint64_t)st.st_size, bytes), fail);
        if (fsync(j->fd) != 0) {
            r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal fsync: %s",
                                 strerror(errno));
            goto fail;
        }
        if (fresh)
            journal_sync_dir(path);
        st.st_size = (off_t)bytes;
    }
    j->size = (uint64_t)st.st_size & ~(uint64_t)4095;
    if (j->size < KMS_JOURNAL_MIN_BYTES) {
        r = kms_error_raisef(KMS_ERR_STORE_CORRUPT, __FILE__, __LINE__,
                             "audit journal %s is %llu bytes: too short", path,
                             (unsigned long long)j->size);
        goto fail;
    }
    if (alone && ftruncate(j->hfd, 4096) != 0) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal header: %s",
                             strerror(errno));
        goto fail;
    }
    void *m = mmap(NULL, j->size, PROT_READ, MAP_SHARED, j->fd, 0);
    void *hm = m == MAP_FAILED ? MAP_FAILED
                               : mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, j->hfd, 0);
    if (m != MAP_FAILED)
        j->map = m;
    if (hm == MAP_FAILED) {
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal mmap: %s",
                             strerror(errno));
        goto fail;
    }
    j->h = hm;
    if (alone) {
        memset(j->h, 0, sizeof(*j->h));
        j->h->magic = JOURNAL_MAGIC;
        j->h->size = j->size;
        atomic_store(&j->h->end, KMS_JOURNAL_DATA_OFF);
        j->h->dirty = 1; /* rebuilt from a scan by the first append lock */
        atomic_thread_fence(memory_order_seq_cst);
        if (journal_ofd_lock(j->hfd, F_RDLCK, LOCK_ALIVE, true) != 0) {
            r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "audit journal lock: %s",
                                 strerror(errno));
            goto fail;
        }
    } else if (j->h->magic != JOURNAL_MAGIC || j->h->size != j->size) {
        r = kms_error_raisef(KMS_ERR_STORE_CORRUPT, __FILE__, __LINE__,
                             "audit journal %s: header does not match the file", path);
        goto fail;
    }
    *out = j;
    return KMS_OK_RESULT;
fail:
    kms_journal_close(j);
    return r;
}

void kms_journal_close(kms_journal *j)
{
    if (j == NULL)
        return;
    if (j->h != NULL)
        munmap(j->h, 4096);
    if (j->map != NULL)
        munmap(j->map, j->size);
    if (j->hfd >= 0)
        close(j->hfd); /* releases its locks */
    if (j->fd >= 0)
        close(j->fd);
    pthread_mutex_destroy(&j->append_mu);
    pthread_mutex_destroy(&j->ingest_mu);
    free(j);
}

/* A lock held by one thread of one process at a time: the process's mutex
 * (open-file-description locks do not exclude threads sharing the
 * description), then the shared byte. */
static kms_result journal_lock(kms_journal *j, pthread_mutex_t *mu, int byte)
{
    pthread_mutex_lock(mu);
    if (journal_ofd_lock(j->hfd, F_WRLCK, byte, true) != 0) {
        int e = errno;
        pthread_mutex_unlock(mu);
        KMS_BAIL_MSG(KMS_ERR_IO, "audit journal lock: %s", strerror(e));
    }
    return KMS_OK_RESULT;
}

static void journal_unlock(kms_journal *j, pthread_mutex_t *mu, int byte)
{
    (void)journal_ofd_lock(j->hfd, F_UNLCK, byte, false);
    pthread_mutex_unlock(mu);
}

KMS_RESULT kms_journal_lock(kms_journal *j)
{
    return journal_lock(j, &j->append_mu, LOCK_APPEND);
}

void kms_journal_unlock(kms_journal *j)
{
    journal_unlock(j, &j->append_mu, LOCK_APPEND);
}

KMS_RESULT kms_journal_ingest_lock(kms_journal *j)
{
    return journal_lock(j, &j->ingest_mu, LOCK_INGEST);
}

void kms_journal_ingest_unlock(kms_journal *j)
{
    journal_unlock(j, &j->ingest_mu, LOCK_INGEST);
}

bool kms_journal_dirty(const kms_journal *j)
{
    return j->h->dirty != 0;
}

void kms_journal_tail(const kms_journal *j, uint64_t *seq, uint8_t hash[KMS_JOURNAL_HASH_BYTES])
{
    *seq = j->h->tail_seq;
    memcpy(hash, j->h->tail_hash, KMS_JOURNAL_HASH_BYTES);
}

uint64_t kms_journal_end(const kms_journal *j)
{
    return atomic_load_explicit(&j->h->end, memory_order_acquire);
}

uint64_t kms_journal_room_total(const kms_journal *j)
{
    return j->size - KMS_JOURNAL_DATA_OFF;
}

uint64_t kms_journal_room(const kms_journal *j)
{
    return j->size - kms_journal_end(j);
}

void kms_journal_set(kms_journal *j, uint64_t end, uint64_t seq,
                     const uint8_t hash[KMS_JOURNAL_HASH_BYTES])
{
    j->h->dirty = 1;
    j->h->tail_seq = seq;
    memcpy(j->h->tail_hash, hash, KMS_JOURNAL_HASH_BYTES);
    atomic_store_explicit(&j->h->end, end, memory_order_release);
    if (end == KMS_JOURNAL_DATA_OFF) {
        j->h->hint_seq = 0;
        j->h->hint_off = 0;
    }
    atomic_thread_fence(memory_order_release);
    j->h->dirty = 0;
}

uint64_t kms_journal_frame_size(size_t len)
{
    return (KMS_JOURNAL_FRAME_HEAD + (uint64_t)len + 7) & ~(uint64_t)7;
}

KMS_RESULT kms_journal_frame_put(kms_buf *b, uint64_t seq, const uint8_t *prev, const uint8_t *hash,
                                 const uint8_t *bytes, size_t len)
{
    KMS_ENSURE(len <= JOURNAL_FRAME_MAX, KMS_ERR_LIMIT_EXCEEDED);
    uint8_t *p;
    uint64_t size = kms_journal_frame_size(len);
    KMS_GUARD(kms_buf_extend(b, (size_t)size, &p));
    uint32_t magic = JOURNAL_FRAME_MAGIC, l = (uint32_t)len;
    memcpy(p, &magic, 4);
    memcpy(p + 4, &l, 4);
    memcpy(p + 8, &seq, 8);
    memcpy(p + 16, prev, KMS_JOURNAL_HASH_BYTES);
    memcpy(p + 48, hash, KMS_JOURNAL_HASH_BYTES);
    memcpy(p + KMS_JOURNAL_FRAME_HEAD, bytes, len);
    memset(p + KMS_JOURNAL_FRAME_HEAD + len, 0, (size_t)(size - KMS_JOURNAL_FRAME_HEAD - len));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_journal_write(kms_journal *j, const kms_buf *b, uint64_t seq,
                             const uint8_t hash[KMS_JOURNAL_HASH_BYTES])
{
    uint64_t end = kms_journal_end(j);
    KMS_ENSURE_MSG(b->len <= j->size - end, KMS_ERR_STORE_FULL, "audit journal full");
    /* Dirty from here until the header is consistent again: a writer
     * that dies in between leaves the rebuild to the next one. */
    j->h->dirty = 1;
    atomic_thread_fence(memory_order_seq_cst);
    size_t done = 0;
    while (done < b->len) {
        ssize_t w = pwrite(j->fd, b->data + done, b->len - done, (off_t)(end + done));
        if (w < 0 && errno == EINTR)
            continue;
        /* The header stays dirty: the next writer rebuilds it. */
        KMS_ENSURE_MSG(w > 0, KMS_ERR_IO, "audit journal write: %s",
                       w < 0 ? strerror(errno) : "short write");
        done += (size_t)w;
    }
    kms_journal_set(j, end + b->len, seq, hash);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_journal_sync(kms_journal *j)
{
    KMS_ENSURE_MSG(fdatasync(j->fd) == 0, KMS_ERR_IO, "audit journal fdatasync: %s",
                   strerror(errno));
    return KMS_OK_RESULT;
}

bool kms_journal_frame(const kms_journal *j, uint64_t off, uint64_t limit, kms_jframe *f)
{
    if (limit > j->size)
        limit = j->size;
    if (off % 8 != 0 || off >= limit || limit - off < KMS_JOURNAL_FRAME_HEAD)
        return false;
    const uint8_t *p = j->map + off;
    uint32_t len = rd32(p + 4);
    if (rd32(p) != JOURNAL_FRAME_MAGIC || len > JOURNAL_FRAME_MAX ||
        kms_journal_frame_size(len) > limit - off)
        return false;
    f->seq = rd64(p + 8);
    f->prev = p + 16;
    f->hash = p + 48;
    f->bytes = p + KMS_JOURNAL_FRAME_HEAD;
    f->len = len;
    f->next = off + kms_journal_frame_size(len);
    uint8_t h[KMS_JOURNAL_HASH_BYTES];
    kms_iov parts[2] = {{f->prev, KMS_JOURNAL_HASH_BYTES}, {f->bytes, len}};
    if (!kms_is_ok(kms_sha256_iov(parts, 2, h)))
        return false;
    return memcmp(h, f->hash, sizeof(h)) == 0;
}

void kms_journal_scan(const kms_journal *j, kms_jscan *s)
{
    memset(s, 0, sizeof(*s));
    s->end = KMS_JOURNAL_DATA_OFF;
    kms_jframe f;
    uint64_t off = KMS_JOURNAL_DATA_OFF;
    while (kms_journal_frame(j, off, j->size, &f)) {
        if (s->n > 0 &&
            (f.seq != s->last_seq + 1 || memcmp(f.prev, s->last_hash, KMS_JOURNAL_HASH_BYTES) != 0))
            break;
        if (s->n == 0)
            s->first_seq = f.seq;
        s->n++;
        s->last_seq = f.seq;
        memcpy(s->last_hash, f.hash, KMS_JOURNAL_HASH_BYTES);
        s->end = off = f.next;
    }
}

bool kms_journal_hint(const kms_journal *j, uint64_t seq, uint64_t *off)
{
    if (j->h->hint_seq != seq)
        return false;
    *off = j->h->hint_off;
    return true;
}

bool kms_journal_ingested(const kms_journal *j)
{
    /* The hint is set only after an ingest committed everything below it,
     * and cleared when the journal starts over. */
    return j->h->hint_off == kms_journal_end(j);
}

void kms_journal_hint_set(kms_journal *j, uint64_t seq, uint64_t off)
{
    j->h->hint_seq = seq;
    j->h->hint_off = off;
}
