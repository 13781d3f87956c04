/*
 * hsm/: everything kmsd does with the HSM, through PKCS#11 loaded by p11-kit.
 * No CK_* type leaves this layer, and nothing here knows about key names:
 * callers name version secrets by an opaque 16-byte uid.
 *
 * Objects:
 *  - master keys: AES-256 token objects (CKA_TOKEN, CKA_SENSITIVE, not
 *    CKA_EXTRACTABLE, CKA_WRAP/CKA_UNWRAP only), named by a random 16-byte
 *    CKA_ID that the caller records in LMDB. Handles are cached and re-found
 *    on CKR_OBJECT_HANDLE_INVALID; the token is never searched on the hot
 *    path.
 *  - version secrets: AES-256 (encrypt purpose) or 32-byte generic secrets
 *    (HMAC-SHA-256), generated in the HSM and only ever held outside it
 *    wrapped under a master key with CKM_AES_KEY_WRAP_PAD (RFC 5649). On
 *    first use they are unwrapped into sensitive, non-extractable session
 *    objects whose handles live in a bounded LRU cache keyed by uid; an
 *    evicted entry's object is destroyed.
 *
 * Thread safety: every function may be called from any number of threads.
 * Errors: every CK_RV is translated once, at the seam (hsm/kms_p11.c), to the
 * project's error table; transient ones (session lost, device removed, busy)
 * trigger recovery: the pool is dropped and re-initialised with back-off and
 * handles are re-found, without a restart.
 */
#ifndef KMS_HSM_H
#define KMS_HSM_H

#include "kms_buf.h"
#include "kms_hash.h"
#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

#define KMS_HSM_ID_BYTES    16 /* CKA_ID of a master key */
#define KMS_HSM_UID_BYTES   16 /* caller's id of a version secret (cache key) */
#define KMS_HSM_NONCE_BYTES 12
#define KMS_HSM_TAG_BYTES   16
#define KMS_HSM_MAC_BYTES   32
/* Wrapped blob of a 32-byte secret under AES key wrap with padding is 40
 * bytes; leave room for HSMs that add framing. */
#define KMS_HSM_WRAPPED_MAX_BYTES 512

typedef struct kms_hsm kms_hsm;

/* What a kms_hsm counts, only ever increased. It keeps them in its own
 * handle unless kms_hsm_config.counters points elsewhere: kmsd's worker
 * processes count into a slot each of one shared mapping, so that /metrics
 * adds up every worker's and a restarted worker goes on from its slot.
 * Lock-free 64-bit atomics are address-free, so this works across
 * processes. */
typedef struct kms_hsm_counters {
    _Atomic uint64_t calls;        /* PKCS#11 calls made */
    _Atomic uint64_t errors;       /* calls that returned other than CKR_OK */
    _Atomic uint64_t ns;           /* time inside PKCS#11 calls */
    _Atomic uint64_t recoveries;   /* pool re-initialisations */
    _Atomic uint64_t cache_hits;   /* version secret found in the cache */
    _Atomic uint64_t cache_misses; /* version secret unwrapped */
} kms_hsm_counters;

typedef struct {
    /* p11-kit module name (as in p11-kit's config) or an absolute path. */
    const char *module;
    /* RFC 7512 PKCS#11 URI naming the token, e.g. "pkcs11:token=kmsd".
     * A URI carrying pin-value or pin-source is refused (KMS_ERR_CONFIG). */
    const char *token_uri;
    /* Exactly one of these supplies the user PIN. The file must not be
     * group- or world-readable; it is read again for every (re-)login and
     * the PIN wiped right after C_Login. The environment variable is unset
     * after it has been read, so that PIN is kept in secure memory (locked,
     * not dumped) for re-login after a recovery, and wiped on close. */
    const char *pin_file;
    const char *pin_env;
    /* Sessions in the pool (default 4). */
    unsigned pool_size;
    /* Unwrapped version secrets kept as session objects (default 4096). */
    size_t cache_capacity;
    /* Where to count (see kms_hsm_counters); NULL: in the handle. Must
     * outlive the handle. */
    kms_hsm_counters *counters;
} kms_hsm_config;

KMS_RESULT kms_hsm_open(const kms_hsm_config *cfg, kms_hsm **out);
void kms_hsm_close(kms_hsm *hsm);

/* ---- master keys (tier 1) ---- */

/* Generates a new master key on the token with a fresh random CKA_ID. */
KMS_RESULT kms_hsm_master_create(kms_hsm *hsm, uint8_t id_out[KMS_HSM_ID_BYTES]);
KMS_RESULT kms_hsm_master_exists(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists);
/* As kms_hsm_master_exists, for a master the caller has reason to believe
 * exists (another process recorded it): a miss is searched again for up to
 * about 250 ms, since a token object another process has just created can
 * take that long to appear in this process's view (SoftHSM). */
KMS_RESULT kms_hsm_master_await(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists);
KMS_RESULT kms_hsm_master_destroy(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES]);
/* Lists the CKA_IDs of every kmsd master key on the token (start-up check
 * only: this searches the token). Caller frees *ids with free(). */
KMS_RESULT kms_hsm_master_list(kms_hsm *hsm, uint8_t (**ids)[KMS_HSM_ID_BYTES], size_t *count);

/* ---- version secrets (tier 2) ---- */

typedef enum {
    KMS_HSM_SECRET_AES256 = 1,  /* AES-256-GCM via C_Encrypt/C_Decrypt */
    KMS_HSM_SECRET_HMAC256 = 2, /* HMAC-SHA-256 via C_Sign */
} kms_hsm_secret_type;

/* What the caller knows of a version secret. */
typedef struct {
    uint8_t uid[KMS_HSM_UID_BYTES];
    uint8_t master_id[KMS_HSM_ID_BYTES];
    kms_hsm_secret_type type;
    const uint8_t *wrapped;
    size_t wrapped_len;
} kms_hsm_key_ref;

/* Generates a secret inside the HSM and appends it, wrapped under the
 * master key, to wrapped_out. The clear secret never leaves the HSM. */
KMS_RESULT kms_hsm_secret_generate(kms_hsm *hsm, const uint8_t master_id[KMS_HSM_ID_BYTES],
                                   kms_hsm_secret_type type, kms_buf *wrapped_out);
/* Unwraps ref's blob under its master and wraps it under new_master_id,
 * inside the HSM; appends the new blob to wrapped_out. */
KMS_RESULT kms_hsm_secret_rewrap(kms_hsm *hsm, const kms_hsm_key_ref *ref,
                                 const uint8_t new_master_id[KMS_HSM_ID_BYTES],
                                 kms_buf *wrapped_out);
/* Drops the cached session object of uid, if any (destroy, disable). */
void kms_hsm_cache_evict(kms_hsm *hsm, const uint8_t uid[KMS_HSM_UID_BYTES]);

/* ---- operations ---- */

/* AES-256-GCM, 96-bit nonce, 128-bit tag. out receives pt_len + 16 bytes:
 * ciphertext then tag. */
KMS_RESULT kms_hsm_aead_encrypt(kms_hsm *hsm, const kms_hsm_key_ref *ref,
                                const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                                size_t aad_len, const uint8_t *pt, size_t pt_len, uint8_t *out);
/* in is ciphertext then tag (in_len >= 16); out receives in_len - 16 bytes.
 * A tag mismatch gives KMS_ERR_TOKEN_INVALID and writes nothing to out. */
KMS_RESULT kms_hsm_aead_decrypt(kms_hsm *hsm, const kms_hsm_key_ref *ref,
                                const uint8_t nonce[KMS_HSM_NONCE_BYTES], const uint8_t *aad,
                                size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out);
/* HMAC-SHA-256 over the concatenation of parts. */
KMS_RESULT kms_hsm_mac_sign(kms_hsm *hsm, const kms_hsm_key_ref *ref, const kms_iov *parts,
                            size_t count, uint8_t out[KMS_HSM_MAC_BYTES]);
/* The HSM's RNG (C_GenerateRandom): data keys come from here. */
KMS_RESULT kms_hsm_random(kms_hsm *hsm, uint8_t *out, size_t n);
/* A real, cheap HSM operation for readiness checks. */
KMS_RESULT kms_hsm_ping(kms_hsm *hsm);

/* ---- token set-up (development and tests) ---- */

/* Initialises the first uninitialised token of the module (SoftHSM always
 * offers one) with the label, SO PIN and user PIN, through C_InitToken and
 * C_InitPIN, so that no PIN ever appears on a command line. */
KMS_RESULT kms_hsm_token_init(const char *module, const char *label, const kms_buf *so_pin,
                              const kms_buf *user_pin);

/* What kms_hsm_token_list reports of each slot with a token. */
typedef struct {
    unsigned long slot_id;
    char label[33]; /* blank padding removed, NUL-terminated */
    char manufacturer[33];
    char model[17];
    char serial[17];
    bool initialized;          /* CKF_TOKEN_INITIALIZED */
    bool user_pin_initialized; /* CKF_USER_PIN_INITIALIZED */
} kms_hsm_token_info;

/* Lists the module's tokens (no login). Caller frees *tokens with free(). */
KMS_RESULT kms_hsm_token_list(const char *module, kms_hsm_token_info **tokens, size_t *count);

/* ---- the audit signing key (hsm/kms_hsm_sign.c) ----
 * An EC P-256 key pair on the token: the private key CKA_TOKEN,
 * CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_SIGN only; the
 * public key a token object too. Both carry a random 16-byte CKA_ID that
 * the caller records. Signing is rare (chain heads, exports): the objects
 * are searched on every use instead of cached. */

#define KMS_HSM_ECDSA_SIG_MAX_BYTES 72 /* DER ECDSA-Sig-Value for P-256 */

KMS_RESULT kms_hsm_signkey_create(kms_hsm *hsm, uint8_t id_out[KMS_HSM_ID_BYTES]);
KMS_RESULT kms_hsm_signkey_exists(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES], bool *exists);
/* The public key as DER SubjectPublicKeyInfo, appended to spki_out. */
KMS_RESULT kms_hsm_signkey_public(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES],
                                  kms_buf *spki_out);
/* CKM_ECDSA over a SHA-256 digest; the signature as DER ECDSA-Sig-Value
 * (what `openssl dgst -sha256 -verify` reads). */
KMS_RESULT kms_hsm_signkey_sign(kms_hsm *hsm, const uint8_t id[KMS_HSM_ID_BYTES],
                                const uint8_t digest[KMS_SHA256_BYTES],
                                uint8_t sig[KMS_HSM_ECDSA_SIG_MAX_BYTES], size_t *sig_len);

/* ---- observation ---- */

/* Counters as kms_hsm_counters says (a shared slot counts every process
 * that used it); cache_evictions, cache_size and sessions_open are this
 * process's. */
typedef struct {
    uint64_t calls;        /* PKCS#11 calls made */
    uint64_t errors;       /* calls that returned other than CKR_OK */
    uint64_t call_ns;      /* total time inside PKCS#11 calls */
    uint64_t recoveries;   /* pool re-initialisations */
    uint64_t cache_hits;   /* version secret found in the cache */
    uint64_t cache_misses; /* version secret unwrapped */
    uint64_t cache_evictions;
    size_t cache_size;
    size_t sessions_open;
} kms_hsm_stats;

void kms_hsm_stats_get(kms_hsm *hsm, kms_hsm_stats *out);

/* Objects this process can see on the token: token objects plus the
 * session objects of every application session (cached version secrets).
 * Searches the token: for start-up checks and tests, never the hot path. */
KMS_RESULT kms_hsm_object_count(kms_hsm *hsm, size_t *count);

/* The benchmark baseline: a raw C_EncryptInit+C_Encrypt (or C_Decrypt) loop
 * of msg_len-byte messages with AES-256-GCM on a session-object key, on
 * `threads` threads each with its own session, for `seconds`. Reports
 * operations per second. */
typedef enum { KMS_HSM_RAW_ENCRYPT = 1, KMS_HSM_RAW_DECRYPT = 2 } kms_hsm_raw_op;
KMS_RESULT kms_hsm_bench_raw(kms_hsm *hsm, kms_hsm_raw_op op, size_t msg_len, unsigned threads,
                             double seconds, double *ops_per_sec);

#endif /* KMS_HSM_H */
