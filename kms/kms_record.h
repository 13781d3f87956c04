/*
 * Records kept in LMDB (internal). Each value starts with a record-format
 * version byte; integers are big-endian; every decoder reads through a
 * bounded cursor and must consume the value exactly, so any truncation or
 * trailing garbage gives KMS_ERR_STORE_CORRUPT.
 *
 * Keys of the databases:
 *   keys       name
 *   versions   name || 0x00 || u32 version (a key's versions are contiguous
 *              and ordered, and no name is a prefix of another's range)
 *   masters    u32 master version
 *   rotations  u64 started_at || 32 hex chars of the id (time order)
 */
#ifndef KMS_RECORD_H
#define KMS_RECORD_H

#include "kms.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_RECORD_FORMAT_V1 0x01

typedef struct {
    uint8_t purpose; /* kms_purpose */
    uint32_t primary_version;
    uint32_t latest_version;
    uint32_t min_decryption_version;
    int64_t rotation_period_s;
    int64_t warning_window_s;
    bool deletion_protection;
    int64_t created_at;
    int64_t rotated_at;
} kms_rec_key;

typedef struct {
    uint8_t state; /* kms_version_state; a pending destruction is disabled + destroy_at */
    uint8_t uid[KMS_HSM_UID_BYTES];
    uint32_t master_version;
    int64_t created_at;
    int64_t primary_at;
    int64_t deprecated_at;
    int64_t grace_until;
    int64_t destroy_at;
    int64_t last_used_at;
    /* Encryptions reserved: always >= the encryptions actually done. */
    uint64_t reserved;
    uint16_t wrapped_len; /* 0 once destroyed */
    uint8_t wrapped[KMS_HSM_WRAPPED_MAX_BYTES];
} kms_rec_version;

typedef enum {
    KMS_MASTER_PENDING = 1, /* created; versions being rewrapped into it */
    KMS_MASTER_CURRENT = 2,
    KMS_MASTER_RETIRED = 3,
} kms_master_state;

typedef struct {
    uint8_t id[KMS_HSM_ID_BYTES];
    uint8_t state; /* kms_master_state */
    int64_t created_at;
    int64_t retired_at;
} kms_rec_master;

typedef struct {
    kms_rotation_info info;
    uint32_t owner_pid; /* process that ran it: a started record is stale once it is gone */
} kms_rec_rotation;

#define KMS_VERSION_KEY_MAX_BYTES (KMS_KEY_NAME_MAX_BYTES + 1 + 4)
#define KMS_ROTATION_KEY_BYTES    (8 + 32)

KMS_RESULT kms_rec_key_encode(const kms_rec_key *r, kms_buf *out);
KMS_RESULT kms_rec_key_decode(const uint8_t *p, size_t n, kms_rec_key *r);
KMS_RESULT kms_rec_version_encode(const kms_rec_version *r, kms_buf *out);
KMS_RESULT kms_rec_version_decode(const uint8_t *p, size_t n, kms_rec_version *r);
KMS_RESULT kms_rec_master_encode(const kms_rec_master *r, kms_buf *out);
KMS_RESULT kms_rec_master_decode(const uint8_t *p, size_t n, kms_rec_master *r);
KMS_RESULT kms_rec_rotation_encode(const kms_rec_rotation *r, kms_buf *out);
KMS_RESULT kms_rec_rotation_decode(const uint8_t *p, size_t n, kms_rec_rotation *r);

/* Database keys. Return the key length. */
size_t kms_rec_version_key(const char *name, uint32_t version,
                           uint8_t out[KMS_VERSION_KEY_MAX_BYTES]);
/* Splits a versions key into name and version; false if malformed. */
bool kms_rec_version_key_split(const uint8_t *key, size_t klen,
                               char name[KMS_KEY_NAME_MAX_BYTES + 1], uint32_t *version);
void kms_rec_master_key(uint32_t version, uint8_t out[4]);
KMS_RESULT kms_rec_master_key_parse(const uint8_t *key, size_t klen, uint32_t *version);
void kms_rec_rotation_key(const kms_rotation_info *info, uint8_t out[KMS_ROTATION_KEY_BYTES]);

#endif /* KMS_RECORD_H */
