/*
 * kms-reencrypt: online, resumable re-encryption of the ciphertext tokens
 * stored in PostgreSQL columns, after a key rotation, through kmsd's batch
 * rewrap endpoint (plaintext never leaves kmsd). docs/reencrypt.md is the
 * manual; kms_reencrypt.h names the parts.
 *
 * Nothing secret is taken from argv: the PostgreSQL password comes from
 * libpq's usual means (PGPASSFILE / ~/.pgpass, PGPASSWORD, a service file),
 * and a conninfo that carries one is refused; the client key is a file path.
 */
#define _GNU_SOURCE
#include "kms_error.h"
#include "kms_reencrypt.h"
#include "kms_result.h"
#include "kms_token.h"

#include <curl/curl.h>
#include <getopt.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RX_VERSION              "0.1.0"
#define RX_DEFAULT_URL          "https://127.0.0.1:8443"
#define RX_DEFAULT_BATCH        500
#define RX_DEFAULT_LOCK_TIMEOUT 2000
#define RX_DEFAULT_RETRY_S      300
#define RX_DEFAULT_PASSES       3
#define RX_DEFAULT_SAMPLE       1000
#define RX_DEFAULT_REPORT_LIMIT 20
#define RX_DEFAULT_PROGRESS_S   10
#define RX_HTTP_TIMEOUT_S       60

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

/* ---- command line: one table for parsing and --help ---- */

enum {
    O_DB = 256,
    O_TABLE,
    O_KEY_COLUMN,
    O_COLUMN,
    O_WHERE,
    O_KEY,
    O_URL,
    O_CERT,
    O_TLS_KEY,
    O_CACERT,
    O_WORKERS,
    O_BATCH,
    O_RPS,
    O_LOCK_TIMEOUT,
    O_RETRY,
    O_PASSES,
    O_DRY_RUN,
    O_VERIFY,
    O_SAMPLE,
    O_NO_CENSUS,
    O_JSON,
    O_PROGRESS,
    O_REPORT_LIMIT,
    O_HELP,
    O_VERSION,
};

typedef struct {
    const char *name;
    int has_arg;
    int id;
    const char *arg;
    const char *help;
} rx_opt;

static const rx_opt k_opts[] = {
    {"db", 1, O_DB, "CONNINFO",
     "PostgreSQL conninfo or URI (default: libpq's PG* environment). A password in it is "
     "refused: use PGPASSFILE/~/.pgpass, PGPASSWORD or a service file."},
    {"table", 1, O_TABLE, "TABLE", "the table, optionally schema-qualified (schema.table)"},
    {"key-column", 1, O_KEY_COLUMN, "COL",
     "a column of the table's unique key; repeat for a composite key, in index order"},
    {"column", 1, O_COLUMN, "COL", "a text or bytea column holding tokens; repeatable"},
    {"where", 1, O_WHERE, "SQL", "only rows matching this SQL condition (trusted DBA input)"},
    {"key", 1, O_KEY, "NAME", "the kmsd key (default: the one key named by the tokens found)"},
    {"url", 1, O_URL, "URL", "kmsd base URL (env KMSCTL_URL; default " RX_DEFAULT_URL ")"},
    {"cert", 1, O_CERT, "PATH", "client certificate, migrator role (env KMSCTL_CERT)"},
    {"tls-key", 1, O_TLS_KEY, "PATH", "client private key file (env KMSCTL_KEY)"},
    {"cacert", 1, O_CACERT, "PATH", "CA that signed kmsd's certificate (env KMSCTL_CACERT)"},
    {"workers", 1, O_WORKERS, "N", "parallel workers over disjoint key ranges (1..64; default 1)"},
    {"batch-size", 1, O_BATCH, "N", "rows per batch and transaction (1..1000; default 500)"},
    {"max-rows-per-second", 1, O_RPS, "N", "throttle over all workers (default: none)"},
    {"lock-timeout", 1, O_LOCK_TIMEOUT, "MS",
     "PostgreSQL lock_timeout of the session; a batch that hits it is retried (default 2000)"},
    {"retry-timeout", 1, O_RETRY, "S",
     "give up after this many seconds of kmsd or PostgreSQL unavailable (default 300)"},
    {"max-passes", 1, O_PASSES, "N",
     "passes over a range while concurrent writes conflict (default 3)"},
    {"dry-run", 0, O_DRY_RUN, NULL, "census only: cells per key version, NULLs, non-tokens"},
    {"verify", 0, O_VERIFY, NULL, "after the run, decrypt-check a sample through kmsd"},
    {"sample", 1, O_SAMPLE, "N", "rows checked by --verify, 0 = all (default 1000)"},
    {"no-census", 0, O_NO_CENSUS, NULL, "skip the census before and after the run"},
    {"json", 0, O_JSON, NULL, "print the final summary as JSON on stdout"},
    {"progress-interval", 1, O_PROGRESS, "S",
     "seconds between progress lines when stderr is not a terminal (default 10)"},
    {"report-limit", 1, O_REPORT_LIMIT, "N",
     "problem cells printed (all are recorded in table " RX_PROBLEM_TABLE "; default 20)"},
    {"help", 0, O_HELP, NULL, "this text"},
    {"version", 0, O_VERSION, NULL, "the version"},
};

static void usage(FILE *f)
{
    fputs("NAME\n"
          "    kms-reencrypt - re-encrypt PostgreSQL columns under a key's primary version\n\n"
          "SYNOPSIS\n"
          "    kms-reencrypt --table T --key-column ID [--key-column ID2 ...] --column C\n"
          "                  [--column C2 ...] [--where SQL] [--key NAME] [options]\n\n"
          "DESCRIPTION\n"
          "    Finds the cells whose tokens are under another version than the key's\n"
          "    primary, reads them in keyset-paginated batches, rewraps them through\n"
          "    kmsd's batch endpoint with the migrator role, and writes them back, one\n"
          "    transaction per batch, only where the cell still holds the token read.\n"
          "    The position is checkpointed in table " RX_CHECKPOINT_TABLE " in the same\n"
          "    transaction: run the same command again to continue after any stop.\n\n"
          "OPTIONS\n",
          f);
    for (size_t i = 0; i < KMS_ARRAY_LEN(k_opts); i++) {
        const rx_opt *o = &k_opts[i];
        char head[64];
        snprintf(head, sizeof(head), "--%s%s%s", o->name, o->arg ? " " : "", o->arg ? o->arg : "");
        fprintf(f, "    %s\n        %s\n", head, o->help);
    }
    fputs("\nEXIT STATUS\n"
          "    0   done: every cell that needed work is under the primary (or nothing to do)\n"
          "    1   some cells could not be processed, or --verify found a failure\n"
          "    64  usage error (options, unknown table or column, bad --where)\n"
          "    66  the key does not exist\n"
          "    69  kmsd or PostgreSQL unavailable beyond --retry-timeout\n"
          "    74  other PostgreSQL error\n"
          "    75  interrupted (SIGINT/SIGTERM): run the same command again to continue\n"
          "    77  TLS or permission failure (certificate, role, PostgreSQL privilege)\n"
          "    79  another kms-reencrypt is running the same run\n"
          "    See docs/reencrypt.md.\n",
          f);
}

static kms_result parse_uint(const char *s, unsigned long min, unsigned long max, const char *what,
                             unsigned long *out)
{
    char *end = NULL;
    unsigned long v = strtoul(s, &end, 10);
    KMS_ENSURE_MSG(*s != '\0' && *s != '-' && end != NULL && *end == '\0' && v >= min && v <= max,
                   KMS_ERR_INVALID_ARGUMENT, "--%s: expected a number %lu..%lu", what, min, max);
    *out = v;
    return KMS_OK_RESULT;
}

typedef struct {
    bool dry_run, verify, census, json;
    long sample;
    double progress_s;
} rx_mode;

static kms_result conninfo_check(const char *conninfo)
{
    if (conninfo == NULL || *conninfo == '\0') {
        return KMS_OK_RESULT;
    }
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
    if (opts == NULL) {
        kms_result r = kms_error_raisef(KMS_ERR_INVALID_ARGUMENT, __FILE__, __LINE__, "--db: %s",
                                        err != NULL ? err : "cannot parse");
        PQfreemem(err);
        return r;
    }
    bool has_password = false;
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
        if (strcmp(o->keyword, "password") == 0 && o->val != NULL && *o->val != '\0') {
            has_password = true;
        }
    }
    PQconninfoFree(opts);
    KMS_ENSURE_MSG(!has_password, KMS_ERR_INVALID_ARGUMENT,
                   "--db carries a password: put it in PGPASSFILE (~/.pgpass), PGPASSWORD or "
                   "a service file instead, never on the command line");
    return KMS_OK_RESULT;
}

static kms_result args_parse(int argc, char **argv, rx_plan *p, rx_mode *m, bool *exit_now)
{
    struct option lo[KMS_ARRAY_LEN(k_opts) + 1];
    for (size_t i = 0; i < KMS_ARRAY_LEN(k_opts); i++) {
        lo[i] = (struct option){k_opts[i].name, k_opts[i].has_arg, NULL, k_opts[i].id};
    }
    lo[KMS_ARRAY_LEN(k_opts)] = (struct option){0};
    p->workers = 1;
    p->batch = RX_DEFAULT_BATCH;
    p->max_passes = RX_DEFAULT_PASSES;
    p->lock_timeout_ms = RX_DEFAULT_LOCK_TIMEOUT;
    p->report_limit = RX_DEFAULT_REPORT_LIMIT;
    p->http.retry_max_s = RX_DEFAULT_RETRY_S;
    p->http.timeout_s = RX_HTTP_TIMEOUT_S;
    m->census = true;
    m->sample = RX_DEFAULT_SAMPLE;
    m->progress_s = RX_DEFAULT_PROGRESS_S;
    opterr = 0;
    int c;
    unsigned long v;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case O_DB:
            p->conninfo = optarg;
            break;
        case O_TABLE:
            p->table = optarg;
            break;
        case O_KEY_COLUMN:
            KMS_ENSURE_MSG(p->nkeys < RX_MAX_KEY_COLUMNS, KMS_ERR_INVALID_ARGUMENT,
                           "at most %d --key-column", RX_MAX_KEY_COLUMNS);
            p->keys[p->nkeys++].name = optarg;
            break;
        case O_COLUMN:
            KMS_ENSURE_MSG(p->ncols < RX_MAX_COLUMNS, KMS_ERR_INVALID_ARGUMENT,
                           "at most %d --column", RX_MAX_COLUMNS);
            p->cols[p->ncols++].name = optarg;
            break;
        case O_WHERE:
            p->where = optarg;
            break;
        case O_KEY:
            KMS_ENSURE_MSG(kms_key_name_valid(optarg, strlen(optarg)), KMS_ERR_INVALID_ARGUMENT,
                           "--key: not a key name ([a-z0-9][a-z0-9._-]{0,127})");
            snprintf(p->key, sizeof(p->key), "%s", optarg);
            break;
        case O_URL:
            p->http.url = optarg;
            break;
        case O_CERT:
            p->http.cert = optarg;
            break;
        case O_TLS_KEY:
            p->http.key = optarg;
            break;
        case O_CACERT:
            p->http.cacert = optarg;
            break;
        case O_WORKERS:
            KMS_GUARD(parse_uint(optarg, 1, RX_MAX_WORKERS, "workers", &v));
            p->workers = (unsigned)v;
            break;
        case O_BATCH:
            KMS_GUARD(parse_uint(optarg, 1, RX_MAX_BATCH, "batch-size", &v));
            p->batch = (unsigned)v;
            break;
        case O_RPS:
            KMS_GUARD(parse_uint(optarg, 1, 100000000, "max-rows-per-second", &v));
            p->max_rps = (double)v;
            break;
        case O_LOCK_TIMEOUT:
            KMS_GUARD(parse_uint(optarg, 1, 600000, "lock-timeout", &v));
            p->lock_timeout_ms = (long)v;
            break;
        case O_RETRY:
            KMS_GUARD(parse_uint(optarg, 1, 7 * 86400, "retry-timeout", &v));
            p->http.retry_max_s = (double)v;
            break;
        case O_PASSES:
            KMS_GUARD(parse_uint(optarg, 1, 100, "max-passes", &v));
            p->max_passes = (unsigned)v;
            break;
        case O_DRY_RUN:
            m->dry_run = true;
            break;
        case O_VERIFY:
            m->verify = true;
            break;
        case O_SAMPLE:
            KMS_GUARD(parse_uint(optarg, 0, 1000000000, "sample", &v));
            m->sample = (long)v;
            break;
        case O_NO_CENSUS:
            m->census = false;
            break;
        case O_JSON:
            m->json = true;
            break;
        case O_PROGRESS:
            KMS_GUARD(parse_uint(optarg, 1, 86400, "progress-interval", &v));
            m->progress_s = (double)v;
            break;
        case O_REPORT_LIMIT:
            KMS_GUARD(parse_uint(optarg, 0, 1000000000, "report-limit", &v));
            p->report_limit = (unsigned)v;
            break;
        case 'h':
        case O_HELP:
            usage(stdout);
            *exit_now = true;
            return KMS_OK_RESULT;
        case O_VERSION:
            printf("kms-reencrypt %s\n", RX_VERSION);
            *exit_now = true;
            return KMS_OK_RESULT;
        default:
            KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT, "unknown or incomplete option %s (see --help)",
                         argv[optind - 1]);
        }
    }
    KMS_ENSURE_MSG(optind == argc, KMS_ERR_INVALID_ARGUMENT, "unexpected argument %s",
                   argv[optind]);
    KMS_ENSURE_MSG(p->table != NULL && p->nkeys > 0 && p->ncols > 0, KMS_ERR_INVALID_ARGUMENT,
                   "--table, --key-column and --column are required (see --help)");
    KMS_GUARD(conninfo_check(p->conninfo));
    static const struct {
        const char *env;
        size_t off;
    } envs[] = {
        {"KMSCTL_URL", offsetof(rx_http_conf, url)},
        {"KMSCTL_CERT", offsetof(rx_http_conf, cert)},
        {"KMSCTL_KEY", offsetof(rx_http_conf, key)},
        {"KMSCTL_CACERT", offsetof(rx_http_conf, cacert)},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(envs); i++) {
        const char **slot = (const char **)((char *)&p->http + envs[i].off);
        const char *e = getenv(envs[i].env);
        if (*slot == NULL && e != NULL && *e != '\0') {
            *slot = e;
        }
    }
    if (p->http.url == NULL) {
        p->http.url = RX_DEFAULT_URL;
    }
    KMS_ENSURE_MSG(strncmp(p->http.url, "https://", 8) == 0, KMS_ERR_INVALID_ARGUMENT,
                   "--url: kmsd is reached over https:// only");
    return KMS_OK_RESULT;
}

/* ---- reporting ---- */

static uint64_t sum(const rx_worker *w, unsigned n, size_t off)
{
    uint64_t t = 0;
    for (unsigned i = 0; i < n; i++) {
        t += atomic_load((_Atomic uint64_t *)((char *)&w[i].c + off)) +
             atomic_load((_Atomic uint64_t *)((char *)&w[i].base + off));
    }
    return t;
}

#define SUM(w, n, f) sum((w), (n), offsetof(rx_counts, f))

static void census_print(const rx_plan *p, const char *when, const rx_census *c)
{
    for (size_t i = 0; i < p->ncols; i++) {
        const rx_census_col *cc = &c->col[i];
        char line[2048];
        size_t o = 0;
        o += (size_t)snprintf(line + o, sizeof(line) - o,
                              "census %s: %s.%s: %llu cells, %llu NULL, %llu not tokens, "
                              "%llu other keys;",
                              when, p->table, p->cols[i].name, (unsigned long long)cc->total,
                              (unsigned long long)cc->nulls, (unsigned long long)cc->not_token,
                              (unsigned long long)cc->other_key);
        for (size_t v = 0; v < cc->nversions && o < sizeof(line) - 64; v++) {
            o += (size_t)snprintf(line + o, sizeof(line) - o, " %s v%u%s: %llu", p->key,
                                  cc->v[v].version,
                                  cc->v[v].version == p->primary ? " (primary)" : "",
                                  (unsigned long long)cc->v[v].count);
        }
        if (cc->nversions == 0) {
            snprintf(line + o, sizeof(line) - o, " no tokens of %s", p->key);
        }
        rx_log("%s", line);
    }
}

static json_t *census_json(const rx_plan *p, const rx_census *c)
{
    json_t *o = json_object();
    for (size_t i = 0; i < p->ncols; i++) {
        const rx_census_col *cc = &c->col[i];
        json_t *vers = json_object();
        for (size_t v = 0; v < cc->nversions; v++) {
            char k[16];
            snprintf(k, sizeof(k), "%u", cc->v[v].version);
            json_object_set_new(vers, k, json_integer((json_int_t)cc->v[v].count));
        }
        json_object_set_new(o, p->cols[i].name,
                            json_pack("{s:I,s:I,s:I,s:I,s:o}", "cells", (json_int_t)cc->total,
                                      "null", (json_int_t)cc->nulls, "not_token",
                                      (json_int_t)cc->not_token, "other_key",
                                      (json_int_t)cc->other_key, "versions", vers));
    }
    return o;
}

typedef struct {
    rx_worker *w;
    unsigned n;
    const rx_plan *p;
    const rx_mode *m;
    _Atomic int done;
} rx_progress;

static void progress_line(const rx_progress *pg, double elapsed, bool tty, bool final)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < pg->n; i++) {
        total += pg->w[i].rows_total;
    }
    uint64_t seen = SUM(pg->w, pg->n, seen);
    uint64_t base_seen = 0;
    for (unsigned i = 0; i < pg->n; i++) {
        base_seen += atomic_load(&pg->w[i].base.seen);
    }
    uint64_t now_seen = seen - base_seen;
    double rate = elapsed > 0 ? (double)now_seen / elapsed : 0;
    uint64_t skipped = SUM(pg->w, pg->n, not_token) + SUM(pg->w, pg->n, other_key);
    uint64_t errors = SUM(pg->w, pg->n, failed);
    uint64_t rewrapped = SUM(pg->w, pg->n, rewrapped);
    uint64_t conflicts = SUM(pg->w, pg->n, conflicts);
    double frac = total > 0 ? (double)(seen < total ? seen : total) / (double)total : 1.0;
    char eta[32] = "-";
    if (rate > 0 && seen < total) {
        snprintf(eta, sizeof(eta), "%.0fs", (double)(total - seen) / rate);
    }
    if (tty) {
        char bar[31];
        int fill = (int)(frac * 30);
        for (int i = 0; i < 30; i++) {
            bar[i] = i < fill ? '#' : '-';
        }
        bar[30] = '\0';
        fprintf(stderr,
                "\r[%s] %5.1f%% %llu/%llu rows %.0f rows/s ETA %s rewrapped %llu skipped %llu "
                "conflicts %llu errors %llu ",
                bar, frac * 100, (unsigned long long)seen, (unsigned long long)total, rate, eta,
                (unsigned long long)rewrapped, (unsigned long long)skipped,
                (unsigned long long)conflicts, (unsigned long long)errors);
        if (final) {
            fputc('\n', stderr);
        }
        fflush(stderr);
    } else {
        rx_log("progress: %llu/%llu rows (%.1f%%), %.0f rows/s, ETA %s, rewrapped %llu, skipped "
               "%llu, conflicts %llu, errors %llu",
               (unsigned long long)seen, (unsigned long long)total, frac * 100, rate, eta,
               (unsigned long long)rewrapped, (unsigned long long)skipped,
               (unsigned long long)conflicts, (unsigned long long)errors);
    }
}

/* ---- main ---- */

static int exit_for(kms_result r)
{
    if (kms_is_ok(r)) {
        return RX_EXIT_OK;
    }
    return kms_error_exit_code(r.err);
}

static int fail_exit(kms_result r, const char *what)
{
    const char *d = kms_error_detail();
    rx_log("%s: %s: %s", what, kms_error_code(r.err),
           d != NULL && *d != '\0' ? d : kms_error_message(r.err));
    return exit_for(r);
}

int main(int argc, char **argv)
{
    static rx_plan p;
    rx_mode m = {0};
    bool exit_now = false;
    kms_result r = args_parse(argc, argv, &p, &m, &exit_now);
    if (!kms_is_ok(r)) {
        return fail_exit(r, "usage");
    }
    if (exit_now) {
        return 0;
    }
    p.stop = &g_stop;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    rx_json_alloc_init();
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        rx_log("cannot initialise libcurl");
        return 70;
    }
    double t0 = rx_now();
    int rc = RX_EXIT_OK;
    PGconn *db = NULL;
    rx_http *http = NULL;
    rx_worker *w = calloc(RX_MAX_WORKERS, sizeof(*w));
    unsigned nw = 0;
    bool created = false, already = false, interrupted = false;
    rx_census before = {0}, after = {0};
    bool have_before = false, have_after = false;
    rx_verify ver = {0};
    bool have_verify = false;
    const char *status = "finished";
    if (w == NULL) {
        rc = 70;
        goto out;
    }

    r = rx_db_connect(&p, &db);
    if (kms_is_ok(r)) {
        r = rx_db_resolve(db, &p);
    }
    if (kms_is_ok(r) && p.key[0] == '\0') {
        r = rx_db_guess_key(db, &p, p.key);
    }
    if (!kms_is_ok(r)) {
        rc = fail_exit(r, "PostgreSQL");
        goto out;
    }
    r = rx_http_new(&p.http, &g_stop, &http);
    bool encrypt = false;
    if (kms_is_ok(r)) {
        r = rx_http_key_primary(http, p.key, &p.primary, &encrypt);
    }
    if (!kms_is_ok(r)) {
        rc = fail_exit(r, "kmsd");
        goto out;
    }
    if (!encrypt) {
        rx_log("key %s is not an encryption key: nothing to re-encrypt", p.key);
        rc = 64;
        goto out;
    }
    r = rx_run_id(&p);
    if (!kms_is_ok(r)) {
        rc = fail_exit(r, "run id");
        goto out;
    }
    rx_log("table %s, key %s, primary version %u, run %s", p.table, p.key, p.primary, p.run_id);

    if (m.census || m.dry_run) {
        r = rx_db_census(db, &p, &before);
        if (!kms_is_ok(r)) {
            rc = fail_exit(r, "census");
            goto out;
        }
        have_before = true;
        census_print(&p, m.dry_run ? "(dry run)" : "before", &before);
    }
    if (m.dry_run) {
        status = "dry_run";
        goto out;
    }

    r = rx_db_lock_run(db, &p);
    if (kms_is_ok(r)) {
        r = rx_db_checkpoint_open(db, &p, w, &nw, &created);
    }
    if (!kms_is_ok(r)) {
        rc = fail_exit(r, "checkpoint");
        goto out;
    }
    unsigned unfinished = 0;
    for (unsigned i = 0; i < nw; i++) {
        unfinished += w[i].finished ? 0 : 1;
    }
    if (unfinished == 0) {
        already = true;
        status = "already_finished";
        rx_log("run %s already finished: nothing to do", p.run_id);
    } else {
        rx_log("%s run %s: %u worker range(s), %u to do", created ? "starting" : "resuming",
               p.run_id, nw, unfinished);
        pthread_t th[RX_MAX_WORKERS];
        bool started[RX_MAX_WORKERS] = {0};
        for (unsigned i = 0; i < nw; i++) {
            if (w[i].finished) {
                continue;
            }
            if (pthread_create(&th[i], NULL, rx_worker_run, &w[i]) != 0) {
                w[i].result = kms_error_raise(KMS_ERR_INTERNAL, __FILE__, __LINE__);
                snprintf(w[i].error, sizeof(w[i].error), "cannot start a thread");
                g_stop = 1;
                break;
            }
            started[i] = true;
        }
        rx_progress pg = {.w = w, .n = nw, .p = &p, .m = &m};
        bool tty = isatty(STDERR_FILENO) == 1;
        double last = rx_now();
        double run_t0 = last;
        for (;;) {
            bool running = false;
            for (unsigned i = 0; i < nw; i++) {
                if (started[i] && pthread_tryjoin_np(th[i], NULL) != 0) {
                    running = true;
                } else {
                    started[i] = false;
                }
            }
            if (!running) {
                break;
            }
            rx_sleep(tty ? 0.5 : 0.2, NULL);
            double now = rx_now();
            if (tty || now - last >= m.progress_s) {
                progress_line(&pg, now - run_t0, tty, false);
                last = now;
            }
        }
        progress_line(&pg, rx_now() - run_t0, tty, true);
        for (unsigned i = 0; i < nw; i++) {
            if (!kms_is_ok(w[i].result) && !g_stop) {
                rx_log("worker %u stopped: %s: %s", i, kms_error_code(w[i].result.err),
                       w[i].error[0] ? w[i].error : kms_error_message(w[i].result.err));
                if (rc == RX_EXIT_OK) {
                    rc = exit_for(w[i].result);
                }
            }
        }
        /* A signal cuts back-off waits short, which a worker reports as an
         * error: what matters is that it stopped at a batch boundary, and
         * the checkpoint says where. */
        for (unsigned i = 0; i < nw; i++) {
            if (!w[i].finished && (rc == RX_EXIT_OK || g_stop)) {
                interrupted = true;
            }
        }
        if (g_stop && interrupted) {
            rc = RX_EXIT_OK;
        }
        if (rc != RX_EXIT_OK) {
            status = "error";
        } else if (interrupted) {
            status = "interrupted";
            rc = RX_EXIT_INTERRUPTED;
            rx_log("interrupted: run the same command again to continue from the checkpoint");
        }
    }
    if (rc == RX_EXIT_OK && m.census && !g_stop) {
        r = rx_db_census(db, &p, &after);
        if (!kms_is_ok(r)) {
            rc = fail_exit(r, "census");
            goto out;
        }
        have_after = true;
        census_print(&p, "after", &after);
    }
    if (rc == RX_EXIT_OK && m.verify && !g_stop) {
        r = rx_db_verify(db, &p, http, m.sample, &ver);
        if (!kms_is_ok(r)) {
            rc = fail_exit(r, "verify");
            goto out;
        }
        have_verify = true;
        rx_log("verify: %llu cells checked, %llu ok, %llu not under the primary, %llu failed",
               (unsigned long long)ver.checked, (unsigned long long)ver.ok,
               (unsigned long long)ver.not_primary, (unsigned long long)ver.failed);
        if (ver.failed > 0 || ver.not_primary > 0) {
            rc = RX_EXIT_ROWS_FAILED;
        }
    }
    if (rc == RX_EXIT_OK && SUM(w, nw, failed) > 0) {
        rc = RX_EXIT_ROWS_FAILED;
    }

out:;
    double elapsed = rx_now() - t0;
    if (rc == RX_EXIT_ROWS_FAILED && strcmp(status, "finished") == 0) {
        status = "finished_with_failures";
    }
    uint64_t http_requests = 0, http_retries = 0, db_retries = 0;
    for (unsigned i = 0; w != NULL && i < nw; i++) {
        http_requests += w[i].http_requests;
        http_retries += w[i].http_retries;
        db_retries += atomic_load(&w[i].c.db_retries);
    }
    if (w != NULL && p.primary != 0) {
        uint64_t now_seen = SUM(w, nw, seen);
        for (unsigned i = 0; i < nw; i++) {
            now_seen -= atomic_load(&w[i].base.seen);
        }
        if (m.json) {
            json_t *s = json_pack(
                "{s:s,s:s,s:s,s:i,s:s,s:i,s:f,s:f,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I},"
                "s:{s:I,s:I,s:I},s:i}",
                "run_id", p.run_id, "table", p.table, "key", p.key, "target_version",
                (int)p.primary, "status", status, "workers", (int)nw, "elapsed_s", elapsed,
                "rows_per_s", elapsed > 0 ? (double)now_seen / elapsed : 0.0, "counts", "rows_seen",
                (json_int_t)SUM(w, nw, seen), "null", (json_int_t)SUM(w, nw, nulls), "not_token",
                (json_int_t)SUM(w, nw, not_token), "other_key", (json_int_t)SUM(w, nw, other_key),
                "current", (json_int_t)SUM(w, nw, current), "rewrapped",
                (json_int_t)SUM(w, nw, rewrapped), "conflicts", (json_int_t)SUM(w, nw, conflicts),
                "failed", (json_int_t)SUM(w, nw, failed), "retries", "http_requests",
                (json_int_t)http_requests, "http", (json_int_t)http_retries, "db",
                (json_int_t)db_retries, "exit_code", rc);
            if (s != NULL && have_before) {
                json_object_set_new(s, m.dry_run ? "census" : "census_before",
                                    census_json(&p, &before));
            }
            if (s != NULL && have_after) {
                json_object_set_new(s, "census_after", census_json(&p, &after));
            }
            if (s != NULL && have_verify) {
                json_object_set_new(s, "verify",
                                    json_pack("{s:I,s:I,s:I,s:I}", "checked",
                                              (json_int_t)ver.checked, "ok", (json_int_t)ver.ok,
                                              "not_primary", (json_int_t)ver.not_primary, "failed",
                                              (json_int_t)ver.failed));
            }
            if (s != NULL) {
                json_dumpf(s, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(s);
            }
        } else if (!m.dry_run) {
            rx_log("summary: %s in %.1f s; rows %llu, cells rewrapped %llu, already current "
                   "%llu, NULL %llu, not tokens %llu, other keys %llu, conflicts %llu, failed "
                   "%llu%s",
                   status, elapsed, (unsigned long long)SUM(w, nw, seen),
                   (unsigned long long)SUM(w, nw, rewrapped),
                   (unsigned long long)SUM(w, nw, current), (unsigned long long)SUM(w, nw, nulls),
                   (unsigned long long)SUM(w, nw, not_token),
                   (unsigned long long)SUM(w, nw, other_key),
                   (unsigned long long)SUM(w, nw, conflicts),
                   (unsigned long long)SUM(w, nw, failed), already ? " (nothing to do)" : "");
        }
    }
    for (unsigned i = 0; w != NULL && i < RX_MAX_WORKERS; i++) {
        rx_worker_free(&w[i]);
    }
    free(w);
    rx_http_free(http);
    PQfinish(db);
    for (size_t i = 0; i < p.nkeys; i++) {
        free(p.keys[i].ident);
        free(p.keys[i].type);
    }
    for (size_t i = 0; i < p.ncols; i++) {
        free(p.cols[i].ident);
        free(p.cols[i].type);
    }
    free(p.table_ident);
    curl_global_cleanup();
    return rc;
}
