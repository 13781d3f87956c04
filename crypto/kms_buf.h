/*
 * Bounded buffers and cursors (after s2n-tls s2n_stuffer, OpenSSH sshbuf,
 * curl dynbuf).
 *
 * kms_buf is a growable byte buffer with a ceiling (max): growing past it
 * fails with KMS_ERR_LIMIT_EXCEEDED instead of allocating. A buffer made
 * with kms_buf_init_secret() keeps its bytes in secure memory (locked pages,
 * excluded from core dumps) and wipes them on every resize and on free.
 *
 * kms_rcursor reads typed big-endian fields from a byte range and never
 * reads past its end; a short read fails with the error the caller names,
 * so a parser reads like the format's schema.
 */
#ifndef KMS_BUF_H
#define KMS_BUF_H

#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    size_t max;  /* ceiling on len; 0 means KMS_BUF_DEFAULT_MAX */
    bool secret; /* bytes live in secure memory and are wiped */
} kms_buf;

#define KMS_BUF_DEFAULT_MAX ((size_t)64 * 1024 * 1024)

void kms_buf_init(kms_buf *b, size_t max);
void kms_buf_init_secret(kms_buf *b, size_t max);
/* Frees the storage (wiping it first if secret) and resets to empty. */
void kms_buf_free(kms_buf *b);
/* For KMS_DEFER: kms_buf b KMS_DEFER(kms_buf_cleanup) = {0}; */
void kms_buf_cleanup(kms_buf *b);
/* Empties without freeing (wipes the old bytes if secret). */
void kms_buf_reset(kms_buf *b);
KMS_RESULT kms_buf_reserve(kms_buf *b, size_t extra);
KMS_RESULT kms_buf_append(kms_buf *b, const void *p, size_t n);
KMS_RESULT kms_buf_append_u8(kms_buf *b, uint8_t v);
KMS_RESULT kms_buf_append_u16(kms_buf *b, uint16_t v);
KMS_RESULT kms_buf_append_u32(kms_buf *b, uint32_t v);
KMS_RESULT kms_buf_append_u64(kms_buf *b, uint64_t v);
/* Shortens the buffer to len bytes (no-op if already shorter), wiping the
 * dropped bytes: how a failed operation takes back what it appended. */
void kms_buf_truncate(kms_buf *b, size_t len);
/* Appends n bytes of space and returns a pointer to them in *out. */
KMS_RESULT kms_buf_extend(kms_buf *b, size_t n, uint8_t **out);
/* Appends printf-formatted text (no NUL counted), within the ceiling. */
KMS_RESULT kms_buf_appendf(kms_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends a NUL that is not counted in len (for text consumers). */
KMS_RESULT kms_buf_terminate(kms_buf *b);

typedef struct {
    const uint8_t *data;
    size_t len;
    size_t pos;
    kms_err err; /* returned on any short or malformed read */
} kms_rcursor;

void kms_rcursor_init(kms_rcursor *c, const void *data, size_t len, kms_err err);
size_t kms_rcursor_remaining(const kms_rcursor *c);
KMS_RESULT kms_rcursor_u8(kms_rcursor *c, uint8_t *v);
KMS_RESULT kms_rcursor_u16(kms_rcursor *c, uint16_t *v);
KMS_RESULT kms_rcursor_u32(kms_rcursor *c, uint32_t *v);
KMS_RESULT kms_rcursor_u64(kms_rcursor *c, uint64_t *v);
/* Points *p at the next n bytes without copying. */
KMS_RESULT kms_rcursor_view(kms_rcursor *c, size_t n, const uint8_t **p);
KMS_RESULT kms_rcursor_copy(kms_rcursor *c, void *out, size_t n);
/* Fails unless every byte has been consumed. */
KMS_RESULT kms_rcursor_end(const kms_rcursor *c);

#endif /* KMS_BUF_H */
