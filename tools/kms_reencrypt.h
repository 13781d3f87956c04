/*
 * kms-reencrypt: the plan of a run (resolved from the command line and the
 * database's catalog), the PostgreSQL side (checkpoint, workers, census,
 * verify) in kms_reencrypt_db.c, the kmsd side in kms_reencrypt_http.c,
 * the command line and reporting in kms-reencrypt.c. docs/reencrypt.md is
 * the operator's manual.
 */
#ifndef KMS_REENCRYPT_H
#define KMS_REENCRYPT_H

#include "kms_reencrypt_http.h"
#include "kms_result.h"
#include "kms_token.h"

#include <libpq-fe.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define RX_MAX_KEY_COLUMNS  8
#define RX_MAX_COLUMNS      16
#define RX_MAX_WORKERS      64
#define RX_MAX_BATCH        1000 /* kmsd's max_batch_items ceiling */
#define RX_RUN_ID_HEX_BYTES 32
#define RX_CENSUS_VERSIONS  256
#define RX_CHECKPOINT_TABLE "kms_reencrypt_checkpoint"
#define RX_PROBLEM_TABLE    "kms_reencrypt_problem"

/* Exit codes of kms-reencrypt (docs/reencrypt.md). Errors otherwise exit
 * with their entry's code in crypto/kms_error.c. */
#define RX_EXIT_OK          0
#define RX_EXIT_ROWS_FAILED 1
#define RX_EXIT_INTERRUPTED 75

typedef struct {
    char *name;  /* as given */
    char *ident; /* quoted identifier (PQescapeIdentifier) */
    char *type;  /* format_type(), for casts */
    bool bytea;
} rx_column;

/* Counts of one worker. Values are cells (row x column), except seen
 * (rows read in the first pass). */
typedef struct {
    _Atomic uint64_t seen, nulls, not_token, other_key, current, rewrapped, conflicts, failed,
        batches, db_retries;
} rx_counts;

typedef struct {
    uint64_t nulls, not_token, other_key, total;
    size_t nversions;
    struct {
        uint32_t version;
        uint64_t count;
    } v[RX_CENSUS_VERSIONS];
    uint64_t other_versions; /* more distinct versions than the table holds */
} rx_census_col;

typedef struct {
    rx_census_col col[RX_MAX_COLUMNS];
    double seconds;
} rx_census;

typedef struct {
    uint64_t checked, ok, not_primary, failed;
    double seconds;
} rx_verify;

typedef struct {
    /* from the command line */
    const char *conninfo;
    const char *table;
    const char *where;
    char key[KMS_KEY_NAME_MAX_BYTES + 1];
    rx_http_conf http;
    unsigned workers;
    unsigned batch;
    unsigned max_passes;
    double max_rps;
    long lock_timeout_ms;
    unsigned report_limit;
    /* resolved */
    char *table_ident;
    rx_column keys[RX_MAX_KEY_COLUMNS];
    size_t nkeys;
    rx_column cols[RX_MAX_COLUMNS];
    size_t ncols;
    uint32_t primary;
    char run_id[RX_RUN_ID_HEX_BYTES + 1];
    volatile sig_atomic_t *stop;
    _Atomic uint64_t reported; /* problem lines printed so far */
} rx_plan;

/* The state of one worker's key range, as in its checkpoint row. */
typedef struct {
    rx_plan *p;
    unsigned id;
    char *lo[RX_MAX_KEY_COLUMNS]; /* exclusive lower bound; NULL = open */
    char *hi[RX_MAX_KEY_COLUMNS]; /* inclusive upper bound; NULL = open */
    char *last[RX_MAX_KEY_COLUMNS];
    bool has_lo, has_hi, has_last;
    unsigned pass;
    bool finished;
    uint64_t rows_total;
    uint64_t pass_conflicts;
    rx_counts c;
    rx_counts base; /* counts committed by earlier runs (resume) */
    uint64_t http_requests, http_retries;
    kms_result result;
    char error[512];
} rx_worker;

/* Opens a connection with the run's session settings (lock_timeout,
 * application_name). conninfo may be empty (libpq's environment). */
KMS_RESULT rx_db_connect(const rx_plan *p, PGconn **out);
/* Checks the table and columns in the catalog, quotes their identifiers
 * and notes their types. */
KMS_RESULT rx_db_resolve(PGconn *db, rx_plan *p);
/* Without --key: the one key named by the tokens of a sample. */
KMS_RESULT rx_db_guess_key(PGconn *db, const rx_plan *p, char out[KMS_KEY_NAME_MAX_BYTES + 1]);
/* The run id: a hash of what defines the run (docs/reencrypt.md). */
KMS_RESULT rx_run_id(rx_plan *p);
/* Holds a session advisory lock on the run id, so that two instances
 * never run the same run. */
KMS_RESULT rx_db_lock_run(PGconn *db, const rx_plan *p);
/* Creates the checkpoint tables if missing, then loads the run's worker
 * rows or, for a new run, splits the key range (ntile) and records it.
 * *nworkers receives the number of ranges (<= p->workers). */
KMS_RESULT rx_db_checkpoint_open(PGconn *db, rx_plan *p, rx_worker *w, unsigned *nworkers,
                                 bool *created);
/* The worker thread body: result in w->result. */
void *rx_worker_run(void *arg);
KMS_RESULT rx_db_census(PGconn *db, const rx_plan *p, rx_census *out);
KMS_RESULT rx_db_verify(PGconn *db, const rx_plan *p, rx_http *http, long sample, rx_verify *out);
void rx_worker_free(rx_worker *w);

/* The shared throttle (--max-rows-per-second): blocks until n more rows
 * may be read. */
void rx_throttle(const rx_plan *p, unsigned n);

/* Logging to stderr, one line at a time across threads. */
void rx_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif /* KMS_REENCRYPT_H */
