/*
 * The HTTPS server: libmicrohttpd over GnuTLS, driven by server threads of
 * kmsd's own (loop_main), each with one daemon per listening socket. Order
 * of work for every request, before any body is read:
 * client certificate verified (once per connection, cached), route and
 * method resolved, role checked against the policy, Content-Length and
 * Content-Type checked. Only then is the body read (bounded), parsed
 * strictly and handed to kms/.
 */
#define _GNU_SOURCE
#include "kms_api_audit.h"
#include "kms_api_internal.h"
#include "kms_api_rotation.h"
#include "kms_api_tls.h"
#include "kms_base64.h"
#include "kms_rand.h"
#include "kms_secmem.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- logging ---- */

static kms_log_level log_level = KMS_LOG_INFO;

void kms_log_set_level(kms_log_level level)
{
    log_level = level;
}

/* The process id, read once and again after a fork: glibc's getpid() is a
 * system call, and the access log writes a line per request. */
static _Atomic int log_pid;

static void log_pid_after_fork(void)
{
    atomic_store(&log_pid, 0);
}

static void log_pid_register(void)
{
    (void)pthread_atfork(NULL, NULL, log_pid_after_fork);
}

static int log_pid_get(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, log_pid_register);
    int pid = atomic_load(&log_pid);
    if (pid == 0) {
        pid = (int)getpid();
        atomic_store(&log_pid, pid);
    }
    return pid;
}

/* Each thread keeps the line's prefix up to the second and formats it again
 * only when the second or the process changes: gmtime_r takes glibc's
 * time-zone lock, shared by every thread. */
typedef struct {
    time_t sec;
    int pid;
    char date[80]; /* "2026-12-06T04:05:06" */
    char who[32];  /* "Z kmsd[1234] " */
} log_stamp;

static _Thread_local log_stamp log_tls = {.sec = -1};

void kms_log(kms_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    if (level > log_level) {
        return;
    }
    char line[1024];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    log_stamp *st = &log_tls;
    int pid = log_pid_get();
    if (st->sec != ts.tv_sec || st->pid != pid) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        snprintf(st->date, sizeof(st->date), "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        snprintf(st->who, sizeof(st->who), "Z kmsd[%d] ", pid);
        st->sec = ts.tv_sec;
        st->pid = pid;
    }
    /* "<date>.<ms><who><level>: " */
    size_t dl = strlen(st->date), wl = strlen(st->who), ll = strlen(names[level]);
    size_t n = 0;
    memcpy(line, st->date, dl);
    n += dl;
    long ms = ts.tv_nsec / 1000000;
    line[n++] = '.';
    line[n++] = (char)('0' + ms / 100);
    line[n++] = (char)('0' + ms / 10 % 10);
    line[n++] = (char)('0' + ms % 10);
    memcpy(line + n, st->who, wl);
    n += wl;
    memcpy(line + n, names[level], ll);
    n += ll;
    line[n++] = ':';
    line[n++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    if (m > 0) {
        n = n + (size_t)m >= sizeof(line) - 1 ? sizeof(line) - 2 : n + (size_t)m;
    }
    line[n++] = '\n';
    /* One write(2) per line: lines from several processes do not mix. */
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

/* ---- routes ---- */

typedef enum {
    R_NONE = 0,
    R_HEALTHZ,
    R_READYZ,
    R_METRICS,
    R_KEYS,
    R_KEY,
    R_KEY_ROTATE,
    R_KEY_ROLLBACK,
    R_VERSION,
    R_VERSION_STATE,
    R_OP,
    R_BATCH,
    R_MASTER,
    R_MASTER_ROTATE,
    R_ROTATIONS,
    R_ADMIN_CHECK,
    R_STATUS,
    R_REPORT,
    R_AUDIT,
    R_EXPORT,
    R_COUNT
} route_id;

static const char *route_template(route_id r, kms_op op)
{
    (void)op;
    switch (r) {
    case R_HEALTHZ:
        return "/healthz";
    case R_READYZ:
        return "/readyz";
    case R_METRICS:
        return "/metrics";
    case R_KEYS:
        return "/v1/keys";
    case R_KEY:
        return "/v1/keys/{name}";
    case R_KEY_ROTATE:
        return "/v1/keys/{name}/rotate";
    case R_KEY_ROLLBACK:
        return "/v1/keys/{name}/rollback";
    case R_VERSION:
        return "/v1/keys/{name}/versions/{v}";
    case R_VERSION_STATE:
        return "/v1/keys/{name}/versions/{v}/state";
    case R_OP:
        return "/v1/keys/{name}/{op}";
    case R_BATCH:
        return "/v1/keys/{name}/batch/{op}";
    case R_MASTER:
        return "/v1/master";
    case R_MASTER_ROTATE:
        return "/v1/master/rotate";
    case R_ROTATIONS:
        return "/v1/rotations";
    case R_ADMIN_CHECK:
        return "/v1/admin/check";
    case R_AUDIT:
        return "/v1/audit";
    case R_EXPORT:
        return "/v1/export";
    case R_STATUS:
        return "/v1/status";
    case R_REPORT:
        return "/v1/report";
    default:
        return "unknown";
    }
}

static const char *op_names[] = {
    [KMS_OP_WRAP] = "wrap",       [KMS_OP_UNWRAP] = "unwrap", [KMS_OP_ENCRYPT] = "encrypt",
    [KMS_OP_DECRYPT] = "decrypt", [KMS_OP_REWRAP] = "rewrap", [KMS_OP_DATAKEY] = "datakey",
    [KMS_OP_MAC] = "mac",         [KMS_OP_VERIFY] = "verify",
};
#define OP_COUNT 9

static kms_op op_parse(const char *s, size_t n)
{
    for (int i = 1; i < OP_COUNT; i++) {
        if (strlen(op_names[i]) == n && memcmp(op_names[i], s, n) == 0) {
            return (kms_op)i;
        }
    }
    return (kms_op)0;
}

/* Roles allowed per data operation (docs/api.md, "Roles"). */
static unsigned op_roles(kms_op op)
{
    switch (op) {
    case KMS_OP_UNWRAP:
    case KMS_OP_DECRYPT:
    case KMS_OP_REWRAP:
        return KMS_ROLE_APP | KMS_ROLE_MIGRATOR;
    default:
        return KMS_ROLE_APP;
    }
}

/* ---- metrics ---- */

static const int status_slots[] = {200, 201, 400, 401, 403, 404, 405, 409,
                                   410, 413, 415, 500, 503, 507, 0};
#define STATUS_SLOTS ((int)KMS_ARRAY_LEN(status_slots))
/* Finer around the 2 ms objective for a single operation (docs/api.md). */
static const double latency_buckets[] = {0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025,
                                         0.003,   0.004,  0.005, 0.01,   0.025, 0.05,
                                         0.1,     0.25,   0.5,   1,      2.5,   5};
#define BUCKETS ((int)KMS_ARRAY_LEN(latency_buckets))

/* A worker process's HSM and audit counters (kms_api_metrics_slot), a
 * cache line apart from the next worker's. */
typedef struct {
    _Alignas(64) kms_hsm_counters hsm;
    kms_audit_counters audit;
} worker_slot;

typedef struct {
    _Atomic uint64_t requests[R_COUNT][STATUS_SLOTS];
    _Atomic uint64_t bucket[R_COUNT][BUCKETS + 1];
    _Atomic uint64_t sum_us[R_COUNT];
    _Atomic uint64_t auth_failures;
    worker_slot slots[KMS_CONFIG_WORKERS_MAX];
} metrics;

/* With workers = processes:N the counters live in one anonymous shared
 * mapping made by the supervisor before it forks, so that /metrics counts
 * every worker's requests whichever worker answers the scrape (lock-free
 * 64-bit atomics are address-free, so they work across processes). */
static metrics *shared_metrics;
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2 && sizeof(unsigned long long) == sizeof(uint64_t),
               "shared metrics need address-free (lock-free) 64-bit atomics");

KMS_RESULT kms_api_metrics_share(void)
{
    void *p =
        mmap(NULL, sizeof(metrics), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    KMS_ENSURE_MSG(p != MAP_FAILED, KMS_ERR_NO_MEMORY, "shared metrics: %s", strerror(errno));
    shared_metrics = p;
    return KMS_OK_RESULT;
}

/* Without a shared mapping (threads mode), the one process's slot. */
static worker_slot local_slot;

void kms_api_metrics_slot(size_t idx, kms_hsm_counters **hsm, kms_audit_counters **audit)
{
    worker_slot *w = shared_metrics == NULL         ? &local_slot
                     : idx < KMS_CONFIG_WORKERS_MAX ? &shared_metrics->slots[idx]
                                                    : NULL;
    *hsm = w != NULL ? &w->hsm : NULL;
    *audit = w != NULL ? &w->audit : NULL;
}

/* Every worker's HSM and audit counters (a slot each). The audit's are
 * zero when it is off. */
typedef struct {
    uint64_t hsm_calls, hsm_errors, hsm_ns, hsm_recoveries, cache_hits, cache_misses;
    uint64_t records, refused, sync_ns, wait_ns;
    uint64_t sync_bucket[KMS_AUDIT_BUCKETS + 1], wait_bucket[KMS_AUDIT_BUCKETS + 1];
} counters_sum;

static void counters_add_hsm(counters_sum *t, const kms_hsm_counters *c)
{
    t->hsm_calls += atomic_load(&c->calls);
    t->hsm_errors += atomic_load(&c->errors);
    t->hsm_ns += atomic_load(&c->ns);
    t->hsm_recoveries += atomic_load(&c->recoveries);
    t->cache_hits += atomic_load(&c->cache_hits);
    t->cache_misses += atomic_load(&c->cache_misses);
}

static void counters_add_audit(counters_sum *t, const kms_audit_counters *c)
{
    t->records += atomic_load(&c->records);
    t->refused += atomic_load(&c->refused);
    t->sync_ns += atomic_load(&c->sync_ns);
    t->wait_ns += atomic_load(&c->wait_ns);
    for (int i = 0; i <= KMS_AUDIT_BUCKETS; i++) {
        t->sync_bucket[i] += atomic_load(&c->sync_bucket[i]);
        t->wait_bucket[i] += atomic_load(&c->wait_bucket[i]);
    }
}

static void counters_total(counters_sum *t)
{
    memset(t, 0, sizeof(*t));
    const worker_slot *w = shared_metrics != NULL ? shared_metrics->slots : &local_slot;
    size_t n = shared_metrics != NULL ? KMS_CONFIG_WORKERS_MAX : 1;
    for (size_t i = 0; i < n; i++) {
        counters_add_hsm(t, &w[i].hsm);
        counters_add_audit(t, &w[i].audit);
    }
}

/* ---- server state ---- */

#define RID_BYTES KMS_RAND_ID_HEX_BYTES

#define KMS_API_BATCH_THREADS_MAX 16

/* A server thread: kmsd runs libmicrohttpd's event loop itself, one
 * daemon per listening socket, all sharing the sockets with the other
 * server threads (loop_main). */
typedef struct api_loop {
    kms_api_server *s;
    struct MHD_Daemon *d[KMS_CONFIG_LISTEN_MAX];
    size_t nd;
    int wake_fd;        /* eventfd: a connection of this loop was resumed */
    _Atomic bool woken; /* wake_fd written and not yet seen by the loop */
    _Atomic bool stop;
    /* Audit records of this pass's answers, written by the loop itself at
     * the end of the pass (NULL with the audit off). */
    kms_audit_writer *aw;
    bool queued;
    pthread_t thread;
    bool started;
    /* Spill-over (loop_serving): the thread's place in the process, its
     * share of connection_limit, its open connections, and since when
     * (CLOCK_MONOTONIC ms) it has been inside one request's handler, 0 if
     * it is not. */
    unsigned idx;
    unsigned share;
    _Atomic unsigned conns;
    _Atomic int64_t busy_since;
} api_loop;

/* Open connections of one client address, across the server threads. */
typedef struct {
    uint8_t key[17]; /* address family, then the address */
    unsigned count;
} ip_count;

struct kms_api_server {
    kms_daemon_config cfg;
    kms *k;
    api_loop *loops;
    unsigned loop_count;
    char *ca_pem;
    /* per_ip_connection_limit, counted by kmsd: each loop's daemon counts
     * only its own connections. */
    pthread_mutex_t ip_mu;
    ip_count *ips;
    size_t ip_n, ip_cap;

    pthread_rwlock_t lock; /* guards policy and trust (swapped on reload) */
    kms_policy *policy;
    kms_api_trust *trust;
    uint64_t trust_gen; /* bumped on every CA/CRL reload, under lock */

    _Atomic long inflight;
    _Atomic long audit_waiting; /* records of held answers not yet called back */
    _Atomic long held;          /* answers held (connection suspended) and not yet sent */
    _Atomic bool no_suspend;    /* stopping: answers are audited without suspending */
    _Atomic bool draining;
    /* Batch requests run on threads of their own (batch_main), their
     * connections suspended meanwhile, so that a batch does not hold a
     * server thread and every other connection that thread serves. */
    pthread_mutex_t bq_mu;
    pthread_cond_t bq_cv;
    void *bq_head, *bq_tail; /* req_ctx, linked through bq_next */
    bool bq_stop;
    pthread_t bq_threads[KMS_API_BATCH_THREADS_MAX];
    unsigned bq_n;  /* set before the daemons start, then only read */
    bool bq_joined; /* by the thread that stops the server */
    metrics own_metrics;
    metrics *m; /* own_metrics, or the block shared by all workers */

    /* Readiness prober: one thread runs kms_ready on demand, so a hung HSM
     * holds that thread, never a request thread for longer than the
     * timeout. */
    pthread_t prober;
    bool prober_started;
    pthread_mutex_t ready_mu;
    pthread_cond_t ready_cv;
    uint64_t ready_asked, ready_done;
    bool ready_running, prober_stop;
    kms_err ready_err;
    char ready_reason[256];
};

typedef struct {
    api_loop *loop; /* the server thread that serves the connection */
    bool ip_counted;
    uint8_t ip_key[17];
    int verified;       /* 0 not yet, 1 ok, -1 refused */
    uint64_t trust_gen; /* the CA/CRL generation it was verified against */
    char identity[KMS_IDENTITY_MAX_BYTES + 1];
    const char *reason;
    char addr[INET6_ADDRSTRLEN + 8];
} conn_ctx;

typedef struct {
    kms_api_server *s;
    conn_ctx *conn;
    route_id route;
    kms_op op;
    const char *method;
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t version;
    unsigned roles; /* roles the caller holds for this request */
    char allow[32]; /* methods the route takes, for 405's Allow header */
    char rid[RID_BYTES];
    struct timespec start;
    bool responded;
    bool too_large;   /* stop keeping the body (over the limit or failed) */
    kms_err body_err; /* why keeping the body failed, if not its size */
    kms_buf body;
    int status;
    kms_err err;
    /* For the audit record (docs/audit.md). */
    uint32_t au_version, au_to_version, au_items;
    bool audited;
    bool announced; /* announced to the audit's group commit, record not queued yet */
    /* The answer held back, its connection suspended, while its record is
     * committed (send_text); the committer stores the outcome and resumes
     * the connection, and the next call of on_request sends it. */
    struct MHD_Connection *mhd_conn;
    struct MHD_Response *held;
    int held_status;
    _Atomic int au_outcome; /* 0 waiting, else 1 + the kms_err of the commit */
    kms_audit_record au_rec;
    /* A batch handed to a batch thread: its answer is held as above, and
     * the batch thread resumes the connection (offload_failed if it could
     * make no answer: the connection is then closed). */
    bool offloaded;
    bool offload_failed;
    void *bq_next;
} req_ctx;

/* ---- responses ---- */
/* ---- the audit record of every answer (docs/audit.md) ---- */

static void audit_operation(const req_ctx *rq, char *out, size_t n)
{
    bool get = rq->method != NULL && strcmp(rq->method, "GET") == 0;
    const char *name;
    switch (rq->route) {
    case R_NONE:
        name = "unknown";
        break;
    case R_HEALTHZ:
        name = "healthz";
        break;
    case R_READYZ:
        name = "readyz";
        break;
    case R_METRICS:
        name = "metrics";
        break;
    case R_KEYS:
        name = get ? "key.list" : "key.create";
        break;
    case R_KEY:
        name = get ? "key.get" : "key.update";
        break;
    case R_KEY_ROTATE:
        name = "key.rotate";
        break;
    case R_KEY_ROLLBACK:
        name = "key.rollback";
        break;
    case R_VERSION:
        name = "version.get";
        break;
    case R_VERSION_STATE:
        name = "version.state";
        break;
    case R_OP:
        name = rq->op > 0 && rq->op < OP_COUNT ? op_names[rq->op] : "unknown";
        break;
    case R_BATCH:
        snprintf(out, n, "batch.%s",
                 rq->op > 0 && rq->op < OP_COUNT ? op_names[rq->op] : "unknown");
        return;
    case R_MASTER:
        name = "master.get";
        break;
    case R_MASTER_ROTATE:
        name = "master.rotate";
        break;
    case R_ROTATIONS:
        name = "rotations.list";
        break;
    case R_ADMIN_CHECK:
        name = "admin.check";
        break;
    case R_AUDIT:
        name = "audit.query";
        break;
    case R_EXPORT:
        name = "audit.export";
        break;
    default:
        /* Routes added later: recorded by their path template. */
        name = route_template(rq->route, rq->op);
        break;
    }
    snprintf(out, n, "%s", name);
}

static void audit_event_of(req_ctx *rq, int status, char *op, size_t op_len, kms_api_audit_event *e)
{
    audit_operation(rq, op, op_len);
    bool known = rq->conn != NULL && rq->conn->verified > 0;
    *e = (kms_api_audit_event){
        .operation = op,
        .identity = known ? rq->conn->identity : "",
        .source = rq->conn != NULL ? rq->conn->addr : "",
        .request_id = rq->rid,
        .key = rq->name,
        .version = rq->au_version != 0 ? rq->au_version : rq->version,
        .to_version = rq->au_to_version,
        .items = rq->au_items,
        .status = status,
        .err = status >= 400 && rq->err == KMS_OK ? KMS_ERR_UNAVAILABLE : rq->err,
        .announced = rq->announced,
    };
    rq->announced = false; /* queuing the record ends the announcement, whatever its result */
}

/* The answer that replaces one whose record could not be made durable:
 * kmsd refuses rather than answer unaudited (issue 4). */
static struct MHD_Response *audit_refusal(req_ctx *rq)
{
    rq->err = KMS_ERR_AUDIT_UNAVAILABLE;
    kms_log(KMS_LOG_ERROR, "audit: request id=%s could not be recorded: answering 503", rq->rid);
    char *text = kms_api_wipe_malloc(512);
    if (text == NULL) {
        return NULL;
    }
    int n = snprintf(text, 512,
                     "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"},"
                     "\"request_id\":\"%s\"}\n",
                     kms_error_code(KMS_ERR_AUDIT_UNAVAILABLE),
                     kms_error_message(KMS_ERR_AUDIT_UNAVAILABLE), rq->rid);
    size_t len = n > 0 && n < 512 ? (size_t)n : 0;
    struct MHD_Response *r =
        MHD_create_response_from_buffer_with_free_callback(len, text, kms_api_wipe_free);
    if (r == NULL) {
        kms_api_wipe_free(text);
        return NULL;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(r, "X-Request-Id", rq->rid);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    return r;
}

static enum MHD_Result queue_answer(req_ctx *rq, struct MHD_Connection *conn, int status,
                                    struct MHD_Response *r)
{
    rq->status = status;
    rq->responded = true;
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

/* The server thread's loop, on a server thread; NULL on other threads. */
static _Thread_local api_loop *tl_loop;

/* CLOCK_MONOTONIC in milliseconds. */
static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wakes a server thread's loop; one write until the loop has seen it. */
static void loop_wake(api_loop *l)
{
    if (atomic_exchange(&l->woken, true)) {
        return;
    }
    uint64_t one = 1;
    ssize_t w;
    do {
        w = write(l->wake_fd, &one, sizeof(one));
    } while (w < 0 && errno == EINTR);
}

/* Resumes a suspended connection, from any thread, and wakes the loop
 * that serves it: without an internal thread libmicrohttpd has no channel
 * of its own for that (0.9.75 drops MHD_USE_ITC), and MHD_get_timeout does
 * not count resumed connections, so the loop would not run them before its
 * timeout. l is read by the caller before the resume, after which the
 * request and its connection may be gone. */
static void conn_resume(struct MHD_Connection *conn, api_loop *l)
{
    MHD_resume_connection(conn);
    loop_wake(l);
}

/* On the audit's syncer thread (or the writer's, if the write failed): the
 * record of a held answer is durable (or failed). rq belongs to the suspended connection, which no
 * other thread touches until it is resumed; after MHD_resume_connection rq may be gone at any
 * moment. */
static void audit_committed(void *arg, kms_err res)
{
    req_ctx *rq = arg;
    kms_api_server *s = rq->s;
    api_loop *l = rq->conn->loop;
    atomic_store(&rq->au_outcome, 1 + (int)res);
    conn_resume(rq->mhd_conn, l);
    atomic_fetch_sub(&s->audit_waiting, 1);
}

/* Sends r once its record's fate is known: as it is when the record is
 * durable, else the audit refusal in its place. */
static enum MHD_Result queue_audited(req_ctx *rq, struct MHD_Connection *conn, int status,
                                     struct MHD_Response *r, bool durable)
{
    if (!durable) {
        MHD_destroy_response(r);
        status = kms_error_http_status(KMS_ERR_AUDIT_UNAVAILABLE);
        r = audit_refusal(rq);
        if (r == NULL) {
            return MHD_NO;
        }
    }
    return queue_answer(rq, conn, status, r);
}

/* Sends an answer held for its audit record (on_request after resume). */
static enum MHD_Result send_held(req_ctx *rq, struct MHD_Connection *conn)
{
    struct MHD_Response *r = rq->held;
    rq->held = NULL;
    atomic_fetch_sub(&rq->s->held, 1);
    return queue_audited(rq, conn, rq->held_status, r, atomic_load(&rq->au_outcome) == 1 + KMS_OK);
}

/* Holds r for rq's connection, already suspended and counted in s->held,
 * and queues the answer's record; the audit resumes the connection once
 * the record is durable (audit_committed), or this does at once if
 * the record cannot be queued (send_held then refuses). rq is not touched
 * after the queueing or the resume: the connection's thread may free it
 * from then on. */
static enum MHD_Result hold_for_record(req_ctx *rq, const kms_api_audit_event *e, int status,
                                       struct MHD_Response *r)
{
    kms_api_server *s = rq->s;
    struct MHD_Connection *conn = rq->mhd_conn;
    kms_api_audit_record_fill(e, &rq->au_rec);
    rq->held = r;
    rq->held_status = status;
    atomic_store(&rq->au_outcome, 0);
    atomic_fetch_add(&s->audit_waiting, 1);
    /* On a server thread the record is written by the thread itself at
     * the end of its pass, with the pass's other records, and only the
     * sync is left to another thread: no hand-off to the committer. */
    api_loop *own = tl_loop != NULL && tl_loop->aw != NULL ? tl_loop : NULL;
    kms_result ar = own != NULL
                        ? kms_audit_queue(s->k, &rq->au_rec, e->announced, audit_committed, rq)
                        : kms_audit_submit(s->k, &rq->au_rec, e->announced, audit_committed, rq);
    if (own != NULL && kms_is_ok(ar)) {
        own->queued = true;
    }
    if (!kms_is_ok(ar)) {
        atomic_store(&rq->au_outcome, 1 + (int)KMS_ERR_AUDIT_UNAVAILABLE);
        conn_resume(conn, rq->conn->loop);
        atomic_fetch_sub(&s->audit_waiting, 1);
    }
    return MHD_YES;
}

/* On a batch thread: the batch's answer r is held for its suspended
 * connection (counted in s->held since it was handed over) until its
 * record is durable, or resumed at once without an audit trail. */
static enum MHD_Result hold_offloaded(req_ctx *rq, int status, struct MHD_Response *r)
{
    if (rq->audited || !kms_audit_enabled(rq->s->k)) {
        rq->held = r;
        rq->held_status = status;
        atomic_store(&rq->au_outcome, 1 + (int)KMS_OK);
        conn_resume(rq->mhd_conn, rq->conn->loop);
        return MHD_YES;
    }
    rq->audited = true;
    char op[KMS_AUDIT_OPERATION_MAX_BYTES + 1];
    kms_api_audit_event e;
    audit_event_of(rq, status, op, sizeof(op), &e);
    return hold_for_record(rq, &e, status, r);
}

static enum MHD_Result send_text(req_ctx *rq, struct MHD_Connection *conn, int status, char *text,
                                 size_t len, const char *ctype)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer_with_free_callback(len, text, kms_api_wipe_free);
    if (r == NULL) {
        kms_api_wipe_free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    MHD_add_response_header(r, "X-Request-Id", rq->rid);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == 503) {
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    }
    if (status == 405 && rq->allow[0] != '\0') {
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, rq->allow);
    }
    if (atomic_load(&rq->s->draining)) {
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    }
    if (rq->offloaded) {
        return hold_offloaded(rq, status, r);
    }
    if (rq->audited || !kms_audit_enabled(rq->s->k)) {
        return queue_answer(rq, conn, status, r);
    }
    rq->audited = true;
    char op[KMS_AUDIT_OPERATION_MAX_BYTES + 1];
    kms_api_audit_event e;
    audit_event_of(rq, status, op, sizeof(op), &e);
    /* Counted before the check, so that held_drain either sees this
     * answer or this request sees no_suspend (both sequentially
     * consistent). */
    atomic_fetch_add(&rq->s->held, 1);
    if (atomic_load(&rq->s->no_suspend)) {
        /* Shutting down: libmicrohttpd must not be stopped with a
         * suspended connection, so wait for the record on this thread. */
        atomic_fetch_sub(&rq->s->held, 1);
        return queue_audited(rq, conn, status, r,
                             kms_is_ok(kms_api_audit_event_append(rq->s->k, &e)));
    }
    /* Issue 4: a record is durable before its response is sent. The
     * answer is held and the connection suspended while the record's
     * group commit runs, so that this server thread serves other
     * connections meanwhile: requests in flight are bounded by
     * connections, not threads, and more of them share each commit.
     * Suspended before the record is queued: the committer's resume can
     * then never come first. */
    rq->mhd_conn = conn;
    MHD_suspend_connection(conn);
    return hold_for_record(rq, &e, status, r);
}

/* Most answers (a single operation, an error: 100 to 400 bytes) fit this,
 * so they are serialised once; a larger one (a batch) is dumped again at
 * its size. Below glibc's large-chunk size (1 KiB), so that the block comes
 * from the thread's cache and its allocation does not consolidate the
 * heap's fast bins. */
#define SEND_JSON_GUESS 512

/* Serialises doc into a wiping allocation (it may hold base64 plaintext)
 * and sends it. Takes ownership of doc. */
static enum MHD_Result send_json(req_ctx *rq, struct MHD_Connection *conn, int status, json_t *doc)
{
    size_t cap = SEND_JSON_GUESS;
    char *text = doc != NULL ? kms_api_wipe_malloc(cap) : NULL;
    size_t n = text != NULL ? json_dumpb(doc, text, cap - 1, JSON_COMPACT) : 0;
    if (n >= cap) {
        kms_api_wipe_free(text);
        cap = n + 1;
        text = kms_api_wipe_malloc(cap);
        if (text != NULL && json_dumpb(doc, text, n, JSON_COMPACT) != n)
            n = 0;
    }
    if (text == NULL || n == 0) {
        json_decref(doc);
        kms_api_wipe_free(text);
        return MHD_NO;
    }
    text[n] = '\n';
    json_decref(doc);
    return send_text(rq, conn, status, text, n + 1, "application/json");
}

/* The message a client sees. A token that fails to parse, names another
 * key or fails its tag check must be indistinguishable (no decryption
 * oracle, STYLE.md): for invalid_token the table's message is the only one
 * ever sent, whatever detail the layer that raised it recorded. */
static const char *public_message(kms_err err, const char *detail)
{
    if (err == KMS_ERR_TOKEN_INVALID || detail == NULL || detail[0] == '\0') {
        return kms_error_message(err);
    }
    return detail;
}

static enum MHD_Result send_error(req_ctx *rq, struct MHD_Connection *conn, kms_err err,
                                  const char *message)
{
    message = public_message(err, message);
    rq->err = err;
    json_t *doc = json_pack("{s:{s:s,s:s},s:s}", "error", "code", kms_error_code(err), "message",
                            message, "request_id", rq->rid);
    return send_json(rq, conn, kms_error_http_status(err), doc);
}

/* The error just raised on this thread, with its detail text when the
 * raiser gave one (details never carry secrets, kms_error.h). */
static enum MHD_Result send_result(req_ctx *rq, struct MHD_Connection *conn, kms_result r)
{
    const char *detail = kms_error_last() == r.err ? kms_error_detail() : "";
    return send_error(rq, conn, r.err, detail);
}

/* ---- JSON views of domain objects ---- */

static json_t *time_or_null(int64_t t)
{
    return t == 0 ? json_null() : json_integer(t);
}

static json_t *version_json(const kms_version_info *v)
{
    return json_pack("{s:I,s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:I,s:I}", "version", (json_int_t)v->version,
                     "state", kms_version_state_name(v->state), "created_at",
                     time_or_null(v->created_at), "primary_at", time_or_null(v->primary_at),
                     "deprecated_at", time_or_null(v->deprecated_at), "grace_until",
                     time_or_null(v->grace_until), "destroy_at", time_or_null(v->destroy_at),
                     "last_used_at", time_or_null(v->last_used_at), "encryptions",
                     (json_int_t)v->encryptions, "master_version", (json_int_t)v->master_version);
}

static json_t *key_json(const kms_key_info *k)
{
    return json_pack(
        "{s:s,s:s,s:I,s:I,s:I,s:I,s:I,s:b,s:o,s:o}", "name", k->name, "purpose",
        kms_purpose_name(k->purpose), "primary_version", (json_int_t)k->primary_version,
        "latest_version", (json_int_t)k->latest_version, "min_decryption_version",
        (json_int_t)k->min_decryption_version, "rotation_period", (json_int_t)k->rotation_period_s,
        "warning_window", (json_int_t)k->warning_window_s, "deletion_protection",
        k->deletion_protection, "created_at", time_or_null(k->created_at), "rotated_at",
        time_or_null(k->rotated_at));
}

static json_t *rotation_json(const kms_rotation_info *r)
{
    return json_pack("{s:s,s:o,s:o,s:I,s:s,s:s,s:s,s:o,s:o,s:o}", "id", r->id, "key",
                     r->key[0] != '\0' ? json_string(r->key) : json_null(), "from_version",
                     r->from_version != 0 ? json_integer(r->from_version) : json_null(),
                     "to_version", (json_int_t)r->to_version, "type",
                     kms_rotation_type_name(r->type), "status", kms_rotation_status_name(r->status),
                     "initiator", r->initiator, "started_at", time_or_null(r->started_at),
                     "finished_at", time_or_null(r->finished_at), "reason",
                     r->reason[0] != '\0' ? json_string(r->reason) : json_null());
}

/* Text form of a binary token as a JSON string. */
static json_t *token_json(const kms_buf *bin)
{
    kms_buf text KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&text, 0);
    if (!kms_is_ok(kms_token_to_text(bin->data, bin->len, &text))) {
        return NULL;
    }
    return json_stringn((const char *)text.data, text.len);
}

/* base64 of a secret: encoded in secret memory, copied into a jansson
 * string (jansson's allocator wipes, kms_api_json_alloc_init). */
static json_t *secret_b64_json(const kms_buf *pt)
{
    kms_buf b64 KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&b64, 0);
    if (!kms_is_ok(kms_base64_encode(pt->data, pt->len, &b64))) {
        return NULL;
    }
    return json_stringn((const char *)b64.data, b64.len);
}

/* One data-op result (single or batch item) as its JSON response. */
static json_t *op_result_json(kms_op op, const char *name, const kms_batch_result *r,
                              const kms_buf *plaintext)
{
    json_t *o = json_object();
    if (o == NULL) {
        return NULL;
    }
    int bad = 0;
    switch (op) {
    case KMS_OP_WRAP:
    case KMS_OP_ENCRYPT:
        bad |= json_object_set_new(o, "ciphertext", token_json(&r->out));
        bad |= json_object_set_new(o, "key", json_string(name));
        break;
    case KMS_OP_UNWRAP:
    case KMS_OP_DECRYPT:
        bad |= json_object_set_new(o, "plaintext", secret_b64_json(&r->out));
        break;
    case KMS_OP_DATAKEY:
        bad |= json_object_set_new(o, "ciphertext", token_json(&r->out));
        if (plaintext != NULL) {
            bad |= json_object_set_new(o, "plaintext", secret_b64_json(plaintext));
        }
        break;
    case KMS_OP_REWRAP:
        bad |= json_object_set_new(o, "ciphertext", token_json(&r->out));
        bad |= json_object_set_new(o, "from_version", json_integer(r->from_version));
        bad |= json_object_set_new(o, "changed", json_boolean(r->flag));
        break;
    case KMS_OP_MAC:
        bad |= json_object_set_new(o, "mac", token_json(&r->out));
        break;
    case KMS_OP_VERIFY:
        bad |= json_object_set_new(o, "valid", json_boolean(r->flag));
        break;
    default:
        bad = 1;
        break;
    }
    bad |= json_object_set_new(o, "version", json_integer(r->version));
    if (bad) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ---- handlers ---- */

static kms_caller caller_of(req_ctx *rq)
{
    return (kms_caller){
        .identity = rq->conn->identity,
        .request_id = rq->rid,
        .source_addr = rq->conn->addr,
        /* Only the migrator role reads compromised versions, and only to
         * rewrap them (DESIGN.md key model). */
        .may_read_compromised = rq->op == KMS_OP_REWRAP && (rq->roles & KMS_ROLE_MIGRATOR) != 0,
    };
}

typedef struct {
    json_t *doc;
    int status;
} reply;

static kms_result run_single_op(req_ctx *rq, json_t *body, reply *out)
{
    kms_api_item it KMS_DEFER(kms_api_item_free) = {0};
    KMS_GUARD(kms_api_item_parse(rq->op, body, "", &it));
    kms_caller c = caller_of(rq);
    kms_batch_result r = {0};
    kms_buf pt KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&r.out, 0);
    kms_buf_init_secret(&pt, 0);
    kms_result res;
    switch (rq->op) {
    case KMS_OP_WRAP:
        res = kms_wrap(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                       &r.out, &r.version);
        break;
    case KMS_OP_ENCRYPT:
        res = kms_encrypt(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                          &r.out, &r.version);
        break;
    case KMS_OP_UNWRAP:
        kms_buf_free(&r.out);
        kms_buf_init_secret(&r.out, 0);
        res = kms_unwrap(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                         &r.out, &r.version);
        break;
    case KMS_OP_DECRYPT:
        kms_buf_free(&r.out);
        kms_buf_init_secret(&r.out, 0);
        res = kms_decrypt(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                          &r.out, &r.version);
        break;
    case KMS_OP_DATAKEY:
        res = kms_datakey(rq->s->k, &c, rq->name, it.datakey_bytes, it.ctx.data, it.ctx.len, &r.out,
                          it.include_plaintext ? &pt : NULL, &r.version);
        break;
    case KMS_OP_REWRAP:
        res = kms_rewrap(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                         &r.out, &r.from_version, &r.version, &r.flag);
        break;
    case KMS_OP_MAC:
        res = kms_mac(rq->s->k, &c, rq->name, it.in.data, it.in.len, &r.out, &r.version);
        break;
    case KMS_OP_VERIFY:
        res = kms_verify(rq->s->k, &c, rq->name, it.in.data, it.in.len, it.ctx.data, it.ctx.len,
                         &r.flag, &r.version);
        break;
    default:
        res = kms_error_raise(KMS_ERR_INTERNAL, __FILE__, __LINE__);
        break;
    }
    rq->au_version = rq->op == KMS_OP_REWRAP ? r.from_version : r.version;
    rq->au_to_version = rq->op == KMS_OP_REWRAP ? r.version : 0;
    if (kms_is_ok(res)) {
        out->doc = op_result_json(rq->op, rq->name, &r,
                                  rq->op == KMS_OP_DATAKEY && it.include_plaintext ? &pt : NULL);
        out->status = 200;
        if (out->doc == NULL) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        }
    }
    kms_buf_free(&r.out);
    return res;
}

static json_t *item_error_json(kms_err err, const char *msg)
{
    msg = public_message(err, msg);
    return json_pack("{s:{s:s,s:s}}", "error", "code", kms_error_code(err), "message", msg);
}

static kms_result run_batch(req_ctx *rq, json_t *body, reply *out)
{
    json_t *items = NULL;
    KMS_GUARD(kms_api_batch_parse(body, rq->s->cfg.max_batch_items, &items));
    size_t n = json_array_size(items);
    rq->au_items = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
    kms_api_item *parsed = calloc(n, sizeof(*parsed));
    kms_batch_item *bi = calloc(n, sizeof(*bi));
    kms_batch_result *br = calloc(n, sizeof(*br));
    size_t *map = calloc(n, sizeof(*map));
    json_t **errs = calloc(n, sizeof(*errs));
    json_t *results = json_array();
    kms_result res = KMS_OK_RESULT;
    size_t good = 0, ok = 0, failed = 0;
    if (parsed == NULL || bi == NULL || br == NULL || map == NULL || errs == NULL ||
        results == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto done;
    }
    /* Item-level defects (bad base64, a size limit, a wrong field) are that
     * item's error; the others still run. */
    for (size_t i = 0; i < n; i++) {
        char where[32];
        snprintf(where, sizeof(where), "items[%zu].", i);
        kms_result pr = kms_api_item_parse(rq->op, json_array_get(items, i), where, &parsed[i]);
        if (kms_is_ok(pr) && rq->op == KMS_OP_DATAKEY && parsed[i].include_plaintext) {
            pr = kms_error_raisef(KMS_ERR_INVALID_ARGUMENT, __FILE__, __LINE__,
                                  "field '%sinclude_plaintext': not available in batches", where);
        }
        if (!kms_is_ok(pr)) {
            errs[i] = item_error_json(pr.err, kms_error_detail());
            continue;
        }
        bi[good] = (kms_batch_item){.in = parsed[i].in.data,
                                    .in_len = parsed[i].in.len,
                                    .ctx = parsed[i].ctx.data,
                                    .ctx_len = parsed[i].ctx.len,
                                    .datakey_len = parsed[i].datakey_bytes};
        map[good++] = i;
    }
    if (good > 0) {
        kms_caller c = caller_of(rq);
        KMS_GUARD_GOTO(res, kms_batch(rq->s->k, &c, rq->op, rq->name, bi, good, br), done);
    }
    for (size_t g = 0; g < good; g++) {
        errs[map[g]] = br[g].err == KMS_OK ? op_result_json(rq->op, rq->name, &br[g], NULL)
                                           : item_error_json(br[g].err, NULL);
    }
    for (size_t i = 0; i < n; i++) {
        if (errs[i] == NULL) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto done;
        }
        if (json_object_get(errs[i], "error") != NULL) {
            failed++;
        } else {
            ok++;
        }
        json_array_append_new(results, errs[i]);
        errs[i] = NULL;
    }
    out->doc = json_pack("{s:O,s:I,s:I}", "results", results, "succeeded", (json_int_t)ok, "failed",
                         (json_int_t)failed);
    out->status = 200;
    if (out->doc == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    }
done:
    if (br != NULL) {
        kms_batch_results_free(br, good);
    }
    for (size_t i = 0; parsed != NULL && i < n; i++) {
        kms_api_item_free(&parsed[i]);
        if (errs != NULL) {
            json_decref(errs[i]);
        }
    }
    json_decref(results);
    free(parsed);
    free(bi);
    free(br);
    free(map);
    free(errs);
    return res;
}

static kms_result key_with_versions(kms *k, const char *name, json_t **out)
{
    kms_key_info info;
    kms_version_info *vs = NULL;
    size_t n = 0;
    KMS_GUARD(kms_key_get(k, name, &info));
    KMS_GUARD(kms_key_versions(k, name, &vs, &n));
    json_t *doc = key_json(&info);
    json_t *arr = json_array();
    for (size_t i = 0; i < n && doc != NULL && arr != NULL; i++) {
        json_array_append_new(arr, version_json(&vs[i]));
    }
    free(vs);
    if (doc == NULL || arr == NULL || json_object_set_new(doc, "versions", arr) != 0) {
        json_decref(doc);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    *out = doc;
    return KMS_OK_RESULT;
}

static kms_result query_u64(struct MHD_Connection *conn, const char *name, uint64_t max,
                            uint64_t *out)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, name);
    if (v == NULL || v[0] == '\0') {
        return KMS_OK_RESULT;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    KMS_ENSURE_MSG(v[0] >= '0' && v[0] <= '9' && *end == '\0' && errno == 0 && n <= max,
                   KMS_ERR_INVALID_ARGUMENT,
                   "query parameter '%s': expected an integer <= %" PRIu64, name, max);
    *out = n;
    return KMS_OK_RESULT;
}

/* GET /v1/keys: the keys the caller holds any role on, in name order. The
 * store is read in pages until the caller's page is full, so that a caller
 * allowed a few keys among many still gets complete pages. */
static kms_result list_keys(req_ctx *rq, struct MHD_Connection *conn, reply *out)
{
    uint64_t limit = 100;
    KMS_GUARD(query_u64(conn, "limit", 1000, &limit));
    KMS_ENSURE_MSG(limit > 0, KMS_ERR_INVALID_ARGUMENT, "query parameter 'limit': must be >= 1");
    const char *after_q = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "after");
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    if (after_q != NULL && after_q[0] != '\0') {
        KMS_ENSURE_MSG(kms_key_name_valid(after_q, strlen(after_q)), KMS_ERR_KEY_NAME_INVALID,
                       "query parameter 'after': not a key name");
        memcpy(after, after_q, strlen(after_q) + 1);
    }
    json_t *arr = json_array();
    KMS_ENSURE(arr != NULL, KMS_ERR_NO_MEMORY);
    size_t got = 0;
    bool more = true;
    char last[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    /* Bounded: at most 64 store pages per request. */
    for (int page = 0; page < 64 && got < limit && more; page++) {
        kms_key_info *keys = NULL;
        size_t n = 0;
        kms_result r = kms_key_list(rq->s->k, after[0] != '\0' ? after : NULL, 256, &keys, &n);
        if (!kms_is_ok(r)) {
            json_decref(arr);
            return r;
        }
        more = n == 256;
        pthread_rwlock_rdlock(&rq->s->lock);
        size_t i = 0;
        for (; i < n && got < limit; i++) {
            if (kms_policy_roles(rq->s->policy, rq->conn->identity, keys[i].name) != 0) {
                json_array_append_new(arr, key_json(&keys[i]));
                got++;
            }
            memcpy(last, keys[i].name, sizeof(last));
        }
        pthread_rwlock_unlock(&rq->s->lock);
        if (i < n) {
            more = true;
        }
        if (n > 0) {
            memcpy(after, keys[n - 1].name, sizeof(after));
        }
        free(keys);
    }
    out->doc = json_pack("{s:o,s:o}", "keys", arr, "next",
                         more && last[0] != '\0' ? json_string(last) : json_null());
    KMS_ENSURE(out->doc != NULL, KMS_ERR_NO_MEMORY);
    out->status = 200;
    return KMS_OK_RESULT;
}

static kms_result list_rotations(req_ctx *rq, struct MHD_Connection *conn, reply *out)
{
    kms_rotation_filter f = {0};
    const char *key = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "key");
    const char *type = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "type");
    const char *status = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "status");
    uint64_t from = 0, to = 0, limit = 1000;
    KMS_GUARD(query_u64(conn, "from", INT64_MAX, &from));
    KMS_GUARD(query_u64(conn, "to", INT64_MAX, &to));
    KMS_GUARD(query_u64(conn, "limit", 10000, &limit));
    if (key != NULL && key[0] != '\0') {
        KMS_ENSURE_MSG(kms_key_name_valid(key, strlen(key)), KMS_ERR_KEY_NAME_INVALID,
                       "query parameter 'key': not a key name");
        f.key = key;
    }
    if (type != NULL && type[0] != '\0') {
        for (int t = KMS_ROTATION_SCHEDULED; t <= KMS_ROTATION_MASTER; t++) {
            if (strcmp(type, kms_rotation_type_name((kms_rotation_type)t)) == 0) {
                f.type = t;
            }
        }
        KMS_ENSURE_MSG(f.type != 0, KMS_ERR_INVALID_ARGUMENT,
                       "query parameter 'type': scheduled, manual, emergency, rollback or master");
    }
    if (status != NULL && status[0] != '\0') {
        for (int t = KMS_ROTATION_STARTED; t <= KMS_ROTATION_ROLLED_BACK; t++) {
            if (strcmp(status, kms_rotation_status_name((kms_rotation_status)t)) == 0) {
                f.status = t;
            }
        }
        KMS_ENSURE_MSG(f.status != 0, KMS_ERR_INVALID_ARGUMENT,
                       "query parameter 'status': started, succeeded, failed or rolled_back");
    }
    f.from = (int64_t)from;
    f.to = (int64_t)to;
    f.limit = limit == 0 ? 1000 : (size_t)limit;
    kms_rotation_info *rs = NULL;
    size_t n = 0;
    KMS_GUARD(kms_rotations_list(rq->s->k, &f, &rs, &n));
    json_t *arr = json_array();
    for (size_t i = 0; i < n && arr != NULL; i++) {
        json_array_append_new(arr, rotation_json(&rs[i]));
    }
    free(rs);
    out->doc = json_pack("{s:o}", "rotations", arr);
    KMS_ENSURE(out->doc != NULL, KMS_ERR_NO_MEMORY);
    out->status = 200;
    return KMS_OK_RESULT;
}

static kms_result list_masters(req_ctx *rq, reply *out)
{
    kms_master_info *ms = NULL;
    size_t n = 0;
    KMS_GUARD(kms_master_list(rq->s->k, &ms, &n));
    json_t *arr = json_array();
    for (size_t i = 0; i < n && arr != NULL; i++) {
        json_array_append_new(
            arr, json_pack("{s:I,s:o,s:o,s:I,s:b}", "version", (json_int_t)ms[i].version,
                           "created_at", time_or_null(ms[i].created_at), "retired_at",
                           time_or_null(ms[i].retired_at), "versions_wrapped",
                           (json_int_t)ms[i].versions_wrapped, "current", ms[i].current));
    }
    free(ms);
    out->doc = json_pack("{s:o}", "masters", arr);
    KMS_ENSURE(out->doc != NULL, KMS_ERR_NO_MEMORY);
    out->status = 200;
    return KMS_OK_RESULT;
}

/* ---- readiness ---- */

static void *prober_main(void *arg)
{
    kms_api_server *s = arg;
    pthread_mutex_lock(&s->ready_mu);
    for (;;) {
        while (!s->prober_stop && s->ready_done >= s->ready_asked) {
            pthread_cond_wait(&s->ready_cv, &s->ready_mu);
        }
        if (s->prober_stop) {
            break;
        }
        uint64_t gen = s->ready_asked;
        s->ready_running = true;
        pthread_mutex_unlock(&s->ready_mu);
        kms_result r = kms_ready(s->k);
        char reason[256] = "";
        if (!kms_is_ok(r)) {
            snprintf(reason, sizeof(reason), "%s%s%s", kms_error_code(r.err),
                     kms_error_detail()[0] != '\0' ? ": " : "", kms_error_detail());
        }
        pthread_mutex_lock(&s->ready_mu);
        s->ready_running = false;
        s->ready_err = r.err;
        memcpy(s->ready_reason, reason, sizeof(reason));
        s->ready_done = gen;
        pthread_cond_broadcast(&s->ready_cv);
    }
    pthread_mutex_unlock(&s->ready_mu);
    return NULL;
}

static json_t *readiness(kms_api_server *s, int *status)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += s->cfg.ready_timeout_ms / 1000;
    deadline.tv_nsec += (long)(s->cfg.ready_timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->ready_mu);
    uint64_t want = ++s->ready_asked;
    pthread_cond_broadcast(&s->ready_cv);
    int rc = 0;
    while (s->ready_done < want && rc == 0) {
        rc = pthread_cond_timedwait(&s->ready_cv, &s->ready_mu, &deadline);
    }
    json_t *doc;
    if (s->ready_done < want) {
        *status = 503;
        doc = json_pack("{s:s,s:s}", "status", "not_ready", "reason",
                        "readiness check timed out (HSM or store not answering)");
    } else if (s->ready_err != KMS_OK) {
        *status = 503;
        doc = json_pack("{s:s,s:s}", "status", "not_ready", "reason", s->ready_reason);
    } else {
        *status = 200;
        doc = json_pack("{s:s}", "status", "ready");
    }
    pthread_mutex_unlock(&s->ready_mu);
    return doc;
}

/* ---- /metrics (Prometheus text exposition format 0.0.4) ---- */

/* A histogram without labels in kms_audit_buckets. */
static kms_result metrics_histogram(kms_buf *b, const char *name, const char *help,
                                    const uint64_t bucket[KMS_AUDIT_BUCKETS + 1], uint64_t sum_ns)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(line), KMS_ERR_INTERNAL);
    KMS_GUARD(kms_buf_append(b, line, (size_t)n));
    uint64_t cum = 0;
    for (int i = 0; i <= KMS_AUDIT_BUCKETS; i++) {
        cum += bucket[i];
        if (i < KMS_AUDIT_BUCKETS) {
            n = snprintf(line, sizeof(line), "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name,
                         kms_audit_buckets[i], cum);
        } else {
            n = snprintf(line, sizeof(line), "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cum);
        }
        KMS_ENSURE(n > 0 && (size_t)n < sizeof(line), KMS_ERR_INTERNAL);
        KMS_GUARD(kms_buf_append(b, line, (size_t)n));
    }
    n = snprintf(line, sizeof(line), "%s_sum %.6f\n%s_count %" PRIu64 "\n", name,
                 (double)sum_ns / 1e9, name, cum);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(line), KMS_ERR_INTERNAL);
    return kms_buf_append(b, line, (size_t)n);
}

static kms_result metrics_text(kms_api_server *s, kms_buf *b)
{
    char line[512];
#define EMIT(...)                                                          \
    do {                                                                   \
        int n_ = snprintf(line, sizeof(line), __VA_ARGS__);                \
        KMS_ENSURE(n_ > 0 && (size_t)n_ < sizeof(line), KMS_ERR_INTERNAL); \
        KMS_GUARD(kms_buf_append(b, line, (size_t)n_));                    \
    } while (0)
    EMIT("# HELP kmsd_http_requests_total HTTP requests by route template and status.\n"
         "# TYPE kmsd_http_requests_total counter\n");
    for (int r = 1; r < R_COUNT; r++) {
        for (int i = 0; i < STATUS_SLOTS; i++) {
            uint64_t v = atomic_load(&s->m->requests[r][i]);
            if (v != 0) {
                EMIT("kmsd_http_requests_total{route=\"%s\",status=\"%d\"} %" PRIu64 "\n",
                     route_template((route_id)r, 0), status_slots[i], v);
            }
        }
    }
    EMIT("# HELP kmsd_http_request_duration_seconds Request latency by route template.\n"
         "# TYPE kmsd_http_request_duration_seconds histogram\n");
    for (int r = 1; r < R_COUNT; r++) {
        uint64_t cum = 0;
        for (int i = 0; i <= BUCKETS; i++) {
            cum += atomic_load(&s->m->bucket[r][i]);
            if (i < BUCKETS) {
                EMIT("kmsd_http_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %" PRIu64
                     "\n",
                     route_template((route_id)r, 0), latency_buckets[i], cum);
            } else {
                EMIT("kmsd_http_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} "
                     "%" PRIu64 "\n",
                     route_template((route_id)r, 0), cum);
            }
        }
        EMIT("kmsd_http_request_duration_seconds_sum{route=\"%s\"} %.6f\n",
             route_template((route_id)r, 0), (double)atomic_load(&s->m->sum_us[r]) / 1e6);
        EMIT("kmsd_http_request_duration_seconds_count{route=\"%s\"} %" PRIu64 "\n",
             route_template((route_id)r, 0), cum);
    }
    EMIT("# HELP kmsd_tls_client_rejections_total Connections refused for their client "
         "certificate.\n# TYPE kmsd_tls_client_rejections_total counter\n"
         "kmsd_tls_client_rejections_total %" PRIu64 "\n",
         atomic_load(&s->m->auth_failures));
    kms_stats st;
    if (kms_is_ok(kms_stats_get(s->k, &st))) {
        /* Every worker's (counters_total), not only this one's. */
        counters_sum t;
        counters_total(&t);
        EMIT("# HELP kmsd_hsm_calls_total PKCS#11 calls made.\n# TYPE kmsd_hsm_calls_total "
             "counter\nkmsd_hsm_calls_total %" PRIu64 "\n",
             t.hsm_calls);
        EMIT("# HELP kmsd_hsm_errors_total PKCS#11 calls that failed.\n# TYPE "
             "kmsd_hsm_errors_total counter\nkmsd_hsm_errors_total %" PRIu64 "\n",
             t.hsm_errors);
        EMIT("# HELP kmsd_hsm_call_seconds_total Time spent inside PKCS#11 calls.\n# TYPE "
             "kmsd_hsm_call_seconds_total counter\nkmsd_hsm_call_seconds_total %.6f\n",
             (double)t.hsm_ns / 1e9);
        EMIT("# HELP kmsd_hsm_recoveries_total HSM session pool re-initialisations.\n# TYPE "
             "kmsd_hsm_recoveries_total counter\nkmsd_hsm_recoveries_total %" PRIu64 "\n",
             t.hsm_recoveries);
        EMIT("# HELP kmsd_hsm_cache_hits_total Version secrets found in the handle cache.\n"
             "# TYPE kmsd_hsm_cache_hits_total counter\nkmsd_hsm_cache_hits_total %" PRIu64 "\n",
             t.cache_hits);
        EMIT("# HELP kmsd_hsm_cache_misses_total Version secrets unwrapped into the HSM.\n"
             "# TYPE kmsd_hsm_cache_misses_total counter\nkmsd_hsm_cache_misses_total "
             "%" PRIu64 "\n",
             t.cache_misses);
        if (kms_audit_enabled(s->k)) {
            EMIT("# HELP kmsd_audit_records_total Audit records written to the journal.\n"
                 "# TYPE kmsd_audit_records_total counter\nkmsd_audit_records_total "
                 "%" PRIu64 "\n",
                 t.records);
            EMIT("# HELP kmsd_audit_refused_total Audit records whose write or sync failed "
                 "(their requests were refused).\n# TYPE kmsd_audit_refused_total counter\n"
                 "kmsd_audit_refused_total %" PRIu64 "\n",
                 t.refused);
            KMS_GUARD(metrics_histogram(b, "kmsd_audit_sync_seconds",
                                        "Time of each sync of the audit journal.", t.sync_bucket,
                                        t.sync_ns));
            KMS_GUARD(metrics_histogram(
                b, "kmsd_audit_durable_wait_seconds",
                "Per record, from its submission until it was durable: what the audit trail "
                "adds to an answer.",
                t.wait_bucket, t.wait_ns));
        }
        EMIT("# HELP kmsd_keys Keys in the store.\n# TYPE kmsd_keys gauge\nkmsd_keys %zu\n",
             st.keys);
        EMIT("# HELP kmsd_keys_due Keys inside their rotation warning window.\n# TYPE "
             "kmsd_keys_due gauge\nkmsd_keys_due %zu\n",
             st.keys_due);
        EMIT("# HELP kmsd_keys_overdue Keys past their rotation period.\n# TYPE "
             "kmsd_keys_overdue gauge\nkmsd_keys_overdue %zu\n",
             st.keys_overdue);
        EMIT("# HELP kmsd_store_map_size_bytes LMDB map size.\n# TYPE kmsd_store_map_size_bytes "
             "gauge\nkmsd_store_map_size_bytes %zu\n",
             st.store_map_size);
        EMIT("# HELP kmsd_store_used_bytes LMDB bytes the store's pages hold (pruning lowers "
             "it).\n# TYPE kmsd_store_used_bytes gauge\nkmsd_store_used_bytes %zu\n",
             st.store_used_bytes);
        EMIT("# HELP kmsd_store_limit_bytes Bytes ordinary writes may fill; beyond, they fail "
             "with store_full (the rest of store_map_size_max is kept for pruning).\n# TYPE "
             "kmsd_store_limit_bytes gauge\nkmsd_store_limit_bytes %zu\n",
             st.store_limit_bytes);
    }
#undef EMIT
    return KMS_OK_RESULT;
}

/* ---- routing ---- */

/* Splits the path into at most 8 segments; false if it has more, or empty
 * segments. */
static bool split_path(const char *url, const char *seg[8], size_t len[8], size_t *n)
{
    *n = 0;
    if (url[0] != '/') {
        return false;
    }
    const char *p = url + 1;
    while (*p != '\0') {
        const char *slash = strchr(p, '/');
        size_t l = slash != NULL ? (size_t)(slash - p) : strlen(p);
        if (l == 0 || *n == 8) {
            return false;
        }
        seg[*n] = p;
        len[*n] = l;
        (*n)++;
        p += l;
        if (*p == '/') {
            p++;
            if (*p == '\0') {
                return false; /* trailing slash */
            }
        }
    }
    return true;
}

static bool seg_is(const char *s, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

typedef struct {
    route_id route;
    const char *method; /* the one method the route takes */
    const char *method2;
    kms_err err; /* KMS_OK, or why the path is refused */
} route_match;

static route_match route_resolve(req_ctx *rq, const char *url)
{
    const char *seg[8];
    size_t len[8], n;
    route_match m = {R_NONE, NULL, NULL, KMS_ERR_NOT_FOUND};
    if (!split_path(url, seg, len, &n) || n == 0) {
        return m;
    }
    m.err = KMS_OK;
    if (n == 1 && seg_is(seg[0], len[0], "healthz")) {
        m.route = R_HEALTHZ, m.method = "GET";
    } else if (n == 1 && seg_is(seg[0], len[0], "readyz")) {
        m.route = R_READYZ, m.method = "GET";
    } else if (n == 1 && seg_is(seg[0], len[0], "metrics")) {
        m.route = R_METRICS, m.method = "GET";
    } else if (n >= 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "master")) {
        if (n == 2) {
            m.route = R_MASTER, m.method = "GET";
        } else if (n == 3 && seg_is(seg[2], len[2], "rotate")) {
            m.route = R_MASTER_ROTATE, m.method = "POST";
        }
    } else if (n == 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "rotations")) {
        m.route = R_ROTATIONS, m.method = "GET";
    } else if (n == 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "status")) {
        m.route = R_STATUS, m.method = "GET";
    } else if (n == 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "report")) {
        m.route = R_REPORT, m.method = "GET";
    } else if (n == 3 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "admin") &&
               seg_is(seg[2], len[2], "check")) {
        m.route = R_ADMIN_CHECK, m.method = "POST";
    } else if (n == 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "audit")) {
        m.route = R_AUDIT, m.method = "GET";
    } else if (n == 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "export")) {
        m.route = R_EXPORT, m.method = "POST";
    } else if (n >= 2 && seg_is(seg[0], len[0], "v1") && seg_is(seg[1], len[1], "keys")) {
        if (n == 2) {
            m.route = R_KEYS, m.method = "GET", m.method2 = "POST";
            return m;
        }
        if (!kms_key_name_valid(seg[2], len[2])) {
            m.err = KMS_ERR_KEY_NAME_INVALID;
            return m;
        }
        memcpy(rq->name, seg[2], len[2]);
        rq->name[len[2]] = '\0';
        if (n == 3) {
            m.route = R_KEY, m.method = "GET", m.method2 = "PATCH";
        } else if (n == 4 && seg_is(seg[3], len[3], "rotate")) {
            m.route = R_KEY_ROTATE, m.method = "POST";
        } else if (n == 4 && seg_is(seg[3], len[3], "rollback")) {
            m.route = R_KEY_ROLLBACK, m.method = "POST";
        } else if (n == 4 && (rq->op = op_parse(seg[3], len[3])) != 0) {
            m.route = R_OP, m.method = "POST";
        } else if (n == 5 && seg_is(seg[3], len[3], "batch") &&
                   (rq->op = op_parse(seg[4], len[4])) != 0) {
            m.route = R_BATCH, m.method = "POST";
        } else if ((n == 5 || n == 6) && seg_is(seg[3], len[3], "versions")) {
            uint64_t v = 0;
            for (size_t i = 0; i < len[4]; i++) {
                if (seg[4][i] < '0' || seg[4][i] > '9' || v > UINT32_MAX / 10) {
                    m.err = KMS_ERR_VERSION_NOT_FOUND;
                    return m;
                }
                v = v * 10 + (uint64_t)(seg[4][i] - '0');
            }
            if (v == 0 || v > UINT32_MAX) {
                m.err = KMS_ERR_VERSION_NOT_FOUND;
                return m;
            }
            rq->version = (uint32_t)v;
            if (n == 5) {
                m.route = R_VERSION, m.method = "GET";
            } else if (seg_is(seg[5], len[5], "state")) {
                m.route = R_VERSION_STATE, m.method = "POST";
            }
        }
    }
    if (m.route == R_NONE) {
        m.err = KMS_ERR_NOT_FOUND;
    }
    return m;
}

/* Roles that may use the route (docs/api.md, "Roles"), and whether they
 * are judged on the key (true) or service-wide (false). */
static unsigned route_roles(req_ctx *rq, bool *per_key)
{
    *per_key = true;
    bool get = strcmp(rq->method, "GET") == 0;
    switch (rq->route) {
    case R_HEALTHZ:
    case R_READYZ:
        *per_key = false;
        return 0; /* any authenticated client */
    case R_METRICS:
    case R_MASTER:
    case R_ROTATIONS:
    case R_STATUS:
    case R_REPORT:
        *per_key = false;
        return rq->route == R_MASTER && !get ? KMS_ROLE_ADMIN : KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR;
    case R_AUDIT:
    case R_EXPORT:
        *per_key = false;
        return KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR;
    case R_MASTER_ROTATE:
    case R_ADMIN_CHECK:
        *per_key = false;
        return KMS_ROLE_ADMIN;
    case R_KEYS:
        /* POST: admin on the key named in the body, checked by the
         * handler; GET: filtered per key. */
        *per_key = false;
        return get ? 0 : KMS_ROLE_ADMIN;
    case R_KEY:
    case R_VERSION:
        if (get) {
            return KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR | KMS_ROLE_APP | KMS_ROLE_MIGRATOR;
        }
        return KMS_ROLE_ADMIN;
    case R_KEY_ROTATE:
    case R_KEY_ROLLBACK:
    case R_VERSION_STATE:
        return KMS_ROLE_ADMIN;
    case R_OP:
    case R_BATCH:
        return op_roles(rq->op);
    default:
        return 0;
    }
}

static bool body_is_secret(const req_ctx *rq)
{
    return (rq->route == R_OP || rq->route == R_BATCH) &&
           (rq->op == KMS_OP_WRAP || rq->op == KMS_OP_ENCRYPT);
}

/* GET /v1/audit?from=&to=&identity=&key=&operation=&after=&limit= */
static kms_result audit_list(req_ctx *rq, struct MHD_Connection *conn, reply *out)
{
    kms_audit_filter f = {0};
    uint64_t from = 0, to = 0, after = 0, limit = KMS_AUDIT_QUERY_DEFAULT;
    KMS_GUARD(query_u64(conn, "from", INT64_MAX, &from));
    KMS_GUARD(query_u64(conn, "to", INT64_MAX, &to));
    KMS_GUARD(query_u64(conn, "after", INT64_MAX, &after));
    KMS_GUARD(query_u64(conn, "limit", KMS_AUDIT_QUERY_MAX, &limit));
    KMS_ENSURE_MSG(limit > 0, KMS_ERR_INVALID_ARGUMENT, "query parameter 'limit': must be >= 1");
    static const char *const names[] = {"identity", "key", "operation"};
    const char *vals[3];
    for (size_t i = 0; i < 3; i++) {
        vals[i] = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, names[i]);
        if (vals[i] != NULL && vals[i][0] == '\0') {
            vals[i] = NULL;
        }
        KMS_ENSURE_MSG(vals[i] == NULL || strlen(vals[i]) <= KMS_IDENTITY_MAX_BYTES,
                       KMS_ERR_INVALID_ARGUMENT, "query parameter '%s': too long", names[i]);
    }
    f.from = (int64_t)from;
    f.to = (int64_t)to;
    f.after_seq = after;
    f.limit = (size_t)limit;
    f.identity = vals[0];
    f.key = vals[1];
    f.operation = vals[2];
    KMS_GUARD(kms_api_audit_list(rq->s->k, &f, &out->doc));
    out->status = 200;
    return KMS_OK_RESULT;
}

/* POST /v1/export {"from"?: seconds, "to"?: seconds} */
static kms_result audit_export(req_ctx *rq, json_t *body, reply *out)
{
    json_int_t from = 0, to = 0;
    json_error_t jerr;
    KMS_ENSURE_MSG(
        json_unpack_ex(body, &jerr, JSON_STRICT, "{s?I,s?I}", "from", &from, "to", &to) == 0,
        KMS_ERR_JSON_INVALID, "export: %s (fields: from, to as Unix seconds)", jerr.text);
    KMS_ENSURE_MSG(from >= 0 && to >= 0, KMS_ERR_INVALID_ARGUMENT,
                   "export: from and to must be >= 0");
    KMS_GUARD(kms_api_export_build(rq->s->k, (int64_t)from, (int64_t)to, &out->doc));
    out->status = 200;
    return KMS_OK_RESULT;
}

/* Runs once the body is complete. */
static enum MHD_Result dispatch(req_ctx *rq, struct MHD_Connection *conn)
{
    kms_api_server *s = rq->s;
    reply out = {NULL, 200};
    kms_result res = KMS_OK_RESULT;
    json_t *body = NULL;
    kms_caller c = caller_of(rq);
    bool has_body = strcmp(rq->method, "GET") != 0;

    /* No operation runs while its record could not be written. */
    KMS_GUARD_GOTO(res, kms_audit_ready(s->k), done);
    if (has_body) {
        KMS_GUARD_GOTO(res, kms_api_body_parse(rq->body.data, rq->body.len, &body), done);
    }
    switch (rq->route) {
    case R_HEALTHZ:
        out.doc = json_pack("{s:s}", "status", "ok");
        break;
    case R_READYZ:
        out.doc = readiness(s, &out.status);
        break;
    case R_METRICS: {
        kms_buf text;
        kms_buf_init(&text, 16u << 20);
        KMS_GUARD_GOTO(res, metrics_text(s, &text), metrics_done);
        char *copy = kms_api_wipe_malloc(text.len + 1);
        if (copy == NULL) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto metrics_done;
        }
        memcpy(copy, text.data, text.len);
        kms_buf_free(&text);
        json_decref(body);
        return send_text(rq, conn, 200, copy, strlen(copy),
                         "text/plain; version=0.0.4; charset=utf-8");
    metrics_done:
        kms_buf_free(&text);
        goto done;
    }
    case R_KEYS:
        if (!has_body) {
            KMS_GUARD_GOTO(res, list_keys(rq, conn, &out), done);
        } else {
            kms_api_create_req cr;
            kms_key_info info;
            KMS_GUARD_GOTO(res, kms_api_create_parse(body, &cr), done);
            pthread_rwlock_rdlock(&s->lock);
            unsigned roles = kms_policy_roles(s->policy, rq->conn->identity, cr.name);
            pthread_rwlock_unlock(&s->lock);
            if ((roles & KMS_ROLE_ADMIN) == 0) {
                res = kms_error_raisef(KMS_ERR_FORBIDDEN, __FILE__, __LINE__,
                                       "role admin on key '%s' required", cr.name);
                goto done;
            }
            memcpy(rq->name, cr.name, sizeof(rq->name));
            KMS_GUARD_GOTO(res, kms_key_create(s->k, &c, &cr.spec, &info), done);
            out.doc = key_json(&info);
            out.status = 201;
        }
        break;
    case R_KEY:
        if (!has_body) {
            const char *uses = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "uses");
            KMS_GUARD_GOTO(res, kms_api_uses_param(uses), done);
            bool want_uses = uses != NULL && strcmp(uses, "true") == 0;
            /* Use counts describe every caller of the key: staff only. */
            if (want_uses && (rq->roles & (KMS_ROLE_ADMIN | KMS_ROLE_AUDITOR)) == 0) {
                res =
                    kms_error_raisef(KMS_ERR_FORBIDDEN, __FILE__, __LINE__,
                                     "uses=true needs role admin or auditor on key '%s'", rq->name);
                goto done;
            }
            KMS_GUARD_GOTO(res, key_with_versions(s->k, rq->name, &out.doc), done);
            if (want_uses) {
                /* Per version: uses in the last 30 days, from the audit log
                 * (a scan of it: only when asked). */
                kms_api_versions_add_uses(s->k, rq->name, json_object_get(out.doc, "versions"));
            }
        } else {
            kms_key_update u;
            kms_key_info info;
            KMS_GUARD_GOTO(res, kms_api_patch_parse(body, &u), done);
            KMS_GUARD_GOTO(res, kms_key_update_policy(s->k, &c, rq->name, &u, &info), done);
            out.doc = key_json(&info);
        }
        break;
    case R_KEY_ROTATE:
    case R_KEY_ROLLBACK: {
        kms_api_rotate_req rr;
        kms_rotation_info ri;
        kms_key_info info;
        KMS_GUARD_GOTO(res, kms_api_rotate_parse(body, rq->route == R_KEY_ROTATE, &rr), done);
        if (rq->route == R_KEY_ROTATE) {
            KMS_GUARD_GOTO(res, kms_key_rotate(s->k, &c, rq->name, rr.type, rr.reason, &ri), done);
        } else {
            KMS_GUARD_GOTO(res, kms_key_rollback(s->k, &c, rq->name, rr.reason, &ri), done);
        }
        rq->au_version = ri.from_version;
        rq->au_to_version = ri.to_version;
        KMS_GUARD_GOTO(res, kms_key_get(s->k, rq->name, &info), done);
        out.doc = json_pack("{s:o,s:o}", "rotation", rotation_json(&ri), "key", key_json(&info));
        if (out.doc != NULL && rq->route == R_KEY_ROTATE && rr.type == KMS_ROTATION_EMERGENCY) {
            /* Who used the compromised version (issue 4 section 2). The
             * rotation is done whatever happens here: a report that cannot
             * be built is null in the answer and logged, not an error. */
            json_t *usage = NULL;
            kms_result ur =
                kms_api_usage_doc(s->k, rq->name, ri.from_version, rr.lookback_s, &usage);
            if (!kms_is_ok(ur)) {
                kms_log(KMS_LOG_WARN, "rid=%s usage report of key=%s v%u failed: %s", rq->rid,
                        rq->name, ri.from_version, kms_error_code(ur.err));
            }
            json_object_set_new(out.doc, "usage", kms_is_ok(ur) ? usage : json_null());
        }
        break;
    }
    case R_VERSION: {
        kms_version_info v;
        KMS_GUARD_GOTO(res, kms_version_get(s->k, rq->name, rq->version, &v), done);
        out.doc = version_json(&v);
        break;
    }
    case R_VERSION_STATE: {
        kms_api_state_req sr;
        kms_version_info v;
        KMS_GUARD_GOTO(res, kms_api_state_parse(body, &sr), done);
        KMS_GUARD_GOTO(res,
                       kms_version_set_state(s->k, &c, rq->name, rq->version, sr.action, sr.arg,
                                             sr.reason, &v),
                       done);
        out.doc = version_json(&v);
        break;
    }
    case R_OP:
        KMS_GUARD_GOTO(res, run_single_op(rq, body, &out), done);
        break;
    case R_BATCH:
        KMS_GUARD_GOTO(res, run_batch(rq, body, &out), done);
        break;
    case R_MASTER:
        KMS_GUARD_GOTO(res, list_masters(rq, &out), done);
        break;
    case R_MASTER_ROTATE: {
        kms_api_rotate_req rr;
        kms_rotation_info ri;
        KMS_GUARD_GOTO(res, kms_api_rotate_parse(body, false, &rr), done);
        KMS_GUARD_GOTO(res, kms_master_rotate(s->k, &c, rr.reason, &ri), done);
        rq->au_version = ri.from_version;
        rq->au_to_version = ri.to_version;
        out.doc = json_pack("{s:o}", "rotation", rotation_json(&ri));
        break;
    }
    case R_ROTATIONS:
        KMS_GUARD_GOTO(res, list_rotations(rq, conn, &out), done);
        break;
    case R_STATUS:
        KMS_GUARD_GOTO(
            res,
            kms_api_status_doc(
                s->k, MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "due_within"),
                MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "overdue"), &out.doc),
            done);
        break;
    case R_REPORT:
        KMS_GUARD_GOTO(
            res,
            kms_api_report_doc(
                s->k, MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "month"), &out.doc),
            done);
        break;
    case R_ADMIN_CHECK: {
        bool repair = false;
        kms_check_report rep;
        KMS_GUARD_GOTO(res, kms_api_check_parse(body, &repair), done);
        KMS_GUARD_GOTO(res, kms_check(s->k, repair, &rep), done);
        out.doc = json_pack(
            "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:s}", "keys", (json_int_t)rep.keys, "versions",
            (json_int_t)rep.versions, "masters", (json_int_t)rep.masters, "problems",
            (json_int_t)rep.problems, "repaired", (json_int_t)rep.repaired, "orphan_objects",
            (json_int_t)rep.orphan_objects, "missing_objects", (json_int_t)rep.missing_objects,
            "unreadable_versions", (json_int_t)rep.unreadable_versions, "summary", rep.summary);
        break;
    }
    case R_AUDIT:
        KMS_GUARD_GOTO(res, audit_list(rq, conn, &out), done);
        break;
    case R_EXPORT:
        KMS_GUARD_GOTO(res, audit_export(rq, body, &out), done);
        break;
    default:
        res = kms_error_raise(KMS_ERR_NOT_FOUND, __FILE__, __LINE__);
        break;
    }
    if (kms_is_ok(res) && out.doc == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    }
done:
    json_decref(body);
    if (!kms_is_ok(res)) {
        json_decref(out.doc);
        return send_result(rq, conn, res);
    }
    return send_json(rq, conn, out.status, out.doc);
}

/* ---- libmicrohttpd callbacks ---- */

/* The key of a client address for per_ip_connection_limit: its family,
 * then its bytes; false for other families (not counted, as
 * libmicrohttpd's own limit does not count them). */
static bool ip_key_of(const struct sockaddr *sa, uint8_t key[17])
{
    memset(key, 0, 17);
    if (sa != NULL && sa->sa_family == AF_INET) {
        key[0] = 4;
        memcpy(key + 1, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return true;
    }
    if (sa != NULL && sa->sa_family == AF_INET6) {
        key[0] = 6;
        memcpy(key + 1, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return true;
    }
    return false;
}

/* Under ip_mu: the slot of key, or NULL. A plain array: at most
 * connection_limit distinct addresses, looked at once per new connection,
 * which costs a TLS handshake anyway. */
static ip_count *ip_find(kms_api_server *s, const uint8_t key[17])
{
    for (size_t i = 0; i < s->ip_n; i++) {
        if (memcmp(s->ips[i].key, key, 17) == 0) {
            return &s->ips[i];
        }
    }
    return NULL;
}

/* Counts a connection of key; false if no slot could be made. */
static bool ip_add(kms_api_server *s, const uint8_t key[17])
{
    bool ok = true;
    pthread_mutex_lock(&s->ip_mu);
    ip_count *c = ip_find(s, key);
    if (c == NULL) {
        if (s->ip_n == s->ip_cap) {
            size_t cap = s->ip_cap != 0 ? 2 * s->ip_cap : 16;
            ip_count *n = realloc(s->ips, cap * sizeof(*n));
            if (n == NULL) {
                ok = false;
                goto out;
            }
            s->ips = n;
            s->ip_cap = cap;
        }
        c = &s->ips[s->ip_n++];
        memcpy(c->key, key, 17);
        c->count = 0;
    }
    c->count++;
out:
    pthread_mutex_unlock(&s->ip_mu);
    return ok;
}

static void ip_del(kms_api_server *s, const uint8_t key[17])
{
    pthread_mutex_lock(&s->ip_mu);
    ip_count *c = ip_find(s, key);
    if (c != NULL && --c->count == 0) {
        *c = s->ips[--s->ip_n];
    }
    pthread_mutex_unlock(&s->ip_mu);
}

/* While draining, a new connection is closed as soon as it is accepted.
 * This stands in for MHD_quiesce_daemon, which removes the listening
 * socket from a daemon's epoll set from the calling thread while the
 * daemon's own thread, seeing it quiesced, may remove it too, and the
 * loser of that race aborts the process ("Failed to remove listen FD from
 * epoll set", libmicrohttpd 0.9.75; seen as a worker killed by SIGABRT
 * while stopping). A connection over per_ip_connection_limit is closed the
 * same way: the limit is counted by kmsd over the connections started on
 * every server thread of the process (each thread's daemon sees only its
 * own); two accepted at the same moment on different threads may both
 * pass it. */
static enum MHD_Result on_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
    (void)addrlen;
    kms_api_server *s = cls;
    if (atomic_load(&s->draining)) {
        return MHD_NO;
    }
    uint8_t key[17];
    if (!ip_key_of(addr, key)) {
        return MHD_YES;
    }
    pthread_mutex_lock(&s->ip_mu);
    const ip_count *c = ip_find(s, key);
    bool over = c != NULL && c->count >= s->cfg.per_ip_connection_limit;
    pthread_mutex_unlock(&s->ip_mu);
    if (over) {
        kms_log(KMS_LOG_WARN, "connection refused: per_ip_connection_limit (%u) reached",
                s->cfg.per_ip_connection_limit);
        return MHD_NO;
    }
    return MHD_YES;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    api_loop *l = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        atomic_fetch_add(&l->conns, 1);
        conn_ctx *cc = calloc(1, sizeof(*cc));
        if (cc != NULL) {
            cc->loop = l;
            const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
            if (ip_key_of(ci != NULL ? ci->client_addr : NULL, cc->ip_key)) {
                inet_ntop(cc->ip_key[0] == 4 ? AF_INET : AF_INET6, cc->ip_key + 1, cc->addr,
                          sizeof(cc->addr));
                cc->ip_counted = ip_add(l->s, cc->ip_key);
            }
        }
        *socket_context = cc;
    } else {
        atomic_fetch_sub(&l->conns, 1);
        conn_ctx *cc = *socket_context;
        if (cc != NULL && cc->ip_counted) {
            ip_del(l->s, cc->ip_key);
        }
        free(cc);
        *socket_context = NULL;
    }
}

/* Verifies the client certificate on first sight of the connection, and
 * again after a reload of the CA or CRL, so that a revocation also reaches
 * kept-alive connections. A connection is served by one thread at a time,
 * so cc needs no lock of its own. */
static void conn_verify(kms_api_server *s, struct MHD_Connection *conn, conn_ctx *cc)
{
    pthread_rwlock_rdlock(&s->lock);
    if (cc->verified != 0 && cc->trust_gen == s->trust_gen) {
        pthread_rwlock_unlock(&s->lock);
        return;
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    gnutls_session_t session = ci != NULL ? (gnutls_session_t)ci->tls_session : NULL;
    bool ok =
        kms_api_trust_verify(s->trust, session, cc->identity, sizeof(cc->identity), &cc->reason);
    cc->trust_gen = s->trust_gen;
    pthread_rwlock_unlock(&s->lock);
    cc->verified = ok ? 1 : -1;
    if (!ok) {
        atomic_fetch_add(&s->m->auth_failures, 1);
        kms_log(KMS_LOG_WARN, "client %s refused: %s", cc->addr[0] ? cc->addr : "?", cc->reason);
    }
}

static bool content_type_json(struct MHD_Connection *conn)
{
    const char *ct =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (ct == NULL) {
        return false;
    }
    size_t n = strlen("application/json");
    return strncasecmp(ct, "application/json", n) == 0 &&
           (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ');
}

/* ---- batches on threads of their own ---- */

/* A batch thread: runs the batches handed over, each as dispatch would on
 * the server thread; the answer goes out through hold_offloaded. */
static void *batch_main(void *arg)
{
    kms_api_server *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->bq_mu);
        while (s->bq_head == NULL && !s->bq_stop) {
            pthread_cond_wait(&s->bq_cv, &s->bq_mu);
        }
        req_ctx *rq = s->bq_head;
        if (rq == NULL) {
            pthread_mutex_unlock(&s->bq_mu);
            break;
        }
        s->bq_head = rq->bq_next;
        if (s->bq_head == NULL) {
            s->bq_tail = NULL;
        }
        pthread_mutex_unlock(&s->bq_mu);
        struct MHD_Connection *conn = rq->mhd_conn;
        if (dispatch(rq, conn) == MHD_NO) {
            /* No answer could be made (out of memory): nothing was held
             * or resumed; the connection's thread closes it. */
            rq->offload_failed = true;
            conn_resume(conn, rq->conn->loop);
        }
    }
    return NULL;
}

/* Hands a batch to a batch thread, its connection suspended; false (run
 * it here) when there is none or the server is stopping. Counted in held
 * first, so that held_drain either waits for it or this sees no_suspend
 * (both sequentially consistent). */
static bool batch_offload(req_ctx *rq, struct MHD_Connection *conn)
{
    kms_api_server *s = rq->s;
    if (s->bq_n == 0) {
        return false;
    }
    atomic_fetch_add(&s->held, 1);
    if (atomic_load(&s->no_suspend)) {
        atomic_fetch_sub(&s->held, 1);
        return false;
    }
    rq->offloaded = true;
    rq->mhd_conn = conn;
    rq->bq_next = NULL;
    MHD_suspend_connection(conn);
    pthread_mutex_lock(&s->bq_mu);
    if (s->bq_tail != NULL) {
        ((req_ctx *)s->bq_tail)->bq_next = rq;
    } else {
        s->bq_head = rq;
    }
    s->bq_tail = rq;
    pthread_cond_signal(&s->bq_cv);
    pthread_mutex_unlock(&s->bq_mu);
    return true;
}

/* Once nothing is held (held_drain), the batch threads are idle: stop
 * them. */
static void batch_threads_stop(kms_api_server *s)
{
    if (s->bq_n == 0 || s->bq_joined) {
        return;
    }
    pthread_mutex_lock(&s->bq_mu);
    s->bq_stop = true;
    pthread_cond_broadcast(&s->bq_cv);
    pthread_mutex_unlock(&s->bq_mu);
    for (unsigned i = 0; i < s->bq_n; i++) {
        pthread_join(s->bq_threads[i], NULL);
    }
    s->bq_joined = true;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    kms_api_server *s = cls;
    req_ctx *rq = *con_cls;
    (void)version;
    if (rq == NULL) {
        rq = calloc(1, sizeof(*rq));
        if (rq == NULL) {
            return MHD_NO;
        }
        *con_cls = rq;
        rq->s = s;
        rq->method = method;
        rq->status = 0;
        clock_gettime(CLOCK_MONOTONIC, &rq->start);
        atomic_fetch_add(&s->inflight, 1);
        /* Its record will be queued within microseconds of its answer:
         * the audit's committer waits briefly for announced records so
         * that concurrent requests share one synced commit. */
        kms_audit_announce(s->k);
        rq->announced = true;
        if (!kms_is_ok(kms_rand_id_hex(rq->rid))) {
            memcpy(rq->rid, "0", 2);
        }
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        rq->conn = ci != NULL ? ci->socket_context : NULL;
        if (rq->conn == NULL) {
            return MHD_NO;
        }
        conn_verify(s, conn, rq->conn);
        if (rq->conn->verified < 0) {
            return send_error(rq, conn, KMS_ERR_UNAUTHENTICATED, rq->conn->reason);
        }
        route_match m = route_resolve(rq, url);
        rq->route = m.route;
        if (m.err != KMS_OK) {
            return send_error(rq, conn, m.err, NULL);
        }
        if (strcmp(method, m.method) != 0 &&
            (m.method2 == NULL || strcmp(method, m.method2) != 0)) {
            snprintf(rq->allow, sizeof(rq->allow), "%s%s%s", m.method, m.method2 ? ", " : "",
                     m.method2 ? m.method2 : "");
            return send_error(rq, conn, KMS_ERR_METHOD_NOT_ALLOWED, NULL);
        }
        bool per_key;
        unsigned need = route_roles(rq, &per_key);
        pthread_rwlock_rdlock(&s->lock);
        rq->roles = kms_policy_roles(s->policy, rq->conn->identity, per_key ? rq->name : NULL);
        pthread_rwlock_unlock(&s->lock);
        if (need != 0 && (rq->roles & need) == 0) {
            char msg[384];
            snprintf(msg, sizeof(msg), "identity has no role allowing %s %s%s%s", method,
                     route_template(rq->route, rq->op), per_key ? " on key " : "",
                     per_key ? rq->name : "");
            return send_error(rq, conn, KMS_ERR_FORBIDDEN, msg);
        }
        /* Body limits are enforced before a byte of the body is read. */
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl != NULL) {
            char *end = NULL;
            errno = 0;
            unsigned long long n = strtoull(cl, &end, 10);
            if (errno != 0 || *end != '\0' || n > s->cfg.max_body_bytes) {
                char msg[96];
                snprintf(msg, sizeof(msg), "request body exceeds the limit of %zu bytes",
                         s->cfg.max_body_bytes);
                return send_error(rq, conn, KMS_ERR_BODY_TOO_LARGE, msg);
            }
        }
        if (strcmp(method, "GET") != 0) {
            bool announced = cl != NULL && strcmp(cl, "0") != 0;
            bool chunked = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                       MHD_HTTP_HEADER_TRANSFER_ENCODING) != NULL;
            if ((announced || chunked) && !content_type_json(conn)) {
                return send_error(rq, conn, KMS_ERR_UNSUPPORTED_MEDIA_TYPE, NULL);
            }
        }
        if (body_is_secret(rq)) {
            kms_buf_init_secret(&rq->body, s->cfg.max_body_bytes);
        } else {
            kms_buf_init(&rq->body, s->cfg.max_body_bytes);
        }
        return MHD_YES;
    }
    if (rq->held != NULL) {
        /* Resumed: the answer's audit record is committed (or failed). */
        *upload_data_size = 0;
        return send_held(rq, conn);
    }
    if (rq->offload_failed) {
        rq->offload_failed = false;
        atomic_fetch_sub(&s->held, 1);
        return MHD_NO;
    }
    if (rq->responded) {
        *upload_data_size = 0; /* discard the rest of a refused request */
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        /* Chunked bodies announce no length: count while reading, and once
         * past the limit keep nothing more. */
        if (!rq->too_large) {
            if (*upload_data_size > s->cfg.max_body_bytes - rq->body.len) {
                rq->too_large = true;
                kms_buf_free(&rq->body);
            } else {
                kms_result ar = kms_buf_append(&rq->body, upload_data, *upload_data_size);
                if (!kms_is_ok(ar)) {
                    /* Out of (secure) memory is not the client's fault. */
                    rq->body_err = ar.err == KMS_ERR_LIMIT_EXCEEDED ? KMS_OK : ar.err;
                    rq->too_large = true;
                    kms_buf_free(&rq->body);
                }
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (rq->body_err != KMS_OK) {
        return send_error(rq, conn, rq->body_err, NULL);
    }
    if (rq->too_large) {
        char msg[96];
        snprintf(msg, sizeof(msg), "request body exceeds the limit of %zu bytes",
                 s->cfg.max_body_bytes);
        return send_error(rq, conn, KMS_ERR_BODY_TOO_LARGE, msg);
    }
    if (rq->route == R_BATCH && batch_offload(rq, conn)) {
        return MHD_YES;
    }
    /* Marked while the handler runs: a thread held here (an HSM call that
     * hangs) lets the next server thread take new connections. */
    api_loop *l = tl_loop;
    if (l != NULL) {
        atomic_store_explicit(&l->busy_since, mono_ms(), memory_order_relaxed);
    }
    enum MHD_Result ret = dispatch(rq, conn);
    if (l != NULL) {
        atomic_store_explicit(&l->busy_since, 0, memory_order_relaxed);
    }
    return ret;
}

static int status_slot(int status)
{
    for (int i = 0; i < STATUS_SLOTS - 1; i++) {
        if (status_slots[i] == status) {
            return i;
        }
    }
    return STATUS_SLOTS - 1;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    kms_api_server *s = cls;
    req_ctx *rq = *con_cls;
    (void)conn;
    if (rq == NULL) {
        return;
    }
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    uint64_t us = (uint64_t)(end.tv_sec - rq->start.tv_sec) * 1000000u +
                  (uint64_t)((end.tv_nsec - rq->start.tv_nsec) / 1000);
    if (rq->route != R_NONE) {
        double secs = (double)us / 1e6;
        int b = 0;
        while (b < BUCKETS && secs > latency_buckets[b]) {
            b++;
        }
        atomic_fetch_add(&s->m->bucket[rq->route][b], 1);
        atomic_fetch_add(&s->m->sum_us[rq->route], us);
        atomic_fetch_add(&s->m->requests[rq->route][status_slot(rq->status)], 1);
    }
    /* One line per request: never a body, a token or plaintext. */
    kms_log(
        rq->status >= 500 ? KMS_LOG_WARN : KMS_LOG_INFO,
        "request id=%s client=%s identity=%s %s %s%s%s%s%s status=%d%s%s duration_ms=%.3f%s",
        rq->rid, rq->conn != NULL && rq->conn->addr[0] ? rq->conn->addr : "-",
        rq->conn != NULL && rq->conn->verified > 0 ? rq->conn->identity : "-",
        rq->method != NULL ? rq->method : "-", route_template(rq->route, rq->op),
        rq->op != 0 ? " op=" : "", rq->op != 0 ? op_names[rq->op] : "",
        rq->name[0] != '\0' ? " key=" : "", rq->name, rq->status,
        rq->err != KMS_OK ? " error=" : "", rq->err != KMS_OK ? kms_error_code(rq->err) : "",
        (double)us / 1000.0,
        toe != MHD_REQUEST_TERMINATED_COMPLETED_OK
            ? (toe == MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN
                   ? " aborted=shutdown"
                   : (toe == MHD_REQUEST_TERMINATED_CLIENT_ABORT ? " aborted=client" : " aborted"))
            : "");
    if (rq->announced) {
        kms_audit_withdraw(s->k); /* ended without an answer (client gone, shutdown) */
    }
    if (rq->held != NULL) {
        MHD_destroy_response(rq->held); /* resumed, connection gone before it was sent */
        atomic_fetch_sub(&s->held, 1);
    }
    kms_buf_free(&rq->body);
    free(rq);
    *con_cls = NULL;
    atomic_fetch_sub(&s->inflight, 1);
}

/* libmicrohttpd's own messages: fmt is the library's format string. */
__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n') {
        msg[--n] = '\0';
    }
    kms_log(KMS_LOG_DEBUG, "libmicrohttpd: %s", msg);
}

/* ---- life cycle ---- */

void kms_api_global_init(void)
{
    kms_api_json_alloc_init();
}

/* One listening socket on ss; SO_REUSEPORT when the address is bound once
 * per worker process. Returns the fd, or -1 with errno set. */
static int listen_one(const struct sockaddr_storage *ss, socklen_t sl, bool reuseport)
{
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) ||
        (ss->ss_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) ||
        bind(fd, (const struct sockaddr *)ss, sl) != 0 || listen(fd, 512) != 0) {
        int e = errno;
        if (fd >= 0) {
            close(fd);
        }
        errno = e;
        return -1;
    }
    return fd;
}

static kms_result listen_error(const kms_listen_addr *a)
{
    return kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "listen on %s port %u: %s", a->host,
                            a->port, strerror(errno));
}

KMS_RESULT kms_api_listen(const kms_daemon_config *cfg, size_t copies, int *fds, size_t *n)
{
    KMS_ENSURE(copies >= 1, KMS_ERR_INVALID_ARGUMENT);
    *n = 0;
    const size_t nl = cfg->listen_count;
    for (size_t j = 0; j < copies * nl; j++) {
        fds[j] = -1;
    }
    kms_result r = KMS_OK_RESULT;
    for (size_t i = 0; i < nl && kms_is_ok(r); i++) {
        const kms_listen_addr *a = &cfg->listen[i];
        struct sockaddr_storage ss;
        socklen_t sl;
        memset(&ss, 0, sizeof(ss));
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        if (inet_pton(AF_INET, a->host, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET;
            s4->sin_port = htons(a->port);
            sl = sizeof(*s4);
        } else if (inet_pton(AF_INET6, a->host, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6;
            s6->sin6_port = htons(a->port);
            sl = sizeof(*s6);
        } else {
            r = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__,
                                 "listen: '%s' is not a numeric address", a->host);
            break;
        }
        if (copies > 1) {
            /* A socket with SO_REUSEPORT joins any group of the same user
             * already listening there (another kmsd would silently share
             * the connections): first a socket without it, which that
             * group refuses, so that a port in use fails as it would
             * without SO_REUSEPORT. */
            int probe = listen_one(&ss, sl, false);
            if (probe < 0) {
                r = listen_error(a);
                break;
            }
            close(probe);
        }
        for (size_t c = 0; c < copies; c++) {
            int fd = listen_one(&ss, sl, copies > 1);
            /* Port 0: the copies join the port the first one was given. */
            socklen_t got = sizeof(ss);
            if (fd >= 0 && c == 0 && a->port == 0 &&
                getsockname(fd, (struct sockaddr *)&ss, &got) != 0) {
                close(fd);
                fd = -1;
            }
            if (fd < 0) {
                r = listen_error(a);
                break;
            }
            fds[c * nl + i] = fd;
        }
    }
    if (!kms_is_ok(r)) {
        for (size_t j = 0; j < copies * nl; j++) {
            if (fds[j] >= 0) {
                close(fds[j]);
            }
        }
        return r;
    }
    *n = copies * nl;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_tls_check(const kms_daemon_config *cfg)
{
    kms_api_trust *t = NULL;
    KMS_GUARD(kms_api_tls_cert_load(cfg->tls_cert, cfg->tls_key));
    kms_api_tls_free();
    KMS_GUARD(kms_api_trust_load(cfg->tls_ca, cfg->tls_crl, &t));
    kms_api_trust_free(t);
    return KMS_OK_RESULT;
}

static kms_result load_ca_pem(const char *path, char **out)
{
    size_t len;
    KMS_GUARD(kms_api_read_file(path, 1024 * 1024, out, &len));
    return KMS_OK_RESULT;
}

/* Spill-over. The first server thread of a process accepts and serves
 * every connection while it can: one thread serves a pass's requests, writes
 * their audit records with one write and is woken once per sync, where
 * threads sharing the connections each do so for a few (docs/performance.md,
 * "One serving thread, the others spare"). Another thread starts taking new
 * connections only when every thread before it is unavailable: held in one
 * request for thread_spill_ms (an HSM call that hangs must not stop the
 * accept loop or /healthz), or at its share of connection_limit. It serves
 * the connections it took until they close, and while it has any it also
 * accepts. A spare thread looks every LOOP_SPARE_TICK_MS at most. */
#define LOOP_SPARE_TICK_MS 25

static bool loop_unavailable(api_loop *l, int64_t now, unsigned spill_ms)
{
    int64_t since = atomic_load_explicit(&l->busy_since, memory_order_relaxed);
    return (since != 0 && now - since >= (int64_t)spill_ms) || atomic_load(&l->conns) >= l->share;
}

static bool loop_serving(api_loop *l)
{
    unsigned spill_ms = l->s->cfg.thread_spill_ms;
    if (l->idx == 0 || spill_ms == 0 || atomic_load(&l->conns) > 0) {
        return true;
    }
    int64_t now = mono_ms();
    for (unsigned u = 0; u < l->idx; u++) {
        if (!loop_unavailable(&l->s->loops[u], now, spill_ms)) {
            return false;
        }
    }
    return true;
}

/* A server thread: waits on its daemons' epoll sets and its wake-up
 * eventfd, then lets each daemon do what is ready. The wait is bounded by
 * libmicrohttpd's own next deadline (connection timeouts, data already
 * read by TLS), else by LOOP_IDLE_MS so that a stop is seen. A spare
 * thread (loop_serving false) waits on its eventfd alone. */
#define LOOP_IDLE_MS 1000

static void *loop_main(void *arg)
{
    api_loop *l = arg;
    struct pollfd pf[KMS_CONFIG_LISTEN_MAX + 1];
    for (size_t i = 0; i < l->nd; i++) {
        const union MHD_DaemonInfo *di = MHD_get_daemon_info(l->d[i], MHD_DAEMON_INFO_EPOLL_FD);
        pf[i] = (struct pollfd){.fd = di != NULL ? di->epoll_fd : -1, .events = POLLIN};
    }
    pf[l->nd] = (struct pollfd){.fd = l->wake_fd, .events = POLLIN};
    tl_loop = l;
    while (!atomic_load(&l->stop)) {
        /* A spare waits on its eventfd alone. */
        bool serving = loop_serving(l);
        int ms = serving ? LOOP_IDLE_MS : LOOP_SPARE_TICK_MS;
        for (size_t i = 0; serving && i < l->nd; i++) {
            MHD_UNSIGNED_LONG_LONG to;
            if (MHD_get_timeout(l->d[i], &to) == MHD_YES && to < (MHD_UNSIGNED_LONG_LONG)ms) {
                ms = (int)to;
            }
        }
        struct pollfd *set = serving ? pf : &pf[l->nd];
        if (poll(set, serving ? l->nd + 1 : 1, ms) < 0 && errno != EINTR) {
            kms_log(KMS_LOG_ERROR, "server thread: poll: %s", strerror(errno));
            struct timespec d = {0, 10 * 1000000L};
            nanosleep(&d, NULL);
        }
        if (pf[l->nd].revents != 0) {
            uint64_t v;
            (void)!read(l->wake_fd, &v, sizeof(v));
        }
        /* Cleared before the daemons run, so that a connection resumed
         * while they do wakes the loop again. */
        atomic_store(&l->woken, false);
        if (!serving) {
            continue;
        }
        for (size_t i = 0; i < l->nd; i++) {
            MHD_run(l->d[i]);
        }
        if (l->queued) {
            l->queued = false;
            kms_audit_write_queued(l->aw);
        }
    }
    tl_loop = NULL;
    return NULL;
}

/* Stops the server threads (each finishes its pass), then the daemons:
 * libmicrohttpd is stopped from this thread once no loop runs it. */
static void loops_stop(kms_api_server *s)
{
    for (unsigned i = 0; i < s->loop_count; i++) {
        api_loop *l = &s->loops[i];
        if (l->started) {
            atomic_store(&l->stop, true);
            loop_wake(l);
            pthread_join(l->thread, NULL);
            l->started = false;
        }
    }
    for (unsigned i = 0; i < s->loop_count; i++) {
        api_loop *l = &s->loops[i];
        for (size_t j = 0; j < l->nd; j++) {
            MHD_stop_daemon(l->d[j]);
            l->d[j] = NULL;
        }
        l->nd = 0;
    }
}

/* TLS 1.2 and 1.3 only (api-routes.md); GnuTLS's NORMAL cipher suites. */
#define KMS_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:%SERVER_PRECEDENCE"

KMS_RESULT kms_api_server_start(const kms_daemon_config *cfg, kms *k, const int *fds, size_t n,
                                unsigned threads, kms_api_server **out)
{
    kms_api_server *s = calloc(1, sizeof(*s));
    KMS_ENSURE(s != NULL, KMS_ERR_NO_MEMORY);
    kms_result res = KMS_OK_RESULT;
    s->cfg = *cfg;
    s->k = k;
    s->m = shared_metrics != NULL ? shared_metrics : &s->own_metrics;
    kms_log_set_level(cfg->log_level);
    pthread_rwlock_init(&s->lock, NULL);
    pthread_mutex_init(&s->ready_mu, NULL);
    pthread_mutex_init(&s->bq_mu, NULL);
    pthread_cond_init(&s->bq_cv, NULL);
    pthread_mutex_init(&s->ip_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->ready_cv, &ca);
    pthread_condattr_destroy(&ca);

    KMS_GUARD_GOTO(res, kms_api_tls_cert_load(cfg->tls_cert, cfg->tls_key), fail);
    KMS_GUARD_GOTO(res, load_ca_pem(cfg->tls_ca, &s->ca_pem), fail);
    KMS_GUARD_GOTO(res, kms_api_trust_load(cfg->tls_ca, cfg->tls_crl, &s->trust), fail);
    KMS_GUARD_GOTO(res, kms_policy_load(cfg->policy, &s->policy), fail);
    if (pthread_create(&s->prober, NULL, prober_main, s) != 0) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto fail;
    }
    s->prober_started = true;
    /* As many batch threads as server threads: as many batches at once as
     * before they had threads of their own. */
    unsigned nb = threads > 1 ? threads : 1;
    nb = nb < KMS_API_BATCH_THREADS_MAX ? nb : KMS_API_BATCH_THREADS_MAX;
    for (unsigned i = 0; i < nb; i++) {
        if (pthread_create(&s->bq_threads[i], NULL, batch_main, s) != 0) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto fail;
        }
        s->bq_n++;
    }

    /* Server threads: each runs one daemon per listening socket in a loop
     * of its own (loop_main). connection_limit is shared out among them
     * as libmicrohttpd's own thread pool does; the listening sockets are
     * shared, and a thread whose daemon is at its share stops accepting. */
    unsigned nl = threads > 1 ? threads : 1;
    /* No more threads than connections: each thread's share is at least
     * one (connection_limit is at least 1, docs/config.md). */
    if (nl > cfg->connection_limit && cfg->connection_limit > 0) {
        nl = cfg->connection_limit;
    }
    s->loops = calloc(nl, sizeof(*s->loops));
    if (s->loops == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto fail;
    }
    for (unsigned t = 0; t < nl; t++) {
        api_loop *l = &s->loops[t];
        l->s = s;
        l->idx = t;
        l->aw = kms_audit_writer_new(k);
        l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        s->loop_count++;
        if (l->wake_fd < 0) {
            res = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "eventfd: %s", strerror(errno));
            goto fail;
        }
        unsigned share = cfg->connection_limit / nl + (t < cfg->connection_limit % nl ? 1 : 0);
        l->share = share;
        for (size_t i = 0; i < n; i++) {
            /* Each daemon closes its listening socket when stopped: the
             * first thread's daemons take the sockets given, the others a
             * duplicate each (one socket, one open file, its own fd). */
            int fd = t == 0 ? fds[i] : fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
            if (fd < 0) {
                res = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__,
                                       "duplicating listener %zu: %s", i, strerror(errno));
                goto fail;
            }
            unsigned flags =
                MHD_USE_TLS | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
            struct MHD_OptionItem opts[] = {
                {MHD_OPTION_LISTEN_SOCKET, fd, NULL},
                {MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)kms_api_tls_cert_retrieve},
                {MHD_OPTION_HTTPS_MEM_TRUST, 0, s->ca_pem},
                {MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)KMS_TLS_PRIORITIES},
                {MHD_OPTION_CONNECTION_TIMEOUT, (intptr_t)cfg->connection_timeout_s, NULL},
                {MHD_OPTION_CONNECTION_LIMIT, (intptr_t)share, NULL},
                {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, l},
                {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, s},
                {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, NULL},
                {MHD_OPTION_END, 0, NULL},
            };
            l->d[i] = MHD_start_daemon(flags, 0, on_accept, s, on_request, s, MHD_OPTION_ARRAY,
                                       opts, MHD_OPTION_END);
            if (l->d[i] == NULL) {
                if (t != 0) {
                    close(fd);
                }
                res = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__,
                                       "libmicrohttpd did not start on listener %zu", i);
                goto fail;
            }
            l->nd++;
        }
    }
    for (unsigned t = 0; t < nl; t++) {
        api_loop *l = &s->loops[t];
        if (pthread_create(&l->thread, NULL, loop_main, l) != 0) {
            res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            goto fail;
        }
        l->started = true;
    }
    *out = s;
    return KMS_OK_RESULT;
fail:
    kms_api_server_free(s);
    return res;
}

KMS_RESULT kms_api_server_reload(kms_api_server *s)
{
    kms_result first = KMS_OK_RESULT;
    kms_policy *p = NULL;
    kms_result r = kms_policy_load(s->cfg.policy, &p);
    if (kms_is_ok(r)) {
        pthread_rwlock_wrlock(&s->lock);
        kms_policy *old = s->policy;
        s->policy = p;
        pthread_rwlock_unlock(&s->lock);
        kms_policy_free(old);
        kms_log(KMS_LOG_INFO, "policy reloaded: %zu rules", kms_policy_rule_count(p));
    } else {
        kms_log(KMS_LOG_ERROR, "policy not reloaded, previous policy stays in force: %s",
                kms_error_detail());
        first = r;
    }
    r = kms_api_tls_cert_load(s->cfg.tls_cert, s->cfg.tls_key);
    if (kms_is_ok(r)) {
        kms_log(KMS_LOG_INFO, "server certificate reloaded");
    } else {
        kms_log(KMS_LOG_ERROR, "server certificate not reloaded, previous one stays: %s",
                kms_error_detail());
        first = kms_is_ok(first) ? r : first;
    }
    kms_api_trust *t = NULL;
    r = kms_api_trust_load(s->cfg.tls_ca, s->cfg.tls_crl, &t);
    if (kms_is_ok(r)) {
        pthread_rwlock_wrlock(&s->lock);
        kms_api_trust *old = s->trust;
        s->trust = t;
        s->trust_gen++;
        pthread_rwlock_unlock(&s->lock);
        kms_api_trust_free(old);
    } else {
        kms_log(KMS_LOG_ERROR, "CA/CRL not reloaded, previous ones stay: %s", kms_error_detail());
        first = kms_is_ok(first) ? r : first;
    }
    return first;
}

/* libmicrohttpd must not be stopped while a connection is suspended (it
 * aborts), and a held request must outlive the committer's callback. From
 * here on answers are audited without suspending; then wait until every
 * held answer has been called back and sent (the committer answers each
 * record, failed or not; it is stopped only after the server). */
static void held_drain(kms_api_server *s)
{
    atomic_store(&s->no_suspend, true);
    long waited_ms = 0;
    while (atomic_load(&s->held) > 0 || atomic_load(&s->audit_waiting) > 0) {
        struct timespec d = {0, 1000000L};
        nanosleep(&d, NULL);
        if (++waited_ms % 5000 == 0) {
            kms_log(KMS_LOG_WARN, "shutdown: still waiting for %ld held answer(s)",
                    (long)atomic_load(&s->held));
        }
    }
}

void kms_api_server_shutdown(kms_api_server *s)
{
    /* From here new connections are refused (on_accept); the listening
     * sockets are closed with their daemons below, which closes only this
     * process's copies (a supervisor keeps its own). */
    atomic_store(&s->draining, true);
    /* Drain: requests already received are answered; bounded wait. */
    const int64_t t0 = mono_ms();
    while (atomic_load(&s->inflight) > 0 &&
           mono_ms() - t0 < (int64_t)s->cfg.drain_timeout_s * 1000) {
        struct timespec d = {0, 10 * 1000000L};
        nanosleep(&d, NULL);
    }
    if (atomic_load(&s->inflight) > 0) {
        kms_log(KMS_LOG_WARN, "drain timeout: %ld requests still in flight",
                (long)atomic_load(&s->inflight));
    }
    held_drain(s);
    batch_threads_stop(s);
    loops_stop(s);
}

void kms_api_server_free(kms_api_server *s)
{
    if (s == NULL) {
        return;
    }
    held_drain(s);
    batch_threads_stop(s);
    loops_stop(s);
    for (unsigned i = 0; i < s->loop_count; i++) {
        if (s->loops[i].wake_fd >= 0) {
            close(s->loops[i].wake_fd);
        }
        kms_audit_writer_free(s->loops[i].aw);
    }
    free(s->loops);
    free(s->ips);
    pthread_mutex_destroy(&s->ip_mu);
    if (s->prober_started) {
        pthread_mutex_lock(&s->ready_mu);
        s->prober_stop = true;
        pthread_cond_broadcast(&s->ready_cv);
        pthread_mutex_unlock(&s->ready_mu);
        pthread_join(s->prober, NULL);
    }
    kms_policy_free(s->policy);
    kms_api_trust_free(s->trust);
    free(s->ca_pem);
    pthread_rwlock_destroy(&s->lock);
    pthread_mutex_destroy(&s->ready_mu);
    pthread_cond_destroy(&s->ready_cv);
    pthread_mutex_destroy(&s->bq_mu);
    pthread_cond_destroy(&s->bq_cv);
    kms_api_tls_free();
    free(s);
}
