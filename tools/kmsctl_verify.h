/*
 * kmsctl verify-export: checks a compliance export directory offline, with
 * OpenSSL and the files alone (docs/audit.md). Every problem found is
 * printed as one line "FAIL: <what>" naming the record (seq), the file or
 * the signature concerned; what verifies is printed as "ok: <what>".
 */
#ifndef KMSCTL_VERIFY_H
#define KMSCTL_VERIFY_H

#include "kms_result.h"

#include <stddef.h>
#include <stdio.h>

typedef struct {
    size_t problems; /* FAIL lines printed */
    size_t records;  /* audit records checked */
    unsigned long long first_seq, last_seq;
} kmsctl_verify_report;

/* pinned_pem: a public key obtained out of band (may be NULL: then the
 * key in the export is trusted, and its SHA-256 printed for comparison).
 * Fails (KMS_ERR_IO / KMS_ERR_INVALID_ARGUMENT) only when the directory
 * cannot be examined at all; a failed verification is rep->problems > 0. */
KMS_RESULT kmsctl_verify_export(const char *dir, const char *pinned_pem, FILE *out,
                                kmsctl_verify_report *rep);

/* kmsctl export: writes the files of kmsd's POST /v1/export answer
 * ({"files":{name:text},"manifest_signature":base64}) into dir, which is
 * created (mode 0700) or must be empty. Files are written byte-exact; the
 * signature is written as DER to manifest.sig. */
struct json_t;
KMS_RESULT kmsctl_export_write(const struct json_t *doc, const char *dir);

#endif /* KMSCTL_VERIFY_H */
