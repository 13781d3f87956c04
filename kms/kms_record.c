#include "kms_record.h"

#include <string.h>

#define KMS_CORRUPT KMS_ERR_STORE_CORRUPT

static kms_result kms_rec_head(kms_rcursor *c, const uint8_t *p, size_t n)
{
    kms_rcursor_init(c, p, n, KMS_CORRUPT);
    uint8_t fmt;
    KMS_GUARD(kms_rcursor_u8(c, &fmt));
    KMS_ENSURE_MSG(fmt == KMS_RECORD_FORMAT_V1, KMS_CORRUPT, "record format %u", fmt);
    return KMS_OK_RESULT;
}

static kms_result kms_rc_i64(kms_rcursor *c, int64_t *v)
{
    uint64_t u;
    KMS_GUARD(kms_rcursor_u64(c, &u));
    *v = (int64_t)u;
    return KMS_OK_RESULT;
}

static kms_result kms_rc_bool(kms_rcursor *c, bool *v)
{
    uint8_t u;
    KMS_GUARD(kms_rcursor_u8(c, &u));
    KMS_ENSURE(u <= 1, KMS_CORRUPT);
    *v = u == 1;
    return KMS_OK_RESULT;
}

/* A length-prefixed (u16) string into a NUL-terminated array of cap bytes. */
static kms_result kms_rc_str(kms_rcursor *c, char *out, size_t cap)
{
    uint16_t len;
    KMS_GUARD(kms_rcursor_u16(c, &len));
    KMS_ENSURE(len < cap, KMS_CORRUPT);
    KMS_GUARD(kms_rcursor_copy(c, out, len));
    out[len] = '\0';
    KMS_ENSURE(memchr(out, '\0', len) == NULL, KMS_CORRUPT);
    return KMS_OK_RESULT;
}

static kms_result kms_buf_str(kms_buf *b, const char *s)
{
    size_t n = strlen(s);
    KMS_ENSURE(n <= UINT16_MAX, KMS_ERR_LIMIT_EXCEEDED);
    KMS_GUARD(kms_buf_append_u16(b, (uint16_t)n));
    return kms_buf_append(b, s, n);
}

KMS_RESULT kms_rec_key_encode(const kms_rec_key *r, kms_buf *out)
{
    KMS_GUARD(kms_buf_append_u8(out, KMS_RECORD_FORMAT_V1));
    KMS_GUARD(kms_buf_append_u8(out, r->purpose));
    KMS_GUARD(kms_buf_append_u32(out, r->primary_version));
    KMS_GUARD(kms_buf_append_u32(out, r->latest_version));
    KMS_GUARD(kms_buf_append_u32(out, r->min_decryption_version));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->rotation_period_s));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->warning_window_s));
    KMS_GUARD(kms_buf_append_u8(out, r->deletion_protection ? 1 : 0));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->created_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->rotated_at));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_key_decode(const uint8_t *p, size_t n, kms_rec_key *r)
{
    kms_rcursor c;
    memset(r, 0, sizeof(*r));
    KMS_GUARD(kms_rec_head(&c, p, n));
    KMS_GUARD(kms_rcursor_u8(&c, &r->purpose));
    KMS_ENSURE(r->purpose == KMS_PURPOSE_ENCRYPT || r->purpose == KMS_PURPOSE_MAC, KMS_CORRUPT);
    KMS_GUARD(kms_rcursor_u32(&c, &r->primary_version));
    KMS_GUARD(kms_rcursor_u32(&c, &r->latest_version));
    KMS_GUARD(kms_rcursor_u32(&c, &r->min_decryption_version));
    KMS_GUARD(kms_rc_i64(&c, &r->rotation_period_s));
    KMS_GUARD(kms_rc_i64(&c, &r->warning_window_s));
    KMS_GUARD(kms_rc_bool(&c, &r->deletion_protection));
    KMS_GUARD(kms_rc_i64(&c, &r->created_at));
    KMS_GUARD(kms_rc_i64(&c, &r->rotated_at));
    KMS_GUARD(kms_rcursor_end(&c));
    /* Invariants every writer keeps; a record that breaks them is corrupt. */
    KMS_ENSURE(r->primary_version >= 1 && r->primary_version <= r->latest_version, KMS_CORRUPT);
    KMS_ENSURE(r->min_decryption_version <= r->primary_version, KMS_CORRUPT);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_version_encode(const kms_rec_version *r, kms_buf *out)
{
    KMS_ENSURE(r->wrapped_len <= KMS_HSM_WRAPPED_MAX_BYTES, KMS_ERR_INTERNAL);
    KMS_GUARD(kms_buf_append_u8(out, KMS_RECORD_FORMAT_V1));
    KMS_GUARD(kms_buf_append_u8(out, r->state));
    KMS_GUARD(kms_buf_append(out, r->uid, sizeof(r->uid)));
    KMS_GUARD(kms_buf_append_u32(out, r->master_version));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->created_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->primary_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->deprecated_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->grace_until));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->destroy_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->last_used_at));
    KMS_GUARD(kms_buf_append_u64(out, r->reserved));
    KMS_GUARD(kms_buf_append_u16(out, r->wrapped_len));
    KMS_GUARD(kms_buf_append(out, r->wrapped, r->wrapped_len));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_version_decode(const uint8_t *p, size_t n, kms_rec_version *r)
{
    kms_rcursor c;
    memset(r, 0, sizeof(*r));
    KMS_GUARD(kms_rec_head(&c, p, n));
    KMS_GUARD(kms_rcursor_u8(&c, &r->state));
    KMS_ENSURE(r->state >= KMS_VERSION_ACTIVE && r->state <= KMS_VERSION_DESTROYED, KMS_CORRUPT);
    KMS_GUARD(kms_rcursor_copy(&c, r->uid, sizeof(r->uid)));
    KMS_GUARD(kms_rcursor_u32(&c, &r->master_version));
    KMS_GUARD(kms_rc_i64(&c, &r->created_at));
    KMS_GUARD(kms_rc_i64(&c, &r->primary_at));
    KMS_GUARD(kms_rc_i64(&c, &r->deprecated_at));
    KMS_GUARD(kms_rc_i64(&c, &r->grace_until));
    KMS_GUARD(kms_rc_i64(&c, &r->destroy_at));
    KMS_GUARD(kms_rc_i64(&c, &r->last_used_at));
    KMS_GUARD(kms_rcursor_u64(&c, &r->reserved));
    KMS_GUARD(kms_rcursor_u16(&c, &r->wrapped_len));
    KMS_ENSURE(r->wrapped_len <= KMS_HSM_WRAPPED_MAX_BYTES, KMS_CORRUPT);
    KMS_GUARD(kms_rcursor_copy(&c, r->wrapped, r->wrapped_len));
    KMS_GUARD(kms_rcursor_end(&c));
    /* Only a destroyed version may lack its secret, and it must lack it. */
    KMS_ENSURE((r->state == KMS_VERSION_DESTROYED) == (r->wrapped_len == 0), KMS_CORRUPT);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_master_encode(const kms_rec_master *r, kms_buf *out)
{
    KMS_GUARD(kms_buf_append_u8(out, KMS_RECORD_FORMAT_V1));
    KMS_GUARD(kms_buf_append(out, r->id, sizeof(r->id)));
    KMS_GUARD(kms_buf_append_u8(out, r->state));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->created_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)r->retired_at));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_master_decode(const uint8_t *p, size_t n, kms_rec_master *r)
{
    kms_rcursor c;
    memset(r, 0, sizeof(*r));
    KMS_GUARD(kms_rec_head(&c, p, n));
    KMS_GUARD(kms_rcursor_copy(&c, r->id, sizeof(r->id)));
    KMS_GUARD(kms_rcursor_u8(&c, &r->state));
    KMS_ENSURE(r->state >= KMS_MASTER_PENDING && r->state <= KMS_MASTER_RETIRED, KMS_CORRUPT);
    KMS_GUARD(kms_rc_i64(&c, &r->created_at));
    KMS_GUARD(kms_rc_i64(&c, &r->retired_at));
    KMS_GUARD(kms_rcursor_end(&c));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_rotation_encode(const kms_rec_rotation *r, kms_buf *out)
{
    const kms_rotation_info *i = &r->info;
    KMS_GUARD(kms_buf_append_u8(out, KMS_RECORD_FORMAT_V1));
    KMS_GUARD(kms_buf_append(out, i->id, 32));
    KMS_GUARD(kms_buf_str(out, i->key));
    KMS_GUARD(kms_buf_append_u32(out, i->from_version));
    KMS_GUARD(kms_buf_append_u32(out, i->to_version));
    KMS_GUARD(kms_buf_append_u8(out, (uint8_t)i->type));
    KMS_GUARD(kms_buf_append_u8(out, (uint8_t)i->status));
    KMS_GUARD(kms_buf_str(out, i->initiator));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)i->started_at));
    KMS_GUARD(kms_buf_append_u64(out, (uint64_t)i->finished_at));
    KMS_GUARD(kms_buf_str(out, i->reason));
    KMS_GUARD(kms_buf_append_u32(out, r->owner_pid));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rec_rotation_decode(const uint8_t *p, size_t n, kms_rec_rotation *r)
{
    kms_rcursor c;
    memset(r, 0, sizeof(*r));
    kms_rotation_info *i = &r->info;
    KMS_GUARD(kms_rec_head(&c, p, n));
    KMS_GUARD(kms_rcursor_copy(&c, i->id, 32));
    i->id[32] = '\0';
    for (size_t j = 0; j < 32; j++)
        KMS_ENSURE((i->id[j] >= '0' && i->id[j] <= '9') || (i->id[j] >= 'a' && i->id[j] <= 'f'),
                   KMS_CORRUPT);
    KMS_GUARD(kms_rc_str(&c, i->key, sizeof(i->key)));
    KMS_GUARD(kms_rcursor_u32(&c, &i->from_version));
    KMS_GUARD(kms_rcursor_u32(&c, &i->to_version));
    uint8_t type, status;
    KMS_GUARD(kms_rcursor_u8(&c, &type));
    KMS_GUARD(kms_rcursor_u8(&c, &status));
    KMS_ENSURE(type >= KMS_ROTATION_SCHEDULED && type <= KMS_ROTATION_MASTER, KMS_CORRUPT);
    KMS_ENSURE(status >= KMS_ROTATION_STARTED && status <= KMS_ROTATION_ROLLED_BACK, KMS_CORRUPT);
    i->type = (kms_rotation_type)type;
    i->status = (kms_rotation_status)status;
    KMS_GUARD(kms_rc_str(&c, i->initiator, sizeof(i->initiator)));
    KMS_GUARD(kms_rc_i64(&c, &i->started_at));
    KMS_GUARD(kms_rc_i64(&c, &i->finished_at));
    KMS_GUARD(kms_rc_str(&c, i->reason, sizeof(i->reason)));
    KMS_GUARD(kms_rcursor_u32(&c, &r->owner_pid));
    KMS_GUARD(kms_rcursor_end(&c));
    return KMS_OK_RESULT;
}

static void kms_be32(uint8_t *o, uint32_t v)
{
    o[0] = (uint8_t)(v >> 24);
    o[1] = (uint8_t)(v >> 16);
    o[2] = (uint8_t)(v >> 8);
    o[3] = (uint8_t)v;
}

static uint32_t kms_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

size_t kms_rec_version_key(const char *name, uint32_t version,
                           uint8_t out[KMS_VERSION_KEY_MAX_BYTES])
{
    size_t n = strnlen(name, KMS_KEY_NAME_MAX_BYTES);
    memcpy(out, name, n);
    out[n] = 0;
    kms_be32(out + n + 1, version);
    return n + 5;
}

bool kms_rec_version_key_split(const uint8_t *key, size_t klen,
                               char name[KMS_KEY_NAME_MAX_BYTES + 1], uint32_t *version)
{
    if (klen < 6 || klen > KMS_VERSION_KEY_MAX_BYTES || key[klen - 5] != 0)
        return false;
    size_t n = klen - 5;
    if (memchr(key, 0, n) != NULL)
        return false;
    memcpy(name, key, n);
    name[n] = '\0';
    *version = kms_rd32(key + n + 1);
    return true;
}

void kms_rec_master_key(uint32_t version, uint8_t out[4])
{
    kms_be32(out, version);
}

KMS_RESULT kms_rec_master_key_parse(const uint8_t *key, size_t klen, uint32_t *version)
{
    KMS_ENSURE(klen == 4, KMS_CORRUPT);
    *version = kms_rd32(key);
    return KMS_OK_RESULT;
}

void kms_rec_rotation_key(const kms_rotation_info *info, uint8_t out[KMS_ROTATION_KEY_BYTES])
{
    uint64_t t = (uint64_t)info->started_at;
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)(t >> (56 - 8 * i));
    memcpy(out + 8, info->id, 32);
}
