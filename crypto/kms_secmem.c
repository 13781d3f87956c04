/*
 * Secret memory.
 *
 * Design (why not one mmap per allocation): kmsd holds many small secrets
 * at once (PINs, 32-byte DEKs in flight, batch items), and a page per
 * 32-byte secret would lock 128 times the memory it needs and run into
 * RLIMIT_MEMLOCK (often 8 MiB for unprivileged users) after ~2000 secrets.
 * So:
 *
 *  - small blocks (payload + 16-byte header <= 4 KiB) come from a slab
 *    arena: 64 KiB chunks, mmap'd, mlock'ed and MADV_DONTDUMP'ed once, cut
 *    into power-of-two size classes (32 B .. 4 KiB) with one free list per
 *    class. Chunks are never returned to the system; they are reused, so
 *    the locked footprint is bounded by the peak of live secrets.
 *  - large blocks get their own page-rounded mapping, locked and excluded
 *    from dumps, and are unmapped on free.
 *
 * Every free path wipes the whole block with OPENSSL_cleanse before it goes
 * back to a free list or to the kernel. If mlock fails (RLIMIT_MEMLOCK,
 * EPERM) the memory is still used: dumps are still excluded and frees still
 * wipe; only swap-out is no longer prevented. The failure is counted
 * (kms_secmem_stats_get) so the daemon can report it, rather than failing
 * every request of an unprivileged deployment.
 *
 * Each block starts with a header (tag bound to the block address, payload
 * size). Freeing with the wrong size, a pointer that did not come from here,
 * or twice, is a memory-safety bug and aborts. Under ASan the header, the
 * slack after the payload and free blocks are poisoned, so overflows and
 * uses after free of secret memory are caught like heap ones (ASan also
 * turns mlock into a no-op, so sanitizer builds never count lock failures).
 */
#include "kms_secmem.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KMS_SECMEM_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define KMS_SECMEM_ASAN 1
#endif
#ifdef KMS_SECMEM_ASAN
#include <sanitizer/asan_interface.h>
#define KMS_POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define KMS_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define KMS_POISON(p, n)   ((void)(p), (void)(n))
#define KMS_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define KMS_SECMEM_HDR_BYTES   16
#define KMS_SECMEM_MIN_CLASS   5 /* 32-byte blocks */
#define KMS_SECMEM_CLASSES     8 /* 32 .. 4096 bytes */
#define KMS_SECMEM_SLAB_MAX    ((size_t)1 << (KMS_SECMEM_MIN_CLASS + KMS_SECMEM_CLASSES - 1))
#define KMS_SECMEM_CHUNK_BYTES ((size_t)64 * 1024)
#define KMS_SECMEM_TAG_LIVE    UINT64_C(0x6b6d73536563724c) /* "kmsSecrL" */
/* A large block whose mapping mlock refused (so free must not count it as
 * unlocked memory). */
#define KMS_SECMEM_TAG_UNLOCKED   UINT64_C(0x6b6d735365637255) /* "kmsSecrU" */
#define KMS_SECRET_FILE_MAX_BYTES 1024

typedef struct {
    uint64_t tag;  /* KMS_SECMEM_TAG_LIVE (or _UNLOCKED) ^ address of the header */
    uint64_t size; /* payload bytes the caller asked for */
} kms_secmem_hdr;

_Static_assert(sizeof(kms_secmem_hdr) == KMS_SECMEM_HDR_BYTES, "header size");

typedef struct kms_secmem_free_block {
    struct kms_secmem_free_block *next;
} kms_secmem_free_block;

static pthread_mutex_t kms_secmem_lock = PTHREAD_MUTEX_INITIALIZER;
static kms_secmem_free_block *kms_secmem_free_lists[KMS_SECMEM_CLASSES];
static kms_secmem_stats kms_secmem_counters;

static size_t kms_secmem_page_bytes(void)
{
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* Locks and excludes a fresh mapping from core dumps; failures are
 * counted, not fatal (see the design note above). Called with the lock.
 * Returns whether mlock succeeded. */
static bool kms_secmem_protect_locked(void *p, size_t n)
{
    bool locked = mlock(p, n) == 0;
    if (locked) {
        kms_secmem_counters.bytes_locked += n;
    } else {
        kms_secmem_counters.lock_failures++;
    }
    if (madvise(p, n, MADV_DONTDUMP) != 0) {
        kms_secmem_counters.dontdump_failures++;
    }
    kms_secmem_counters.bytes_mapped += n;
    return locked;
}

static void *kms_secmem_map(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static unsigned kms_secmem_class_of(size_t block)
{
    unsigned c = 0;
    while (((size_t)1 << (KMS_SECMEM_MIN_CLASS + c)) < block) {
        c++;
    }
    return c;
}

static size_t kms_secmem_class_bytes(unsigned c)
{
    return (size_t)1 << (KMS_SECMEM_MIN_CLASS + c);
}

/* Adds one chunk's worth of blocks of class c to its free list. */
static bool kms_secmem_refill_locked(unsigned c)
{
    uint8_t *chunk = kms_secmem_map(KMS_SECMEM_CHUNK_BYTES);
    if (chunk == NULL) {
        return false;
    }
    (void)kms_secmem_protect_locked(chunk, KMS_SECMEM_CHUNK_BYTES);
    const size_t bs = kms_secmem_class_bytes(c);
    for (size_t off = KMS_SECMEM_CHUNK_BYTES; off >= bs; off -= bs) {
        kms_secmem_free_block *fb = (kms_secmem_free_block *)(void *)(chunk + off - bs);
        fb->next = kms_secmem_free_lists[c];
        kms_secmem_free_lists[c] = fb;
        KMS_POISON(fb, bs);
    }
    return true;
}

static size_t kms_secmem_block_bytes(size_t n, bool *large)
{
    /* n + header cannot overflow here: callers cap n first. */
    const size_t need = n + KMS_SECMEM_HDR_BYTES;
    if (need <= KMS_SECMEM_SLAB_MAX) {
        *large = false;
        return kms_secmem_class_bytes(kms_secmem_class_of(need));
    }
    *large = true;
    const size_t page = kms_secmem_page_bytes();
    return (need + page - 1) / page * page;
}

void *kms_secmem_alloc(size_t n)
{
    const size_t page = kms_secmem_page_bytes();
    if (n > SIZE_MAX / 2 - KMS_SECMEM_HDR_BYTES - page) {
        (void)kms_error_raisef(KMS_ERR_SECURE_MEMORY, __FILE__, __LINE__,
                               "secure allocation of %zu bytes is too large", n);
        return NULL;
    }
    bool large;
    const size_t bs = kms_secmem_block_bytes(n, &large);
    uint8_t *block = NULL;
    bool locked = true;

    pthread_mutex_lock(&kms_secmem_lock);
    if (large) {
        block = kms_secmem_map(bs);
        if (block != NULL) {
            locked = kms_secmem_protect_locked(block, bs);
        }
    } else {
        const unsigned c = kms_secmem_class_of(bs);
        if (kms_secmem_free_lists[c] != NULL || kms_secmem_refill_locked(c)) {
            kms_secmem_free_block *fb = kms_secmem_free_lists[c];
            KMS_UNPOISON(fb, sizeof(*fb));
            kms_secmem_free_lists[c] = fb->next;
            block = (uint8_t *)fb;
        }
    }
    if (block != NULL) {
        kms_secmem_counters.blocks_in_use++;
        kms_secmem_counters.bytes_in_use += bs;
    }
    pthread_mutex_unlock(&kms_secmem_lock);

    if (block == NULL) {
        (void)kms_error_raisef(KMS_ERR_SECURE_MEMORY, __FILE__, __LINE__,
                               "cannot map secure memory for %zu bytes", n);
        return NULL;
    }
    KMS_UNPOISON(block, bs);
    /* Free blocks were wiped when freed and fresh maps are zero, but the
     * free-list link sat in the payload: clear the whole block. */
    memset(block, 0, bs);
    kms_secmem_hdr *h = (kms_secmem_hdr *)(void *)block;
    h->tag = (locked ? KMS_SECMEM_TAG_LIVE : KMS_SECMEM_TAG_UNLOCKED) ^ (uint64_t)(uintptr_t)h;
    h->size = n;
    KMS_POISON(block, KMS_SECMEM_HDR_BYTES);
    KMS_POISON(block + KMS_SECMEM_HDR_BYTES + n, bs - KMS_SECMEM_HDR_BYTES - n);
    return block + KMS_SECMEM_HDR_BYTES;
}

static void kms_secmem_misuse(void)
{
    static const char msg[] = "kms_secmem_free: corrupt header, wrong size or double free\n";
    ssize_t w = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)w;
    abort();
}

void kms_secmem_free(void *p, size_t n)
{
    if (p == NULL) {
        return;
    }
    uint8_t *block = (uint8_t *)p - KMS_SECMEM_HDR_BYTES;
    kms_secmem_hdr *h = (kms_secmem_hdr *)(void *)block;
    KMS_UNPOISON(block, KMS_SECMEM_HDR_BYTES);
    bool large;
    const size_t bs = kms_secmem_block_bytes(n, &large);
    const uint64_t tag = h->tag ^ (uint64_t)(uintptr_t)h;
    const bool locked = tag == KMS_SECMEM_TAG_LIVE;
    if (!(locked || (large && tag == KMS_SECMEM_TAG_UNLOCKED)) || h->size != n) {
        kms_secmem_misuse();
    }
    KMS_UNPOISON(block, bs);
    OPENSSL_cleanse(block, bs);

    pthread_mutex_lock(&kms_secmem_lock);
    kms_secmem_counters.blocks_in_use--;
    kms_secmem_counters.bytes_in_use -= bs;
    if (large) {
        /* munmap drops the lock with the mapping. */
        if (locked) {
            kms_secmem_counters.bytes_locked -= bs;
        }
        kms_secmem_counters.bytes_mapped -= bs;
        munmap(block, bs);
    } else {
        const unsigned c = kms_secmem_class_of(bs);
        kms_secmem_free_block *fb = (kms_secmem_free_block *)(void *)block;
        /* The link overwrites the tag, so a second free of this pointer
         * fails the tag check above and aborts. */
        fb->next = kms_secmem_free_lists[c];
        kms_secmem_free_lists[c] = fb;
        KMS_POISON(block, bs);
    }
    pthread_mutex_unlock(&kms_secmem_lock);
}

void kms_secmem_wipe(void *p, size_t n)
{
    if (p != NULL && n > 0) {
        OPENSSL_cleanse(p, n);
    }
}

bool kms_ct_equal(const void *a, const void *b, size_t n)
{
    return n == 0 || CRYPTO_memcmp(a, b, n) == 0;
}

void kms_secmem_stats_get(kms_secmem_stats *out)
{
    pthread_mutex_lock(&kms_secmem_lock);
    *out = kms_secmem_counters;
    pthread_mutex_unlock(&kms_secmem_lock);
}

KMS_RESULT kms_process_harden(void)
{
    const struct rlimit none = {0, 0};
    KMS_ENSURE_MSG(setrlimit(RLIMIT_CORE, &none) == 0, KMS_ERR_INTERNAL,
                   "setrlimit(RLIMIT_CORE, 0) failed: errno %d", errno);
    /* Not dumpable: no core file, and other processes of the same user can
     * no longer ptrace us or read /proc/<pid>/mem. */
    KMS_ENSURE_MSG(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0, KMS_ERR_INTERNAL,
                   "prctl(PR_SET_DUMPABLE, 0) failed: errno %d", errno);
    return KMS_OK_RESULT;
}

/* Strips one trailing "\n" or "\r\n" (editors add one; the secret does not
 * include it) and wipes the stripped bytes. */
static void kms_secret_strip_newline(kms_buf *b)
{
    if (b->len > 0 && b->data[b->len - 1] == '\n') {
        b->len--;
        if (b->len > 0 && b->data[b->len - 1] == '\r') {
            b->len--;
        }
        kms_secmem_wipe(b->data + b->len, b->cap - b->len);
    }
}

static KMS_RESULT kms_secret_read_fd(int fd, const char *path, kms_buf *out)
{
    struct stat st;
    KMS_ENSURE_MSG(fstat(fd, &st) == 0, KMS_ERR_IO, "cannot stat secret file %s", path);
    KMS_ENSURE_MSG(S_ISREG(st.st_mode), KMS_ERR_CONFIG, "secret file %s is not a regular file",
                   path);
    /* A PIN readable by group or others is already disclosed; refuse it
     * rather than use it, as OpenSSH refuses an open private key file. */
    KMS_ENSURE_MSG((st.st_mode & (S_IRWXG | S_IRWXO)) == 0, KMS_ERR_CONFIG,
                   "secret file %s has mode %04o; it must not be accessible by group or others "
                   "(chmod 600)",
                   path, (unsigned)(st.st_mode & 07777));

    /* Read one byte more than allowed, to tell "exactly at the limit" from
     * "too long". */
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(out, KMS_SECRET_FILE_MAX_BYTES + 1, &dst));
    size_t got = 0;
    while (got < KMS_SECRET_FILE_MAX_BYTES + 1) {
        ssize_t r = read(fd, dst + got, KMS_SECRET_FILE_MAX_BYTES + 1 - got);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        KMS_ENSURE_MSG(r >= 0, KMS_ERR_IO, "cannot read secret file %s", path);
        if (r == 0) {
            break;
        }
        got += (size_t)r;
    }
    out->len = got;
    KMS_ENSURE_MSG(got <= KMS_SECRET_FILE_MAX_BYTES, KMS_ERR_CONFIG,
                   "secret file %s is longer than %d bytes", path, KMS_SECRET_FILE_MAX_BYTES);
    kms_secret_strip_newline(out);
    KMS_ENSURE_MSG(out->len > 0, KMS_ERR_CONFIG, "secret file %s is empty", path);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_secret_read_file(const char *path, kms_buf *out)
{
    KMS_ENSURE(path != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_buf_free(out);
    kms_buf_init_secret(out, KMS_SECRET_FILE_MAX_BYTES + 1);

    /* O_NOFOLLOW: a symlink planted in place of the PIN file is refused
     * (ELOOP) instead of silently reading whatever it points at. */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        const int e = errno;
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "cannot open secret file %s: %s", path,
                     e == ELOOP ? "it is a symbolic link" : strerror(e));
    }
    kms_result r = kms_secret_read_fd(fd, path, out);
    close(fd);
    if (!kms_is_ok(r)) {
        kms_buf_free(out);
    }
    return r;
}

KMS_RESULT kms_secret_read_env(const char *name, kms_buf *out)
{
    KMS_ENSURE(name != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_buf_free(out);
    kms_buf_init_secret(out, KMS_SECRET_FILE_MAX_BYTES);

    char *v = getenv(name);
    KMS_ENSURE_MSG(v != NULL, KMS_ERR_CONFIG, "environment variable %s is not set", name);
    const size_t n = strlen(v);
    kms_result r = KMS_OK_RESULT;
    if (n > KMS_SECRET_FILE_MAX_BYTES) {
        r = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__,
                             "environment variable %s is longer than %d bytes", name,
                             KMS_SECRET_FILE_MAX_BYTES);
    } else {
        r = kms_buf_append(out, v, n);
    }
    /* Whatever happened, the value must not stay in the environment, where
     * /proc/<pid>/environ and every child process would see it: wipe the
     * string in place (environ points into it), then drop the variable. */
    kms_secmem_wipe(v, n);
    unsetenv(name);
    if (kms_is_ok(r)) {
        kms_secret_strip_newline(out);
        if (out->len == 0) {
            r = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__,
                                 "environment variable %s is empty", name);
        }
    }
    if (!kms_is_ok(r)) {
        kms_buf_free(out);
    }
    return r;
}
