/*
 * api/: the rotation-operations routes' documents (docs/api.md, "Rotation
 * status and reports"): GET /v1/status, GET /v1/report, the usage report
 * of an emergency rotation, and the per-version recent uses shown with a
 * key. The server routes and authorizes; these build the JSON.
 */
#ifndef KMS_API_ROTATION_H
#define KMS_API_ROTATION_H

#include "kms.h"

#include <jansson.h>

#define KMS_API_LOOKBACK_DEFAULT_S (7 * INT64_C(86400))
#define KMS_API_LOOKBACK_MAX_S     (400 * INT64_C(86400))

/* GET /v1/status?due_within=SECONDS&overdue=true|false. The query values
 * as received (NULL when absent). */
KMS_RESULT kms_api_status_doc(kms *k, const char *due_within, const char *overdue, json_t **out);

/* GET /v1/report?month=YYYY-MM. */
KMS_RESULT kms_api_report_doc(kms *k, const char *month, json_t **out);

/* The "usage" member of an emergency rotation's answer: every use of
 * name's `version` in the `lookback_s` seconds before now (0 = 7 days). */
KMS_RESULT kms_api_usage_doc(kms *k, const char *name, uint32_t version, int64_t lookback_s,
                             json_t **out);

/* GET /v1/keys/{name}?uses=true|false: KMS_ERR_INVALID_ARGUMENT for any
 * other value. */
KMS_RESULT kms_api_uses_param(const char *uses);

/* Adds "uses_30d" to each version object of a key's "versions" array
 * (null when the audit log cannot be read). */
void kms_api_versions_add_uses(kms *k, const char *name, json_t *versions);

#endif /* KMS_API_ROTATION_H */
