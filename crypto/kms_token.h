/*
 * The ciphertext token: one self-describing, versioned format for wrapped
 * DEKs, encrypted fields and MAC tags. docs/ciphertext-format.md specifies it
 * byte by byte; this is the summary.
 *
 * Binary form (all integers big-endian):
 *
 *   off   size  field
 *   0     1     magic 0x4B ('K')
 *   1     1     format version, 0x01
 *   2     1     kind: 0x01 AES-256-GCM ciphertext, 0x02 HMAC-SHA-256 tag
 *   3     1     key name length L, 1..128
 *   4     L     key name, [a-z0-9][a-z0-9._-]{0,127}
 *   4+L   4     key version, >= 1
 *   ---- header ends: header = bytes [0, 8+L) ----
 *   kind 0x01:  8+L: nonce (12) | ciphertext (N >= 0) | GCM tag (16)
 *   kind 0x02:  8+L: HMAC-SHA-256 (32)
 *
 * The GCM additional authenticated data is header || context, where context
 * is the caller's optional encryption context (may be empty). The header is
 * self-delimiting, so the concatenation is unambiguous. The HMAC of a MAC
 * token covers header || message.
 *
 * Text form: "kms1:" followed by the strict base64 (RFC 4648 section 4) of
 * the binary form. Binary tokens start with 0x4B 0x01, text tokens with
 * "kms1:", so kms_token_parse_any() tells them apart.
 *
 * Every defect (bad magic, unknown version or kind, bad name, version 0,
 * short or long input, bad base64 in the text form) gives the single error
 * KMS_ERR_TOKEN_INVALID, the same error a failed tag check gives.
 */
#ifndef KMS_TOKEN_H
#define KMS_TOKEN_H

#include "kms_buf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KMS_TOKEN_MAGIC             0x4B
#define KMS_TOKEN_FORMAT_V1         0x01
#define KMS_TOKEN_NONCE_BYTES       12
#define KMS_TOKEN_TAG_BYTES         16
#define KMS_TOKEN_MAC_BYTES         32
#define KMS_KEY_NAME_MAX_BYTES      128
#define KMS_TOKEN_HEADER_MAX_BYTES  (8 + KMS_KEY_NAME_MAX_BYTES)
#define KMS_TOKEN_TEXT_PREFIX       "kms1:"
#define KMS_TOKEN_TEXT_PREFIX_BYTES 5
/* Largest plaintext a token may carry (encrypt of a field); see docs/api.md. */
#define KMS_TOKEN_PLAINTEXT_MAX_BYTES (64 * 1024)
#define KMS_TOKEN_BINARY_MAX_BYTES                                                        \
    (KMS_TOKEN_HEADER_MAX_BYTES + KMS_TOKEN_NONCE_BYTES + KMS_TOKEN_PLAINTEXT_MAX_BYTES + \
     KMS_TOKEN_TAG_BYTES)

typedef enum {
    KMS_TOKEN_KIND_AEAD = 0x01,
    KMS_TOKEN_KIND_MAC = 0x02,
} kms_token_kind;

/* A parsed token. The pointers view the buffer that was parsed. */
typedef struct {
    kms_token_kind kind;
    char key_name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t key_version;
    const uint8_t *header;
    size_t header_len;
    const uint8_t *nonce;      /* AEAD only */
    const uint8_t *ciphertext; /* AEAD only */
    size_t ciphertext_len;
    const uint8_t *tag; /* AEAD: 16 bytes; MAC: 32 bytes */
} kms_token;

/* The key name grammar [a-z0-9][a-z0-9._-]{0,127}. */
bool kms_key_name_valid(const char *name, size_t len);

/* Appends the header for (kind, name, version) to out. A name outside the
 * grammar gives KMS_ERR_KEY_NAME_INVALID; kind unknown or version 0 give
 * KMS_ERR_INVALID_ARGUMENT. */
KMS_RESULT kms_token_header_write(kms_token_kind kind, const char *name, uint32_t version,
                                  kms_buf *out);
/* Parses a binary token in place. */
KMS_RESULT kms_token_parse(const uint8_t *bin, size_t len, kms_token *out);
/* Parses either form: text is decoded into scratch (which must outlive out;
 * it is reset first). Text longer than any token could be is refused before
 * decoding. */
KMS_RESULT kms_token_parse_any(const uint8_t *in, size_t len, kms_buf *scratch, kms_token *out);
/* Appends the text form of a binary token; refuses (KMS_ERR_TOKEN_INVALID)
 * bytes that do not parse as a token, leaving out unchanged. */
KMS_RESULT kms_token_to_text(const uint8_t *bin, size_t len, kms_buf *out);

#endif /* KMS_TOKEN_H */
