/*
 * Bounded buffers and read cursors. Every size computation is checked for
 * overflow before it is used; a buffer never grows past its ceiling.
 */
#include "kms_buf.h"
#include "kms_secmem.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* First allocation size: small tokens and headers fit without a regrow. */
#define KMS_BUF_INITIAL_CAP_BYTES 64

static size_t kms_buf_max(const kms_buf *b)
{
    return b->max == 0 ? KMS_BUF_DEFAULT_MAX : b->max;
}

void kms_buf_init(kms_buf *b, size_t max)
{
    *b = (kms_buf){.data = NULL, .len = 0, .cap = 0, .max = max, .secret = false};
}

void kms_buf_init_secret(kms_buf *b, size_t max)
{
    *b = (kms_buf){.data = NULL, .len = 0, .cap = 0, .max = max, .secret = true};
}

static void kms_buf_release(uint8_t *data, size_t cap, bool secret)
{
    if (data == NULL) {
        return;
    }
    if (secret) {
        kms_secmem_free(data, cap);
    } else {
        free(data);
    }
}

void kms_buf_free(kms_buf *b)
{
    if (b == NULL) {
        return;
    }
    kms_buf_release(b->data, b->cap, b->secret);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void kms_buf_cleanup(kms_buf *b)
{
    kms_buf_free(b);
}

void kms_buf_reset(kms_buf *b)
{
    if (b->secret && b->data != NULL) {
        kms_secmem_wipe(b->data, b->cap);
    }
    b->len = 0;
}

/*
 * Makes room for at least min_cap bytes of storage. Capacity doubles (so
 * appends are amortised O(1)) but never exceeds max + 1: the one byte past
 * the ceiling holds the NUL of kms_buf_terminate, which len never counts.
 * Secret buffers move through a fresh secure block; the old one is wiped
 * and freed by kms_secmem_free, so no copy of a secret is left behind.
 */
static KMS_RESULT kms_buf_grow(kms_buf *b, size_t min_cap)
{
    if (min_cap <= b->cap) {
        return KMS_OK_RESULT;
    }
    const size_t max = kms_buf_max(b);
    const size_t limit = max == SIZE_MAX ? SIZE_MAX : max + 1;
    KMS_ENSURE(min_cap <= limit, KMS_ERR_LIMIT_EXCEEDED);

    size_t cap = b->cap < KMS_BUF_INITIAL_CAP_BYTES ? KMS_BUF_INITIAL_CAP_BYTES : b->cap;
    while (cap < min_cap) {
        if (cap > limit / 2) {
            cap = limit;
            break;
        }
        cap *= 2;
    }
    if (cap > limit) {
        cap = limit;
    }

    uint8_t *data;
    if (b->secret) {
        data = kms_secmem_alloc(cap);
        KMS_ENSURE(data != NULL, KMS_ERR_SECURE_MEMORY);
        if (b->len > 0) {
            memcpy(data, b->data, b->len);
        }
        kms_buf_release(b->data, b->cap, true);
    } else {
        data = realloc(b->data, cap);
        KMS_ENSURE(data != NULL, KMS_ERR_NO_MEMORY);
    }
    b->data = data;
    b->cap = cap;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_buf_reserve(kms_buf *b, size_t extra)
{
    KMS_ENSURE(b->len <= kms_buf_max(b), KMS_ERR_INTERNAL);
    KMS_ENSURE(extra <= kms_buf_max(b) - b->len, KMS_ERR_LIMIT_EXCEEDED);
    return kms_buf_grow(b, b->len + extra);
}

KMS_RESULT kms_buf_extend(kms_buf *b, size_t n, uint8_t **out)
{
    KMS_GUARD(kms_buf_reserve(b, n));
    /* A zero-length extend on an empty buffer still yields a valid pointer. */
    KMS_GUARD(kms_buf_grow(b, b->len + (n == 0 ? 1 : 0)));
    *out = b->data + b->len;
    b->len += n;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_buf_append(kms_buf *b, const void *p, size_t n)
{
    if (n == 0) {
        return KMS_OK_RESULT;
    }
    KMS_ENSURE(p != NULL, KMS_ERR_INVALID_ARGUMENT);
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(b, n, &dst));
    memcpy(dst, p, n);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_buf_append_u8(kms_buf *b, uint8_t v)
{
    return kms_buf_append(b, &v, 1);
}

KMS_RESULT kms_buf_append_u16(kms_buf *b, uint16_t v)
{
    const uint8_t be[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    return kms_buf_append(b, be, sizeof(be));
}

KMS_RESULT kms_buf_append_u32(kms_buf *b, uint32_t v)
{
    const uint8_t be[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    return kms_buf_append(b, be, sizeof(be));
}

KMS_RESULT kms_buf_append_u64(kms_buf *b, uint64_t v)
{
    KMS_GUARD(kms_buf_append_u32(b, (uint32_t)(v >> 32)));
    return kms_buf_append_u32(b, (uint32_t)v);
}

KMS_RESULT kms_buf_terminate(kms_buf *b)
{
    /* len <= max always holds, so len + 1 <= max + 1 fits the capacity
     * limit; only a buffer of SIZE_MAX bytes has no room left. */
    KMS_ENSURE(b->len < SIZE_MAX, KMS_ERR_LIMIT_EXCEEDED);
    KMS_GUARD(kms_buf_grow(b, b->len + 1));
    b->data[b->len] = '\0';
    return KMS_OK_RESULT;
}

KMS_RESULT kms_buf_appendf(kms_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    KMS_ENSURE(n >= 0, KMS_ERR_INVALID_ARGUMENT);
    /* Room for the text within the ceiling, plus the NUL vsnprintf writes,
     * which the capacity (max + 1) always has room for, as in terminate. */
    KMS_GUARD(kms_buf_reserve(b, (size_t)n));
    KMS_GUARD(kms_buf_grow(b, b->len + (size_t)n + 1));
    va_start(ap, fmt);
    vsnprintf((char *)b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return KMS_OK_RESULT;
}

/* ---- read cursor ---- */

void kms_rcursor_init(kms_rcursor *c, const void *data, size_t len, kms_err err)
{
    *c = (kms_rcursor){.data = data, .len = data == NULL ? 0 : len, .pos = 0, .err = err};
}

size_t kms_rcursor_remaining(const kms_rcursor *c)
{
    return c->len - c->pos;
}

KMS_RESULT kms_rcursor_view(kms_rcursor *c, size_t n, const uint8_t **p)
{
    /* Compared against the remainder, never as pos + n, which could wrap. */
    KMS_ENSURE(n <= kms_rcursor_remaining(c), c->err);
    /* An empty cursor may have no data at all; NULL + 0 is undefined in C. */
    *p = c->data == NULL ? NULL : c->data + c->pos;
    c->pos += n;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_copy(kms_rcursor *c, void *out, size_t n)
{
    const uint8_t *p;
    KMS_GUARD(kms_rcursor_view(c, n, &p));
    if (n > 0) {
        memcpy(out, p, n);
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_u8(kms_rcursor *c, uint8_t *v)
{
    const uint8_t *p;
    KMS_GUARD(kms_rcursor_view(c, 1, &p));
    *v = p[0];
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_u16(kms_rcursor *c, uint16_t *v)
{
    const uint8_t *p;
    KMS_GUARD(kms_rcursor_view(c, 2, &p));
    *v = (uint16_t)((uint16_t)p[0] << 8 | p[1]);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_u32(kms_rcursor *c, uint32_t *v)
{
    const uint8_t *p;
    KMS_GUARD(kms_rcursor_view(c, 4, &p));
    *v = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_u64(kms_rcursor *c, uint64_t *v)
{
    const uint8_t *p;
    KMS_GUARD(kms_rcursor_view(c, 8, &p));
    uint64_t x = 0;
    for (size_t i = 0; i < 8; i++) {
        x = x << 8 | p[i];
    }
    *v = x;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rcursor_end(const kms_rcursor *c)
{
    KMS_ENSURE(kms_rcursor_remaining(c) == 0, c->err);
    return KMS_OK_RESULT;
}

void kms_buf_truncate(kms_buf *b, size_t len)
{
    if (b->len > len) {
        /* Wiped whether or not the buffer is secret: what a failed
         * operation appended may be partial plaintext. */
        kms_secmem_wipe(b->data + len, b->len - len);
        b->len = len;
    }
}
