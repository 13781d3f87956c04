/*
 * Secret memory: the one allocator for key material, plaintext DEKs and
 * PINs (after libsodium sodium_malloc, s2n-tls s2n_mem, OpenSSH freezero).
 * Pages are locked (mlock) and excluded from core dumps (MADV_DONTDUMP);
 * every free path wipes with OPENSSL_cleanse before releasing.
 */
#ifndef KMS_SECMEM_H
#define KMS_SECMEM_H

#include "kms_result.h"

#include <stddef.h>

/* Returns zeroed secure memory, or NULL (and raises KMS_ERR_SECURE_MEMORY). */
void *kms_secmem_alloc(size_t n);
/* Wipes n bytes and frees; NULL is allowed. n must be the allocated size. */
void kms_secmem_free(void *p, size_t n);
/* Wipes memory that did not come from kms_secmem_alloc (stack buffers). */
void kms_secmem_wipe(void *p, size_t n);
/* Constant-time equality of two n-byte ranges (CRYPTO_memcmp). */
bool kms_ct_equal(const void *a, const void *b, size_t n);

/* Counters of the secure allocator (for metrics and tests). */
typedef struct {
    size_t bytes_mapped;      /* mapped for secrets (slab chunks + large blocks) */
    size_t bytes_locked;      /* of which mlock succeeded */
    size_t bytes_in_use;      /* handed out, counted in whole blocks */
    size_t blocks_in_use;     /* live allocations */
    size_t lock_failures;     /* mappings mlock refused (RLIMIT_MEMLOCK): not fatal */
    size_t dontdump_failures; /* mappings MADV_DONTDUMP refused: not fatal */
} kms_secmem_stats;
void kms_secmem_stats_get(kms_secmem_stats *out);

/* Process hardening at start: RLIMIT_CORE 0, PR_SET_DUMPABLE 0. */
KMS_RESULT kms_process_harden(void);

/* Reads a PIN or other secret from a file (refusing a group- or
 * world-readable file) or from an environment variable (which is then
 * unset). Trailing newline stripped. The result is secret memory.
 * `out` must be initialised (or zeroed); it is freed and re-made as a
 * secret buffer. At most 1024 bytes; an empty secret is refused. Every
 * failure is KMS_ERR_CONFIG (KMS_ERR_IO for a read error) with a detail
 * naming the path or variable, never the content. */
#include "kms_buf.h"
KMS_RESULT kms_secret_read_file(const char *path, kms_buf *out);
KMS_RESULT kms_secret_read_env(const char *name, kms_buf *out);

#endif /* KMS_SECMEM_H */
