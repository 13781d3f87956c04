/*
 * kmsctl's rotation-operations output: `kmsctl status` (a table of every
 * key's rotation status), the usage report printed after an emergency
 * rotation, and `kmsctl report` as a table or as one self-contained HTML
 * page (inline CSS and SVG, no script, nothing fetched). Pure functions of
 * the server's JSON (docs/api.md, "Rotation status and reports"),
 * unit-tested in tests/unit/kmsctl_report_test.c.
 */
#ifndef KMSCTL_REPORT_H
#define KMSCTL_REPORT_H

#include "kms_result.h"

#include <jansson.h>
#include <stdio.h>

/* GET /v1/status's document as a table. */
KMS_RESULT kmsctl_print_status(const json_t *doc, FILE *f);
/* The "usage" member of an emergency rotation's answer. */
KMS_RESULT kmsctl_print_usage(const json_t *usage, FILE *f);
/* GET /v1/report's document as text. */
KMS_RESULT kmsctl_print_report(const json_t *doc, FILE *f);
/* GET /v1/report's document as one HTML page. */
KMS_RESULT kmsctl_report_html(const json_t *doc, FILE *f);

/* "2h 5m", "45s", "3d 4h": at most two units. */
void kmsctl_duration_human(int64_t seconds, char *out, size_t out_len);

#endif /* KMSCTL_REPORT_H */
