/*
 * kms-bench http: drives a running kmsd over HTTPS with keep-alive clients
 * (one libcurl easy handle per connection, so that a connection count is
 * exactly that many TLS connections, driven by a few client threads through
 * libcurl's multi interface, so that the client's own threads do not crowd
 * the server's CPUs) and reports
 * requests/s, latency percentiles and the server's CPU time per request,
 * next to the floor (/healthz) and the raw PKCS#11 baseline.
 */
#define _GNU_SOURCE
#include "kms_bench.h"

#include "kms_base64.h"
#include "kms_rand.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <time.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <sys/timerfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HTTP_BATCH_ITEMS      1000
#define HTTP_LAT_MAX          (1u << 22) /* latencies kept per client thread */
#define HTTP_CONNS_PER_THREAD 16         /* default connections per client thread */
#define HTTP_TARGET_CPU       1.25       /* CPU per wrap <= 1.25 x (floor + raw op) */
#define HTTP_TARGET_BATCH     0.8        /* rewrap items/s >= 0.8 x raw dec+enc */
#define HTTP_TARGET_P99_MS    2.0        /* p99 wrap at 16 connections */

typedef enum { H_HEALTHZ = 0, H_WRAP, H_UNWRAP, H_DATAKEY, H_REWRAP_BATCH, H_COUNT } http_op;

static const char *const http_op_names[H_COUNT] = {"healthz", "wrap", "unwrap", "datakey",
                                                   "batch rewrap"};
/* kmsd's route templates, as its latency histogram labels them. */
static const char *const http_op_routes[H_COUNT] = {"/healthz", "/v1/keys/{name}/{op}",
                                                    "/v1/keys/{name}/{op}", "/v1/keys/{name}/{op}",
                                                    "/v1/keys/{name}/batch/{op}"};
/* Names for --ops (no spaces). */
static const char *const http_op_keys[H_COUNT] = {"healthz", "wrap", "unwrap", "datakey",
                                                  "rewrap-batch"};

/* Whether --ops (comma-separated; NULL = all) names op. */
static bool op_selected(const kms_bench_opts *o, http_op op)
{
    if (o->ops == NULL) {
        return true;
    }
    size_t n = strlen(http_op_keys[op]);
    for (const char *p = o->ops; *p != '\0';) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && memcmp(p, http_op_keys[op], n) == 0) {
            return true;
        }
        p += len + (end ? 1 : 0);
    }
    return false;
}

typedef struct {
    CURL *h;
    struct curl_slist *headers;
    char *resp;
    size_t resp_len, resp_cap;
} http_client;

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    http_client *c = arg;
    size_t len = size * n;
    if (c->resp_len + len + 1 > c->resp_cap) {
        size_t cap = (c->resp_len + len + 1) * 2;
        char *q = realloc(c->resp, cap);
        if (q == NULL) {
            return 0;
        }
        c->resp = q;
        c->resp_cap = cap;
    }
    memcpy(c->resp + c->resp_len, p, len);
    c->resp_len += len;
    c->resp[c->resp_len] = '\0';
    return len;
}

static int client_init(http_client *c, const kms_bench_opts *o, const char *cert, const char *key)
{
    memset(c, 0, sizeof(*c));
    c->h = curl_easy_init();
    if (c->h == NULL) {
        return -1;
    }
    c->headers = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(c->h, CURLOPT_HTTPHEADER, c->headers);
    curl_easy_setopt(c->h, CURLOPT_SSLCERT, cert);
    curl_easy_setopt(c->h, CURLOPT_SSLKEY, key);
    curl_easy_setopt(c->h, CURLOPT_CAINFO, o->cacert);
    curl_easy_setopt(c->h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c->h, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(c->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c->h, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(c->h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    return 0;
}

static void client_free(http_client *c)
{
    if (c->h != NULL) {
        curl_easy_cleanup(c->h);
    }
    curl_slist_free_all(c->headers);
    free(c->resp);
    memset(c, 0, sizeof(*c));
}

/* Points an idle connection's handle at the next request. */
static void client_prepare(http_client *c, const char *url, const char *body)
{
    c->resp_len = 0;
    if (c->resp != NULL) {
        c->resp[0] = '\0';
    }
    curl_easy_setopt(c->h, CURLOPT_URL, url);
    if (body != NULL) {
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    } else {
        curl_easy_setopt(c->h, CURLOPT_HTTPGET, 1L);
    }
}

/* One request on the client's connection (kept alive between calls).
 * Returns the HTTP status, or -1 on a transport error. */
static long client_do(http_client *c, const char *url, const char *body)
{
    client_prepare(c, url, body);
    if (curl_easy_perform(c->h) != CURLE_OK) {
        return -1;
    }
    long status = 0;
    curl_easy_getinfo(c->h, CURLINFO_RESPONSE_CODE, &status);
    return status;
}

/* ---- server CPU from /proc ---- */

/* utime+stime (seconds) and pgrp of one process, from /proc/PID/stat; the
 * comm field may hold spaces, so parsing starts after its ')'. */
static int proc_stat(const char *pid, long *pgrp, double *cpu_s)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%s/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (p == NULL) {
        return -1;
    }
    /* fields from 3: state ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime stime */
    char state;
    long ppid, grp, session, tty, tpgid;
    unsigned long flags, minflt, cminflt, majflt, cmajflt, utime, stime;
    if (sscanf(p + 2, "%c %ld %ld %ld %ld %ld %lu %lu %lu %lu %lu %lu %lu", &state, &ppid, &grp,
               &session, &tty, &tpgid, &flags, &minflt, &cminflt, &majflt, &cmajflt, &utime,
               &stime) != 13) {
        return -1;
    }
    *pgrp = grp;
    *cpu_s = (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
    return 0;
}

/* CPU seconds of every process in the server's process group (kmsd's
 * worker processes included); < 0 if the server is gone. */
static double server_cpu(long server_pid)
{
    char pid[32];
    snprintf(pid, sizeof(pid), "%ld", server_pid);
    long pgrp = 0;
    double cpu = 0;
    if (proc_stat(pid, &pgrp, &cpu) != 0) {
        return -1;
    }
    DIR *d = opendir("/proc");
    if (d == NULL) {
        return cpu;
    }
    double sum = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') {
            continue;
        }
        long g = 0;
        double c = 0;
        if (proc_stat(e->d_name, &g, &c) == 0 && g == pgrp) {
            sum += c;
        }
    }
    closedir(d);
    return sum;
}

/* ---- the server's own latency, from its /metrics histogram ---- */

#define HTTP_SRV_BUCKETS 64

/* One route's cumulative latency buckets: upper bounds in seconds (the
 * last +Inf) and counts. */
typedef struct {
    double le[HTTP_SRV_BUCKETS];
    double cum[HTTP_SRV_BUCKETS];
    unsigned n;
    /* The audit trail's counters of the same scrape (all 0 with it off):
     * records written, journal syncs and their seconds, records made
     * durable and their seconds of waiting. */
    double records, syncs, sync_s, waits, wait_s;
} srv_hist;

/* The value of a series without labels, "name value"; 0 if absent. */
static double metric_plain(const char *text, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = text; p != NULL && *p != '\0';) {
        if (strncmp(p, name, nl) == 0 && p[nl] == ' ') {
            return strtod(p + nl + 1, NULL);
        }
        p = strchr(p, '\n');
        p = p != NULL ? p + 1 : NULL;
    }
    return 0;
}

/* Reads route's kmsd_http_request_duration_seconds buckets from /metrics
 * (admin or auditor role). The worker processes share the histogram, so
 * one scrape counts them all. Returns 0, or -1 if there is none. */
static int srv_hist_get(http_client *mc, const char *base, const char *route, srv_hist *h)
{
    char url[600];
    snprintf(url, sizeof(url), "%s/metrics", base);
    if (client_do(mc, url, NULL) != 200 || mc->resp == NULL) {
        return -1;
    }
    char prefix[160];
    int pl = snprintf(prefix, sizeof(prefix),
                      "kmsd_http_request_duration_seconds_bucket{route=\"%s\",le=\"", route);
    if (pl < 0 || (size_t)pl >= sizeof(prefix)) {
        return -1;
    }
    h->n = 0;
    for (const char *p = mc->resp; p != NULL && *p != '\0' && h->n < HTTP_SRV_BUCKETS;) {
        const char *eol = strchr(p, '\n');
        if (strncmp(p, prefix, (size_t)pl) == 0) {
            const char *v = p + pl;
            double le = strncmp(v, "+Inf", 4) == 0 ? INFINITY : strtod(v, NULL);
            const char *q = strstr(v, "} ");
            if (q != NULL && (eol == NULL || q < eol)) {
                h->le[h->n] = le;
                h->cum[h->n] = strtod(q + 2, NULL);
                h->n++;
            }
        }
        p = eol != NULL ? eol + 1 : NULL;
    }
    h->records = metric_plain(mc->resp, "kmsd_audit_records_total");
    h->syncs = metric_plain(mc->resp, "kmsd_audit_sync_seconds_count");
    h->sync_s = metric_plain(mc->resp, "kmsd_audit_sync_seconds_sum");
    h->waits = metric_plain(mc->resp, "kmsd_audit_durable_wait_seconds_count");
    h->wait_s = metric_plain(mc->resp, "kmsd_audit_durable_wait_seconds_sum");
    return h->n > 0 && isinf(h->le[h->n - 1]) ? 0 : -1;
}

/* The 99th percentile, in ms, of the requests counted between two scrapes,
 * interpolated within its bucket as Prometheus's histogram_quantile does;
 * < 0 if there were none or the bucket layouts differ. In the +Inf bucket
 * it is the last finite bound (a lower bound). *floor_ms is the bucket's
 * lower bound: the true percentile is above it, wherever the estimate is. */
static double srv_p99_ms(const srv_hist *a, const srv_hist *b, double *floor_ms)
{
    *floor_ms = -1;
    if (a->n != b->n || a->n == 0) {
        return -1;
    }
    double total = b->cum[b->n - 1] - a->cum[a->n - 1];
    if (total <= 0) {
        return -1;
    }
    double want = 0.99 * total, lo = 0, lo_cum = 0;
    for (unsigned i = 0; i < b->n; i++) {
        double c = b->cum[i] - a->cum[i];
        if (c >= want) {
            *floor_ms = lo * 1e3;
            if (isinf(b->le[i])) {
                return lo * 1e3;
            }
            double f = c > lo_cum ? (want - lo_cum) / (c - lo_cum) : 1;
            return (lo + (b->le[i] - lo) * f) * 1e3;
        }
        lo = b->le[i];
        lo_cum = c;
    }
    return -1;
}

/* ---- load threads ---- */

/* One connection of a load thread: its easy handle and its request in
 * flight. */
typedef struct {
    http_client c;
    double sent; /* when the request in flight was due (open loop) or sent */
    double next; /* open loop: when the next request is due */
    bool busy;
} load_conn;

typedef struct {
    const kms_bench_opts *o;
    const char *url;
    const char *body;
    double seconds;
    pthread_barrier_t *start;
    unsigned first, n; /* this thread's connections: [first, first + n) of the cell's */
    unsigned conns;    /* the cell's connections, all threads */
    double interval;   /* open loop: seconds between one connection's sends; 0 = closed loop */
    uint32_t *lat_us;
    size_t n_lat;
    uint64_t ok, errors;
    long last_bad_status;
} load_thread;

static bool load_send(load_thread *t, CURLM *m, load_conn *lc, double due)
{
    client_prepare(&lc->c, t->url, t->body);
    if (curl_multi_add_handle(m, lc->c.h) != CURLM_OK) {
        return false;
    }
    lc->sent = due;
    lc->busy = true;
    return true;
}

/* Takes the answers libcurl has finished and returns how many; with
 * counting false (the warm-up) it only counts the failed ones. */
static unsigned load_collect(load_thread *t, CURLM *m, bool counting)
{
    unsigned done = 0;
    int left = 0;
    CURLMsg *msg;
    while ((msg = curl_multi_info_read(m, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        double b = kms_bench_now();
        load_conn *lc = NULL;
        (void)curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&lc);
        long st = -1;
        if (msg->data.result == CURLE_OK) {
            (void)curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &st);
        }
        (void)curl_multi_remove_handle(m, msg->easy_handle);
        if (st == 200 && counting) {
            t->ok++;
            if (t->n_lat < HTTP_LAT_MAX) {
                t->lat_us[t->n_lat++] = (uint32_t)((b - lc->sent) * 1e6);
            }
        } else if (st != 200) {
            t->errors++;
            t->last_bad_status = st;
        }
        lc->busy = false;
        done++;
    }
    return done;
}

/* Warm-up: one request on every connection at once, so that each opens its
 * own TLS connection (handshakes are not part of the measurement) in the
 * multi handle's connection cache, where the measured requests find them. */
static bool load_warm(load_thread *t, CURLM *m, load_conn *cs)
{
    for (unsigned i = 0; i < t->n; i++) {
        if (!load_send(t, m, &cs[i], 0)) {
            return false;
        }
    }
    for (unsigned left = t->n; left > 0;) {
        int running = 0;
        if (curl_multi_perform(m, &running) != CURLM_OK) {
            return false;
        }
        left -= load_collect(t, m, false);
        if (left > 0 && curl_multi_poll(m, NULL, 0, 1000, NULL) != CURLM_OK) {
            return false;
        }
    }
    return t->errors == 0;
}

/* Arms an absolute CLOCK_MONOTONIC timer for the next due send (open loop):
 * libcurl's own wait takes milliseconds, a send is due to the microsecond. */
static void load_arm(int tfd, double at)
{
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) {
        its.it_value.tv_nsec = 1; /* zero would disarm */
    }
    (void)timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* One client thread: its connections on one libcurl multi handle, each
 * sending its next request as soon as its last is answered (closed loop) or
 * when it is due (open loop). */
static void *load_run(void *arg)
{
    load_thread *t = arg;
    load_conn *cs = calloc(t->n, sizeof(*cs));
    CURLM *m = curl_multi_init();
    int tfd = t->interval > 0 ? timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK) : -1;
    bool usable = cs != NULL && m != NULL && (t->interval <= 0 || tfd >= 0);
    if (usable) {
        /* Connections live in the multi handle's cache, whose default size
         * follows the handles in use at the moment: at a low rate it would
         * close idle connections and the next request would pay a new
         * handshake. Exactly n, kept open. */
        (void)curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, (long)t->n);
        (void)curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, (long)t->n);
    }
    for (unsigned i = 0; usable && i < t->n; i++) {
        usable = client_init(&cs[i].c, t->o, t->o->cert, t->o->key) == 0;
        if (usable) {
            curl_easy_setopt(cs[i].c.h, CURLOPT_PRIVATE, &cs[i]);
        }
    }
    usable = usable && load_warm(t, m, cs);
    /* Twice: every thread's warm-up has been answered, then the server's
     * figures before have been read; only then does the load start. */
    (void)pthread_barrier_wait(t->start);
    (void)pthread_barrier_wait(t->start);
    double t0 = kms_bench_now(), end = t0 + t->seconds;
    for (unsigned i = 0; usable && i < t->n; i++) {
        cs[i].next = t0 + t->interval * (double)(t->first + i) / (double)t->conns;
    }
    while (usable) {
        double now = kms_bench_now(), wake = end;
        unsigned busy = 0;
        for (unsigned i = 0; usable && i < t->n; i++) {
            load_conn *lc = &cs[i];
            if (!lc->busy && t->interval <= 0 && now < end) {
                usable = load_send(t, m, lc, now);
            } else if (!lc->busy && t->interval > 0 && lc->next < end) {
                if (lc->next <= now) {
                    /* Latency counts from when it was due, so that time
                     * spent waiting for a late server counts. */
                    usable = load_send(t, m, lc, lc->next);
                    lc->next += t->interval;
                } else if (lc->next < wake) {
                    wake = lc->next;
                }
            }
            busy += lc->busy;
        }
        if (!usable || (busy == 0 && (t->interval <= 0 || wake >= end))) {
            break;
        }
        int running = 0;
        if (curl_multi_perform(m, &running) != CURLM_OK) {
            usable = false;
            break;
        }
        if (load_collect(t, m, true) > 0) {
            continue; /* idle connections send at once (closed loop) */
        }
        struct curl_waitfd wfd = {.fd = tfd, .events = CURL_WAIT_POLLIN};
        unsigned nfd = 0;
        if (tfd >= 0 && wake < end) {
            load_arm(tfd, wake);
            nfd = 1;
        }
        if (curl_multi_poll(m, nfd ? &wfd : NULL, nfd, 1000, NULL) != CURLM_OK) {
            usable = false;
        }
        if (nfd) {
            uint64_t expirations;
            (void)!read(tfd, &expirations, sizeof(expirations));
        }
    }
    if (!usable) {
        t->errors++;
    }
    for (unsigned i = 0; cs != NULL && i < t->n; i++) {
        if (cs[i].busy) {
            (void)curl_multi_remove_handle(m, cs[i].c.h);
        }
        client_free(&cs[i].c);
    }
    if (m != NULL) {
        (void)curl_multi_cleanup(m);
    }
    if (tfd >= 0) {
        close(tfd);
    }
    free(cs);
    return NULL;
}

typedef struct {
    http_op op;
    unsigned conns;
    double req_s;
    double items_s;
    double p50_ms, p99_ms;
    uint64_t requests, errors;
    double cpu_us_per_req; /* < 0: not measured */
    /* Pooling over --rounds: the sums, and each round's percentiles. */
    double elapsed_s, cpu_s; /* cpu_s < 0: not measured */
    double srv_p99_ms;       /* from kmsd's histogram; < 0: not measured */
    double srv_floor_ms;     /* the lower bound of its bucket */
    double bg_items;         /* --background-batch: items rewrapped beside it; < 0: none */
    double bg_items_s;       /* the same per second of the cell (pool_finish) */
    /* The audit trail during the cell (from /metrics; syncs 0: off or not
     * measured): records written, syncs and seconds in them, records made
     * durable and their seconds of waiting. */
    double au_records, au_syncs, au_sync_s, au_waits, au_wait_s;
    unsigned rounds;
    double p50s[KMS_BENCH_ROUNDS_MAX], p99s[KMS_BENCH_ROUNDS_MAX];
    double srv_p99s[KMS_BENCH_ROUNDS_MAX], srv_floors[KMS_BENCH_ROUNDS_MAX];
} http_result;

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Client threads for a cell: --client-threads, else one per
 * HTTP_CONNS_PER_THREAD connections; never more than connections. */
static unsigned load_threads(const kms_bench_opts *o, unsigned conns)
{
    unsigned n = o->client_threads > 0
                     ? o->client_threads
                     : (conns + HTTP_CONNS_PER_THREAD - 1) / HTTP_CONNS_PER_THREAD;
    return n < conns ? n : conns;
}

/* One cell: conns connections sending op for --seconds. With bg_url set
 * (--background-batch), one more thread keeps o->background_batch
 * connections busy with batch rewraps meanwhile, timed apart: the cell's
 * latencies are those of op beside a bulk re-encryption. */
static int load_measure(const kms_bench_opts *o, http_op op, unsigned conns, const char *url,
                        const char *body, const char *bg_url, const char *bg_body, http_client *mc,
                        http_result *res)
{
    unsigned nth = load_threads(o, conns);
    bool bg = bg_url != NULL && o->background_batch > 0;
    load_thread *th = calloc(nth + 1, sizeof(*th));
    pthread_t *tid = calloc(nth + 1, sizeof(*tid));
    pthread_barrier_t bar;
    if (th == NULL || tid == NULL || pthread_barrier_init(&bar, NULL, nth + (bg ? 2 : 1)) != 0) {
        free(th);
        free(tid);
        return -1;
    }
    for (unsigned i = 0, first = 0; i < nth; i++) {
        /* Connections as evenly as they divide: the first conns % nth
         * threads take one more. */
        unsigned n = conns / nth + (i < conns % nth ? 1 : 0);
        th[i] = (load_thread){.o = o,
                              .url = url,
                              .body = body,
                              .seconds = o->seconds,
                              .start = &bar,
                              .first = first,
                              .n = n,
                              .conns = conns};
        first += n;
        if (o->rate > 0 && op != H_REWRAP_BATCH) {
            th[i].interval = (double)conns / o->rate;
        }
        th[i].lat_us = malloc(HTTP_LAT_MAX * sizeof(uint32_t));
        if (th[i].lat_us == NULL || pthread_create(&tid[i], NULL, load_run, &th[i]) != 0) {
            abort(); /* out of memory or threads: nothing sensible to measure */
        }
    }
    if (bg) {
        th[nth] = (load_thread){.o = o,
                                .url = bg_url,
                                .body = bg_body,
                                .seconds = o->seconds,
                                .start = &bar,
                                .n = o->background_batch,
                                .conns = o->background_batch};
        th[nth].lat_us = malloc(HTTP_LAT_MAX * sizeof(uint32_t));
        if (th[nth].lat_us == NULL || pthread_create(&tid[nth], NULL, load_run, &th[nth]) != 0) {
            abort();
        }
    }
    /* The clients warm up (TLS handshakes, a first request each) before
     * the first barrier. The server's histogram and CPU are read between
     * it and the second, when no request is in flight: the server then
     * counts exactly the requests the clients time (a connection's first
     * request, slower, would otherwise be a good part of the top 1 % at
     * a few thousand requests), and a handshake (milliseconds of CPU) is
     * not charged to the cell. */
    (void)pthread_barrier_wait(&bar);
    srv_hist h0, h1;
    bool have_h0 = mc != NULL && srv_hist_get(mc, o->url, http_op_routes[op], &h0) == 0;
    double cpu0 = o->server_pid > 0 ? server_cpu(o->server_pid) : -1;
    (void)pthread_barrier_wait(&bar);
    double t0 = kms_bench_now();
    uint64_t ok = 0, errors = 0;
    size_t n_lat = 0;
    long bad = 0;
    for (unsigned i = 0; i < nth; i++) {
        (void)pthread_join(tid[i], NULL);
    }
    double elapsed = kms_bench_now() - t0;
    double cpu1 = o->server_pid > 0 ? server_cpu(o->server_pid) : -1;
    bool have_h1 = have_h0 && srv_hist_get(mc, o->url, http_op_routes[op], &h1) == 0;
    for (unsigned i = 0; i < nth; i++) {
        ok += th[i].ok;
        errors += th[i].errors;
        n_lat += th[i].n_lat;
        if (th[i].last_bad_status != 0) {
            bad = th[i].last_bad_status;
        }
    }
    /* The background's last batch may end after the cell: it counts the
     * batches answered by then. Its failures fail the cell. */
    double bg_items = 0;
    if (bg) {
        (void)pthread_join(tid[nth], NULL);
        bg_items = (double)th[nth].ok * HTTP_BATCH_ITEMS;
        errors += th[nth].errors;
        if (th[nth].last_bad_status != 0) {
            bad = th[nth].last_bad_status;
        }
        free(th[nth].lat_us);
    }
    uint32_t *all = malloc((n_lat ? n_lat : 1) * sizeof(uint32_t));
    if (all == NULL) {
        abort();
    }
    size_t k = 0;
    for (unsigned i = 0; i < nth; i++) {
        memcpy(all + k, th[i].lat_us, th[i].n_lat * sizeof(uint32_t));
        k += th[i].n_lat;
        free(th[i].lat_us);
    }
    qsort(all, n_lat, sizeof(uint32_t), cmp_u32);
    /* One round's sums and percentiles; pool_finish derives the rates. */
    *res = (http_result){.op = op, .conns = conns, .requests = ok, .errors = errors};
    res->p50_ms = n_lat ? all[n_lat / 2] / 1e3 : 0;
    res->p99_ms = n_lat ? all[(n_lat * 99) / 100] / 1e3 : 0;
    res->elapsed_s = elapsed;
    /* With a background, the server's CPU is not the cell's alone. */
    res->cpu_s = cpu0 >= 0 && cpu1 >= 0 && !bg ? cpu1 - cpu0 : -1;
    res->bg_items = bg ? bg_items : -1;
    res->srv_floor_ms = -1;
    res->srv_p99_ms = have_h1 ? srv_p99_ms(&h0, &h1, &res->srv_floor_ms) : -1;
    if (have_h1) {
        res->au_records = h1.records - h0.records;
        res->au_syncs = h1.syncs - h0.syncs;
        res->au_sync_s = h1.sync_s - h0.sync_s;
        res->au_waits = h1.waits - h0.waits;
        res->au_wait_s = h1.wait_s - h0.wait_s;
    }
    if (errors > 0) {
        fprintf(stderr, "kms-bench: %s at %u connections: %llu failed requests (last status %ld)\n",
                http_op_names[op], conns, (unsigned long long)errors, bad);
    }
    free(all);
    free(th);
    free(tid);
    (void)pthread_barrier_destroy(&bar);
    return 0;
}

/* ---- setup through the API ---- */

static char *json_text(json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s;
}

static char *b64(const uint8_t *p, size_t n)
{
    kms_buf b;
    kms_buf_init(&b, 0);
    if (!kms_is_ok(kms_base64_encode(p, n, &b)) || !kms_is_ok(kms_buf_terminate(&b))) {
        kms_buf_free(&b);
        return NULL;
    }
    char *s = strdup((const char *)b.data);
    kms_buf_free(&b);
    return s;
}

typedef struct {
    char key[64];
    char *tokens[HTTP_BATCH_ITEMS]; /* under version 1; version 2 is primary */
    char *body[H_COUNT];
    char url[H_COUNT][512];
} http_setup;

static void setup_free(http_setup *s)
{
    for (size_t i = 0; i < HTTP_BATCH_ITEMS; i++) {
        free(s->tokens[i]);
    }
    for (int i = 0; i < H_COUNT; i++) {
        free(s->body[i]);
    }
}

static int expect(const char *what, long got, long want, const http_client *c)
{
    if (got == want) {
        return 0;
    }
    fprintf(stderr, "kms-bench: setup: %s: HTTP %ld (expected %ld): %.300s\n", what, got, want,
            c->resp ? c->resp : "");
    return -1;
}

static int setup_make(const kms_bench_opts *o, http_setup *s)
{
    http_client admin, app;
    char url[512];
    int rc = -1;
    uint8_t id[4];
    if (!kms_is_ok(kms_rand_bytes(id, sizeof(id)))) {
        return -1;
    }
    snprintf(s->key, sizeof(s->key), "kms-bench-%02x%02x%02x%02x", id[0], id[1], id[2], id[3]);
    if (client_init(&admin, o, o->admin_cert ? o->admin_cert : o->cert,
                    o->admin_key ? o->admin_key : o->key) != 0 ||
        client_init(&app, o, o->cert, o->key) != 0) {
        return -1;
    }
    char *body = json_text(json_pack("{s:s, s:s}", "name", s->key, "purpose", "encrypt"));
    snprintf(url, sizeof(url), "%s/v1/keys", o->url);
    if (expect("create key", client_do(&admin, url, body), 201, &admin) != 0) {
        goto out;
    }
    free(body);

    /* 1,000 tokens under version 1 through one batch wrap. */
    json_t *items = json_array();
    for (size_t i = 0; i < HTTP_BATCH_ITEMS; i++) {
        uint8_t dek[32];
        if (!kms_is_ok(kms_rand_bytes(dek, sizeof(dek)))) {
            json_decref(items);
            body = NULL;
            goto out;
        }
        char *p = b64(dek, sizeof(dek));
        json_array_append_new(items, json_pack("{s:s}", "plaintext", p));
        free(p);
    }
    body = json_text(json_pack("{s:o}", "items", items));
    snprintf(url, sizeof(url), "%s/v1/keys/%s/batch/wrap", o->url, s->key);
    if (expect("batch wrap", client_do(&app, url, body), 200, &app) != 0) {
        goto out;
    }
    json_error_t jerr;
    json_t *resp = json_loads(app.resp, 0, &jerr);
    json_t *results = json_object_get(resp, "results");
    if (json_array_size(results) != HTTP_BATCH_ITEMS) {
        fprintf(stderr, "kms-bench: setup: batch wrap answered %zu results\n",
                json_array_size(results));
        json_decref(resp);
        goto out;
    }
    for (size_t i = 0; i < HTTP_BATCH_ITEMS; i++) {
        const char *ct =
            json_string_value(json_object_get(json_array_get(results, i), "ciphertext"));
        if (ct == NULL) {
            fprintf(stderr, "kms-bench: setup: batch wrap item %zu failed\n", i);
            json_decref(resp);
            goto out;
        }
        s->tokens[i] = strdup(ct);
    }
    json_decref(resp);
    free(body);

    body = json_text(json_pack("{s:s, s:s}", "type", "manual", "reason", "kms-bench"));
    snprintf(url, sizeof(url), "%s/v1/keys/%s/rotate", o->url, s->key);
    if (expect("rotate", client_do(&admin, url, body), 200, &admin) != 0) {
        goto out;
    }

    uint8_t dek[32];
    if (!kms_is_ok(kms_rand_bytes(dek, sizeof(dek)))) {
        goto out;
    }
    char *p = b64(dek, sizeof(dek));
    s->body[H_WRAP] = json_text(json_pack("{s:s}", "plaintext", p));
    free(p);
    s->body[H_UNWRAP] = json_text(json_pack("{s:s}", "ciphertext", s->tokens[0]));
    s->body[H_DATAKEY] = json_text(json_pack("{s:i}", "bytes", 32));
    items = json_array();
    for (size_t i = 0; i < HTTP_BATCH_ITEMS; i++) {
        json_array_append_new(items, json_pack("{s:s}", "ciphertext", s->tokens[i]));
    }
    s->body[H_REWRAP_BATCH] = json_text(json_pack("{s:o}", "items", items));
    snprintf(s->url[H_HEALTHZ], sizeof(s->url[0]), "%s/healthz", o->url);
    snprintf(s->url[H_WRAP], sizeof(s->url[0]), "%s/v1/keys/%s/wrap", o->url, s->key);
    snprintf(s->url[H_UNWRAP], sizeof(s->url[0]), "%s/v1/keys/%s/unwrap", o->url, s->key);
    snprintf(s->url[H_DATAKEY], sizeof(s->url[0]), "%s/v1/keys/%s/datakey", o->url, s->key);
    snprintf(s->url[H_REWRAP_BATCH], sizeof(s->url[0]), "%s/v1/keys/%s/batch/rewrap", o->url,
             s->key);
    for (int i = 1; i < H_COUNT; i++) {
        if (s->body[i] == NULL) {
            goto out;
        }
    }
    rc = 0;
out:
    free(body);
    client_free(&admin);
    client_free(&app);
    return rc;
}

/* ---- report ---- */

typedef struct {
    const char *name;
    double measured, baseline, ratio;
    const char *unit;
    const char *target;
    int met; /* 1 yes, 0 no, -1 not measured */
} http_check;

static const char *met_text(int met)
{
    return met < 0 ? "n/a" : met ? "yes" : "no";
}

static void report(const kms_bench_opts *o, const http_result *res, size_t n,
                   const kms_bench_raw *raw, bool have_raw, const http_check *checks,
                   size_t n_checks)
{
    if (o->json) {
        json_t *j = json_pack("{s:s, s:s, s:f, s:f, s:i, s:i, s:i}", "mode", "http", "url", o->url,
                              "seconds", o->seconds, "rate", o->rate, "client_threads",
                              (int)o->client_threads, "rounds", o->rounds > 0 ? (int)o->rounds : 1,
                              "background_batch", (int)o->background_batch);
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++) {
            json_t *r = json_pack("{s:s, s:i, s:f, s:f, s:f, s:f, s:I, s:I, s:f, s:f, s:f}", "op",
                                  http_op_names[res[i].op], "connections", (int)res[i].conns,
                                  "req_per_s", res[i].req_s, "items_per_s", res[i].items_s,
                                  "p50_ms", res[i].p50_ms, "p99_ms", res[i].p99_ms, "requests",
                                  (json_int_t)res[i].requests, "errors", (json_int_t)res[i].errors,
                                  "server_cpu_us_per_req", res[i].cpu_us_per_req, "server_p99_ms",
                                  res[i].srv_p99_ms, "server_p99_floor_ms", res[i].srv_floor_ms);
            if (res[i].bg_items_s >= 0) {
                json_object_set_new(r, "background_items_per_s", json_real(res[i].bg_items_s));
            }
            if (res[i].au_syncs > 0 && res[i].elapsed_s > 0) {
                json_object_set_new(
                    r, "audit",
                    json_pack("{s:f, s:f, s:f, s:f}", "records_per_s",
                              res[i].au_records / res[i].elapsed_s, "syncs_per_s",
                              res[i].au_syncs / res[i].elapsed_s, "mean_sync_ms",
                              res[i].au_sync_s * 1e3 / res[i].au_syncs, "mean_durable_wait_ms",
                              res[i].au_waits > 0 ? res[i].au_wait_s * 1e3 / res[i].au_waits
                                                  : 0.0));
            }
            json_array_append_new(arr, r);
        }
        json_object_set_new(j, "results", arr);
        if (have_raw) {
            json_object_set_new(j, "raw",
                                json_pack("{s:[f,f], s:[f,f]}", "encrypt_ops_per_s", raw->enc[0],
                                          raw->enc[1], "decrypt_ops_per_s", raw->dec[0],
                                          raw->dec[1]));
        }
        arr = json_array();
        for (size_t i = 0; i < n_checks; i++) {
            json_array_append_new(arr, json_pack("{s:s, s:f, s:f, s:f, s:s, s:s}", "check",
                                                 checks[i].name, "measured", checks[i].measured,
                                                 "baseline", checks[i].baseline, "ratio",
                                                 checks[i].ratio, "target", checks[i].target, "met",
                                                 met_text(checks[i].met)));
        }
        json_object_set_new(j, "checks", arr);
        char *s = json_dumps(j, JSON_COMPACT);
        printf("%s\n", s);
        free(s);
        json_decref(j);
        return;
    }
    printf("kms-bench http: %s, %.1f s per cell, keep-alive, one TLS connection per client, ",
           o->url, o->seconds);
    if (o->rounds > 1) {
        printf("%u rounds per cell taking turns (req/s and CPU pooled, p50/p99 the median "
               "round's), ",
               o->rounds);
    }
    if (o->client_threads > 0) {
        printf("%u client thread(s), ", o->client_threads);
    } else {
        printf("a client thread per %d connections, ", HTTP_CONNS_PER_THREAD);
    }
    if (o->background_batch > 0) {
        printf("beside %u connection(s) of batch rewraps (server CPU then n/a), ",
               o->background_batch);
    }
    if (o->rate > 0) {
        printf("open loop at %.0f req/s offered (batch rewrap back to back)\n\n", o->rate);
    } else {
        printf("closed loop (each client sends its next request when the last one is answered)"
               "\n\n");
    }
    bool bgcol = o->background_batch > 0;
    printf("| operation | connections | req/s | items/s | p50 ms | p99 ms | errors | server CPU "
           "us/req | server p99 ms |%s\n",
           bgcol ? " background items/s |" : "");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|%s\n", bgcol ? "---:|" : "");
    for (size_t i = 0; i < n; i++) {
        char cpu[32] = "n/a", srv[32] = "n/a", bgi[32] = "";
        if (bgcol) {
            snprintf(bgi, sizeof(bgi), res[i].bg_items_s >= 0 ? " %.0f |" : " n/a |",
                     res[i].bg_items_s);
        }
        if (res[i].cpu_us_per_req >= 0) {
            snprintf(cpu, sizeof(cpu), "%.1f", res[i].cpu_us_per_req);
        }
        if (res[i].srv_p99_ms >= 0) {
            snprintf(srv, sizeof(srv), "%.2f", res[i].srv_p99_ms);
        }
        printf("| %s | %u | %.0f | %.0f | %.2f | %.2f | %llu | %s | %s |%s\n",
               http_op_names[res[i].op], res[i].conns, res[i].req_s, res[i].items_s, res[i].p50_ms,
               res[i].p99_ms, (unsigned long long)res[i].errors, cpu, srv, bgi);
    }
    bool audited = false;
    for (size_t i = 0; i < n; i++) {
        audited = audited || res[i].au_syncs > 0;
    }
    if (audited) {
        /* What each cell's answers waited for: the journal's syncs (the
         * scrapes around the cell are audited too, a few records). */
        printf("\n| operation | connections | audit records/s | syncs/s | records per sync | "
               "mean sync ms | mean durable wait ms |\n");
        printf("|---|---:|---:|---:|---:|---:|---:|\n");
        for (size_t i = 0; i < n; i++) {
            const http_result *r = &res[i];
            if (r->au_syncs <= 0 || r->elapsed_s <= 0) {
                continue;
            }
            printf("| %s | %u | %.0f | %.0f | %.1f | %.3f | %.3f |\n", http_op_names[r->op],
                   r->conns, r->au_records / r->elapsed_s, r->au_syncs / r->elapsed_s,
                   r->au_records / r->au_syncs, r->au_sync_s * 1e3 / r->au_syncs,
                   r->au_waits > 0 ? r->au_wait_s * 1e3 / r->au_waits : 0.0);
        }
    }
    if (have_raw) {
        printf("\nraw PKCS#11 baseline on the same token: encrypt %.0f ops/s (1 thread), %.0f (2 "
               "threads); decrypt %.0f, %.0f\n",
               raw->enc[0], raw->enc[1], raw->dec[0], raw->dec[1]);
    }
    printf("\n| check | measured | baseline | ratio | target | met? |\n");
    printf("|---|---:|---:|---:|---|---|\n");
    for (size_t i = 0; i < n_checks; i++) {
        const http_check *c = &checks[i];
        if (c->met < 0) {
            printf("| %s | n/a | n/a | n/a | %s | n/a |\n", c->name, c->target);
        } else if (c->baseline > 0) {
            printf("| %s | %.1f %s | %.1f %s | %.2f | %s | %s |\n", c->name, c->measured, c->unit,
                   c->baseline, c->unit, c->ratio, c->target, met_text(c->met));
        } else {
            printf("| %s | %.2f %s | - | - | %s | %s |\n", c->name, c->measured, c->unit, c->target,
                   met_text(c->met));
        }
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, unsigned n)
{
    qsort(v, n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Adds one round's measurement of a cell to its pooled result. */
static void pool_add(http_result *acc, const http_result *one)
{
    if (acc->rounds == 0) {
        *acc = *one;
        acc->rounds = 0;
    } else {
        acc->requests += one->requests;
        acc->errors += one->errors;
        acc->elapsed_s += one->elapsed_s;
        acc->cpu_s = acc->cpu_s >= 0 && one->cpu_s >= 0 ? acc->cpu_s + one->cpu_s : -1;
        acc->bg_items =
            acc->bg_items >= 0 && one->bg_items >= 0 ? acc->bg_items + one->bg_items : -1;
        acc->au_records += one->au_records;
        acc->au_syncs += one->au_syncs;
        acc->au_sync_s += one->au_sync_s;
        acc->au_waits += one->au_waits;
        acc->au_wait_s += one->au_wait_s;
    }
    acc->p50s[acc->rounds] = one->p50_ms;
    acc->p99s[acc->rounds] = one->p99_ms;
    acc->srv_p99s[acc->rounds] = one->srv_p99_ms;
    acc->srv_floors[acc->rounds] = one->srv_floor_ms;
    acc->rounds++;
}

static void pool_finish(http_result *acc)
{
    acc->req_s = acc->elapsed_s > 0 ? (double)acc->requests / acc->elapsed_s : 0;
    acc->items_s = acc->req_s * (acc->op == H_REWRAP_BATCH ? HTTP_BATCH_ITEMS : 1);
    acc->cpu_us_per_req =
        acc->cpu_s >= 0 && acc->requests > 0 ? acc->cpu_s * 1e6 / (double)acc->requests : -1;
    acc->bg_items_s =
        acc->bg_items >= 0 && acc->elapsed_s > 0 ? acc->bg_items / acc->elapsed_s : -1;
    acc->p50_ms = median(acc->p50s, acc->rounds);
    acc->p99_ms = median(acc->p99s, acc->rounds);
    /* A round without the server's figure leaves the cell without one. */
    acc->srv_p99_ms = median(acc->srv_p99s, acc->rounds);
    acc->srv_floor_ms = median(acc->srv_floors, acc->rounds);
    for (unsigned i = 0; i < acc->rounds; i++) {
        if (acc->srv_p99s[i] < 0) {
            acc->srv_p99_ms = -1;
            acc->srv_floor_ms = -1;
        }
    }
}

static const http_result *find(const http_result *res, size_t n, http_op op, unsigned conns)
{
    const http_result *best = NULL;
    for (size_t i = 0; i < n; i++) {
        if (res[i].op != op) {
            continue;
        }
        if (res[i].conns == conns) {
            return &res[i];
        }
        if (conns == 0 && (best == NULL || res[i].items_s > best->items_s)) {
            best = &res[i]; /* conns 0: the best run */
        }
    }
    return best;
}

int kms_bench_http(const kms_bench_opts *o)
{
    if (o->url == NULL || o->cert == NULL || o->key == NULL || o->cacert == NULL) {
        fprintf(stderr, "kms-bench http: --url, --cert, --key and --cacert are required; see "
                        "--help\n");
        return KMS_BENCH_EXIT_USAGE;
    }
    kms_bench_raw raw = {0};
    bool have_raw = false;
    if (o->module != NULL && o->token_uri != NULL && o->pin_file != NULL) {
        kms_hsm_config cfg = {
            .module = o->module, .token_uri = o->token_uri, .pin_file = o->pin_file};
        kms_hsm *hsm = NULL;
        kms_result r = kms_hsm_open(&cfg, &hsm);
        if (kms_is_ok(r)) {
            r = kms_bench_raw_measure(hsm, o->size, o->seconds, &raw);
            kms_hsm_close(hsm);
        }
        if (!kms_is_ok(r)) {
            kms_bench_fail("raw baseline", r);
            return kms_error_exit_code(r.err);
        }
        have_raw = true;
    }

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        return 70;
    }
    http_setup s = {0};
    if (setup_make(o, &s) != 0) {
        setup_free(&s);
        curl_global_cleanup();
        return 69;
    }
    size_t cap = o->n_conns * H_COUNT, n = 0;
    http_result *res = calloc(cap, sizeof(*res));
    if (res == NULL) {
        abort();
    }
    /* The server's latency histogram is read with the admin certificate
     * (/metrics wants admin or auditor); without one, no server figure. */
    http_client mc;
    bool have_mc = client_init(&mc, o, o->admin_cert ? o->admin_cert : o->cert,
                               o->admin_key ? o->admin_key : o->key) == 0;
    unsigned rounds = o->rounds > 0 ? o->rounds : 1;
    for (size_t ci = 0; ci < o->n_conns; ci++) {
        /* The operations of one connection count take turns, round after
         * round; res[first + op] pools an operation's rounds. */
        size_t first = n;
        for (int op = 0; op < H_COUNT; op++) {
            res[first + (size_t)op] = (http_result){.op = (http_op)op, .conns = o->conns[ci]};
        }
        for (unsigned round = 0; round < rounds; round++) {
            for (int op = 0; op < H_COUNT; op++) {
                if (!op_selected(o, (http_op)op)) {
                    continue;
                }
                fprintf(stderr, "kms-bench: %s, %u connection(s), round %u of %u\n",
                        http_op_names[op], o->conns[ci], round + 1, rounds);
                http_result one;
                /* No background beside the batch cell itself. */
                bool bg = op != H_REWRAP_BATCH;
                if (load_measure(o, (http_op)op, o->conns[ci], s.url[op], s.body[op],
                                 bg ? s.url[H_REWRAP_BATCH] : NULL,
                                 bg ? s.body[H_REWRAP_BATCH] : NULL, have_mc ? &mc : NULL,
                                 &one) == 0) {
                    pool_add(&res[first + (size_t)op], &one);
                }
            }
        }
        /* Keep the measured cells, in operation order. */
        for (int op = 0; op < H_COUNT; op++) {
            if (res[first + (size_t)op].rounds > 0) {
                pool_finish(&res[first + (size_t)op]);
                res[n++] = res[first + (size_t)op];
            }
        }
    }

    if (have_mc) {
        client_free(&mc);
    }

    /* The comparisons. */
    http_check checks[4];
    unsigned cmp_conns = 16;
    const http_result *wrap = find(res, n, H_WRAP, cmp_conns);
    const http_result *base_floor = find(res, n, H_HEALTHZ, cmp_conns);
    if (wrap == NULL) {
        cmp_conns = o->conns[o->n_conns - 1];
        wrap = find(res, n, H_WRAP, cmp_conns);
        base_floor = find(res, n, H_HEALTHZ, cmp_conns);
    }
    checks[0] = (http_check){.name = "server CPU per wrap (us)",
                             .unit = "us",
                             .target = "<= 1.25 x (floor + raw op)",
                             .met = -1};
    if (have_raw && wrap != NULL && base_floor != NULL && wrap->cpu_us_per_req >= 0 &&
        base_floor->cpu_us_per_req >= 0 && raw.enc[0] > 0) {
        checks[0].measured = wrap->cpu_us_per_req;
        checks[0].baseline = base_floor->cpu_us_per_req + 1e6 / raw.enc[0];
        checks[0].ratio = checks[0].measured / checks[0].baseline;
        checks[0].met = checks[0].ratio <= HTTP_TARGET_CPU;
    }
    const http_result *batch = find(res, n, H_REWRAP_BATCH, 0);
    checks[1] = (http_check){.name = "batch rewrap items/s (best)",
                             .unit = "items/s",
                             .target = ">= 0.8 x raw decrypt+encrypt",
                             .met = -1};
    if (have_raw && batch != NULL) {
        double enc = raw.enc[0] > raw.enc[1] ? raw.enc[0] : raw.enc[1];
        double dec = raw.dec[0] > raw.dec[1] ? raw.dec[0] : raw.dec[1];
        checks[1].measured = batch->items_s;
        checks[1].baseline = enc > 0 && dec > 0 ? 1.0 / (1.0 / enc + 1.0 / dec) : 0;
        checks[1].ratio = checks[1].baseline > 0 ? checks[1].measured / checks[1].baseline : 0;
        checks[1].met = checks[1].ratio >= HTTP_TARGET_BATCH;
    }
    const http_result *w16 = find(res, n, H_WRAP, 16);
    checks[2] = (http_check){
        .name = "p99 wrap at 16 connections", .unit = "ms", .target = "<= 2 ms", .met = -1};
    if (w16 != NULL) {
        checks[2].measured = w16->p99_ms;
        checks[2].met = w16->p99_ms <= HTTP_TARGET_P99_MS;
    }
    /* The same from kmsd's own histogram: from when it has read the request
     * to when the answer is queued, so without the time a request waits for
     * a CPU on the client's side or in the socket. */
    checks[3] = (http_check){.name = "p99 wrap at 16 connections, server side",
                             .unit = "ms",
                             .target = "<= 2 ms",
                             .met = -1};
    if (w16 != NULL && w16->srv_p99_ms >= 0) {
        checks[3].measured = w16->srv_p99_ms;
        checks[3].met = w16->srv_p99_ms <= HTTP_TARGET_P99_MS;
    }
    report(o, res, n, &raw, have_raw, checks, KMS_ARRAY_LEN(checks));
    free(res);
    setup_free(&s);
    curl_global_cleanup();
    return 0;
}
