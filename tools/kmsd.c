/*
 * kmsd: the key management daemon. Reads one configuration file, binds the
 * listening sockets, then serves either from one process with a thread pool
 * (workers = threads:N) or from N processes that share the sockets, each
 * with its own PKCS#11 module instance and LMDB environment
 * (workers = processes:N), supervised by the parent.
 *
 * The PIN never comes from the command line: hsm_pin_file or hsm_pin_env.
 */
#define _GNU_SOURCE
#include "kms.h"
#include "kms_audit.h"
#include "kms_api.h"
#include "kms_schedule.h"
#include "kms_secmem.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KMSD_EX_OK       0
#define KMSD_EX_USAGE    64
#define KMSD_EX_SOFTWARE 70
#define KMSD_EX_CONFIG   78

static const char help_text[] =
    "NAME\n"
    "    kmsd - key management service daemon (HTTPS API over an HSM)\n"
    "\n"
    "SYNOPSIS\n"
    "    kmsd --config FILE\n"
    "    kmsd --config FILE --check-config\n"
    "    kmsd --help | --version\n"
    "\n"
    "DESCRIPTION\n"
    "    kmsd serves the kmsd HTTP API (docs/api.md) over HTTPS with mutual TLS.\n"
    "    Master keys stay in the HSM named by hsm_module and hsm_token_uri; key\n"
    "    metadata lives in the LMDB environment at store_path. Clients present a\n"
    "    certificate from tls_ca; the policy file maps their identities to roles.\n"
    "    Core dumps are disabled at start. kmsd refuses to start if the PIN file or\n"
    "    the server's private key is readable by group or others.\n"
    "\n"
    "OPTIONS\n"
    "    -c, --config FILE   configuration file (docs/config.md); required\n"
    "    -t, --check-config  load and check the configuration, policy, CA, CRL and\n"
    "                        server certificate, print the result, exit\n"
    "    -h, --help          this text\n"
    "    -V, --version       print the version\n"
    "\n"
    "FILES\n"
    "    /etc/kmsd/kmsd.conf     configuration (key = value; see docs/config.md)\n"
    "    /etc/kmsd/policy.json   authorization policy (path set by 'policy')\n"
    "    hsm_pin_file            token user PIN, mode 0600 or stricter\n"
    "\n"
    "SIGNALS\n"
    "    SIGHUP    reload the policy, the server certificate and key, the CA and\n"
    "              CRL; a part that fails to load keeps its previous version\n"
    "    SIGTERM   stop accepting, answer requests in flight (drain_timeout),\n"
    "    SIGINT    then exit 0\n"
    "\n"
    "EXIT STATUS\n"
    "    0    clean shutdown, or configuration valid (--check-config)\n"
    "    64   usage error\n"
    "    70   internal error, or a worker process failed at start\n"
    "    78   configuration error (message names file:line)\n"
    "    other codes: the error table's exit code of the failure at start\n"
    "\n"
    "EXAMPLES\n"
    "    kmsd --config /etc/kmsd/kmsd.conf --check-config\n"
    "    kmsd --config /etc/kmsd/kmsd.conf\n"
    "    kill -HUP $(pidof kmsd)     # after editing the policy\n";

static void die_result(kms_result r, const char *what)
{
    const char *detail = kms_error_detail();
    kms_log(KMS_LOG_ERROR, "%s: %s%s%s", what, kms_error_message(r.err), detail[0] ? ": " : "",
            detail);
}

static kms_result file_private(const char *path, const char *what)
{
    struct stat st;
    KMS_ENSURE_MSG(stat(path, &st) == 0, KMS_ERR_CONFIG, "%s %s: %s", what, path, strerror(errno));
    KMS_ENSURE_MSG((st.st_mode & (S_IRWXG | S_IRWXO)) == 0, KMS_ERR_CONFIG,
                   "%s %s is readable by group or others; chmod 600 it", what, path);
    return KMS_OK_RESULT;
}

/* ---- scheduled rotation (one worker only) ---- */

typedef struct {
    kms *k;
    unsigned interval_s;
    int64_t jitter_s;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
} scheduler;

static void scheduler_note(void *arg, const char *key, const kms_rotation_info *ri, kms_err err)
{
    (void)arg;
    if (ri != NULL) {
        kms_log(KMS_LOG_INFO, "scheduler: rotated key=%s version %u -> %u", key, ri->from_version,
                ri->to_version);
    } else {
        kms_log(KMS_LOG_WARN, "scheduler: rotating key=%s failed: %s", key, kms_error_code(err));
    }
}

/* One pass (kms_schedule_tick): due keys rotated with jitter, never twice
 * (decided inside the write transaction), grace ends and due destructions
 * stored. */
static bool scheduler_pass(scheduler *sc)
{
    kms_schedule_opts o = {.jitter_window_s = sc->jitter_s > 0 ? sc->jitter_s : -1,
                           .notify = scheduler_note};
    kms_schedule_result res;
    kms_result r = kms_schedule_tick(sc->k, &o, &res);
    if (!kms_is_ok(r)) {
        kms_log(KMS_LOG_WARN, "scheduler: pass incomplete: %s", kms_error_code(r.err));
    }
    if (res.deferred > 0 || res.grace_expired > 0 || res.destroyed > 0) {
        kms_log(KMS_LOG_INFO,
                "scheduler: %zu keys, %zu rotated, %zu deferred to the next pass, %zu grace "
                "periods ended, %zu versions destroyed",
                res.keys, res.rotated, res.deferred, res.grace_expired, res.destroyed);
    }
    return kms_is_ok(r);
}

static void *scheduler_main(void *arg)
{
    scheduler *sc = arg;
    unsigned failures = 0;
    pthread_mutex_lock(&sc->mu);
    while (!sc->stop) {
        /* After failed passes (an HSM that is down), back off: the interval
         * doubled per failure, at most 64 times or one hour, so that an
         * outage leaves a failed rotation record now and then, not one per
         * interval. */
        uint64_t wait = sc->interval_s;
        if (failures > 0) {
            wait <<= failures < 6 ? failures : 6;
            uint64_t cap = sc->interval_s > 3600 ? sc->interval_s : 3600;
            wait = wait < cap ? wait : cap;
        }
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += (time_t)wait;
        while (!sc->stop && pthread_cond_timedwait(&sc->cv, &sc->mu, &t) == 0) {
        }
        if (sc->stop) {
            break;
        }
        pthread_mutex_unlock(&sc->mu);
        failures = scheduler_pass(sc) ? 0 : failures + 1;
        pthread_mutex_lock(&sc->mu);
    }
    pthread_mutex_unlock(&sc->mu);
    return NULL;
}

/* ---- one serving process ---- */

static int run_worker(const kms_daemon_config *cfg, const int *fds, size_t nfds, unsigned threads,
                      size_t idx, int ready_fd)
{
    /* Worker idx counts its HSM and audit work in its metrics slot (shared
     * in processes mode), so that /metrics adds up every worker's. */
    struct kms_hsm_counters *hsm_counters;
    struct kms_audit_counters *audit_counters;
    kms_api_metrics_slot(idx, &hsm_counters, &audit_counters);
    bool run_scheduler = idx == 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    kms_config kc = {
        .store_path = cfg->store_path,
        .map_size_initial = cfg->store_map_size_initial,
        .map_size_max = cfg->store_map_size_max,
        .hsm =
            {
                .module = cfg->hsm_module,
                .token_uri = cfg->hsm_token_uri,
                .pin_file = cfg->hsm_pin_file[0] ? cfg->hsm_pin_file : NULL,
                .pin_env = cfg->hsm_pin_env[0] ? cfg->hsm_pin_env : NULL,
                .pool_size = cfg->hsm_pool_size,
                .cache_capacity = cfg->hsm_cache_capacity,
                .counters = hsm_counters,
            },
        .default_rotation_period_s = cfg->rotation_period_s,
        .default_warning_window_s = cfg->warning_window_s,
    };
    kms *k = NULL;
    kms_result r = kms_open(&kc, &k);
    if (!kms_is_ok(r)) {
        die_result(r, "opening the store and the HSM");
        return kms_error_exit_code(r.err);
    }
    /* The audit trail before the first request can arrive. */
    kms_audit_config ac = {.enabled = cfg->audit != 0,
                           .sign_every_records = cfg->audit_sign_every,
                           .sign_every_s = cfg->audit_sign_interval_s,
                           .retention_s = cfg->audit_retention_s,
                           .counters = audit_counters};
    r = kms_audit_start(k, &ac);
    if (!kms_is_ok(r)) {
        die_result(r, "starting the audit trail");
        kms_close(k);
        return kms_error_exit_code(r.err);
    }
    if (!ac.enabled) {
        kms_log(KMS_LOG_WARN, "audit = off: requests are NOT audited (for benchmarks only)");
    }
    kms_api_server *srv = NULL;
    r = kms_api_server_start(cfg, k, fds, nfds, threads, &srv);
    if (!kms_is_ok(r)) {
        die_result(r, "starting the HTTPS server");
        kms_close(k);
        return kms_error_exit_code(r.err);
    }
    scheduler sc = {
        .k = k, .interval_s = cfg->scheduler_interval_s, .jitter_s = cfg->scheduler_jitter_s};
    bool sched = run_scheduler && cfg->scheduler_interval_s > 0;
    pthread_mutex_init(&sc.mu, NULL);
    pthread_cond_init(&sc.cv, NULL);
    if (sched && pthread_create(&sc.thread, NULL, scheduler_main, &sc) != 0) {
        sched = false;
        kms_log(KMS_LOG_WARN, "scheduler thread not started");
    }
    kms_log(KMS_LOG_INFO, "serving (%u threads%s)", threads, sched ? ", scheduler on" : "");
    if (ready_fd >= 0) {
        /* Tell the supervisor this worker is up. */
        ssize_t w = write(ready_fd, "R", 1);
        (void)w;
        close(ready_fd);
    }
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) {
            continue;
        }
        if (sig == SIGHUP) {
            kms_log(KMS_LOG_INFO, "SIGHUP: reloading");
            if (!kms_is_ok(kms_api_server_reload(srv))) {
                kms_log(KMS_LOG_WARN, "reload incomplete; see the errors above");
            }
            continue;
        }
        kms_log(KMS_LOG_INFO, "%s: draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        break;
    }
    if (sched) {
        pthread_mutex_lock(&sc.mu);
        sc.stop = true;
        pthread_cond_broadcast(&sc.cv);
        pthread_mutex_unlock(&sc.mu);
        pthread_join(sc.thread, NULL);
    }
    kms_api_server_shutdown(srv);
    kms_api_server_free(srv);
    kms_close(k);
    kms_log(KMS_LOG_INFO, "stopped");
    return KMSD_EX_OK;
}

/* ---- process supervisor ---- */

typedef struct {
    pid_t pid;
    struct timespec started;
} child;

/* Starts worker idx and waits until it serves (it writes one byte to a
 * pipe) or fails. Workers start one at a time: SoftHSM reads its token
 * files at C_Initialize, and a second process initialising while the first
 * writes them can miss the token. Returns the pid, or -1 with *status set
 * to the worker's exit status. */
static pid_t spawn(const kms_daemon_config *cfg, const int *fds, size_t nfds, size_t idx,
                   int *status)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
        *status = KMSD_EX_SOFTWARE;
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        /* A worker must not outlive its supervisor (killed with SIGKILL, it
         * cannot forward anything): it gets SIGTERM and drains. The check
         * after prctl closes the race with a supervisor that died before. */
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != parent) {
            _exit(KMSD_EX_SOFTWARE);
        }
        sigset_t all;
        sigemptyset(&all);
        sigaddset(&all, SIGCHLD);
        pthread_sigmask(SIG_UNBLOCK, &all, NULL);
        /* Worker idx serves its own copy of the listening sockets (one
         * SO_REUSEPORT socket per address and worker, kms_api_listen). */
        const size_t nl = cfg->listen_count;
        for (size_t i = 0; i < nfds; i++) {
            if (i / nl != idx) {
                close(fds[i]);
            }
        }
        _exit(run_worker(cfg, fds + idx * nl, nl, cfg->process_threads, idx, p[1]));
    }
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        *status = KMSD_EX_SOFTWARE;
        return -1;
    }
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    char c = 0;
    /* Bounded: a worker that neither serves nor exits in 60 s is killed. */
    int n = poll(&pf, 1, 60000);
    ssize_t got = n > 0 ? read(p[0], &c, 1) : 0;
    close(p[0]);
    if (got == 1 && c == 'R') {
        return pid;
    }
    if (n <= 0) {
        kill(pid, SIGKILL);
    }
    int ws = 0;
    waitpid(pid, &ws, 0);
    *status = WIFEXITED(ws) && WEXITSTATUS(ws) != 0 ? WEXITSTATUS(ws) : KMSD_EX_SOFTWARE;
    kms_log(KMS_LOG_ERROR, "worker %zu failed at start (status %d)", idx, *status);
    return -1;
}

static double since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t->tv_sec) + (double)(now.tv_nsec - t->tv_nsec) / 1e9;
}

static int supervise(const kms_daemon_config *cfg, const int *fds, size_t nfds)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGCHLD);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    child kids[256];
    unsigned n = cfg->workers;
    int status = KMSD_EX_OK;
    bool stopping = false;
    for (unsigned i = 0; i < n; i++) {
        kids[i].pid = spawn(cfg, fds, nfds, i, &status);
        clock_gettime(CLOCK_MONOTONIC, &kids[i].started);
        if (kids[i].pid < 0) {
            n = i;
            stopping = true;
            for (unsigned j = 0; j < n; j++) {
                kill(kids[j].pid, SIGTERM);
            }
            break;
        }
    }
    kms_log(KMS_LOG_INFO, "%u worker%s serving", n, n == 1 ? "" : "s");
    unsigned alive = n;
    struct timespec stop_at;
    clock_gettime(CLOCK_MONOTONIC, &stop_at);
    while (alive > 0) {
        int sig = 0;
        if (stopping) {
            /* Bounded wait for the children to drain, then force. */
            struct timespec tick = {0, 200 * 1000000L};
            siginfo_t si;
            sig = sigtimedwait(&set, &si, &tick);
            if (sig < 0 && since(&stop_at) > cfg->drain_timeout_s + 5.0) {
                for (unsigned i = 0; i < n; i++) {
                    if (kids[i].pid > 0) {
                        kill(kids[i].pid, SIGKILL);
                    }
                }
            }
        } else if (sigwait(&set, &sig) != 0) {
            continue;
        }
        if (sig == SIGHUP) {
            for (unsigned i = 0; i < n; i++) {
                if (kids[i].pid > 0) {
                    kill(kids[i].pid, SIGHUP);
                }
            }
            continue;
        }
        if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
            stopping = true;
            clock_gettime(CLOCK_MONOTONIC, &stop_at);
            for (unsigned i = 0; i < n; i++) {
                if (kids[i].pid > 0) {
                    kill(kids[i].pid, SIGTERM);
                }
            }
        }
        /* Reap whatever exited (SIGCHLD may coalesce). */
        int ws;
        pid_t pid;
        while ((pid = waitpid(-1, &ws, WNOHANG)) > 0) {
            for (unsigned i = 0; i < n; i++) {
                if (kids[i].pid != pid) {
                    continue;
                }
                kids[i].pid = 0;
                alive--;
                bool clean = WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
                if (stopping) {
                    if (!clean) {
                        kms_log(KMS_LOG_ERROR, "worker %d exited (%s %d) while stopping", (int)pid,
                                WIFEXITED(ws) ? "status" : "signal",
                                WIFEXITED(ws) ? WEXITSTATUS(ws) : WTERMSIG(ws));
                        if (status == KMSD_EX_OK) {
                            status = WIFEXITED(ws) ? WEXITSTATUS(ws) : KMSD_EX_SOFTWARE;
                        }
                    }
                    break;
                }
                kms_log(KMS_LOG_WARN, "worker %d exited (%s %d); restarting", (int)pid,
                        WIFEXITED(ws) ? "status" : "signal",
                        WIFEXITED(ws) ? WEXITSTATUS(ws) : WTERMSIG(ws));
                int st = 0;
                kids[i].pid = spawn(cfg, fds, nfds, i, &st);
                clock_gettime(CLOCK_MONOTONIC, &kids[i].started);
                if (kids[i].pid > 0) {
                    alive++;
                } else {
                    /* A worker that cannot start again (HSM gone, store
                     * broken): stop the service rather than run degraded
                     * without saying so; the service manager restarts it. */
                    kids[i].pid = 0;
                    status = st;
                    stopping = true;
                    clock_gettime(CLOCK_MONOTONIC, &stop_at);
                    for (unsigned j = 0; j < n; j++) {
                        if (kids[j].pid > 0) {
                            kill(kids[j].pid, SIGTERM);
                        }
                    }
                }
                break;
            }
        }
    }
    return status;
}

int main(int argc, char **argv)
{
    /* First thing: no core dumps, not ptrace-attachable by other users. */
    kms_result hr = kms_process_harden();
    if (!kms_is_ok(hr)) {
        fprintf(stderr, "kmsd: process hardening failed: %s\n", kms_error_message(hr.err));
        return KMSD_EX_SOFTWARE;
    }
    /* Before any JSON is parsed: jansson allocates through a wiping
     * allocator from here on. */
    kms_api_global_init();
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", no_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL;
    bool check_only = false;
    int c;
    while ((c = getopt_long(argc, argv, "c:thV", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config_path = optarg;
            break;
        case 't':
            check_only = true;
            break;
        case 'h':
            fputs(help_text, stdout);
            return KMSD_EX_OK;
        case 'V':
            printf("kmsd %s\n", KMSD_VERSION);
            return KMSD_EX_OK;
        default:
            fputs("usage: kmsd --config FILE [--check-config] | --help | --version\n", stderr);
            return KMSD_EX_USAGE;
        }
    }
    if (config_path == NULL || optind != argc) {
        fputs("usage: kmsd --config FILE [--check-config] | --help | --version\n", stderr);
        return KMSD_EX_USAGE;
    }

    static kms_daemon_config cfg;
    kms_result r = kms_config_load(config_path, &cfg);
    if (!kms_is_ok(r)) {
        die_result(r, "configuration");
        return KMSD_EX_CONFIG;
    }
    kms_log_set_level(cfg.log_level);
    r = file_private(cfg.tls_key, "server key");
    if (kms_is_ok(r) && cfg.hsm_pin_file[0] != '\0') {
        r = file_private(cfg.hsm_pin_file, "PIN file");
    }
    kms_policy *policy = NULL;
    if (kms_is_ok(r)) {
        r = kms_policy_load(cfg.policy, &policy);
    }
    if (kms_is_ok(r) && check_only) {
        r = kms_api_tls_check(&cfg);
    }
    if (!kms_is_ok(r)) {
        die_result(r, "configuration");
        kms_policy_free(policy);
        return KMSD_EX_CONFIG;
    }
    size_t rules = kms_policy_rule_count(policy);
    kms_policy_free(policy);
    if (check_only) {
        printf("%s: configuration valid; policy %s: %zu rules\n", config_path, cfg.policy, rules);
        return KMSD_EX_OK;
    }

    signal(SIGPIPE, SIG_IGN);
    /* In processes mode one copy of the sockets per worker. */
    int fds[KMS_CONFIG_LISTEN_MAX * KMS_CONFIG_WORKERS_MAX];
    size_t nfds = 0;
    r = kms_api_listen(&cfg, cfg.workers_mode == KMS_WORKERS_THREADS ? 1 : cfg.workers, fds, &nfds);
    if (!kms_is_ok(r)) {
        die_result(r, "listening");
        return kms_error_exit_code(r.err);
    }
    for (size_t i = 0; i < cfg.listen_count; i++) {
        kms_log(KMS_LOG_INFO, "listening on %s%s%s:%u (%s:%u)",
                strchr(cfg.listen[i].host, ':') ? "[" : "", cfg.listen[i].host,
                strchr(cfg.listen[i].host, ':') ? "]" : "", cfg.listen[i].port,
                cfg.workers_mode == KMS_WORKERS_THREADS ? "threads" : "processes", cfg.workers);
    }
    if (cfg.workers_mode == KMS_WORKERS_THREADS) {
        /* The server owns the sockets from here and closes them. */
        return run_worker(&cfg, fds, nfds, cfg.workers, 0, -1);
    }
    r = kms_api_metrics_share();
    if (!kms_is_ok(r)) {
        die_result(r, "metrics");
        return kms_error_exit_code(r.err);
    }
    int status = supervise(&cfg, fds, nfds);
    for (size_t i = 0; i < nfds; i++) {
        close(fds[i]);
    }
    return status;
}
