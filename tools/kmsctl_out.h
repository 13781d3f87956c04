/*
 * kmsctl's output for people: aligned tables and "field: value" blocks made
 * from the server's JSON objects (docs/api.md shapes). Pure functions of
 * their input, unit-tested in tests/unit/kmsctl_out_test.c. Missing or null
 * fields print as "-", so a newer server with more or fewer fields never
 * breaks the tables.
 */
#ifndef KMSCTL_OUT_H
#define KMSCTL_OUT_H

#include "kms_result.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>

#define KMSCTL_TABLE_MAX_COLS 12

/* A table of text cells, printed with columns aligned and two spaces
 * between them; the last column is not padded. */
typedef struct kmsctl_table kmsctl_table;

KMS_RESULT kmsctl_table_new(const char *const *headers, size_t ncols, kmsctl_table **out);
/* Adds one row of ncols cells (copied). */
KMS_RESULT kmsctl_table_add(kmsctl_table *t, const char *const *cells);
void kmsctl_table_print(const kmsctl_table *t, FILE *f);
void kmsctl_table_free(kmsctl_table *t);

/* "2026-11-22 00:49:43Z" for a Unix time; "-" for 0/absent. */
void kmsctl_time_format(int64_t t, char *out, size_t out_len);

/* Formatters for the API's objects. */
KMS_RESULT kmsctl_print_key(const json_t *key, FILE *f);           /* block + versions */
KMS_RESULT kmsctl_print_keys(const json_t *keys, FILE *f);         /* array of keys */
KMS_RESULT kmsctl_print_versions(const json_t *versions, FILE *f); /* array of versions */
KMS_RESULT kmsctl_print_rotations(const json_t *rotations, FILE *f);
KMS_RESULT kmsctl_print_masters(const json_t *masters, FILE *f);
/* Any JSON value as indented "name: value" lines (for the check report). */
void kmsctl_print_generic(const json_t *v, int indent, FILE *f);

#endif /* KMSCTL_OUT_H */
