/*
 * kms/: the domain. Keys, versions and their states, the operations on
 * them, master-key rotation, the consistency check, all kept in LMDB. This
 * is the whole interface the API layer and the tools see; nothing here knows
 * about HTTP, and nothing in the HSM layer knows about key names.
 *
 * All functions are thread-safe. Functions that change state run in one
 * LMDB write transaction each. Times are Unix seconds from the configured
 * clock (injectable for tests).
 */
#ifndef KMS_H
#define KMS_H

#include "kms_buf.h"
#include "kms_hsm.h"
#include "kms_result.h"
#include "kms_token.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kms kms;

/* Limits on what the operations accept (documented in docs/api.md). */
#define KMS_WRAP_PLAINTEXT_MIN_BYTES    1
#define KMS_WRAP_PLAINTEXT_MAX_BYTES    1024
#define KMS_ENCRYPT_PLAINTEXT_MAX_BYTES KMS_TOKEN_PLAINTEXT_MAX_BYTES
#define KMS_CONTEXT_MAX_BYTES           4096
#define KMS_MAC_MESSAGE_MAX_BYTES       (64 * 1024)
#define KMS_DATAKEY_MIN_BYTES           16
#define KMS_DATAKEY_MAX_BYTES           64
#define KMS_BATCH_MAX_ITEMS             1000
#define KMS_REASON_MAX_BYTES            512
#define KMS_IDENTITY_MAX_BYTES          256

/* NIST SP 800-38D section 8.3: "The total number of invocations of the
 * authenticated encryption function shall not exceed 2^32, including all IV
 * lengths and all instances of the authenticated encryption function with
 * the given key" (for random 96-bit IVs). kmsd rotates automatically when a
 * primary version reaches the soft limit and refuses encryption under it at
 * the hard limit, far below 2^32. */
#define KMS_ENCRYPTIONS_SOFT_LIMIT (UINT64_C(1) << 30)
#define KMS_ENCRYPTIONS_HARD_LIMIT (UINT64_C(1) << 31)

typedef int64_t (*kms_clock_fn)(void *arg);

typedef struct {
    const char *store_path;  /* LMDB environment directory */
    size_t map_size_initial; /* bytes; 0 = 16 MiB */
    size_t map_size_max;     /* bytes; 0 = 64 GiB */
    kms_hsm_config hsm;
    kms_clock_fn clock; /* NULL = time(NULL) */
    void *clock_arg;
    int64_t default_rotation_period_s; /* 0 = 90 days */
    int64_t default_warning_window_s;  /* 0 = 7 days */
    /* Encryptions reserved per LMDB write for the usage counter; a crash
     * over-counts by at most this many, never under-counts. 0 = 4096. */
    uint32_t counter_reservation;
} kms_config;

KMS_RESULT kms_open(const kms_config *cfg, kms **out);
void kms_close(kms *k);

/* Who asks. api/ fills this from the client certificate and the policy. */
typedef struct {
    const char *identity;    /* certificate identity; "system" for the scheduler */
    const char *request_id;  /* for audit correlation; may be NULL */
    const char *source_addr; /* client address; may be NULL */
    /* Only the migrator role's rewrap may read a compromised version. */
    bool may_read_compromised;
} kms_caller;

typedef enum {
    KMS_PURPOSE_ENCRYPT = 1, /* AES-256-GCM */
    KMS_PURPOSE_MAC = 2,     /* HMAC-SHA-256 */
} kms_purpose;

typedef enum {
    KMS_VERSION_ACTIVE = 1,
    KMS_VERSION_DEPRECATED = 2,
    KMS_VERSION_COMPROMISED = 3,
    KMS_VERSION_DISABLED = 4,
    KMS_VERSION_DESTROYED = 5,
} kms_version_state;

const char *kms_purpose_name(kms_purpose p);
KMS_RESULT kms_purpose_parse(const char *s, kms_purpose *out);
const char *kms_version_state_name(kms_version_state s);
KMS_RESULT kms_version_state_parse(const char *s, kms_version_state *out);

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    kms_purpose purpose;
    uint32_t primary_version;
    uint32_t latest_version;
    uint32_t min_decryption_version;
    int64_t rotation_period_s;
    int64_t warning_window_s;
    bool deletion_protection;
    int64_t created_at;
    int64_t rotated_at; /* when the primary last changed */
} kms_key_info;

typedef struct {
    uint32_t version;
    kms_version_state state;
    int64_t created_at;
    int64_t primary_at;      /* 0 if never primary */
    int64_t deprecated_at;   /* 0 if not deprecated */
    int64_t grace_until;     /* deprecated: disabled after this; else 0 */
    int64_t destroy_at;      /* destruction scheduled for; 0 if none */
    int64_t last_used_at;    /* 0 if never used (updated lazily, see docs) */
    uint64_t encryptions;    /* encryptions done under this version */
    uint32_t master_version; /* master key version it is wrapped under */
} kms_version_info;

typedef struct {
    const char *name;
    kms_purpose purpose;
    int64_t rotation_period_s; /* 0 = default */
    int64_t warning_window_s;  /* 0 = default */
    bool deletion_protection;
} kms_key_spec;

KMS_RESULT kms_key_create(kms *k, const kms_caller *c, const kms_key_spec *spec, kms_key_info *out);
KMS_RESULT kms_key_get(kms *k, const char *name, kms_key_info *out);
/* Keys in name order after `after` (NULL: from the start), at most limit.
 * *out is malloc'd; free() it. */
KMS_RESULT kms_key_list(kms *k, const char *after, size_t limit, kms_key_info **out, size_t *n);
/* Every version of a key, oldest first. *out is malloc'd; free() it. */
KMS_RESULT kms_key_versions(kms *k, const char *name, kms_version_info **out, size_t *n);
KMS_RESULT kms_version_get(kms *k, const char *name, uint32_t version, kms_version_info *out);

/* Policy changes; a negative / zero field means "leave as is" as noted. */
typedef struct {
    int64_t rotation_period_s;       /* 0 = unchanged */
    int64_t warning_window_s;        /* 0 = unchanged */
    uint32_t min_decryption_version; /* 0 = unchanged */
    int deletion_protection;         /* -1 = unchanged, 0 off, 1 on */
} kms_key_update;
KMS_RESULT kms_key_update_policy(kms *k, const kms_caller *c, const char *name,
                                 const kms_key_update *u, kms_key_info *out);

typedef enum {
    KMS_ROTATION_SCHEDULED = 1,
    KMS_ROTATION_MANUAL = 2,
    KMS_ROTATION_EMERGENCY = 3,
    KMS_ROTATION_ROLLBACK = 4,
    KMS_ROTATION_MASTER = 5,
} kms_rotation_type;

typedef enum {
    KMS_ROTATION_STARTED = 1,
    KMS_ROTATION_SUCCEEDED = 2,
    KMS_ROTATION_FAILED = 3,
    KMS_ROTATION_ROLLED_BACK = 4,
} kms_rotation_status;

const char *kms_rotation_type_name(kms_rotation_type t);
const char *kms_rotation_status_name(kms_rotation_status s);
/* Added: parsers for the names above (KMS_ERR_INVALID_ARGUMENT if unknown). */
KMS_RESULT kms_rotation_type_parse(const char *s, kms_rotation_type *out);
KMS_RESULT kms_rotation_status_parse(const char *s, kms_rotation_status *out);

typedef struct {
    char id[33];                          /* random 128-bit id, hex */
    char key[KMS_KEY_NAME_MAX_BYTES + 1]; /* "" for a master rotation */
    uint32_t from_version;
    uint32_t to_version;
    kms_rotation_type type;
    kms_rotation_status status;
    char initiator[KMS_IDENTITY_MAX_BYTES + 1];
    int64_t started_at;
    int64_t finished_at;
    char reason[KMS_REASON_MAX_BYTES + 1];
} kms_rotation_info;

/* New version generated in the HSM and made primary. EMERGENCY also marks
 * the previous primary compromised. */
KMS_RESULT kms_key_rotate(kms *k, const kms_caller *c, const char *name, kms_rotation_type type,
                          const char *reason, kms_rotation_info *out);
/* Primary back to the previous usable version; the newer one stays
 * decryptable; the rotation that made it primary becomes rolled_back. */
KMS_RESULT kms_key_rollback(kms *k, const kms_caller *c, const char *name, const char *reason,
                            kms_rotation_info *out);

typedef enum {
    KMS_ACTION_DEPRECATE = 1, /* arg: grace period in seconds (0 = 30 days) */
    KMS_ACTION_COMPROMISE = 2,
    KMS_ACTION_DISABLE = 3,
    KMS_ACTION_ENABLE = 4,           /* disabled or deprecated -> active */
    KMS_ACTION_SCHEDULE_DESTROY = 5, /* arg: waiting period, 7..30 days (0 = 30) */
    KMS_ACTION_CANCEL_DESTROY = 6,
} kms_version_action;

KMS_RESULT kms_version_action_parse(const char *s, kms_version_action *out);
KMS_RESULT kms_version_set_state(kms *k, const kms_caller *c, const char *name, uint32_t version,
                                 kms_version_action action, int64_t arg, const char *reason,
                                 kms_version_info *out);

/* ---- data operations. Tokens in: text or binary form. Tokens out: the
 * binary form (kms_token_to_text gives the text form). Plaintext outputs
 * are secret buffers: pass a kms_buf made with kms_buf_init_secret. ---- */

KMS_RESULT kms_wrap(kms *k, const kms_caller *c, const char *name, const uint8_t *pt, size_t pt_len,
                    const uint8_t *ctx, size_t ctx_len, kms_buf *token_out, uint32_t *version);
KMS_RESULT kms_unwrap(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                      size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *pt_out,
                      uint32_t *version);
KMS_RESULT kms_encrypt(kms *k, const kms_caller *c, const char *name, const uint8_t *pt,
                       size_t pt_len, const uint8_t *ctx, size_t ctx_len, kms_buf *token_out,
                       uint32_t *version);
KMS_RESULT kms_decrypt(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                       size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *pt_out,
                       uint32_t *version);
/* Generates len bytes in the HSM's RNG, wraps them; pt_out may be NULL when
 * the caller does not want the plaintext. */
KMS_RESULT kms_datakey(kms *k, const kms_caller *c, const char *name, size_t len,
                       const uint8_t *ctx, size_t ctx_len, kms_buf *token_out, kms_buf *pt_out,
                       uint32_t *version);
/* Token under any readable version -> token under the primary, same
 * context; the plaintext never leaves kms/. If the token is already under
 * the primary, it is returned unchanged and *changed is false. */
KMS_RESULT kms_rewrap(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                      size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *token_out,
                      uint32_t *from_version, uint32_t *to_version, bool *changed);
/* MAC tokens (kind 0x02) under the primary; verify accepts any readable version. */
KMS_RESULT kms_mac(kms *k, const kms_caller *c, const char *name, const uint8_t *msg,
                   size_t msg_len, kms_buf *mac_out, uint32_t *version);
KMS_RESULT kms_verify(kms *k, const kms_caller *c, const char *name, const uint8_t *msg,
                      size_t msg_len, const uint8_t *mac, size_t mac_len, bool *valid,
                      uint32_t *version);

/* ---- batch: one operation over many items; the call fails as a whole only
 * for reasons that concern every item (unknown key, wrong purpose, too many
 * items); anything else is reported per item. ---- */

typedef enum {
    KMS_OP_WRAP = 1,
    KMS_OP_UNWRAP = 2,
    KMS_OP_ENCRYPT = 3,
    KMS_OP_DECRYPT = 4,
    KMS_OP_REWRAP = 5,
    KMS_OP_DATAKEY = 6,
    KMS_OP_MAC = 7,
    KMS_OP_VERIFY = 8,
} kms_op;

const char *kms_op_name(kms_op op);
/* Added: "wrap", "unwrap", ... -> kms_op (KMS_ERR_INVALID_ARGUMENT if unknown). */
KMS_RESULT kms_op_parse(const char *s, kms_op *out);

typedef struct {
    const uint8_t *in; /* plaintext, token or message, by operation */
    size_t in_len;
    const uint8_t *ctx; /* context (AEAD ops); MAC token (verify) */
    size_t ctx_len;
    size_t datakey_len; /* datakey only */
} kms_batch_item;

typedef struct {
    kms_err err;           /* KMS_OK or this item's error */
    kms_buf out;           /* token, plaintext (secret) or MAC; empty on error */
    uint32_t version;      /* version used (to_version for rewrap) */
    uint32_t from_version; /* rewrap only */
    bool flag;             /* rewrap: changed; verify: valid */
} kms_batch_result;

/* results[n] must be zeroed by the caller; kms_batch_results_free() frees
 * (wiping plaintext). */
KMS_RESULT kms_batch(kms *k, const kms_caller *c, kms_op op, const char *name,
                     const kms_batch_item *items, size_t n, kms_batch_result *results);
void kms_batch_results_free(kms_batch_result *results, size_t n);

/* ---- master key ---- */

typedef struct {
    uint32_t version;
    int64_t created_at;
    int64_t retired_at;        /* 0 while in use */
    uint64_t versions_wrapped; /* key versions wrapped under it */
    bool current;
} kms_master_info;

/* New master version on the token; every version blob rewrapped inside the
 * HSM, in batches of write transactions; the old master destroyed once
 * nothing refers to it. Resumable: an interrupted rotation is finished by
 * the next call or by kms_open. */
KMS_RESULT kms_master_rotate(kms *k, const kms_caller *c, const char *reason,
                             kms_rotation_info *out);
KMS_RESULT kms_master_list(kms *k, kms_master_info **out, size_t *n);

/* ---- rotation records ---- */

typedef struct {
    const char *key;  /* NULL = any */
    int type;         /* 0 = any, else kms_rotation_type */
    int status;       /* 0 = any, else kms_rotation_status */
    int64_t from, to; /* started_at range; 0 = open */
    size_t limit;     /* 0 = 1000 */
} kms_rotation_filter;
KMS_RESULT kms_rotations_list(kms *k, const kms_rotation_filter *f, kms_rotation_info **out,
                              size_t *n);

/* ---- health, consistency, backup ---- */

/* LMDB readable and a real HSM operation succeeds. */
KMS_RESULT kms_ready(kms *k);

typedef struct {
    size_t keys;
    size_t versions;
    size_t masters;
    size_t problems;            /* inconsistencies found */
    size_t repaired;            /* of those, repaired */
    size_t orphan_objects;      /* master objects on the token unknown to LMDB */
    size_t missing_objects;     /* master versions in LMDB absent from the token */
    size_t unreadable_versions; /* version blobs whose master is missing */
    char summary[1024];         /* human-readable report */
} kms_check_report;

/* Compares LMDB with the token; with repair, fixes what is safe (finishes
 * or cleans up interrupted rotations, removes orphan master objects that no
 * record names). Run by kms_open as a report; kmsctl/kmsd can ask repair. */
KMS_RESULT kms_check(kms *k, bool repair, kms_check_report *out);

/* Hot backup with compaction (mdb_env_copy2 MDB_CP_COMPACT) to dir. */
KMS_RESULT kms_backup(kms *k, const char *dir);

/* Counters for metrics. */
typedef struct {
    size_t keys;
    size_t keys_due;     /* inside the warning window */
    size_t keys_overdue; /* past their rotation period */
    kms_hsm_stats hsm;
    size_t store_map_size;
    size_t store_used_bytes;  /* pages the store holds, in bytes */
    size_t store_limit_bytes; /* what ordinary writes may fill: store_full beyond */
} kms_stats;
KMS_RESULT kms_stats_get(kms *k, kms_stats *out);

/* The HSM this instance uses (benchmarks' raw baseline). */
kms_hsm *kms_hsm_of(kms *k);

#endif /* KMS_H */
