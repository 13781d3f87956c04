/*
 * kms-reencrypt, the PostgreSQL side: catalog checks, the checkpoint, the
 * workers' keyset-paginated batches with optimistic write-back, the census
 * and the verify pass.
 *
 * Correctness rests on three things (docs/reencrypt.md has the long form):
 *  1. A batch's writes and its checkpoint row's advance commit in one
 *     transaction, so after kill -9 the checkpoint names exactly the rows
 *     whose writes are durable: nothing is redone, nothing is skipped.
 *  2. Each write is conditional on the cell still holding the token that
 *     was read (UPDATE ... WHERE key = k AND col IS NOT DISTINCT FROM old),
 *     so an application write that came in between is never overwritten.
 *     Such cells are counted as conflicts, and a further pass over the range
 *     (bounded by --max-passes) picks them up if they still need work.
 *  3. Reads take no locks and writes hold row locks only for the length of
 *     one short transaction; lock_timeout bounds any wait, and lock
 *     timeouts, serialization failures, deadlocks and lost connections roll
 *     the batch back and retry it after a back-off.
 */
#define _GNU_SOURCE
#include "kms_reencrypt.h"

#include "kms_buf.h"
#include "kms_hash.h"
#include "kms_secmem.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RX_FETCH_ROWS    5000
#define RX_GUESS_SAMPLE  200
#define RX_SQL_MAX_BYTES ((size_t)64 * 1024 * 1024)

/* ---- small helpers ---- */

static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;

void rx_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&g_log_lock);
    fputs("kms-reencrypt: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    fflush(stderr);
    pthread_mutex_unlock(&g_log_lock);
    va_end(ap);
}

static kms_result sb(kms_buf *b, const char *s)
{
    return kms_buf_append(b, s, strlen(s));
}

static const char *sz(kms_buf *b)
{
    if (!kms_is_ok(kms_buf_terminate(b))) {
        return "";
    }
    return (const char *)b->data;
}

/* One element of a PostgreSQL array literal, double-quoted with '"' and
 * '\' escaped (PostgreSQL manual, section 8.15.6 "Array Input and Output
 * Syntax"), so any text, "NULL" included, is taken literally. */
static kms_result arr_text(kms_buf *b, const char *s, size_t n)
{
    KMS_GUARD(kms_buf_append(b, "\"", 1));
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\') {
            KMS_GUARD(kms_buf_append(b, "\\", 1));
        }
        KMS_GUARD(kms_buf_append(b, &s[i], 1));
    }
    return kms_buf_append(b, "\"", 1);
}

/* A text[] literal of key values. */
static kms_result key_array(kms_buf *b, char *const *vals, size_t n)
{
    KMS_GUARD(kms_buf_append(b, "{", 1));
    for (size_t i = 0; i < n; i++) {
        if (i > 0) {
            KMS_GUARD(kms_buf_append(b, ",", 1));
        }
        KMS_GUARD(arr_text(b, vals[i], strlen(vals[i])));
    }
    return kms_buf_append(b, "}", 1);
}

/* "(k1=v1, k2=v2)" for reports, control characters replaced. */
static void key_show(const rx_plan *p, const PGresult *r, int row, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t k = 0; k < p->nkeys && o + 1 < cap; k++) {
        int n = snprintf(out + o, cap - o, "%s%s=%s", k == 0 ? "(" : ", ", p->keys[k].name,
                         PQgetvalue(r, row, (int)k));
        if (n < 0 || (size_t)n >= cap - o) {
            o = cap - 1;
            break;
        }
        o += (size_t)n;
    }
    if (o + 2 <= cap) {
        out[o++] = ')';
        out[o] = '\0';
    }
    for (char *s = out; *s != '\0'; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f) {
            *s = '?';
        }
    }
}

/* ---- errors ---- */

typedef enum {
    DB_OK,
    DB_RETRY, /* a passing condition: roll back, back off, redo the batch */
    DB_FAIL,
} db_st;

/* SQLSTATEs (PostgreSQL manual, Appendix A) after which the same batch is
 * worth trying again. */
static bool sqlstate_transient(const char *s)
{
    static const char *const codes[] = {
        "40001", /* serialization_failure */
        "40P01", /* deadlock_detected */
        "55P03", /* lock_not_available: lock_timeout fired */
        "57014", /* query_canceled: statement_timeout */
        "57P01", /* admin_shutdown */
        "57P02", /* crash_shutdown */
        "57P03", /* cannot_connect_now */
        "53300", /* too_many_connections */
    };
    if (s == NULL) {
        return false;
    }
    if (strncmp(s, "08", 2) == 0) { /* connection_exception class */
        return true;
    }
    for (size_t i = 0; i < KMS_ARRAY_LEN(codes); i++) {
        if (strcmp(s, codes[i]) == 0) {
            return true;
        }
    }
    return false;
}

static kms_err sqlstate_err(const char *s)
{
    if (s == NULL) {
        return KMS_ERR_IO;
    }
    if (strcmp(s, "42501") == 0) { /* insufficient_privilege */
        return KMS_ERR_FORBIDDEN;
    }
    if (strncmp(s, "42", 2) == 0) { /* syntax error or access rule violation */
        return KMS_ERR_INVALID_ARGUMENT;
    }
    if (strncmp(s, "28", 2) == 0) { /* invalid authorization */
        return KMS_ERR_UNAUTHENTICATED;
    }
    return KMS_ERR_IO;
}

/* Checks a result (and clears it unless keep); err gets the message. */
static db_st db_check(PGconn *db, PGresult *r, ExecStatusType want, char *err, size_t cap,
                      kms_err *code)
{
    if (r != NULL && PQresultStatus(r) == want) {
        return DB_OK;
    }
    const char *state = r != NULL ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = r != NULL ? PQresultErrorMessage(r) : PQerrorMessage(db);
    snprintf(err, cap, "PostgreSQL: %s%s%s", state != NULL ? state : "", state != NULL ? ": " : "",
             msg != NULL && *msg != '\0' ? msg : PQerrorMessage(db));
    size_t n = strlen(err);
    while (n > 0 && (err[n - 1] == '\n' || err[n - 1] == ' ')) {
        err[--n] = '\0';
    }
    *code = sqlstate_err(state);
    if (PQstatus(db) != CONNECTION_OK || sqlstate_transient(state)) {
        return DB_RETRY;
    }
    return DB_FAIL;
}

/* Runs a statement that must succeed (setup, outside the hot path). */
static kms_result db_exec_fmt(PGconn *db, const char *sql, int nparams, const char *const *params,
                              ExecStatusType want, int result_format, PGresult **keep)
{
    /* Statements without parameters go through the simple protocol, which
     * also takes several commands (the DDL). */
    PGresult *r = nparams == 0 && result_format == 0
                      ? PQexec(db, sql)
                      : PQexecParams(db, sql, nparams, NULL, params, NULL, NULL, result_format);
    char err[512];
    kms_err code;
    if (db_check(db, r, want, err, sizeof(err), &code) != DB_OK) {
        PQclear(r);
        KMS_BAIL_MSG(PQstatus(db) != CONNECTION_OK ? KMS_ERR_UNAVAILABLE : code, "%s", err);
    }
    if (keep != NULL) {
        *keep = r;
    } else {
        PQclear(r);
    }
    return KMS_OK_RESULT;
}

static kms_result db_exec(PGconn *db, const char *sql, int nparams, const char *const *params,
                          ExecStatusType want, PGresult **keep)
{
    return db_exec_fmt(db, sql, nparams, params, want, 0, keep);
}

/* ---- connection and catalog ---- */

KMS_RESULT rx_db_connect(const rx_plan *p, PGconn **out)
{
    PGconn *db = PQconnectdb(p->conninfo != NULL ? p->conninfo : "");
    *out = db;
    KMS_ENSURE(db != NULL, KMS_ERR_NO_MEMORY);
    if (PQstatus(db) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", PQerrorMessage(db));
        size_t n = strlen(msg);
        while (n > 0 && msg[n - 1] == '\n') {
            msg[--n] = '\0';
        }
        KMS_BAIL_MSG(KMS_ERR_UNAVAILABLE, "cannot connect to PostgreSQL: %s", msg);
    }
    char set[160];
    snprintf(set, sizeof(set),
             "SET lock_timeout = %ld; SET application_name = 'kms-reencrypt'; "
             "SET idle_in_transaction_session_timeout = 0",
             p->lock_timeout_ms);
    PGresult *r = PQexec(db, set);
    char err[512];
    kms_err code;
    db_st st = db_check(db, r, PGRES_COMMAND_OK, err, sizeof(err), &code);
    PQclear(r);
    KMS_ENSURE_MSG(st == DB_OK, KMS_ERR_UNAVAILABLE, "%s", err);
    return KMS_OK_RESULT;
}

static kms_result ident(PGconn *db, const char *name, size_t n, char **out)
{
    char *q = PQescapeIdentifier(db, name, n);
    KMS_ENSURE_MSG(q != NULL, KMS_ERR_INVALID_ARGUMENT, "bad identifier %s", name);
    *out = strdup(q);
    PQfreemem(q);
    KMS_ENSURE(*out != NULL, KMS_ERR_NO_MEMORY);
    return KMS_OK_RESULT;
}

static kms_result column_resolve(PGconn *db, const rx_plan *p, rx_column *c, bool value)
{
    KMS_GUARD(ident(db, c->name, strlen(c->name), &c->ident));
    const char *params[2] = {p->table_ident, c->name};
    PGresult *r = NULL;
    KMS_GUARD(db_exec(db,
                      "SELECT format_type(a.atttypid, a.atttypmod), t.typname, t.typcategory "
                      "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                      "WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0 "
                      "AND NOT a.attisdropped",
                      2, params, PGRES_TUPLES_OK, &r));
    if (PQntuples(r) != 1) {
        PQclear(r);
        KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT, "table %s has no column %s", p->table, c->name);
    }
    c->type = strdup(PQgetvalue(r, 0, 0));
    c->bytea = strcmp(PQgetvalue(r, 0, 1), "bytea") == 0;
    bool stringish = PQgetvalue(r, 0, 2)[0] == 'S';
    PQclear(r);
    KMS_ENSURE(c->type != NULL, KMS_ERR_NO_MEMORY);
    KMS_ENSURE_MSG(!value || c->bytea || stringish, KMS_ERR_INVALID_ARGUMENT,
                   "column %s is %s: tokens live in text or bytea columns", c->name, c->type);
    return KMS_OK_RESULT;
}

KMS_RESULT rx_db_resolve(PGconn *db, rx_plan *p)
{
    /* "schema.table" or "table"; each part quoted on its own. */
    const char *dot = strchr(p->table, '.');
    if (dot != NULL) {
        char *s = NULL;
        char *t = NULL;
        KMS_GUARD(ident(db, p->table, (size_t)(dot - p->table), &s));
        kms_result r = ident(db, dot + 1, strlen(dot + 1), &t);
        if (!kms_is_ok(r)) {
            free(s);
            return r;
        }
        size_t n = strlen(s) + strlen(t) + 2;
        p->table_ident = malloc(n);
        if (p->table_ident != NULL) {
            snprintf(p->table_ident, n, "%s.%s", s, t);
        }
        free(s);
        free(t);
        KMS_ENSURE(p->table_ident != NULL, KMS_ERR_NO_MEMORY);
    } else {
        KMS_GUARD(ident(db, p->table, strlen(p->table), &p->table_ident));
    }
    const char *params[1] = {p->table_ident};
    PGresult *r =
        PQexecParams(db, "SELECT to_regclass($1) IS NOT NULL", 1, NULL, params, NULL, NULL, 0);
    bool exists = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
                  strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    KMS_ENSURE_MSG(exists, KMS_ERR_INVALID_ARGUMENT, "no table %s", p->table);
    for (size_t i = 0; i < p->nkeys; i++) {
        KMS_GUARD(column_resolve(db, p, &p->keys[i], false));
    }
    for (size_t i = 0; i < p->ncols; i++) {
        KMS_GUARD(column_resolve(db, p, &p->cols[i], true));
        for (size_t k = 0; k < p->nkeys; k++) {
            KMS_ENSURE_MSG(strcmp(p->cols[i].name, p->keys[k].name) != 0, KMS_ERR_INVALID_ARGUMENT,
                           "column %s is also a key column", p->cols[i].name);
        }
    }
    /* Keyset pagination needs a unique key: a primary key or a unique
     * index over exactly the key columns (in any order). */
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&q, 0);
    KMS_GUARD(sb(&q, "SELECT count(*) FROM pg_index i WHERE i.indrelid = $1::regclass AND "
                     "i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL AND "
                     "i.indnkeyatts = "));
    KMS_GUARD(kms_buf_appendf(&q, "%zu", p->nkeys));
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(sb(&q, " AND (SELECT attnum FROM pg_attribute WHERE attrelid = i.indrelid AND "
                         "attname = $"));
        KMS_GUARD(kms_buf_appendf(&q, "%zu) = ANY (i.indkey::int2[])", k + 2));
    }
    const char *kp[1 + RX_MAX_KEY_COLUMNS] = {p->table_ident};
    for (size_t k = 0; k < p->nkeys; k++) {
        kp[k + 1] = p->keys[k].name;
    }
    KMS_GUARD(db_exec(db, sz(&q), (int)(p->nkeys + 1), kp, PGRES_TUPLES_OK, &r));
    bool unique = strcmp(PQgetvalue(r, 0, 0), "0") != 0;
    PQclear(r);
    KMS_ENSURE_MSG(unique, KMS_ERR_INVALID_ARGUMENT,
                   "the key column(s) of %s must form a unique key (primary key or unique "
                   "index) for keyset pagination",
                   p->table);
    return KMS_OK_RESULT;
}

/* ---- SQL fragments ---- */

static kms_result sql_keys(kms_buf *q, const rx_plan *p, const char *prefix, const char *suffix)
{
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(
            kms_buf_appendf(q, "%s%s%s%s", k == 0 ? "" : ", ", prefix, p->keys[k].ident, suffix));
    }
    return KMS_OK_RESULT;
}

/* The key values as text for the select list, aliased: a bare "id::text"
 * would be an output column named id, and ORDER BY id would then sort by
 * that text (PostgreSQL resolves ORDER BY names against output columns
 * first), not by the column's own order. */
static kms_result sql_keys_text(kms_buf *q, const rx_plan *p)
{
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(
            kms_buf_appendf(q, "%s%s::text AS rx_k%zu", k == 0 ? "" : ", ", p->keys[k].ident, k));
    }
    return KMS_OK_RESULT;
}

/* "($a::t1, $b::t2)" with parameters starting at first. */
static kms_result sql_key_params(kms_buf *q, const rx_plan *p, size_t first)
{
    KMS_GUARD(sb(q, "("));
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(kms_buf_appendf(q, "%s$%zu::%s", k == 0 ? "" : ", ", first + k, p->keys[k].type));
    }
    return sb(q, ")");
}

static kms_result sql_where(kms_buf *q, const rx_plan *p)
{
    KMS_GUARD(sb(q, " WHERE ("));
    KMS_GUARD(sb(q, p->where != NULL ? p->where : "TRUE"));
    KMS_GUARD(sb(q, ") AND ("));
    KMS_GUARD(sql_keys(q, p, "", ""));
    return sb(q, ") IS NOT NULL");
}

/* ---- key guess and run id ---- */

KMS_RESULT rx_db_guess_key(PGconn *db, const rx_plan *p, char out[KMS_KEY_NAME_MAX_BYTES + 1])
{
    out[0] = '\0';
    for (size_t c = 0; c < p->ncols; c++) {
        kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
        kms_buf_init(&q, 0);
        KMS_GUARD(kms_buf_appendf(&q, "SELECT %s FROM %s", p->cols[c].ident, p->table_ident));
        KMS_GUARD(sql_where(&q, p));
        KMS_GUARD(
            kms_buf_appendf(&q, " AND %s IS NOT NULL LIMIT %d", p->cols[c].ident, RX_GUESS_SAMPLE));
        PGresult *r = PQexecParams(db, sz(&q), 0, NULL, NULL, NULL, NULL, 1);
        char err[512];
        kms_err code;
        if (db_check(db, r, PGRES_TUPLES_OK, err, sizeof(err), &code) != DB_OK) {
            PQclear(r);
            KMS_BAIL_MSG(code, "%s", err);
        }
        for (int i = 0; i < PQntuples(r); i++) {
            kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
            kms_buf_init(&scratch, 0);
            kms_token t;
            if (!kms_is_ok(kms_token_parse_any((const uint8_t *)PQgetvalue(r, i, 0),
                                               (size_t)PQgetlength(r, i, 0), &scratch, &t)) ||
                t.kind != KMS_TOKEN_KIND_AEAD) {
                continue;
            }
            if (out[0] == '\0') {
                memcpy(out, t.key_name, sizeof(t.key_name));
            } else if (strcmp(out, t.key_name) != 0) {
                PQclear(r);
                KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT,
                             "the columns hold tokens of several keys (%s, %s, ...): name one "
                             "with --key",
                             out, t.key_name);
            }
        }
        PQclear(r);
    }
    KMS_ENSURE_MSG(out[0] != '\0', KMS_ERR_INVALID_ARGUMENT,
                   "no token found in a sample of the columns: name the key with --key");
    return KMS_OK_RESULT;
}

KMS_RESULT rx_run_id(rx_plan *p)
{
    /* What defines a run: the table, key columns, columns, key, filter and
     * the target (primary) version. After a new rotation the same command
     * is a new run; a run interrupted by a rotation starts over under the
     * new primary (the rows it finished are then just rewrapped once
     * more, to the version that is current now). */
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&b, 0);
    KMS_GUARD(kms_buf_appendf(&b, "kms-reencrypt run v1%c%s%c", 0, p->table_ident, 0));
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(kms_buf_appendf(&b, "k:%s%c", p->keys[k].ident, 0));
    }
    for (size_t c = 0; c < p->ncols; c++) {
        KMS_GUARD(kms_buf_appendf(&b, "c:%s%c", p->cols[c].ident, 0));
    }
    KMS_GUARD(kms_buf_appendf(&b, "%s%c%s%c%u", p->key, 0, p->where != NULL ? p->where : "", 0,
                              p->primary));
    uint8_t h[KMS_SHA256_BYTES];
    KMS_GUARD(kms_sha256(b.data, b.len, h));
    for (size_t i = 0; i < RX_RUN_ID_HEX_BYTES / 2; i++) {
        snprintf(p->run_id + 2 * i, 3, "%02x", h[i]);
    }
    return KMS_OK_RESULT;
}

KMS_RESULT rx_db_lock_run(PGconn *db, const rx_plan *p)
{
    const char *params[1] = {p->run_id};
    PGresult *r = NULL;
    KMS_GUARD(db_exec(db, "SELECT pg_try_advisory_lock(hashtextextended($1, 7497))", 1, params,
                      PGRES_TUPLES_OK, &r));
    bool got = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    KMS_ENSURE_MSG(got, KMS_ERR_CONFLICT,
                   "another kms-reencrypt is running this run (%s); wait for it or stop it",
                   p->run_id);
    return KMS_OK_RESULT;
}

/* ---- checkpoint ---- */

static const char k_ddl[] =
    "CREATE TABLE IF NOT EXISTS " RX_CHECKPOINT_TABLE " ("
    " run_id text NOT NULL, worker integer NOT NULL,"
    " table_name text NOT NULL, key_columns text NOT NULL, columns text NOT NULL,"
    " key_name text NOT NULL, where_sql text NOT NULL, target_version bigint NOT NULL,"
    " range_lo text[], range_hi text[], last_key text[],"
    " pass integer NOT NULL DEFAULT 1, rows_total bigint NOT NULL DEFAULT 0,"
    " rows_seen bigint NOT NULL DEFAULT 0, cells_null bigint NOT NULL DEFAULT 0,"
    " cells_not_token bigint NOT NULL DEFAULT 0, cells_other_key bigint NOT NULL DEFAULT 0,"
    " cells_current bigint NOT NULL DEFAULT 0, cells_rewrapped bigint NOT NULL DEFAULT 0,"
    " cells_conflict bigint NOT NULL DEFAULT 0, cells_failed bigint NOT NULL DEFAULT 0,"
    " pass_conflicts bigint NOT NULL DEFAULT 0, batches bigint NOT NULL DEFAULT 0,"
    " started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz,"
    " finished_at timestamptz, PRIMARY KEY (run_id, worker));"
    "CREATE TABLE IF NOT EXISTS " RX_PROBLEM_TABLE " ("
    " run_id text NOT NULL, key_values text[] NOT NULL, column_name text NOT NULL,"
    " kind text NOT NULL, detail text, seen_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (run_id, key_values, column_name))";

static kms_result json_keys(const char *text, char **out, size_t n, bool *has)
{
    *has = false;
    if (text == NULL) {
        return KMS_OK_RESULT;
    }
    json_error_t e;
    json_t *a = json_loads(text, 0, &e);
    bool ok = json_is_array(a) && json_array_size(a) == n;
    for (size_t i = 0; ok && i < n; i++) {
        const char *s = json_string_value(json_array_get(a, i));
        out[i] = s != NULL ? strdup(s) : NULL;
        ok = out[i] != NULL;
    }
    json_decref(a);
    KMS_ENSURE_MSG(ok, KMS_ERR_STORE_CORRUPT,
                   "checkpoint: a key value array does not match "
                   "the key columns");
    *has = true;
    return KMS_OK_RESULT;
}

static uint64_t u64(const PGresult *r, int row, int col)
{
    return strtoull(PQgetvalue(r, row, col), NULL, 10);
}

static kms_result checkpoint_load(PGconn *db, rx_plan *p, rx_worker *w, unsigned *n)
{
    const char *params[1] = {p->run_id};
    PGresult *r = NULL;
    KMS_GUARD(db_exec(db,
                      "SELECT worker, array_to_json(range_lo)::text, array_to_json(range_hi)::text,"
                      " array_to_json(last_key)::text, pass, rows_total, rows_seen, cells_null,"
                      " cells_not_token, cells_other_key, cells_current, cells_rewrapped,"
                      " cells_conflict, cells_failed, pass_conflicts, batches,"
                      " finished_at IS NOT NULL FROM " RX_CHECKPOINT_TABLE
                      " WHERE run_id = $1 ORDER BY worker",
                      1, params, PGRES_TUPLES_OK, &r));
    int rows = PQntuples(r);
    *n = 0;
    kms_result res = KMS_OK_RESULT;
    for (int i = 0; i < rows && kms_is_ok(res); i++) {
        if (i >= RX_MAX_WORKERS || (int)u64(r, i, 0) != i) {
            res = kms_error_raisef(KMS_ERR_STORE_CORRUPT, __FILE__, __LINE__,
                                   "checkpoint of run %s: unexpected worker rows", p->run_id);
            break;
        }
        rx_worker *x = &w[i];
        x->p = p;
        x->id = (unsigned)i;
        const char *txt[3];
        for (int k = 0; k < 3; k++) {
            txt[k] = PQgetisnull(r, i, 1 + k) ? NULL : PQgetvalue(r, i, 1 + k);
        }
        res = json_keys(txt[0], x->lo, p->nkeys, &x->has_lo);
        if (kms_is_ok(res)) {
            res = json_keys(txt[1], x->hi, p->nkeys, &x->has_hi);
        }
        if (kms_is_ok(res)) {
            res = json_keys(txt[2], x->last, p->nkeys, &x->has_last);
        }
        x->pass = (unsigned)u64(r, i, 4);
        x->rows_total = u64(r, i, 5);
        atomic_store(&x->base.seen, u64(r, i, 6));
        atomic_store(&x->base.nulls, u64(r, i, 7));
        atomic_store(&x->base.not_token, u64(r, i, 8));
        atomic_store(&x->base.other_key, u64(r, i, 9));
        atomic_store(&x->base.current, u64(r, i, 10));
        atomic_store(&x->base.rewrapped, u64(r, i, 11));
        atomic_store(&x->base.conflicts, u64(r, i, 12));
        atomic_store(&x->base.failed, u64(r, i, 13));
        x->pass_conflicts = u64(r, i, 14);
        atomic_store(&x->base.batches, u64(r, i, 15));
        x->finished = strcmp(PQgetvalue(r, i, 16), "t") == 0;
        (*n)++;
    }
    PQclear(r);
    return res;
}

static kms_result checkpoint_insert(PGconn *db, const rx_plan *p, unsigned worker, const char *lo,
                                    const char *hi, uint64_t total)
{
    kms_buf cols KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf keys KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&cols, 0);
    kms_buf_init(&keys, 0);
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(kms_buf_appendf(&keys, "%s%s", k == 0 ? "" : ",", p->keys[k].name));
    }
    for (size_t c = 0; c < p->ncols; c++) {
        KMS_GUARD(kms_buf_appendf(&cols, "%s%s", c == 0 ? "" : ",", p->cols[c].name));
    }
    char wk[16], ver[16], tot[24];
    snprintf(wk, sizeof(wk), "%u", worker);
    snprintf(ver, sizeof(ver), "%u", p->primary);
    snprintf(tot, sizeof(tot), "%llu", (unsigned long long)total);
    const char *params[] = {
        p->run_id, wk, p->table, sz(&keys), sz(&cols), p->key, p->where != NULL ? p->where : "",
        ver,       lo, hi,       tot};
    return db_exec(db,
                   "INSERT INTO " RX_CHECKPOINT_TABLE
                   " (run_id, worker, table_name, key_columns, columns, key_name, where_sql,"
                   " target_version, range_lo, range_hi, rows_total)"
                   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text[], $10::text[], $11)",
                   (int)KMS_ARRAY_LEN(params), params, PGRES_COMMAND_OK, NULL);
}

/* A new run: the key range cut into at most p->workers tiles of equal row
 * counts (ntile over the key order); tile i covers (max of tile i-1, max
 * of tile i], the last one open above so rows inserted past the end at
 * run time are covered too. */
static kms_result checkpoint_create(PGconn *db, rx_plan *p)
{
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&q, 0);
    KMS_GUARD(sb(&q, "WITH s AS (SELECT "));
    KMS_GUARD(sql_keys(&q, p, "", ""));
    KMS_GUARD(kms_buf_appendf(&q, ", ntile(%u) OVER (ORDER BY ", p->workers));
    KMS_GUARD(sql_keys(&q, p, "", ""));
    KMS_GUARD(kms_buf_appendf(&q, ") AS rx_tile FROM %s", p->table_ident));
    KMS_GUARD(sql_where(&q, p));
    KMS_GUARD(sb(&q, ") SELECT DISTINCT ON (rx_tile) rx_tile, count(*) OVER (PARTITION BY "
                     "rx_tile), ARRAY["));
    KMS_GUARD(sql_keys(&q, p, "", "::text"));
    KMS_GUARD(sb(&q, "]::text FROM s ORDER BY rx_tile"));
    for (size_t k = 0; k < p->nkeys; k++) {
        KMS_GUARD(kms_buf_appendf(&q, ", %s DESC", p->keys[k].ident));
    }
    PGresult *r = NULL;
    KMS_GUARD(db_exec(db, sz(&q), 0, NULL, PGRES_TUPLES_OK, &r));
    int tiles = PQntuples(r);
    kms_result res = KMS_OK_RESULT;
    if (tiles == 0) {
        res = checkpoint_insert(db, p, 0, NULL, NULL, 0);
    }
    for (int i = 0; i < tiles && kms_is_ok(res); i++) {
        const char *lo = i == 0 ? NULL : PQgetvalue(r, i - 1, 2);
        const char *hi = i == tiles - 1 ? NULL : PQgetvalue(r, i, 2);
        res = checkpoint_insert(db, p, (unsigned)i, lo, hi, u64(r, i, 1));
    }
    PQclear(r);
    return res;
}

KMS_RESULT rx_db_checkpoint_open(PGconn *db, rx_plan *p, rx_worker *w, unsigned *nworkers,
                                 bool *created)
{
    *created = false;
    KMS_GUARD(db_exec(db, k_ddl, 0, NULL, PGRES_COMMAND_OK, NULL));
    KMS_GUARD(checkpoint_load(db, p, w, nworkers));
    if (*nworkers > 0) {
        return KMS_OK_RESULT;
    }
    KMS_GUARD(db_exec(db, "BEGIN", 0, NULL, PGRES_COMMAND_OK, NULL));
    kms_result r = checkpoint_create(db, p);
    if (kms_is_ok(r)) {
        r = db_exec(db, "COMMIT", 0, NULL, PGRES_COMMAND_OK, NULL);
    } else {
        PQclear(PQexec(db, "ROLLBACK"));
    }
    KMS_GUARD(r);
    *created = true;
    return checkpoint_load(db, p, w, nworkers);
}

void rx_worker_free(rx_worker *w)
{
    for (size_t k = 0; k < RX_MAX_KEY_COLUMNS; k++) {
        free(w->lo[k]);
        free(w->hi[k]);
        free(w->last[k]);
        w->lo[k] = w->hi[k] = w->last[k] = NULL;
    }
}

/* ---- throttle ---- */

static pthread_mutex_t g_throttle_lock = PTHREAD_MUTEX_INITIALIZER;
static double g_throttle_next;

void rx_throttle(const rx_plan *p, unsigned n)
{
    if (p->max_rps <= 0 || n == 0) {
        return;
    }
    /* A shared schedule: each batch books n / rate seconds after the
     * previous booking, and waits for its slot. */
    pthread_mutex_lock(&g_throttle_lock);
    double now = rx_now();
    double start = g_throttle_next > now ? g_throttle_next : now;
    g_throttle_next = start + (double)n / p->max_rps;
    pthread_mutex_unlock(&g_throttle_lock);
    if (start > now) {
        rx_sleep(start - now, p->stop);
    }
}

/* ---- a worker's batch ---- */

typedef enum {
    P_NOT_TOKEN,
    P_OTHER_KEY,
    P_FAILED,
} problem_kind;

static const char *const k_problem_names[] = {"not_token", "other_key", "failed"};

typedef struct {
    int row;
    size_t col;
    bool binary;   /* the cell holds the binary form (else "kms1:" text) */
    char *text;    /* token text sent to kmsd */
    char *newtext; /* rewrapped token text (owned by the rx_item) */
} cell;

typedef struct {
    kms_buf keys, cols, kinds, details; /* text[] literals of problems */
    size_t n;
} problems;

static kms_result problem_add(const rx_plan *p, problems *pr, const PGresult *r, int row,
                              size_t col, problem_kind kind, const char *detail)
{
    kms_buf *bufs[4] = {&pr->keys, &pr->cols, &pr->kinds, &pr->details};
    for (size_t i = 0; i < 4; i++) {
        KMS_GUARD(kms_buf_append(bufs[i], pr->n == 0 ? "{" : ",", 1));
    }
    kms_buf one KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&one, 0);
    char *vals[RX_MAX_KEY_COLUMNS];
    for (size_t k = 0; k < p->nkeys; k++) {
        vals[k] = PQgetvalue(r, row, (int)k);
    }
    KMS_GUARD(key_array(&one, vals, p->nkeys));
    KMS_GUARD(arr_text(&pr->keys, (const char *)one.data, one.len));
    KMS_GUARD(arr_text(&pr->cols, p->cols[col].name, strlen(p->cols[col].name)));
    KMS_GUARD(arr_text(&pr->kinds, k_problem_names[kind], strlen(k_problem_names[kind])));
    KMS_GUARD(arr_text(&pr->details, detail, strlen(detail)));
    pr->n++;
    uint64_t seen = atomic_fetch_add(&((rx_plan *)p)->reported, 1);
    if (seen < p->report_limit) {
        char ks[256];
        key_show(p, r, row, ks, sizeof(ks));
        rx_log("%s %s column %s: %s%s%s", kind == P_FAILED ? "FAILED" : "skipped", ks,
               p->cols[col].name, k_problem_names[kind], *detail ? ": " : "", detail);
    } else if (seen == p->report_limit) {
        rx_log("more problems: not printed (--report-limit); all are in table " RX_PROBLEM_TABLE);
    }
    return KMS_OK_RESULT;
}

static void problems_free(problems *pr)
{
    kms_buf_free(&pr->keys);
    kms_buf_free(&pr->cols);
    kms_buf_free(&pr->kinds);
    kms_buf_free(&pr->details);
    pr->n = 0;
}

typedef struct {
    uint64_t seen, nulls, not_token, other_key, current, rewrapped, conflicts, failed;
} batch_counts;

/* Reads the next batch of the range: the key values as text and the
 * columns in binary form (bytea as its bytes, text as its UTF-8). */
static kms_result batch_read(rx_worker *w, PGconn *db, PGresult **out, db_st *st, kms_err *code)
{
    const rx_plan *p = w->p;
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&q, 0);
    KMS_GUARD(sb(&q, "SELECT "));
    KMS_GUARD(sql_keys_text(&q, p));
    for (size_t c = 0; c < p->ncols; c++) {
        KMS_GUARD(kms_buf_appendf(&q, ", %s", p->cols[c].ident));
    }
    KMS_GUARD(kms_buf_appendf(&q, " FROM %s", p->table_ident));
    KMS_GUARD(sql_where(&q, p));
    const char *params[2 * RX_MAX_KEY_COLUMNS];
    size_t np = 0;
    char *const *from = w->has_last ? w->last : (w->has_lo ? w->lo : NULL);
    if (from != NULL) {
        KMS_GUARD(sb(&q, " AND ("));
        KMS_GUARD(sql_keys(&q, p, "", ""));
        KMS_GUARD(sb(&q, ") > "));
        KMS_GUARD(sql_key_params(&q, p, np + 1));
        for (size_t k = 0; k < p->nkeys; k++) {
            params[np++] = from[k];
        }
    }
    if (w->has_hi) {
        KMS_GUARD(sb(&q, " AND ("));
        KMS_GUARD(sql_keys(&q, p, "", ""));
        KMS_GUARD(sb(&q, ") <= "));
        KMS_GUARD(sql_key_params(&q, p, np + 1));
        for (size_t k = 0; k < p->nkeys; k++) {
            params[np++] = w->hi[k];
        }
    }
    KMS_GUARD(sb(&q, " ORDER BY "));
    KMS_GUARD(sql_keys(&q, p, "", ""));
    KMS_GUARD(kms_buf_appendf(&q, " LIMIT %u", p->batch));
    PGresult *r = PQexecParams(db, sz(&q), (int)np, NULL, params, NULL, NULL, 1);
    char err[512];
    *st = db_check(db, r, PGRES_TUPLES_OK, err, sizeof(err), code);
    if (*st != DB_OK) {
        PQclear(r);
        snprintf(w->error, sizeof(w->error), "%s", err);
        return KMS_OK_RESULT;
    }
    *out = r;
    return KMS_OK_RESULT;
}

/* PostgreSQL's binary array format (array_send/array_recv, src/backend/
 * utils/adt/arrayfuncs.c): ndim, has-null flag, element type OID, then per
 * dimension its length and lower bound, then each element as a 4-byte
 * length and its bytes; all integers big-endian. Binary parameters spare
 * the server parsing text literals and hex (a third of its CPU per batch). */
#define RX_OID_BYTEA 17
#define RX_OID_TEXT  25

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static kms_result barr_begin(kms_buf *b, uint32_t oid)
{
    uint8_t *p = NULL;
    KMS_GUARD(kms_buf_extend(b, 20, &p));
    put_u32(p, 1);       /* ndim */
    put_u32(p + 4, 0);   /* no NULLs */
    put_u32(p + 8, oid); /* element type */
    put_u32(p + 12, 0);  /* length: set by barr_end */
    put_u32(p + 16, 1);  /* lower bound */
    return KMS_OK_RESULT;
}

static kms_result barr_add(kms_buf *b, const void *v, size_t n)
{
    KMS_ENSURE(n <= INT32_MAX, KMS_ERR_LIMIT_EXCEEDED);
    uint8_t *p = NULL;
    KMS_GUARD(kms_buf_extend(b, 4 + n, &p));
    put_u32(p, (uint32_t)n);
    memcpy(p + 4, v, n);
    return KMS_OK_RESULT;
}

static void barr_end(kms_buf *b, size_t count)
{
    put_u32(b->data + 12, (uint32_t)count);
}

/* One column's conditional write-back of a batch:
 *   UPDATE t SET c = v.n FROM unnest($keys..., $old, $new) AS v(...)
 *   WHERE t.k = v.k::type AND t.c IS NOT DISTINCT FROM v.o
 * One statement per column and batch (arrays, not a statement per row),
 * so a batch costs a few round trips whatever its size. */
static kms_result column_write(rx_worker *w, PGconn *db, const PGresult *rows, size_t col,
                               const cell *cells, size_t ncells, uint64_t *updated, db_st *st,
                               kms_err *code)
{
    const rx_plan *p = w->p;
    const rx_column *c = &p->cols[col];
    const uint32_t voids = c->bytea ? RX_OID_BYTEA : RX_OID_TEXT;
    kms_buf karr[RX_MAX_KEY_COLUMNS];
    kms_buf oarr KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf narr KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&oarr, RX_SQL_MAX_BYTES);
    kms_buf_init(&narr, RX_SQL_MAX_BYTES);
    kms_buf_init(&q, 0);
    kms_buf_init(&scratch, 0);
    for (size_t k = 0; k < p->nkeys; k++) {
        kms_buf_init(&karr[k], RX_SQL_MAX_BYTES);
    }
    kms_result res = barr_begin(&oarr, voids);
    if (kms_is_ok(res)) {
        res = barr_begin(&narr, voids);
    }
    for (size_t k = 0; k < p->nkeys && kms_is_ok(res); k++) {
        res = barr_begin(&karr[k], RX_OID_TEXT);
    }
    size_t n = 0;
    for (size_t i = 0; i < ncells && kms_is_ok(res); i++) {
        const cell *x = &cells[i];
        if (x->col != col || x->newtext == NULL) {
            continue;
        }
        for (size_t k = 0; k < p->nkeys && kms_is_ok(res); k++) {
            const char *v = PQgetvalue(rows, x->row, (int)k);
            res = barr_add(&karr[k], v, strlen(v));
        }
        if (!kms_is_ok(res)) {
            break;
        }
        const uint8_t *old = (const uint8_t *)PQgetvalue(rows, x->row, (int)(p->nkeys + col));
        size_t old_len = (size_t)PQgetlength(rows, x->row, (int)(p->nkeys + col));
        res = barr_add(&oarr, old, old_len);
        if (kms_is_ok(res) && c->bytea && x->binary) {
            /* Written back in the form it was read: binary. */
            kms_token t;
            kms_buf_reset(&scratch);
            res =
                kms_token_parse_any((const uint8_t *)x->newtext, strlen(x->newtext), &scratch, &t);
            if (kms_is_ok(res)) {
                res = barr_add(&narr, scratch.data, scratch.len);
            }
        } else if (kms_is_ok(res)) {
            res = barr_add(&narr, x->newtext, strlen(x->newtext));
        }
        n++;
    }
    const char *params[RX_MAX_KEY_COLUMNS + 2];
    int lengths[RX_MAX_KEY_COLUMNS + 2];
    int formats[RX_MAX_KEY_COLUMNS + 2];
    if (kms_is_ok(res) && n > 0) {
        for (size_t k = 0; k < p->nkeys; k++) {
            barr_end(&karr[k], n);
            params[k] = (const char *)karr[k].data;
            lengths[k] = (int)karr[k].len;
        }
        barr_end(&oarr, n);
        barr_end(&narr, n);
        params[p->nkeys] = (const char *)oarr.data;
        lengths[p->nkeys] = (int)oarr.len;
        params[p->nkeys + 1] = (const char *)narr.data;
        lengths[p->nkeys + 1] = (int)narr.len;
        for (size_t i = 0; i < p->nkeys + 2; i++) {
            formats[i] = 1;
        }
        const char *at = c->bytea ? "bytea[]" : "text[]";
        res = kms_buf_appendf(&q, "UPDATE %s AS rx_t SET %s = rx_v.rx_n FROM unnest(",
                              p->table_ident, c->ident);
        for (size_t k = 0; k < p->nkeys && kms_is_ok(res); k++) {
            res = kms_buf_appendf(&q, "$%zu::text[], ", k + 1);
        }
        if (kms_is_ok(res)) {
            res = kms_buf_appendf(&q, "$%zu::%s, $%zu::%s) AS rx_v(", p->nkeys + 1, at,
                                  p->nkeys + 2, at);
        }
        for (size_t k = 0; k < p->nkeys && kms_is_ok(res); k++) {
            res = kms_buf_appendf(&q, "rx_k%zu, ", k);
        }
        if (kms_is_ok(res)) {
            res = sb(&q, "rx_o, rx_n) WHERE ");
        }
        for (size_t k = 0; k < p->nkeys && kms_is_ok(res); k++) {
            res = kms_buf_appendf(&q, "rx_t.%s = rx_v.rx_k%zu::%s AND ", p->keys[k].ident, k,
                                  p->keys[k].type);
        }
        if (kms_is_ok(res)) {
            res = kms_buf_appendf(&q, "rx_t.%s IS NOT DISTINCT FROM rx_v.rx_o", c->ident);
        }
    }
    *updated = 0;
    *st = DB_OK;
    if (kms_is_ok(res) && n > 0) {
        PGresult *r =
            PQexecParams(db, sz(&q), (int)(p->nkeys + 2), NULL, params, lengths, formats, 0);
        char err[512];
        *st = db_check(db, r, PGRES_COMMAND_OK, err, sizeof(err), code);
        if (*st == DB_OK) {
            *updated = strtoull(PQcmdTuples(r), NULL, 10);
        } else {
            snprintf(w->error, sizeof(w->error), "%s", err);
        }
        PQclear(r);
    }
    for (size_t k = 0; k < p->nkeys; k++) {
        kms_buf_free(&karr[k]);
    }
    return res;
}

static db_st simple(rx_worker *w, PGconn *db, const char *sql, int np, const char *const *params,
                    kms_err *code)
{
    PGresult *r = PQexecParams(db, sql, np, NULL, params, NULL, NULL, 0);
    char err[512];
    db_st st = db_check(db, r, PGRES_COMMAND_OK, err, sizeof(err), code);
    if (st != DB_OK) {
        snprintf(w->error, sizeof(w->error), "%s", err);
    }
    PQclear(r);
    return st;
}

/* The end of a pass over the range: another pass if writes conflicted
 * (the application changed those cells; they may still need work), else
 * the range is finished. Unresolved conflicts after the last pass count as
 * failed cells. */
static kms_result pass_end(rx_worker *w, PGconn *db, db_st *st, kms_err *code)
{
    const rx_plan *p = w->p;
    char wk[16];
    snprintf(wk, sizeof(wk), "%u", w->id);
    const char *params[2] = {p->run_id, wk};
    bool again = w->pass_conflicts > 0 && w->pass < p->max_passes;
    *st = simple(w, db,
                 again ? "UPDATE " RX_CHECKPOINT_TABLE " SET pass = pass + 1, last_key = NULL,"
                         " pass_conflicts = 0, updated_at = now() WHERE run_id = $1 AND worker = $2"
                       : "UPDATE " RX_CHECKPOINT_TABLE " SET finished_at = now(), updated_at = "
                         "now(), cells_failed = cells_failed + pass_conflicts, pass_conflicts = 0"
                         " WHERE run_id = $1 AND worker = $2",
                 2, params, code);
    if (*st != DB_OK) {
        return KMS_OK_RESULT;
    }
    if (again) {
        w->pass++;
        w->pass_conflicts = 0;
        for (size_t k = 0; k < p->nkeys; k++) {
            free(w->last[k]);
            w->last[k] = NULL;
        }
        w->has_last = false;
    } else {
        atomic_fetch_add(&w->c.failed, w->pass_conflicts);
        if (w->pass_conflicts > 0) {
            rx_log("worker %u: %llu cells still changed under us after %u passes: counted as "
                   "failed; run again later",
                   w->id, (unsigned long long)w->pass_conflicts, w->pass);
        }
        w->pass_conflicts = 0;
        w->finished = true;
    }
    return KMS_OK_RESULT;
}

static kms_result one_batch(rx_worker *w, PGconn *db, rx_http *http, db_st *st, kms_err *code)
{
    const rx_plan *p = w->p;
    PGresult *rows = NULL;
    *st = DB_OK;
    rx_throttle(p, p->batch);
    KMS_GUARD(batch_read(w, db, &rows, st, code));
    if (*st != DB_OK) {
        return KMS_OK_RESULT;
    }
    int nrows = PQntuples(rows);
    if (nrows == 0) {
        PQclear(rows);
        return pass_end(w, db, st, code);
    }
    const bool first_pass = w->pass == 1;
    batch_counts bc = {.seen = (uint64_t)nrows};
    size_t cap = (size_t)nrows * p->ncols;
    cell *cells = calloc(cap, sizeof(*cells));
    char **texts = calloc(cap, sizeof(*texts));
    rx_item *items = calloc(cap, sizeof(*items));
    problems pr = {0};
    kms_buf_init(&pr.keys, RX_SQL_MAX_BYTES);
    kms_buf_init(&pr.cols, RX_SQL_MAX_BYTES);
    kms_buf_init(&pr.kinds, RX_SQL_MAX_BYTES);
    kms_buf_init(&pr.details, RX_SQL_MAX_BYTES);
    /* Every cleanup variable is declared before the first goto: a jump
     * past one would run its cleanup on an uninitialised value. */
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf last KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&scratch, 0);
    kms_buf_init(&last, 0);
    kms_result res = KMS_OK_RESULT;
    size_t ncells = 0;
    if (cells == NULL || texts == NULL || items == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto done;
    }
    /* Classify every cell locally: only tokens of this key under another
     * version than the primary go to kmsd. */
    for (int i = 0; i < nrows && kms_is_ok(res); i++) {
        for (size_t c = 0; c < p->ncols && kms_is_ok(res); c++) {
            int f = (int)(p->nkeys + c);
            if (PQgetisnull(rows, i, f)) {
                bc.nulls++;
                continue;
            }
            const uint8_t *v = (const uint8_t *)PQgetvalue(rows, i, f);
            size_t len = (size_t)PQgetlength(rows, i, f);
            kms_token t;
            kms_buf_reset(&scratch);
            if (!kms_is_ok(kms_token_parse_any(v, len, &scratch, &t))) {
                bc.not_token++;
                if (first_pass) {
                    res = problem_add(p, &pr, rows, i, c, P_NOT_TOKEN, "");
                }
                continue;
            }
            if (t.kind != KMS_TOKEN_KIND_AEAD) {
                bc.not_token++;
                if (first_pass) {
                    res = problem_add(p, &pr, rows, i, c, P_NOT_TOKEN, "a MAC token");
                }
                continue;
            }
            if (strcmp(t.key_name, p->key) != 0) {
                bc.other_key++;
                if (first_pass) {
                    res = problem_add(p, &pr, rows, i, c, P_OTHER_KEY, t.key_name);
                }
                continue;
            }
            if (t.key_version == p->primary) {
                bc.current++;
                continue;
            }
            cell *x = &cells[ncells];
            x->row = i;
            x->col = c;
            bool text_form = len >= KMS_TOKEN_TEXT_PREFIX_BYTES &&
                             memcmp(v, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES) == 0;
            x->binary = !text_form;
            kms_buf tb = {0};
            kms_buf_init(&tb, 0);
            res = text_form ? kms_buf_append(&tb, v, len) : kms_token_to_text(v, len, &tb);
            if (kms_is_ok(res)) {
                res = kms_buf_terminate(&tb);
            }
            if (!kms_is_ok(res)) {
                kms_buf_free(&tb);
                break;
            }
            x->text = (char *)tb.data; /* owned by the cell now */
            texts[ncells] = x->text;
            ncells++;
        }
    }
    if (!kms_is_ok(res)) {
        goto done;
    }
    /* Rewrap through kmsd in requests of at most --batch-size items (a
     * batch of rows with two columns to do has twice as many cells). */
    for (size_t off = 0; off < ncells; off += p->batch) {
        size_t n = ncells - off < p->batch ? ncells - off : p->batch;
        res = rx_http_batch(http, p->key, "rewrap", texts + off, n, items + off);
        if (!kms_is_ok(res)) {
            snprintf(w->error, sizeof(w->error), "%s", rx_http_last_error(http));
            goto done;
        }
    }
    size_t to_write[RX_MAX_COLUMNS] = {0};
    for (size_t i = 0; i < ncells && kms_is_ok(res); i++) {
        if (items[i].err != KMS_OK) {
            bc.failed++;
            res = problem_add(p, &pr, rows, cells[i].row, cells[i].col, P_FAILED, items[i].code);
        } else if (!items[i].changed) {
            bc.current++; /* already under the primary by kmsd's account */
        } else {
            cells[i].newtext = items[i].token;
            to_write[cells[i].col]++;
        }
    }
    if (!kms_is_ok(res)) {
        goto done;
    }
    /* One transaction: the writes, the problems and the checkpoint. */
    *st = simple(w, db, "BEGIN", 0, NULL, code);
    if (*st != DB_OK) {
        goto done;
    }
    for (size_t c = 0; c < p->ncols && *st == DB_OK && kms_is_ok(res); c++) {
        if (to_write[c] == 0) {
            continue;
        }
        uint64_t updated = 0;
        res = column_write(w, db, rows, c, cells, ncells, &updated, st, code);
        if (*st == DB_OK && kms_is_ok(res)) {
            bc.rewrapped += updated;
            bc.conflicts += to_write[c] - updated;
        }
    }
    if (*st == DB_OK && kms_is_ok(res) && pr.n > 0) {
        kms_buf *bufs[4] = {&pr.keys, &pr.cols, &pr.kinds, &pr.details};
        const char *params[5] = {p->run_id};
        for (size_t i = 0; i < 4 && kms_is_ok(res); i++) {
            res = kms_buf_append(bufs[i], "}", 1);
            params[i + 1] = sz(bufs[i]);
        }
        if (kms_is_ok(res)) {
            *st = simple(w, db,
                         "INSERT INTO " RX_PROBLEM_TABLE
                         " (run_id, key_values, column_name, kind, detail) SELECT $1, k::text[],"
                         " c, kd, d FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])"
                         " AS x(k, c, kd, d) ON CONFLICT (run_id, key_values, column_name) DO "
                         "UPDATE SET kind = EXCLUDED.kind, detail = EXCLUDED.detail, seen_at = "
                         "now()",
                         5, params, code);
        }
    }
    char *lastv[RX_MAX_KEY_COLUMNS];
    for (size_t k = 0; k < p->nkeys; k++) {
        lastv[k] = PQgetvalue(rows, nrows - 1, (int)k);
    }
    if (*st == DB_OK && kms_is_ok(res)) {
        res = key_array(&last, lastv, p->nkeys);
    }
    if (*st == DB_OK && kms_is_ok(res)) {
        /* Classification counts only in the first pass, so that a later
         * pass over the same rows does not count them twice. */
        uint64_t cls[5] = {first_pass ? bc.seen : 0, first_pass ? bc.nulls : 0,
                           first_pass ? bc.not_token : 0, first_pass ? bc.other_key : 0,
                           first_pass ? bc.current : 0};
        char nums[9][24];
        uint64_t all[9] = {cls[0],       cls[1],       cls[2],    cls[3],         cls[4],
                           bc.rewrapped, bc.conflicts, bc.failed, (uint64_t)w->id};
        for (size_t i = 0; i < 9; i++) {
            snprintf(nums[i], sizeof(nums[i]), "%llu", (unsigned long long)all[i]);
        }
        const char *params[] = {p->run_id, nums[8], sz(&last), nums[0], nums[1], nums[2],
                                nums[3],   nums[4], nums[5],   nums[6], nums[7]};
        *st = simple(w, db,
                     "UPDATE " RX_CHECKPOINT_TABLE
                     " SET last_key = $3::text[], rows_seen = rows_seen + $4,"
                     " cells_null = cells_null + $5, cells_not_token = cells_not_token + $6,"
                     " cells_other_key = cells_other_key + $7, cells_current = cells_current + $8,"
                     " cells_rewrapped = cells_rewrapped + $9, cells_conflict = cells_conflict + "
                     "$10, pass_conflicts = pass_conflicts + $10, cells_failed = cells_failed + "
                     "$11, batches = batches + 1, updated_at = now()"
                     " WHERE run_id = $1 AND worker = $2",
                     (int)KMS_ARRAY_LEN(params), params, code);
    }
    if (*st == DB_OK && kms_is_ok(res)) {
        *st = simple(w, db, "COMMIT", 0, NULL, code);
    }
    if (*st != DB_OK || !kms_is_ok(res)) {
        if (PQstatus(db) == CONNECTION_OK) {
            PQclear(PQexec(db, "ROLLBACK"));
        }
        goto done;
    }
    /* Committed: the in-memory state follows the checkpoint. */
    for (size_t k = 0; k < p->nkeys; k++) {
        char *v = strdup(lastv[k]);
        if (v == NULL) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto done;
        }
        free(w->last[k]);
        w->last[k] = v;
    }
    w->has_last = true;
    w->pass_conflicts += bc.conflicts;
    if (first_pass) {
        atomic_fetch_add(&w->c.seen, bc.seen);
        atomic_fetch_add(&w->c.nulls, bc.nulls);
        atomic_fetch_add(&w->c.not_token, bc.not_token);
        atomic_fetch_add(&w->c.other_key, bc.other_key);
        atomic_fetch_add(&w->c.current, bc.current);
    }
    atomic_fetch_add(&w->c.rewrapped, bc.rewrapped);
    atomic_fetch_add(&w->c.conflicts, bc.conflicts);
    atomic_fetch_add(&w->c.failed, bc.failed);
    atomic_fetch_add(&w->c.batches, 1);
done:
    for (size_t i = 0; cells != NULL && i < ncells; i++) {
        free(cells[i].text);
    }
    if (items != NULL) {
        rx_items_free(items, ncells);
    }
    free(items);
    free(texts);
    free(cells);
    problems_free(&pr);
    PQclear(rows);
    return res;
}

void *rx_worker_run(void *arg)
{
    rx_worker *w = arg;
    const rx_plan *p = w->p;
    PGconn *db = NULL;
    rx_http *http = NULL;
    w->result = rx_http_new(&p->http, p->stop, &http);
    if (kms_is_ok(w->result)) {
        w->result = rx_db_connect(p, &db);
        if (!kms_is_ok(w->result)) {
            snprintf(w->error, sizeof(w->error), "%s", kms_error_detail());
        }
    }
    double first_failure = 0;
    double delay = 0.2;
    while (kms_is_ok(w->result) && !w->finished && !*p->stop) {
        db_st st = DB_OK;
        kms_err code = KMS_ERR_IO;
        kms_result r = one_batch(w, db, http, &st, &code);
        if (!kms_is_ok(r)) {
            if (w->error[0] == '\0') {
                snprintf(w->error, sizeof(w->error), "%s", kms_error_detail());
            }
            w->result = r;
            break;
        }
        if (st == DB_OK) {
            first_failure = 0;
            delay = 0.2;
            continue;
        }
        if (st == DB_FAIL) {
            w->result = kms_error_raisef(code, __FILE__, __LINE__, "%s", w->error);
            break;
        }
        /* DB_RETRY: lock timeout, serialization failure, deadlock or a
         * lost connection. The batch was rolled back; redo it. */
        atomic_fetch_add(&w->c.db_retries, 1);
        double now = rx_now();
        if (first_failure == 0) {
            first_failure = now;
        }
        if (now - first_failure > p->http.retry_max_s) {
            w->result = kms_error_raisef(KMS_ERR_UNAVAILABLE, __FILE__, __LINE__,
                                         "gave up after %.0f s: %s", now - first_failure, w->error);
            break;
        }
        rx_sleep(delay, p->stop);
        delay = delay * 2 < 10.0 ? delay * 2 : 10.0;
        if (PQstatus(db) != CONNECTION_OK) {
            PQreset(db);
            if (PQstatus(db) == CONNECTION_OK) {
                char set[96];
                snprintf(set, sizeof(set), "SET lock_timeout = %ld", p->lock_timeout_ms);
                PQclear(PQexec(db, set));
            }
        }
    }
    if (http != NULL) {
        rx_http_stats(http, &w->http_requests, &w->http_retries);
    }
    rx_http_free(http);
    PQfinish(db);
    return NULL;
}

/* ---- census ---- */

static void census_add(rx_census_col *c, uint32_t version)
{
    for (size_t i = 0; i < c->nversions; i++) {
        if (c->v[i].version == version) {
            c->v[i].count++;
            return;
        }
    }
    if (c->nversions < RX_CENSUS_VERSIONS) {
        c->v[c->nversions].version = version;
        c->v[c->nversions].count = 1;
        c->nversions++;
        return;
    }
    c->other_versions++;
}

static int version_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a;
    uint32_t y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Reads the columns through a binary cursor in one read-only transaction
 * (a consistent snapshot) and counts cells per version of the key. */
KMS_RESULT rx_db_census(PGconn *db, const rx_plan *p, rx_census *out)
{
    memset(out, 0, sizeof(*out));
    double t0 = rx_now();
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&q, 0);
    KMS_GUARD(sb(&q, "DECLARE rx_census NO SCROLL CURSOR FOR SELECT "));
    for (size_t c = 0; c < p->ncols; c++) {
        KMS_GUARD(kms_buf_appendf(&q, "%s%s", c == 0 ? "" : ", ", p->cols[c].ident));
    }
    KMS_GUARD(kms_buf_appendf(&q, " FROM %s", p->table_ident));
    KMS_GUARD(sql_where(&q, p));
    KMS_GUARD(db_exec(db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL,
                      PGRES_COMMAND_OK, NULL));
    kms_result res = db_exec(db, sz(&q), 0, NULL, PGRES_COMMAND_OK, NULL);
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&scratch, 0);
    char fetch[64];
    snprintf(fetch, sizeof(fetch), "FETCH %d FROM rx_census", RX_FETCH_ROWS);
    while (kms_is_ok(res) && !*p->stop) {
        PGresult *r = NULL;
        /* Binary results: bytea as its bytes (the extended protocol's
         * result format decides, not the cursor's BINARY option). */
        res = db_exec_fmt(db, fetch, 0, NULL, PGRES_TUPLES_OK, 1, &r);
        if (!kms_is_ok(res)) {
            break;
        }
        int n = PQntuples(r);
        for (int i = 0; i < n; i++) {
            for (size_t c = 0; c < p->ncols; c++) {
                rx_census_col *cc = &out->col[c];
                cc->total++;
                if (PQgetisnull(r, i, (int)c)) {
                    cc->nulls++;
                    continue;
                }
                kms_token t;
                kms_buf_reset(&scratch);
                if (!kms_is_ok(kms_token_parse_any((const uint8_t *)PQgetvalue(r, i, (int)c),
                                                   (size_t)PQgetlength(r, i, (int)c), &scratch,
                                                   &t)) ||
                    t.kind != KMS_TOKEN_KIND_AEAD) {
                    cc->not_token++;
                } else if (strcmp(t.key_name, p->key) != 0) {
                    cc->other_key++;
                } else {
                    census_add(cc, t.key_version);
                }
            }
        }
        PQclear(r);
        if (n == 0) {
            break;
        }
    }
    PQclear(PQexec(db, kms_is_ok(res) ? "COMMIT" : "ROLLBACK"));
    for (size_t c = 0; c < p->ncols; c++) {
        qsort(out->col[c].v, out->col[c].nversions, sizeof(out->col[c].v[0]), version_cmp);
    }
    out->seconds = rx_now() - t0;
    return res;
}

/* ---- verify ---- */

KMS_RESULT rx_db_verify(PGconn *db, const rx_plan *p, rx_http *http, long sample, rx_verify *out)
{
    memset(out, 0, sizeof(*out));
    double t0 = rx_now();
    kms_buf q KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&q, 0);
    KMS_GUARD(sb(&q, "DECLARE rx_verify NO SCROLL CURSOR FOR SELECT "));
    KMS_GUARD(sql_keys_text(&q, p));
    for (size_t c = 0; c < p->ncols; c++) {
        KMS_GUARD(kms_buf_appendf(&q, ", %s", p->cols[c].ident));
    }
    KMS_GUARD(kms_buf_appendf(&q, " FROM %s", p->table_ident));
    KMS_GUARD(sql_where(&q, p));
    if (sample > 0) {
        KMS_GUARD(kms_buf_appendf(&q, " ORDER BY random() LIMIT %ld", sample));
    }
    KMS_GUARD(db_exec(db, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL,
                      PGRES_COMMAND_OK, NULL));
    kms_result res = db_exec(db, sz(&q), 0, NULL, PGRES_COMMAND_OK, NULL);
    char fetch[64];
    snprintf(fetch, sizeof(fetch), "FETCH %u FROM rx_verify", p->batch);
    size_t cap = (size_t)p->batch * p->ncols;
    char **texts = calloc(cap, sizeof(*texts));
    int *rowof = calloc(cap, sizeof(*rowof));
    size_t *colof = calloc(cap, sizeof(*colof));
    rx_item *items = calloc(cap, sizeof(*items));
    if (texts == NULL || rowof == NULL || colof == NULL || items == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    }
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&scratch, 0);
    while (kms_is_ok(res) && !*p->stop) {
        PGresult *r = NULL;
        /* Binary results: bytea as its bytes (the extended protocol's
         * result format decides, not the cursor's BINARY option). */
        res = db_exec_fmt(db, fetch, 0, NULL, PGRES_TUPLES_OK, 1, &r);
        if (!kms_is_ok(res)) {
            break;
        }
        int nrows = PQntuples(r);
        size_t n = 0;
        for (int i = 0; i < nrows && kms_is_ok(res); i++) {
            for (size_t c = 0; c < p->ncols && kms_is_ok(res); c++) {
                int f = (int)(p->nkeys + c);
                if (PQgetisnull(r, i, f)) {
                    continue;
                }
                const uint8_t *v = (const uint8_t *)PQgetvalue(r, i, f);
                size_t len = (size_t)PQgetlength(r, i, f);
                kms_token t;
                kms_buf_reset(&scratch);
                if (!kms_is_ok(kms_token_parse_any(v, len, &scratch, &t)) ||
                    t.kind != KMS_TOKEN_KIND_AEAD || strcmp(t.key_name, p->key) != 0) {
                    continue;
                }
                kms_buf tb = {0};
                kms_buf_init(&tb, 0);
                bool text_form = len >= KMS_TOKEN_TEXT_PREFIX_BYTES &&
                                 memcmp(v, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES) == 0;
                res = text_form ? kms_buf_append(&tb, v, len) : kms_token_to_text(v, len, &tb);
                if (kms_is_ok(res)) {
                    res = kms_buf_terminate(&tb);
                }
                if (!kms_is_ok(res)) {
                    kms_buf_free(&tb);
                    break;
                }
                texts[n] = (char *)tb.data;
                rowof[n] = i;
                colof[n] = c;
                n++;
            }
        }
        if (kms_is_ok(res) && n > 0) {
            res = rx_http_batch(http, p->key, "decrypt", texts, n, items);
        }
        for (size_t i = 0; kms_is_ok(res) && i < n; i++) {
            out->checked++;
            char ks[256];
            if (items[i].err != KMS_OK) {
                out->failed++;
                key_show(p, r, rowof[i], ks, sizeof(ks));
                rx_log("verify FAILED %s column %s: %s", ks, p->cols[colof[i]].name, items[i].code);
            } else if (items[i].version != p->primary) {
                out->not_primary++;
                key_show(p, r, rowof[i], ks, sizeof(ks));
                rx_log("verify: %s column %s decrypts but is under version %u, not the primary "
                       "%u",
                       ks, p->cols[colof[i]].name, items[i].version, p->primary);
            } else {
                out->ok++;
            }
        }
        if (n > 0 && items != NULL) {
            rx_items_free(items, n);
        }
        for (size_t i = 0; i < n; i++) {
            free(texts[i]);
            texts[i] = NULL;
        }
        PQclear(r);
        if (nrows == 0) {
            break;
        }
    }
    PQclear(PQexec(db, kms_is_ok(res) ? "COMMIT" : "ROLLBACK"));
    free(texts);
    free(rowof);
    free(colof);
    free(items);
    out->seconds = rx_now() - t0;
    return res;
}
