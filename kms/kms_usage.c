/*
 * Who used a key version, from the audit log (kms_audit.h): the usage
 * report of an emergency rotation, and the per-version "uses in the last
 * 30 days" shown before retiring a version.
 *
 * Why the audit log and not counters of our own: the log already holds one
 * durable record per request from every process sharing the store, with
 * the identity, the source address and the version, so the numbers are
 * exact across worker processes and restarts and cost nothing on the data
 * path; refused requests count too (a refused decrypt under a disabled
 * version says the version is still needed). The price is a scan of the
 * look-back window (found by bisection, then read page by page, bounded by
 * KMS_USAGE_SCAN_MAX; a report that hit the bound says so), paid only when
 * someone asks: an emergency rotation, or GET /v1/keys/{name}?uses=true
 * (kmsctl key show).
 */
#include "kms_audit.h"
#include "kms_schedule.h"

#include "kms_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMS_USAGE_SCAN_MAX  2000000 /* records per report */
#define KMS_USAGE_ROWS_MAX  100000
#define KMS_RECENT_WINDOW_S (30 * KMS_DAY_S)
#define KMS_USAGE_SKEW_S    300

/* Only data operations are uses of a version ("unwrap", "batch.unwrap",
 * ...); the admin records that name it (the rotation that created or
 * compromised it) are not. */
static bool kms_usage_is_data_op(const char *operation)
{
    static const char batch[] = "batch.";
    if (strncmp(operation, batch, sizeof(batch) - 1) == 0)
        operation += sizeof(batch) - 1;
    kms_op op;
    return kms_is_ok(kms_op_parse(operation, &op));
}

/* The last seq before the look-back window, found by bisection on the
 * records' times so that a report over the last week of a log kept for
 * years does not read the years. Times are in append order up to the
 * group-commit skew between processes; KMS_USAGE_SKEW_S of slack keeps a
 * record just inside the window from being skipped (the time filter of
 * the query then drops what is before it). */
static kms_result kms_usage_start_seq(kms *k, int64_t from, uint64_t *after)
{
    *after = 0;
    uint64_t head = 0;
    uint8_t hash[KMS_AUDIT_HASH_BYTES];
    KMS_GUARD(kms_audit_head_get(k, &head, hash));
    uint64_t lo = 0, hi = head; /* invariant: records <= lo are before the window */
    for (int i = 0; i < 64 && hi > lo + 1; i++) {
        uint64_t mid = lo + (hi - lo) / 2;
        kms_audit_filter f = {.after_seq = mid - 1, .limit = 1};
        kms_audit_record *r = NULL;
        size_t n = 0;
        KMS_GUARD(kms_audit_query(k, &f, &r, &n));
        /* Pruned records (mid below the first kept) read as the first kept. */
        bool before = n == 1 && r[0].time < from - KMS_USAGE_SKEW_S;
        uint64_t seq = n == 1 ? r[0].seq : mid;
        free(r);
        if (n == 0)
            break;
        if (before)
            lo = seq;
        else
            hi = mid;
    }
    *after = lo;
    return KMS_OK_RESULT;
}

typedef kms_result (*kms_usage_visit)(const kms_audit_record *r, void *arg);

/* Every audit record of key `name` in [from, to], page by page. */
static kms_result kms_usage_scan(kms *k, const char *name, int64_t from, int64_t to,
                                 kms_usage_visit fn, void *arg, uint64_t *records, bool *truncated)
{
    kms_audit_filter f = {.from = from, .to = to, .key = name, .limit = KMS_AUDIT_QUERY_MAX};
    *records = 0;
    *truncated = false;
    KMS_GUARD(kms_usage_start_seq(k, from, &f.after_seq));
    for (;;) {
        kms_audit_record *recs = NULL;
        size_t n = 0;
        KMS_GUARD(kms_audit_query(k, &f, &recs, &n));
        kms_result r = KMS_OK_RESULT;
        for (size_t i = 0; i < n && kms_is_ok(r); i++)
            r = fn(&recs[i], arg);
        if (n > 0)
            f.after_seq = recs[n - 1].seq;
        free(recs);
        KMS_GUARD(r);
        *records += n;
        if (n < f.limit)
            return KMS_OK_RESULT;
        if (*records >= KMS_USAGE_SCAN_MAX) {
            *truncated = true;
            return KMS_OK_RESULT;
        }
    }
}

typedef struct {
    kms_usage_report *rep;
    uint32_t version;
    size_t cap;
} kms_usage_agg;

/* The source address without the port: the port changes with every
 * connection and would split one client into many rows.
 * "127.0.0.1:5000" -> "127.0.0.1", "[::1]:5000" -> "::1". */
static void kms_usage_source(const char *in, char out[KMS_USAGE_SOURCE_BYTES])
{
    snprintf(out, KMS_USAGE_SOURCE_BYTES, "%s", in);
    char *colon = strrchr(out, ':');
    if (out[0] == '[') {
        char *close = strchr(out, ']');
        if (close != NULL) {
            *close = '\0';
            memmove(out, out + 1, strlen(out + 1) + 1);
        }
    } else if (colon != NULL && strchr(out, ':') == colon) {
        *colon = '\0';
    }
}

static kms_result kms_usage_add(const kms_audit_record *r, void *arg)
{
    kms_usage_agg *a = arg;
    kms_usage_report *rep = a->rep;
    if (!kms_usage_is_data_op(r->operation))
        return KMS_OK_RESULT;
    if (a->version != 0 && r->version != a->version)
        return KMS_OK_RESULT;
    char source[KMS_USAGE_SOURCE_BYTES];
    kms_usage_source(r->source, source);
    /* Linear in the rows: they are identity x operation x address, few
     * even when the requests are many. */
    kms_usage_row *row = NULL;
    for (size_t i = 0; i < rep->n && row == NULL; i++) {
        kms_usage_row *c = &rep->rows[i];
        if (strcmp(c->identity, r->identity) == 0 && strcmp(c->operation, r->operation) == 0 &&
            strcmp(c->source, source) == 0)
            row = c;
    }
    if (row == NULL) {
        KMS_ENSURE(rep->n < KMS_USAGE_ROWS_MAX, KMS_ERR_LIMIT_EXCEEDED);
        if (rep->n == a->cap) {
            size_t cap = a->cap ? a->cap * 2 : 16;
            kms_usage_row *g = realloc(rep->rows, cap * sizeof(*g));
            KMS_ENSURE(g != NULL, KMS_ERR_NO_MEMORY);
            rep->rows = g;
            a->cap = cap;
        }
        row = &rep->rows[rep->n++];
        memset(row, 0, sizeof(*row));
        snprintf(row->identity, sizeof(row->identity), "%s", r->identity);
        snprintf(row->operation, sizeof(row->operation), "%s", r->operation);
        memcpy(row->source, source, sizeof(row->source));
        row->first = r->time;
    }
    row->count++;
    row->items += r->items != 0 ? r->items : 1;
    if (strcmp(r->result, "ok") != 0)
        row->failures++;
    if (r->time < row->first)
        row->first = r->time;
    if (r->time > row->last)
        row->last = r->time;
    return KMS_OK_RESULT;
}

static int kms_usage_row_cmp(const void *a, const void *b)
{
    const kms_usage_row *x = a, *y = b;
    int c = strcmp(x->identity, y->identity);
    if (c == 0)
        c = strcmp(x->operation, y->operation);
    if (c == 0)
        c = strcmp(x->source, y->source);
    return c;
}

KMS_RESULT kms_usage_report_build(kms *k, const char *name, uint32_t version, int64_t from,
                                  int64_t to, kms_usage_report *out)
{
    KMS_ENSURE(k != NULL && name != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(kms_key_name_valid(name, strnlen(name, KMS_KEY_NAME_MAX_BYTES + 1)),
               KMS_ERR_KEY_NAME_INVALID);
    memset(out, 0, sizeof(*out));
    out->from = from;
    out->to = to;
    kms_usage_agg a = {.rep = out, .version = version};
    kms_result r =
        kms_usage_scan(k, name, from, to, kms_usage_add, &a, &out->records, &out->truncated);
    if (!kms_is_ok(r)) {
        kms_usage_report_free(out);
        return r;
    }
    if (out->n > 1)
        qsort(out->rows, out->n, sizeof(*out->rows), kms_usage_row_cmp);
    return KMS_OK_RESULT;
}

void kms_usage_report_free(kms_usage_report *r)
{
    if (r == NULL)
        return;
    free(r->rows);
    memset(r, 0, sizeof(*r));
}

typedef struct {
    uint64_t *uses;
    uint32_t versions;
} kms_recent_agg;

static kms_result kms_recent_add(const kms_audit_record *r, void *arg)
{
    kms_recent_agg *a = arg;
    /* Attempts count as well as successes: a refused decrypt under a
     * disabled version says the version is still needed. */
    if (kms_usage_is_data_op(r->operation) && r->version >= 1 && r->version <= a->versions)
        a->uses[r->version - 1] += r->items != 0 ? r->items : 1;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_version_recent_uses(kms *k, const char *name, uint32_t versions, int64_t window_s,
                                   uint64_t **out)
{
    KMS_ENSURE(k != NULL && name != NULL && out != NULL && versions > 0, KMS_ERR_INVALID_ARGUMENT);
    kms_recent_agg a = {.uses = calloc(versions, sizeof(uint64_t)), .versions = versions};
    KMS_ENSURE(a.uses != NULL, KMS_ERR_NO_MEMORY);
    int64_t now = kms_now(k);
    int64_t from = now - (window_s > 0 ? window_s : KMS_RECENT_WINDOW_S);
    uint64_t records;
    bool truncated;
    kms_result r =
        kms_usage_scan(k, name, from > 0 ? from : 1, now, kms_recent_add, &a, &records, &truncated);
    if (!kms_is_ok(r)) {
        free(a.uses);
        return r;
    }
    *out = a.uses;
    return KMS_OK_RESULT;
}
