/*
 * The rotation-operations documents: status, the monthly report, the
 * usage report of an emergency rotation, per-version recent uses. Shapes
 * in docs/api.md ("Rotation status and reports"). Times are Unix seconds,
 * zero times are null, durations are seconds.
 */
#include "kms_api_rotation.h"

#include "kms_schedule.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define KMS_DAY_SECONDS INT64_C(86400)

static json_t *time_or_null(int64_t t)
{
    return t == 0 ? json_null() : json_integer(t);
}

/* Appends v to arr; false (and v released) on failure. */
static bool push(json_t *arr, json_t *v)
{
    return v != NULL && json_array_append_new(arr, v) == 0;
}

static json_t *status_json(const kms_key_status *s)
{
    /* days_until_due rounds towards -inf: a key due in 12 hours has 0 days
     * left, one 12 hours overdue has -1. */
    int64_t d = s->seconds_until_due;
    int64_t days = d >= 0 ? d / KMS_DAY_SECONDS : -((-d + KMS_DAY_SECONDS - 1) / KMS_DAY_SECONDS);
    return json_pack("{s:s,s:I,s:I,s:I,s:o,s:I,s:I,s:I,s:b,s:b}", "name", s->name,
                     "primary_version", (json_int_t)s->primary_version, "rotation_period",
                     (json_int_t)s->rotation_period_s, "warning_window",
                     (json_int_t)s->warning_window_s, "rotated_at", time_or_null(s->rotated_at),
                     "due_at", (json_int_t)s->due_at, "seconds_until_due",
                     (json_int_t)s->seconds_until_due, "days_until_due", (json_int_t)days,
                     "due_soon", s->due_soon, "overdue", s->overdue);
}

static kms_result int_query(const char *v, const char *name, int64_t max, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    KMS_ENSURE_MSG(v[0] >= '0' && v[0] <= '9' && *end == '\0' && errno == 0 && n <= max,
                   KMS_ERR_INVALID_ARGUMENT,
                   "query parameter '%s': expected seconds, an integer <= %" PRId64, name, max);
    *out = n;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_status_doc(kms *k, const char *due_within, const char *overdue, json_t **out)
{
    kms_status_filter f = {.due_within_s = -1};
    if (due_within != NULL && due_within[0] != '\0')
        KMS_GUARD(int_query(due_within, "due_within", INT64_C(100) * 365 * KMS_DAY_SECONDS,
                            &f.due_within_s));
    if (overdue != NULL && overdue[0] != '\0') {
        KMS_ENSURE_MSG(strcmp(overdue, "true") == 0 || strcmp(overdue, "false") == 0,
                       KMS_ERR_INVALID_ARGUMENT, "query parameter 'overdue': true or false");
        f.overdue_only = strcmp(overdue, "true") == 0;
    }
    /* "now": the clock the statuses were computed against, so that a
     * reader can check them (and tests can, with an injected clock). */
    int64_t now = kms_clock_now(k);
    kms_key_status *st = NULL;
    size_t n = 0;
    KMS_GUARD(kms_status_list(k, &f, &st, &n));
    json_t *arr = json_array();
    size_t soon = 0, late = 0;
    bool ok = arr != NULL;
    for (size_t i = 0; i < n && ok; i++) {
        ok = push(arr, status_json(&st[i]));
        soon += st[i].due_soon;
        late += st[i].overdue;
    }
    free(st);
    json_t *doc = ok ? json_pack("{s:I,s:{s:I,s:I,s:I},s:o}", "now", (json_int_t)now, "summary",
                                 "keys", (json_int_t)n, "due_soon", (json_int_t)soon, "overdue",
                                 (json_int_t)late, "keys", arr)
                     : NULL;
    if (doc == NULL) {
        if (!ok)
            json_decref(arr);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    *out = doc;
    return KMS_OK_RESULT;
}

static json_t *rotation_json(const kms_rotation_info *r)
{
    int64_t dur = r->finished_at != 0 ? r->finished_at - r->started_at : -1;
    bool within = r->status != KMS_ROTATION_STARTED && r->status != KMS_ROTATION_FAILED &&
                  dur >= 0 && dur <= KMS_EMERGENCY_OBJECTIVE_S;
    return json_pack("{s:s,s:o,s:o,s:I,s:s,s:s,s:s,s:o,s:o,s:o,s:o,s:b}", "id", r->id, "key",
                     r->key[0] != '\0' ? json_string(r->key) : json_null(), "from_version",
                     r->from_version != 0 ? json_integer(r->from_version) : json_null(),
                     "to_version", (json_int_t)r->to_version, "type",
                     kms_rotation_type_name(r->type), "status", kms_rotation_status_name(r->status),
                     "initiator", r->initiator, "started_at", time_or_null(r->started_at),
                     "finished_at", time_or_null(r->finished_at), "reason",
                     r->reason[0] != '\0' ? json_string(r->reason) : json_null(), "duration",
                     dur >= 0 ? json_integer(dur) : json_null(), "within_objective", within);
}

static json_t *report_json(const char *month, const kms_report *r)
{
    json_t *types = json_object(), *statuses = json_object(), *days = json_array();
    json_t *em = json_array(), *oop = json_array(), *due = json_array();
    bool ok = types && statuses && days && em && oop && due;
    for (int t = KMS_ROTATION_SCHEDULED; ok && t <= KMS_ROTATION_MASTER; t++)
        ok = json_object_set_new(types, kms_rotation_type_name((kms_rotation_type)t),
                                 json_integer((json_int_t)r->by_type[t])) == 0;
    for (int t = KMS_ROTATION_STARTED; ok && t <= KMS_ROTATION_ROLLED_BACK; t++)
        ok = json_object_set_new(statuses, kms_rotation_status_name((kms_rotation_status)t),
                                 json_integer((json_int_t)r->by_status[t])) == 0;
    for (size_t d = 0; ok && d < r->days; d++)
        ok = push(days, json_integer((json_int_t)r->per_day[d]));
    for (size_t i = 0; ok && i < r->n_emergencies; i++)
        ok = push(em, rotation_json(&r->emergencies[i]));
    for (size_t i = 0; ok && i < r->n_out_of_policy; i++) {
        const kms_report_key *o = &r->out_of_policy[i];
        ok = push(oop, json_pack("{s:s,s:I,s:I,s:I,s:b}", "name", o->name, "rotation_period",
                                 (json_int_t)o->rotation_period_s, "overdue_since",
                                 (json_int_t)o->overdue_since, "overdue", (json_int_t)o->overdue_s,
                                 "still_overdue", o->still_overdue));
    }
    for (size_t i = 0; ok && i < r->n_due; i++)
        ok = push(due, status_json(&r->due[i]));
    json_t *doc = NULL;
    if (ok) {
        doc = json_pack("{s:s,s:I,s:I,s:I,"
                        "s:{s:I,s:O,s:O,s:o,s:{s:I,s:f,s:f,s:I},s:O},"
                        "s:{s:I,s:I,s:I,s:O},"
                        "s:{s:I,s:I,s:O},"
                        "s:{s:I,s:I,s:O}}",
                        "month", month, "from", (json_int_t)r->from, "to", (json_int_t)r->to,
                        "generated_at", (json_int_t)r->generated_at,
                        /* rotations */
                        "rotations", "total", (json_int_t)r->total, "by_type", types, "by_status",
                        statuses, "success_rate",
                        r->success_rate >= 0 ? json_real(r->success_rate) : json_null(), "duration",
                        "timed", (json_int_t)r->timed, "mean", r->mean_duration_s, "median",
                        r->median_duration_s, "max", (json_int_t)r->max_duration_s, "per_day", days,
                        /* emergency */
                        "emergency", "objective", (json_int_t)KMS_EMERGENCY_OBJECTIVE_S, "count",
                        (json_int_t)r->n_emergencies, "within_objective",
                        (json_int_t)r->emergencies_within_objective, "rotations", em,
                        /* policy */
                        "policy", "keys", (json_int_t)r->keys, "within_policy",
                        (json_int_t)r->keys_within_policy, "out_of_policy", oop,
                        /* due */
                        "due", "ahead", (json_int_t)KMS_REPORT_DUE_AHEAD_S, "overdue_now",
                        (json_int_t)r->overdue_now, "keys", due);
    }
    json_decref(types);
    json_decref(statuses);
    json_decref(days);
    json_decref(em);
    json_decref(oop);
    json_decref(due);
    return doc;
}

KMS_RESULT kms_api_report_doc(kms *k, const char *month, json_t **out)
{
    KMS_ENSURE_MSG(month != NULL && month[0] != '\0', KMS_ERR_INVALID_ARGUMENT,
                   "query parameter 'month' (YYYY-MM) is required");
    int64_t from, to;
    KMS_GUARD(kms_month_parse(month, &from, &to));
    kms_report r;
    KMS_GUARD(kms_report_build(k, from, to, &r));
    json_t *doc = report_json(month, &r);
    kms_report_free(&r);
    KMS_ENSURE(doc != NULL, KMS_ERR_NO_MEMORY);
    *out = doc;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_usage_doc(kms *k, const char *name, uint32_t version, int64_t lookback_s,
                             json_t **out)
{
    if (lookback_s <= 0)
        lookback_s = KMS_API_LOOKBACK_DEFAULT_S;
    KMS_ENSURE(lookback_s <= KMS_API_LOOKBACK_MAX_S, KMS_ERR_INVALID_ARGUMENT);
    int64_t to = kms_clock_now(k);
    int64_t from = to - lookback_s > 0 ? to - lookback_s : 1;
    kms_usage_report u;
    KMS_GUARD(kms_usage_report_build(k, name, version, from, to, &u));
    json_t *rows = json_array();
    bool ok = rows != NULL;
    uint64_t total = 0;
    for (size_t i = 0; ok && i < u.n; i++) {
        const kms_usage_row *w = &u.rows[i];
        total += w->count;
        ok = push(rows, json_pack("{s:s,s:s,s:s,s:I,s:I,s:I,s:I,s:I}", "identity", w->identity,
                                  "operation", w->operation, "source", w->source, "count",
                                  (json_int_t)w->count, "items", (json_int_t)w->items, "failures",
                                  (json_int_t)w->failures, "first", (json_int_t)w->first, "last",
                                  (json_int_t)w->last));
    }
    json_t *doc =
        ok ? json_pack("{s:I,s:I,s:I,s:I,s:I,s:b,s:o}", "version", (json_int_t)version, "from",
                       (json_int_t)u.from, "to", (json_int_t)u.to, "uses", (json_int_t)total,
                       "records_read", (json_int_t)u.records, "truncated", u.truncated, "by", rows)
           : NULL;
    kms_usage_report_free(&u);
    if (doc == NULL) {
        if (!ok)
            json_decref(rows);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    *out = doc;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_uses_param(const char *uses)
{
    KMS_ENSURE_MSG(uses == NULL || strcmp(uses, "true") == 0 || strcmp(uses, "false") == 0,
                   KMS_ERR_INVALID_ARGUMENT, "query parameter 'uses': true or false");
    return KMS_OK_RESULT;
}

void kms_api_versions_add_uses(kms *k, const char *name, json_t *versions)
{
    size_t n = json_array_size(versions);
    if (n == 0 || n > UINT32_MAX)
        return;
    uint64_t *uses = NULL;
    kms_result r = kms_version_recent_uses(k, name, (uint32_t)n, 0, &uses);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(versions, i);
        json_int_t ver = json_integer_value(json_object_get(v, "version"));
        json_t *val = kms_is_ok(r) && ver >= 1 && (size_t)ver <= n
                          ? json_integer((json_int_t)uses[ver - 1])
                          : json_null();
        json_object_set_new(v, "uses_30d", val);
    }
    free(uses);
}
