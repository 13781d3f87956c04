/*
 * api/: the audit routes (docs/audit.md, docs/api.md):
 *   GET  /v1/audit   records, filtered (auditor, admin)
 *   POST /v1/export  a compliance export signed in the HSM (auditor, admin)
 * and the record every request leaves in the audit trail.
 */
#ifndef KMS_API_AUDIT_H
#define KMS_API_AUDIT_H

#include "kms_audit.h"

#include <jansson.h>

/* Audit records in an export at most; a larger range is refused with
 * KMS_ERR_LIMIT_EXCEEDED (export in smaller ranges). */
#define KMS_API_EXPORT_MAX_RECORDS 200000

/* The files of an export, by name, in the order kmsctl writes them. */
#define KMS_EXPORT_FILE_INVENTORY_CSV  "inventory.csv"
#define KMS_EXPORT_FILE_INVENTORY_JSON "inventory.json"
#define KMS_EXPORT_FILE_ROTATIONS      "rotations.json"
#define KMS_EXPORT_FILE_AUDIT          "audit.jsonl"
#define KMS_EXPORT_FILE_PUBKEY         "public-key.pem"
#define KMS_EXPORT_FILE_MANIFEST       "manifest.json"
#define KMS_EXPORT_FILE_SIGNATURE      "manifest.sig"
#define KMS_EXPORT_FORMAT              "kmsd-export-1"

/* {"records":[{seq,time,identity,source,request_id,operation,key,version,
 *  to_version,items,status,result,hash}...],"next":<after for the next
 *  page>|null} */
KMS_RESULT kms_api_audit_list(kms *k, const kms_audit_filter *f, json_t **out);

/* Builds the export of audit records with from <= time <= to (0 = open):
 * {"files":{name:text,...},"manifest_signature":"<base64 DER>"}. */
KMS_RESULT kms_api_export_build(kms *k, int64_t from, int64_t to, json_t **out);

/* The operation name of a request for its audit record ("wrap",
 * "batch.unwrap", "key.rotate", ...). */
typedef struct {
    const char *operation;
    const char *identity; /* "" when unauthenticated */
    const char *source;
    const char *request_id;
    const char *key;
    uint32_t version, to_version, items;
    int status;
    kms_err err;
    bool announced; /* the request was announced (kms_audit_announce) */
} kms_api_audit_event;

/* The audit record of one answered request. */
void kms_api_audit_record_fill(const kms_api_audit_event *e, kms_audit_record *r);

/* Appends the record of one answered request; KMS_ERR_AUDIT_UNAVAILABLE
 * when it could not be made durable (the response must then not be sent). */
KMS_RESULT kms_api_audit_event_append(kms *k, const kms_api_audit_event *e);

#endif /* KMS_API_AUDIT_H */
