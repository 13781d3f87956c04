/*
 * Rotation operations: the scheduler's tick, the rotation status of every
 * key, and the monthly compliance report (see kms_schedule.h). Time comes
 * from the configured clock only (kms_now), so every rule here is tested
 * by moving an injected clock.
 */
#include "kms_schedule.h"

#include "kms_internal.h"
#include "kms_secmem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMS_JITTER_DEFAULT_S INT64_C(3600)
#define KMS_TICK_ROTATIONS   32
#define KMS_LIST_PAGE        1000
#define KMS_LIST_PAGES_MAX   4096 /* 4 million keys: a bound, not a limit anyone meets */
#define KMS_SWEEP_MAX        4096 /* version transitions persisted per tick */

/* ---------------------------------------------------------------------- */
/* Status                                                                  */

int64_t kms_clock_now(kms *k)
{
    return kms_now(k);
}

void kms_key_status_fill(const kms_key_info *ki, int64_t now, kms_key_status *out)
{
    memset(out, 0, sizeof(*out));
    memcpy(out->name, ki->name, sizeof(out->name));
    out->primary_version = ki->primary_version;
    out->rotation_period_s = ki->rotation_period_s;
    out->warning_window_s = ki->warning_window_s;
    out->rotated_at = ki->rotated_at;
    out->due_at = ki->rotated_at + ki->rotation_period_s;
    out->seconds_until_due = out->due_at - now;
    out->overdue = now >= out->due_at;
    out->due_soon = !out->overdue && now >= out->due_at - ki->warning_window_s;
}

/* Every key, in name order, page by page. */
static kms_result kms_keys_all(kms *k, kms_key_info **out, size_t *n)
{
    kms_key_info *all = NULL;
    size_t cnt = 0;
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    for (int page = 0; page < KMS_LIST_PAGES_MAX; page++) {
        kms_key_info *keys = NULL;
        size_t got = 0;
        kms_result r = kms_key_list(k, after[0] != '\0' ? after : NULL, KMS_LIST_PAGE, &keys, &got);
        if (!kms_is_ok(r)) {
            free(all);
            return r;
        }
        if (got > 0) {
            kms_key_info *grown = realloc(all, (cnt + got) * sizeof(*grown));
            if (grown == NULL) {
                free(keys);
                free(all);
                KMS_BAIL(KMS_ERR_NO_MEMORY);
            }
            all = grown;
            memcpy(all + cnt, keys, got * sizeof(*keys));
            cnt += got;
            memcpy(after, keys[got - 1].name, sizeof(after));
        }
        free(keys);
        if (got < KMS_LIST_PAGE)
            break;
    }
    *out = all;
    *n = cnt;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_status_list(kms *k, const kms_status_filter *f, kms_key_status **out, size_t *n)
{
    KMS_ENSURE(k != NULL && out != NULL && n != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_key_info *keys = NULL;
    size_t nk = 0;
    KMS_GUARD(kms_keys_all(k, &keys, &nk));
    kms_key_status *st = calloc(nk ? nk : 1, sizeof(*st));
    if (st == NULL) {
        free(keys);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    int64_t now = kms_now(k);
    size_t m = 0;
    for (size_t i = 0; i < nk; i++) {
        kms_key_status s;
        kms_key_status_fill(&keys[i], now, &s);
        if (f != NULL && f->overdue_only && !s.overdue)
            continue;
        if (f != NULL && f->due_within_s >= 0 && s.seconds_until_due > f->due_within_s)
            continue;
        st[m++] = s;
    }
    free(keys);
    *out = st;
    *n = m;
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Scheduler                                                               */

int64_t kms_schedule_lead(const char *name, int64_t window_s, int64_t warning_s)
{
    int64_t w = window_s == 0 ? KMS_JITTER_DEFAULT_S : window_s;
    if (w > warning_s)
        w = warning_s; /* never earlier than the warning window: a key is not rotated
                          before anyone was told it was coming due */
    if (w <= 0)
        return 0;
    /* FNV-1a: stable across processes and restarts, so every process that
     * might run the scheduler agrees on each key's slot. */
    uint64_t h = UINT64_C(14695981039346656037);
    for (const char *p = name; *p != '\0'; p++)
        h = (h ^ (uint8_t)*p) * UINT64_C(1099511628211);
    return (int64_t)(h % (uint64_t)w);
}

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    int64_t at; /* when the scheduler rotates it */
} kms_due_key;

static int kms_due_cmp(const void *a, const void *b)
{
    const kms_due_key *x = a, *y = b;
    if (x->at != y->at)
        return x->at < y->at ? -1 : 1;
    return strcmp(x->name, y->name);
}

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    bool destroy; /* else: grace expired */
} kms_sweep_item;

typedef struct {
    int64_t now;
    kms_sweep_item *items;
    size_t n;
} kms_sweep_scan;

static kms_result kms_sweep_scan_fn(const uint8_t *key, size_t klen, const uint8_t *val,
                                    size_t vlen, void *arg, bool *stop)
{
    kms_sweep_scan *s = arg;
    kms_rec_version rec;
    KMS_GUARD(kms_rec_version_decode(val, vlen, &rec));
    bool destroy = kms_version_destroy_due(&rec, s->now);
    bool grace =
        rec.state == KMS_VERSION_DEPRECATED && rec.grace_until != 0 && s->now >= rec.grace_until;
    kms_secmem_wipe(&rec, sizeof(rec));
    if (!destroy && !grace)
        return KMS_OK_RESULT;
    kms_sweep_item *it = &s->items[s->n];
    KMS_ENSURE(kms_rec_version_key_split(key, klen, it->name, &it->version), KMS_ERR_STORE_CORRUPT);
    it->destroy = destroy;
    if (++s->n == KMS_SWEEP_MAX)
        *stop = true; /* the rest on the next tick */
    return KMS_OK_RESULT;
}

static kms_result kms_sweep_scan_txn(kms_txn *t, void *arg)
{
    ((kms_sweep_scan *)arg)->n = 0;
    return kms_txn_scan(t, KMS_DB_VERSIONS, NULL, 0, NULL, 0, kms_sweep_scan_fn, arg);
}

static kms_result kms_schedule_sweep(kms *k, int64_t now, kms_schedule_result *res)
{
    kms_sweep_scan s = {.now = now, .items = calloc(KMS_SWEEP_MAX, sizeof(kms_sweep_item))};
    KMS_ENSURE(s.items != NULL, KMS_ERR_NO_MEMORY);
    kms_result r = kms_store_read(k->store, kms_sweep_scan_txn, &s);
    kms_result first = r;
    for (size_t i = 0; kms_is_ok(r) && i < s.n; i++) {
        kms_result one;
        if (s.items[i].destroy) {
            /* Irreversible; kms_version_destroy_now decides again in its
             * own transaction (a cancel may have won the race). */
            pthread_mutex_lock(&k->admin_mu);
            one = kms_version_destroy_now(k, s.items[i].name, s.items[i].version);
            pthread_mutex_unlock(&k->admin_mu);
            if (kms_is_ok(one))
                res->destroyed++;
        } else {
            bool changed = false;
            pthread_mutex_lock(&k->admin_mu);
            one = kms_version_expire_now(k, s.items[i].name, s.items[i].version, now, &changed);
            pthread_mutex_unlock(&k->admin_mu);
            if (kms_is_ok(one) && changed)
                res->grace_expired++;
        }
        /* One version's failure does not hold up the others. */
        if (!kms_is_ok(one) && kms_is_ok(first))
            first = one;
    }
    free(s.items);
    return first;
}

KMS_RESULT kms_schedule_tick(kms *k, const kms_schedule_opts *opts, kms_schedule_result *out)
{
    KMS_ENSURE(k != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(out, 0, sizeof(*out));
    int64_t window = opts != NULL ? opts->jitter_window_s : 0;
    size_t max =
        opts != NULL && opts->max_rotations != 0 ? opts->max_rotations : KMS_TICK_ROTATIONS;
    kms_key_info *keys = NULL;
    size_t nk = 0;
    KMS_GUARD(kms_keys_all(k, &keys, &nk));
    kms_due_key *due = calloc(nk ? nk : 1, sizeof(*due));
    if (due == NULL) {
        free(keys);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    int64_t now = kms_now(k);
    size_t nd = 0;
    for (size_t i = 0; i < nk; i++) {
        const kms_key_info *ki = &keys[i];
        if (ki->rotation_period_s <= 0)
            continue;
        int64_t at = ki->rotated_at + ki->rotation_period_s -
                     kms_schedule_lead(ki->name, window, ki->warning_window_s);
        if (now >= at) {
            memcpy(due[nd].name, ki->name, sizeof(due[nd].name));
            due[nd++].at = at;
        } else if (out->next_due_at == 0 || at < out->next_due_at) {
            out->next_due_at = at;
        }
    }
    out->keys = nk;
    free(keys);
    /* The longest overdue first, so a backlog is worked off fairly. */
    qsort(due, nd, sizeof(*due), kms_due_cmp);
    kms_result r = KMS_OK_RESULT;
    for (size_t i = 0; i < nd; i++) {
        if (out->rotated + out->failed >= max) {
            out->deferred = nd - i;
            break;
        }
        bool rotated = false;
        kms_rotation_info ri;
        kms_result rr = kms_key_rotate_if_due(k, due[i].name, window, &ri, &rotated);
        if (!kms_is_ok(rr)) {
            /* Recorded as a failed rotation and retried on a later tick.
             * The rest wait too: a failure is most often the HSM's, and
             * trying every due key against a device that is down would
             * only add a failed record per key per tick. */
            out->failed++;
            out->deferred = nd - i - 1;
            if (opts != NULL && opts->notify != NULL)
                opts->notify(opts->notify_arg, due[i].name, NULL, rr.err);
            else
                fprintf(stderr, "kms: warning: scheduled rotation of %s failed: %s\n", due[i].name,
                        kms_error_code(rr.err));
            r = rr;
            break;
        } else if (rotated) {
            out->rotated++;
            if (opts != NULL && opts->notify != NULL)
                opts->notify(opts->notify_arg, due[i].name, &ri, KMS_OK);
        } else {
            out->skipped++;
        }
    }
    free(due);
    kms_result sr = kms_schedule_sweep(k, now, out);
    if (kms_is_ok(r))
        r = sr;
    return r;
}

/* ---------------------------------------------------------------------- */
/* Monthly report                                                          */

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
 * days_from_civil), so that the month boundaries do not depend on TZ. */
static int64_t kms_days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

KMS_RESULT kms_month_parse(const char *s, int64_t *from, int64_t *to)
{
    KMS_ENSURE(s != NULL && from != NULL && to != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(strlen(s) == 7 && s[4] == '-', KMS_ERR_INVALID_ARGUMENT,
                   "month: expected YYYY-MM");
    for (int i = 0; i < 7; i++)
        KMS_ENSURE_MSG(i == 4 || (s[i] >= '0' && s[i] <= '9'), KMS_ERR_INVALID_ARGUMENT,
                       "month: expected YYYY-MM");
    int64_t y = (s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10 + (s[3] - '0');
    unsigned m = (unsigned)((s[5] - '0') * 10 + (s[6] - '0'));
    KMS_ENSURE_MSG(y >= 1970 && m >= 1 && m <= 12, KMS_ERR_INVALID_ARGUMENT,
                   "month: year from 1970, month 01 to 12");
    *from = kms_days_from_civil(y, m, 1) * KMS_DAY_S;
    *to =
        (m == 12 ? kms_days_from_civil(y + 1, 1, 1) : kms_days_from_civil(y, m + 1, 1)) * KMS_DAY_S;
    return KMS_OK_RESULT;
}

typedef struct {
    int64_t last_change; /* when the primary last changed, as of the scan */
    int64_t longest_s;
    int64_t longest_since;
    bool exists;
} kms_key_track;

typedef struct {
    kms_report *rep;
    kms_key_info *keys;
    size_t nkeys;
    kms_key_track *track;
    int64_t end; /* min(to, now): the compliance horizon */
    int64_t *durations;
    size_t ndur, capdur;
    size_t capem;
} kms_report_scan;

static int kms_key_name_cmp(const void *name, const void *ki)
{
    return strcmp(name, ((const kms_key_info *)ki)->name);
}

/* The stretch [last + period, until) in which the key was overdue, clipped
 * to the report period; the longest one is kept. */
static void kms_track_gap(kms_report_scan *s, size_t i, int64_t until)
{
    kms_key_track *t = &s->track[i];
    int64_t start = t->last_change + s->keys[i].rotation_period_s;
    if (start < s->rep->from)
        start = s->rep->from;
    if (until > s->end)
        until = s->end;
    if (until > start && until - start > t->longest_s) {
        t->longest_s = until - start;
        t->longest_since = start;
    }
}

static kms_result kms_report_scan_fn(const uint8_t *key, size_t klen, const uint8_t *val,
                                     size_t vlen, void *arg, bool *stop)
{
    (void)key;
    (void)klen;
    kms_report_scan *s = arg;
    kms_report *rep = s->rep;
    kms_rec_rotation rr;
    KMS_GUARD(kms_rec_rotation_decode(val, vlen, &rr));
    const kms_rotation_info *ri = &rr.info;
    if (ri->started_at >= rep->to) {
        *stop = true;
        return KMS_OK_RESULT;
    }
    /* Compliance: every succeeded change of a key's primary (rotations,
     * rollbacks, and rotations later rolled back) moves rotated_at. */
    if (ri->type != KMS_ROTATION_MASTER &&
        (ri->status == KMS_ROTATION_SUCCEEDED || ri->status == KMS_ROTATION_ROLLED_BACK)) {
        const kms_key_info *ki =
            s->nkeys == 0 ? NULL
                          : bsearch(ri->key, s->keys, s->nkeys, sizeof(*s->keys), kms_key_name_cmp);
        if (ki != NULL) {
            size_t i = (size_t)(ki - s->keys);
            int64_t at = ri->finished_at != 0 ? ri->finished_at : ri->started_at;
            if (at >= s->track[i].last_change) {
                kms_track_gap(s, i, at);
                s->track[i].last_change = at;
            }
        }
    }
    if (ri->started_at < rep->from)
        return KMS_OK_RESULT;
    rep->total++;
    if (ri->type >= 1 && ri->type <= KMS_ROTATION_MASTER)
        rep->by_type[ri->type]++;
    if (ri->status >= 1 && ri->status <= KMS_ROTATION_ROLLED_BACK)
        rep->by_status[ri->status]++;
    int64_t day = (ri->started_at - rep->from) / KMS_DAY_S;
    if (day >= 0 && day < KMS_REPORT_DAYS_MAX)
        rep->per_day[day]++;
    if (ri->status != KMS_ROTATION_STARTED && ri->finished_at >= ri->started_at) {
        if (s->ndur == s->capdur) {
            size_t cap = s->capdur ? s->capdur * 2 : 64;
            int64_t *d = realloc(s->durations, cap * sizeof(*d));
            KMS_ENSURE(d != NULL, KMS_ERR_NO_MEMORY);
            s->durations = d;
            s->capdur = cap;
        }
        s->durations[s->ndur++] = ri->finished_at - ri->started_at;
    }
    if (ri->type == KMS_ROTATION_EMERGENCY) {
        if (rep->n_emergencies == s->capem) {
            size_t cap = s->capem ? s->capem * 2 : 8;
            kms_rotation_info *e = realloc(rep->emergencies, cap * sizeof(*e));
            KMS_ENSURE(e != NULL, KMS_ERR_NO_MEMORY);
            rep->emergencies = e;
            s->capem = cap;
        }
        rep->emergencies[rep->n_emergencies++] = *ri;
        if (ri->status != KMS_ROTATION_STARTED && ri->status != KMS_ROTATION_FAILED &&
            ri->finished_at - ri->started_at <= KMS_EMERGENCY_OBJECTIVE_S)
            rep->emergencies_within_objective++;
    }
    return KMS_OK_RESULT;
}

static kms_result kms_report_scan_txn(kms_txn *t, void *arg)
{
    /* A read transaction runs once (no map-growth retry), so the scan may
     * accumulate into arg. */
    return kms_txn_scan(t, KMS_DB_ROTATIONS, NULL, 0, NULL, 0, kms_report_scan_fn, arg);
}

static int kms_i64_cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

void kms_report_free(kms_report *r)
{
    if (r == NULL)
        return;
    free(r->emergencies);
    free(r->out_of_policy);
    free(r->due);
    memset(r, 0, sizeof(*r));
}

static kms_result kms_report_fill(kms *k, kms_report *rep, kms_report_scan *s)
{
    KMS_GUARD(kms_keys_all(k, &s->keys, &s->nkeys));
    s->track = calloc(s->nkeys ? s->nkeys : 1, sizeof(*s->track));
    KMS_ENSURE(s->track != NULL, KMS_ERR_NO_MEMORY);
    for (size_t i = 0; i < s->nkeys; i++) {
        s->track[i].last_change = s->keys[i].created_at;
        s->track[i].exists = s->keys[i].created_at < rep->to;
    }
    KMS_GUARD(kms_store_read(k->store, kms_report_scan_txn, s));

    size_t finished = rep->by_status[KMS_ROTATION_SUCCEEDED] + rep->by_status[KMS_ROTATION_FAILED] +
                      rep->by_status[KMS_ROTATION_ROLLED_BACK];
    rep->success_rate =
        finished ? (double)rep->by_status[KMS_ROTATION_SUCCEEDED] / (double)finished : -1.0;
    rep->timed = s->ndur;
    if (s->ndur > 0) {
        qsort(s->durations, s->ndur, sizeof(*s->durations), kms_i64_cmp);
        double sum = 0;
        for (size_t i = 0; i < s->ndur; i++)
            sum += (double)s->durations[i];
        rep->mean_duration_s = sum / (double)s->ndur;
        rep->median_duration_s =
            s->ndur % 2
                ? (double)s->durations[s->ndur / 2]
                : ((double)s->durations[s->ndur / 2 - 1] + (double)s->durations[s->ndur / 2]) / 2.0;
        rep->max_duration_s = s->durations[s->ndur - 1];
    }

    rep->out_of_policy = calloc(s->nkeys ? s->nkeys : 1, sizeof(*rep->out_of_policy));
    KMS_ENSURE(rep->out_of_policy != NULL, KMS_ERR_NO_MEMORY);
    for (size_t i = 0; i < s->nkeys; i++) {
        if (!s->track[i].exists)
            continue;
        rep->keys++;
        /* The stretch still open at the end of the period. */
        kms_track_gap(s, i, s->end);
        kms_key_track *t = &s->track[i];
        if (t->longest_s == 0) {
            rep->keys_within_policy++;
            continue;
        }
        kms_report_key *o = &rep->out_of_policy[rep->n_out_of_policy++];
        memcpy(o->name, s->keys[i].name, sizeof(o->name));
        o->rotation_period_s = s->keys[i].rotation_period_s;
        o->overdue_since = t->longest_since;
        o->overdue_s = t->longest_s;
        o->still_overdue = t->last_change + s->keys[i].rotation_period_s < s->end;
    }

    kms_status_filter f = {.due_within_s = KMS_REPORT_DUE_AHEAD_S};
    KMS_GUARD(kms_status_list(k, &f, &rep->due, &rep->n_due));
    for (size_t i = 0; i < rep->n_due; i++)
        if (rep->due[i].overdue)
            rep->overdue_now++;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_report_build(kms *k, int64_t from, int64_t to, kms_report *out)
{
    KMS_ENSURE(k != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(from >= 0 && to > from && to - from <= KMS_REPORT_DAYS_MAX * KMS_DAY_S,
                   KMS_ERR_INVALID_ARGUMENT, "report period: at most %d days", KMS_REPORT_DAYS_MAX);
    memset(out, 0, sizeof(*out));
    out->from = from;
    out->to = to;
    out->generated_at = kms_now(k);
    out->days = (size_t)((to - from + KMS_DAY_S - 1) / KMS_DAY_S);
    out->success_rate = -1.0;
    kms_report_scan s = {.rep = out};
    s.end = to < out->generated_at ? to : out->generated_at;
    kms_result r = kms_report_fill(k, out, &s);
    free(s.keys);
    free(s.track);
    free(s.durations);
    if (!kms_is_ok(r))
        kms_report_free(out);
    return r;
}
