/*
 * Strict base64 (RFC 4648 section 4, standard alphabet, '=' padding).
 * Decoding rejects: characters outside the alphabet, embedded whitespace or
 * line breaks, missing or excess padding, padding anywhere but the end, and
 * non-zero bits in the final quantum's unused bits (section 3.5: "decoders
 * MAY chose to reject an encoding if the pad bits have not been set to
 * zero"; we do, so that every byte string has exactly one encoding).
 */
#ifndef KMS_BASE64_H
#define KMS_BASE64_H

#include "kms_buf.h"

#define KMS_BASE64_ENCODED_LEN(n) ((((n) + 2) / 3) * 4)
#define KMS_BASE64_DECODED_MAX(n) (((n) / 4) * 3)

/* Appends the encoding (no NUL counted; kms_buf_terminate adds one). */
KMS_RESULT kms_base64_encode(const uint8_t *in, size_t n, kms_buf *out);
/* Appends the decoded bytes; KMS_ERR_BASE64_INVALID on any defect. */
KMS_RESULT kms_base64_decode(const char *in, size_t n, kms_buf *out);

#endif /* KMS_BASE64_H */
