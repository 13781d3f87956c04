/*
 * kmsctl's command line: one table of verbs and one of options, from which
 * parsing, `--help` for every verb (man-style) and the reference section of
 * docs/cli.md are all generated (after curl's tool_getparam.c and
 * docs/cmdline-opts/). Nothing here talks to the network, so all of it is
 * unit-tested (tests/unit/kmsctl_args_test.c).
 */
#ifndef KMSCTL_ARGS_H
#define KMSCTL_ARGS_H

#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    /* global: accepted by every verb, before or after it */
    KMSCTL_OPT_URL,
    KMSCTL_OPT_CERT,
    KMSCTL_OPT_KEY,
    KMSCTL_OPT_CACERT,
    KMSCTL_OPT_CONFIG,
    KMSCTL_OPT_TIMEOUT,
    KMSCTL_OPT_JSON,
    KMSCTL_OPT_HELP,
    /* per verb */
    KMSCTL_OPT_PURPOSE,
    KMSCTL_OPT_ROTATION_PERIOD,
    KMSCTL_OPT_WARNING_WINDOW,
    KMSCTL_OPT_DELETION_PROTECTION,
    KMSCTL_OPT_NO_DELETION_PROTECTION,
    KMSCTL_OPT_MIN_DECRYPTION_VERSION,
    KMSCTL_OPT_EMERGENCY,
    KMSCTL_OPT_REASON,
    KMSCTL_OPT_GRACE_PERIOD,
    KMSCTL_OPT_WAITING_PERIOD,
    KMSCTL_OPT_FILTER_KEY, /* "--key" after the rotations verb */
    KMSCTL_OPT_TYPE,
    KMSCTL_OPT_STATUS,
    KMSCTL_OPT_SINCE,
    KMSCTL_OPT_UNTIL,
    KMSCTL_OPT_LIMIT,
    KMSCTL_OPT_REPAIR,
    KMSCTL_OPT_IN,
    KMSCTL_OPT_CONTEXT,
    KMSCTL_OPT_OUT,
    KMSCTL_OPT_BASE64,
    KMSCTL_OPT_BYTES,
    KMSCTL_OPT_PLAINTEXT,
    KMSCTL_OPT_MAC,
    /* rotation operations: status, report, emergency usage */
    KMSCTL_OPT_DUE_WITHIN,
    KMSCTL_OPT_OVERDUE,
    KMSCTL_OPT_LOOKBACK,
    KMSCTL_OPT_MONTH,
    KMSCTL_OPT_HTML,
    /* audit trail and exports */
    KMSCTL_OPT_FROM,
    KMSCTL_OPT_TO,
    KMSCTL_OPT_IDENTITY,
    KMSCTL_OPT_OPERATION,
    KMSCTL_OPT_AFTER,
    KMSCTL_OPT_AUDIT_KEY, /* "--key" after the audit verb */
    KMSCTL_OPT_OUT_DIR,   /* "--out DIR" after the export verb */
    KMSCTL_OPT_PUBLIC_KEY,
    KMSCTL_OPT_COUNT
} kmsctl_opt_id;

#define KMSCTL_BIT(id) (UINT64_C(1) << (id))
#define KMSCTL_GLOBAL_OPTS                                                                   \
    (KMSCTL_BIT(KMSCTL_OPT_URL) | KMSCTL_BIT(KMSCTL_OPT_CERT) | KMSCTL_BIT(KMSCTL_OPT_KEY) | \
     KMSCTL_BIT(KMSCTL_OPT_CACERT) | KMSCTL_BIT(KMSCTL_OPT_CONFIG) |                         \
     KMSCTL_BIT(KMSCTL_OPT_TIMEOUT) | KMSCTL_BIT(KMSCTL_OPT_JSON) | KMSCTL_BIT(KMSCTL_OPT_HELP))

typedef enum {
    KMSCTL_KIND_FLAG,     /* no value */
    KMSCTL_KIND_STRING,   /* any non-empty text */
    KMSCTL_KIND_DURATION, /* 90d, 12h, 30m, 3600s, 3600 -> seconds */
    KMSCTL_KIND_UINT,     /* decimal 1..KMSCTL_UINT_MAX */
    KMSCTL_KIND_TIME,     /* Unix seconds, YYYY-MM-DD[THH:MM:SSZ] (UTC), or 7d (ago) */
    KMSCTL_KIND_ENUM,     /* one of a '|'-separated list (the metavar) */
} kmsctl_opt_kind;

typedef struct {
    kmsctl_opt_id id;
    const char *name;    /* long name without the dashes */
    const char *metavar; /* value placeholder; for ENUM the choices "a|b" */
    kmsctl_opt_kind kind;
    const char *help;
} kmsctl_option;

typedef enum {
    KMSCTL_VERB_KEY_CREATE,
    KMSCTL_VERB_KEY_LIST,
    KMSCTL_VERB_KEY_SHOW,
    KMSCTL_VERB_KEY_UPDATE,
    KMSCTL_VERB_KEY_ROTATE,
    KMSCTL_VERB_KEY_ROLLBACK,
    KMSCTL_VERB_KEY_SET_STATE,
    KMSCTL_VERB_MASTER_ROTATE,
    KMSCTL_VERB_MASTER_SHOW,
    KMSCTL_VERB_ROTATIONS,
    KMSCTL_VERB_CHECK,
    KMSCTL_VERB_WRAP,
    KMSCTL_VERB_UNWRAP,
    KMSCTL_VERB_ENCRYPT,
    KMSCTL_VERB_DECRYPT,
    KMSCTL_VERB_DATAKEY,
    KMSCTL_VERB_REWRAP,
    KMSCTL_VERB_MAC,
    KMSCTL_VERB_VERIFY,
    KMSCTL_VERB_HEALTH,
    KMSCTL_VERB_READY,
    KMSCTL_VERB_STATUS,
    KMSCTL_VERB_REPORT,
    KMSCTL_VERB_AUDIT,
    KMSCTL_VERB_EXPORT,
    KMSCTL_VERB_VERIFY_EXPORT,
    KMSCTL_VERB_COUNT
} kmsctl_verb_id;

#define KMSCTL_POS_MAX 3

typedef struct {
    kmsctl_verb_id id;
    const char *name;                /* "key create" */
    const char *pos[KMSCTL_POS_MAX]; /* positional argument names, all required */
    uint64_t options;                /* KMSCTL_BIT()s of the verb's own options */
    uint64_t required;               /* those of them that must be given */
    const char *summary;             /* one line, for NAME and the verb list */
    const char *description;         /* paragraphs separated by "\n\n" */
    const char *exit_status;         /* verb-specific exit codes, or NULL */
    const char *examples;            /* one command per line */
} kmsctl_verb;

typedef struct {
    bool set;
    const char *str; /* as given (points into argv) */
    int64_t num;     /* DURATION and TIME: seconds; UINT: the value */
} kmsctl_value;

typedef struct {
    const kmsctl_verb *verb; /* NULL: no verb given (only global --help or nothing) */
    const char *pos[KMSCTL_POS_MAX];
    size_t npos;
    kmsctl_value opt[KMSCTL_OPT_COUNT];
} kmsctl_args;

/* Longest duration accepted: 100 years. */
#define KMSCTL_DURATION_MAX_S ((int64_t)100 * 365 * 86400)
#define KMSCTL_UINT_MAX       UINT32_MAX

const kmsctl_verb *kmsctl_verbs(size_t *count);
const kmsctl_option *kmsctl_options(size_t *count);
const kmsctl_option *kmsctl_option_get(kmsctl_opt_id id);

/* "90d", "12h", "30m", "3600s", "3600" -> seconds; KMS_ERR_INVALID_ARGUMENT
 * for anything else (signs, spaces, other units, empty, over the maximum). */
KMS_RESULT kmsctl_duration_parse(const char *text, int64_t *seconds);
/* Formats seconds with the largest unit that divides it: 7776000 -> "90d". */
void kmsctl_duration_format(int64_t seconds, char *out, size_t out_len);
/* KMSCTL_KIND_TIME: relative values count back from now. */
KMS_RESULT kmsctl_time_parse(const char *text, int64_t now, int64_t *unix_seconds);

/* Parses argv (argv[0] is the program). On failure the error detail
 * (kms_error_detail) says what was wrong, for a "kmsctl: ..." line. The
 * result points into argv. */
KMS_RESULT kmsctl_args_parse(int argc, char *const *argv, int64_t now, kmsctl_args *out);

/* Help, generated from the tables. */
void kmsctl_help_main(FILE *f);
void kmsctl_help_verb(const kmsctl_verb *v, FILE *f);
/* The reference part of docs/cli.md (every verb's page, the exit codes). */
void kmsctl_help_markdown(FILE *f);

#endif /* KMSCTL_ARGS_H */
