/*
 * Tables and blocks for people, from the API's JSON objects. Every cell is
 * sanitised (control characters become '?') because fields such as a
 * rotation's reason are free text chosen by another client, and must not be
 * able to send escape sequences to an operator's terminal.
 */
#include "kmsctl_out.h"

#include "kmsctl_args.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CELL_BYTES 256

struct kmsctl_table {
    size_t ncols;
    size_t nrows; /* including the header row */
    size_t cap;
    char **cells; /* nrows * ncols */
};

static char *cell_dup(const char *s)
{
    size_t n = strlen(s);
    char *c = malloc(n + 1);
    if (c == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        c[i] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    c[n] = '\0';
    return c;
}

KMS_RESULT kmsctl_table_add(kmsctl_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        KMS_ENSURE(cap < SIZE_MAX / (t->ncols * sizeof(char *)), KMS_ERR_LIMIT_EXCEEDED);
        char **n = realloc(t->cells, cap * t->ncols * sizeof(char *));
        KMS_ENSURE(n != NULL, KMS_ERR_NO_MEMORY);
        t->cells = n;
        t->cap = cap;
    }
    char **row = &t->cells[t->nrows * t->ncols];
    for (size_t c = 0; c < t->ncols; c++) {
        row[c] = cell_dup(cells[c] ? cells[c] : "-");
        if (row[c] == NULL) {
            for (size_t k = 0; k < c; k++) {
                free(row[k]);
            }
            KMS_BAIL(KMS_ERR_NO_MEMORY);
        }
    }
    t->nrows++;
    return KMS_OK_RESULT;
}

KMS_RESULT kmsctl_table_new(const char *const *headers, size_t ncols, kmsctl_table **out)
{
    KMS_ENSURE(ncols > 0 && ncols <= KMSCTL_TABLE_MAX_COLS, KMS_ERR_INVALID_ARGUMENT);
    kmsctl_table *t = calloc(1, sizeof(*t));
    KMS_ENSURE(t != NULL, KMS_ERR_NO_MEMORY);
    t->ncols = ncols;
    kms_result r = kmsctl_table_add(t, headers);
    if (!kms_is_ok(r)) {
        kmsctl_table_free(t);
        return r;
    }
    *out = t;
    return KMS_OK_RESULT;
}

void kmsctl_table_print(const kmsctl_table *t, FILE *f)
{
    size_t width[KMSCTL_TABLE_MAX_COLS] = {0};
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            size_t n = strlen(t->cells[r * t->ncols + c]);
            width[c] = n > width[c] ? n : width[c];
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            const char *cell = t->cells[r * t->ncols + c];
            if (c + 1 == t->ncols) {
                fprintf(f, "%s\n", cell);
            } else {
                fprintf(f, "%-*s  ", (int)width[c], cell);
            }
        }
    }
}

void kmsctl_table_free(kmsctl_table *t)
{
    if (t == NULL) {
        return;
    }
    for (size_t i = 0; i < t->nrows * t->ncols; i++) {
        free(t->cells[i]);
    }
    free(t->cells);
    free(t);
}

void kmsctl_time_format(int64_t t, char *out, size_t out_len)
{
    struct tm tm;
    time_t tt = (time_t)t;
    if (t <= 0 || gmtime_r(&tt, &tm) == NULL ||
        strftime(out, out_len, "%Y-%m-%d %H:%M:%SZ", &tm) == 0) {
        snprintf(out, out_len, "-");
    }
}

/* ---- cells from JSON ---- */

static const char *cell_text(const json_t *o, const char *field, char *buf, size_t n)
{
    const json_t *v = json_object_get(o, field);
    if (json_is_string(v)) {
        snprintf(buf, n, "%s", json_string_value(v));
    } else if (json_is_integer(v)) {
        snprintf(buf, n, "%lld", (long long)json_integer_value(v));
    } else if (json_is_boolean(v)) {
        snprintf(buf, n, "%s", json_is_true(v) ? "yes" : "no");
    } else {
        snprintf(buf, n, "-");
    }
    return buf;
}

static const char *cell_time(const json_t *o, const char *field, char *buf, size_t n)
{
    const json_t *v = json_object_get(o, field);
    if (!json_is_integer(v)) {
        return cell_text(o, field, buf, n);
    }
    kmsctl_time_format((int64_t)json_integer_value(v), buf, n);
    return buf;
}

static const char *cell_duration(const json_t *o, const char *field, char *buf, size_t n)
{
    const json_t *v = json_object_get(o, field);
    if (!json_is_integer(v)) {
        return cell_text(o, field, buf, n);
    }
    kmsctl_duration_format((int64_t)json_integer_value(v), buf, n);
    return buf;
}

typedef enum { COL_TEXT, COL_TIME, COL_DURATION } col_kind;

typedef struct {
    const char *header;
    const char *field;
    col_kind kind;
} column;

static KMS_RESULT print_array(const json_t *arr, const column *cols, size_t ncols, FILE *f)
{
    KMS_ENSURE(json_is_array(arr), KMS_ERR_JSON_INVALID);
    KMS_ENSURE(ncols <= KMSCTL_TABLE_MAX_COLS, KMS_ERR_INTERNAL);
    const char *headers[KMSCTL_TABLE_MAX_COLS];
    for (size_t c = 0; c < ncols; c++) {
        headers[c] = cols[c].header;
    }
    kmsctl_table *t = NULL;
    KMS_GUARD(kmsctl_table_new(headers, ncols, &t));
    size_t i;
    const json_t *item;
    kms_result r = KMS_OK_RESULT;
    json_array_foreach(arr, i, item)
    {
        char bufs[KMSCTL_TABLE_MAX_COLS][CELL_BYTES];
        const char *cells[KMSCTL_TABLE_MAX_COLS];
        for (size_t c = 0; c < ncols; c++) {
            switch (cols[c].kind) {
            case COL_TIME:
                cells[c] = cell_time(item, cols[c].field, bufs[c], CELL_BYTES);
                break;
            case COL_DURATION:
                cells[c] = cell_duration(item, cols[c].field, bufs[c], CELL_BYTES);
                break;
            case COL_TEXT:
            default:
                cells[c] = cell_text(item, cols[c].field, bufs[c], CELL_BYTES);
                break;
            }
        }
        r = kmsctl_table_add(t, cells);
        if (!kms_is_ok(r)) {
            break;
        }
    }
    if (kms_is_ok(r)) {
        kmsctl_table_print(t, f);
    }
    kmsctl_table_free(t);
    return r;
}

KMS_RESULT kmsctl_print_versions(const json_t *versions, FILE *f)
{
    static const column cols[] = {
        {"VERSION", "version", COL_TEXT},          {"STATE", "state", COL_TEXT},
        {"CREATED", "created_at", COL_TIME},       {"PRIMARY SINCE", "primary_at", COL_TIME},
        {"DEPRECATED", "deprecated_at", COL_TIME}, {"GRACE UNTIL", "grace_until", COL_TIME},
        {"DESTROY AT", "destroy_at", COL_TIME},    {"LAST USED", "last_used_at", COL_TIME},
        {"USES 30D", "uses_30d", COL_TEXT},        {"ENCRYPTIONS", "encryptions", COL_TEXT},
        {"MASTER", "master_version", COL_TEXT},
    };
    return print_array(versions, cols, KMS_ARRAY_LEN(cols), f);
}

KMS_RESULT kmsctl_print_keys(const json_t *keys, FILE *f)
{
    static const column cols[] = {
        {"NAME", "name", COL_TEXT},
        {"PURPOSE", "purpose", COL_TEXT},
        {"PRIMARY", "primary_version", COL_TEXT},
        {"LATEST", "latest_version", COL_TEXT},
        {"MIN DECRYPT", "min_decryption_version", COL_TEXT},
        {"ROTATION", "rotation_period", COL_DURATION},
        {"WARNING", "warning_window", COL_DURATION},
        {"PROTECTED", "deletion_protection", COL_TEXT},
        {"ROTATED", "rotated_at", COL_TIME},
    };
    return print_array(keys, cols, KMS_ARRAY_LEN(cols), f);
}

KMS_RESULT kmsctl_print_rotations(const json_t *rotations, FILE *f)
{
    static const column cols[] = {
        {"ID", "id", COL_TEXT},
        {"KEY", "key", COL_TEXT},
        {"FROM", "from_version", COL_TEXT},
        {"TO", "to_version", COL_TEXT},
        {"TYPE", "type", COL_TEXT},
        {"STATUS", "status", COL_TEXT},
        {"INITIATOR", "initiator", COL_TEXT},
        {"STARTED", "started_at", COL_TIME},
        {"FINISHED", "finished_at", COL_TIME},
        {"REASON", "reason", COL_TEXT},
    };
    return print_array(rotations, cols, KMS_ARRAY_LEN(cols), f);
}

KMS_RESULT kmsctl_print_masters(const json_t *masters, FILE *f)
{
    static const column cols[] = {
        {"VERSION", "version", COL_TEXT},
        {"CURRENT", "current", COL_TEXT},
        {"CREATED", "created_at", COL_TIME},
        {"RETIRED", "retired_at", COL_TIME},
        {"VERSIONS WRAPPED", "versions_wrapped", COL_TEXT},
    };
    return print_array(masters, cols, KMS_ARRAY_LEN(cols), f);
}

KMS_RESULT kmsctl_print_key(const json_t *key, FILE *f)
{
    static const column rows[] = {
        {"name", "name", COL_TEXT},
        {"purpose", "purpose", COL_TEXT},
        {"primary version", "primary_version", COL_TEXT},
        {"latest version", "latest_version", COL_TEXT},
        {"min decryption version", "min_decryption_version", COL_TEXT},
        {"rotation period", "rotation_period", COL_DURATION},
        {"warning window", "warning_window", COL_DURATION},
        {"deletion protection", "deletion_protection", COL_TEXT},
        {"created", "created_at", COL_TIME},
        {"rotated", "rotated_at", COL_TIME},
    };
    KMS_ENSURE(json_is_object(key), KMS_ERR_JSON_INVALID);
    const char *cells[2];
    kmsctl_table *t = NULL;
    char buf[CELL_BYTES];
    for (size_t i = 0; i < KMS_ARRAY_LEN(rows); i++) {
        switch (rows[i].kind) {
        case COL_TIME:
            cells[1] = cell_time(key, rows[i].field, buf, sizeof(buf));
            break;
        case COL_DURATION:
            cells[1] = cell_duration(key, rows[i].field, buf, sizeof(buf));
            break;
        case COL_TEXT:
        default:
            cells[1] = cell_text(key, rows[i].field, buf, sizeof(buf));
            break;
        }
        char label[64];
        snprintf(label, sizeof(label), "%s:", rows[i].header);
        cells[0] = label;
        kms_result r = t == NULL ? kmsctl_table_new(cells, 2, &t) : kmsctl_table_add(t, cells);
        if (!kms_is_ok(r)) {
            kmsctl_table_free(t);
            return r;
        }
    }
    kmsctl_table_print(t, f);
    kmsctl_table_free(t);
    const json_t *versions = json_object_get(key, "versions");
    if (json_is_array(versions)) {
        fputc('\n', f);
        KMS_GUARD(kmsctl_print_versions(versions, f));
    }
    return KMS_OK_RESULT;
}

static void print_scalar(const json_t *v, FILE *f)
{
    char buf[CELL_BYTES];
    json_t *holder = json_object();
    if (holder != NULL && json_object_set(holder, "v", (json_t *)v) == 0) {
        cell_text(holder, "v", buf, sizeof(buf));
        for (char *p = buf; *p != '\0'; p++) {
            *p = ((unsigned char)*p < 0x20 || *p == 0x7f) ? '?' : *p;
        }
        fputs(buf, f);
    }
    json_decref(holder);
}

void kmsctl_print_generic(const json_t *v, int indent, FILE *f)
{
    const char *k;
    const json_t *item;
    size_t i;
    if (json_is_object(v)) {
        json_object_foreach((json_t *)v, k, item)
        {
            char name[CELL_BYTES];
            snprintf(name, sizeof(name), "%s", k);
            for (char *p = name; *p != '\0'; p++) {
                *p = ((unsigned char)*p < 0x20 || *p == 0x7f) ? '?' : *p;
            }
            fprintf(f, "%*s%s:", indent, "", name);
            if (json_is_object(item) || (json_is_array(item) && json_array_size(item) > 0)) {
                fputc('\n', f);
                kmsctl_print_generic(item, indent + 2, f);
            } else if (json_is_array(item)) {
                fputs(" (none)\n", f);
            } else {
                fputc(' ', f);
                print_scalar(item, f);
                fputc('\n', f);
            }
        }
    } else if (json_is_array(v)) {
        json_array_foreach(v, i, item)
        {
            if (json_is_object(item) || json_is_array(item)) {
                fprintf(f, "%*s-\n", indent, "");
                kmsctl_print_generic(item, indent + 2, f);
            } else {
                fprintf(f, "%*s- ", indent, "");
                print_scalar(item, f);
                fputc('\n', f);
            }
        }
    } else {
        fprintf(f, "%*s", indent, "");
        print_scalar(v, f);
        fputc('\n', f);
    }
}
