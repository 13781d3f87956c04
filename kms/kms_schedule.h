/*
 * Rotation operations on top of the keyring (kms.h): the scheduler's tick,
 * the rotation status of every key, the usage report of a version from the
 * audit log, and the monthly compliance report. Everything here reads time
 * from the configured clock (kms_config.clock), so tests move time forward
 * instead of sleeping.
 */
#ifndef KMS_SCHEDULE_H
#define KMS_SCHEDULE_H

#include "kms.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The configured clock's now (kms_config.clock, else time(NULL)). */
int64_t kms_clock_now(kms *k);

/* ---- status ---- */

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t primary_version;
    int64_t rotation_period_s;
    int64_t warning_window_s;
    int64_t rotated_at;        /* when the primary last changed */
    int64_t due_at;            /* rotated_at + rotation_period_s */
    int64_t seconds_until_due; /* negative once overdue */
    bool due_soon;             /* inside the warning window, not yet overdue */
    bool overdue;              /* the rotation period has run out */
} kms_key_status;

typedef struct {
    /* Only keys due within this many seconds from now (overdue keys
     * included); negative = every key. */
    int64_t due_within_s;
    bool overdue_only;
} kms_status_filter;

/* The status of every key (name order) that passes f (NULL: all) at the
 * configured clock's now. *out is malloc'd; free() it. */
KMS_RESULT kms_status_list(kms *k, const kms_status_filter *f, kms_key_status **out, size_t *n);
/* One key's status at now (pure; exposed for tests and the report). */
void kms_key_status_fill(const kms_key_info *ki, int64_t now, kms_key_status *out);

/* ---- scheduler ---- */

typedef struct {
    /* Keys due together are spread over a window before their due time:
     * each key is rotated jitter(name) seconds early, jitter in
     * [0, min(jitter_window_s, the key's warning window)). 0 = 1 hour;
     * negative = no jitter. */
    int64_t jitter_window_s;
    /* At most this many rotations per tick, so that a backlog (after a
     * long outage) is worked off over several ticks. 0 = 32. */
    size_t max_rotations;
    /* Called after each scheduled rotation (ri set, err KMS_OK) and each
     * failed one (ri NULL), for the daemon's log; may be NULL. */
    void (*notify)(void *arg, const char *key, const kms_rotation_info *ri, kms_err err);
    void *notify_arg;
} kms_schedule_opts;

typedef struct {
    size_t keys;    /* keys examined */
    size_t rotated; /* scheduled rotations done */
    size_t skipped; /* due when listed, not due in the transaction */
    /* Rotations that failed (recorded as failed); the first failure ends
     * the tick's rotations. */
    size_t failed;
    size_t deferred;      /* due, left for the next tick (max_rotations, or after a failure) */
    size_t grace_expired; /* deprecated versions disabled */
    size_t destroyed;     /* versions whose destruction came due */
    int64_t next_due_at;  /* earliest time a key becomes due; 0 if none */
} kms_schedule_result;

/* One pass of the scheduler: rotates (type scheduled, initiator system)
 * every key whose period has run out (less its jitter); persists the end
 * of deprecation grace periods (deprecated -> disabled) and destructions
 * that have come due. Restart-safe and never twice: "due" is decided from
 * the key's rotated_at inside the write transaction that makes the new
 * version primary, so two processes, or a tick repeated after a crash,
 * rotate a key once per period. opts may be NULL. */
KMS_RESULT kms_schedule_tick(kms *k, const kms_schedule_opts *opts, kms_schedule_result *out);

/* The jitter of a key: seconds before its due time the scheduler rotates
 * it (a stable hash of the name, below min(window, warning_s)). */
int64_t kms_schedule_lead(const char *name, int64_t window_s, int64_t warning_s);

/* ---- usage of a version, from the audit log ---- */

#define KMS_USAGE_SOURCE_BYTES    64
#define KMS_USAGE_OPERATION_BYTES 32

typedef struct {
    char identity[KMS_IDENTITY_MAX_BYTES + 1];
    char operation[KMS_USAGE_OPERATION_BYTES];
    char source[KMS_USAGE_SOURCE_BYTES];
    uint64_t count;    /* audit records */
    uint64_t items;    /* items (batches count each item) */
    uint64_t failures; /* records whose result was not ok */
    int64_t first;
    int64_t last;
} kms_usage_row;

typedef struct {
    int64_t from, to;
    kms_usage_row *rows; /* by identity, operation, source */
    size_t n;
    uint64_t records; /* audit records read */
    bool truncated;   /* the look-back held more than the scan bound */
} kms_usage_report;

/* Every use of key `name` version `version` (0: any) in [from, to] from the
 * audit log, aggregated per identity + operation + source address. */
KMS_RESULT kms_usage_report_build(kms *k, const char *name, uint32_t version, int64_t from,
                                  int64_t to, kms_usage_report *out);
void kms_usage_report_free(kms_usage_report *r);

/* Per version of a key: uses in the last `window_s` seconds (30 days when
 * 0) from the audit log. uses[i] is version i + 1; *out is malloc'd with
 * `versions` entries. */
KMS_RESULT kms_version_recent_uses(kms *k, const char *name, uint32_t versions, int64_t window_s,
                                   uint64_t **out);

/* ---- monthly compliance report ---- */

#define KMS_EMERGENCY_OBJECTIVE_S (4 * 3600)
#define KMS_REPORT_DUE_AHEAD_S    (30 * INT64_C(86400))
#define KMS_REPORT_DAYS_MAX       31

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    int64_t rotation_period_s;
    int64_t overdue_since; /* start of the longest overdue stretch in the period */
    int64_t overdue_s;     /* its length inside the period */
    bool still_overdue;    /* overdue at the end of the period */
} kms_report_key;

typedef struct {
    int64_t from, to;     /* [from, to) */
    int64_t generated_at; /* the clock's now */
    /* Rotation records started in the period (master rotations included). */
    size_t total;
    size_t by_type[KMS_ROTATION_MASTER + 1]; /* index: kms_rotation_type */
    size_t by_status[KMS_ROTATION_ROLLED_BACK + 1];
    double success_rate; /* succeeded / finished (failed and rolled back count against) */
    double mean_duration_s;
    double median_duration_s;
    int64_t max_duration_s;
    size_t timed;                        /* finished records the durations come from */
    size_t per_day[KMS_REPORT_DAYS_MAX]; /* rotations by day of the period */
    size_t days;                         /* days in the period (<= 31) */
    kms_rotation_info *emergencies;      /* every emergency rotation */
    size_t n_emergencies;
    size_t emergencies_within_objective; /* finished in <= 4 hours */
    size_t keys;                         /* keys that existed in the period */
    size_t keys_within_policy;
    kms_report_key *out_of_policy; /* keys overdue at some point in it */
    size_t n_out_of_policy;
    kms_key_status *due; /* keys due in the next 30 days (from now) */
    size_t n_due;
    size_t overdue_now;
} kms_report;

/* "YYYY-MM" -> [first second of the month, first second of the next), UTC. */
KMS_RESULT kms_month_parse(const char *s, int64_t *from, int64_t *to);
KMS_RESULT kms_report_build(kms *k, int64_t from, int64_t to, kms_report *out);
void kms_report_free(kms_report *r);

#endif /* KMS_SCHEDULE_H */
