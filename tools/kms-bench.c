/*
 * kms-bench: load generator and baseline meter for kmsd.
 *
 *   kms-bench core  ...   kms/ wrap and unwrap next to the raw PKCS#11 loop,
 *                         on the same token in the same run
 *   kms-bench http  ...   the HTTPS API under concurrent keep-alive clients
 *
 * `kms-bench --help` is the manual. Every figure is printed next to the
 * baseline it is judged against and the ratio, so a number never stands
 * alone.
 */
#define _GNU_SOURCE /* nftw, mkdtemp */
#include "kms_bench.h"

#include "kms_rand.h"
#include "kms_secmem.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BENCH_KEY_NAME        "kms-bench"
#define BENCH_DEFAULT_SECONDS 3.0
#define BENCH_DEFAULT_SIZE    32
#define BENCH_DEFAULT_MODULE  "/usr/lib/softhsm/libsofthsm2.so"
#define BENCH_PIN_BYTES       16

/* This executable's path, resolved at start, for the worker processes. */
static char bench_self[4096];

static const kms_caller bench_caller = {.identity = "kms-bench", .request_id = "bench"};

static const char bench_help[] =
    "NAME\n"
    "    kms-bench - measure kmsd against its baselines\n"
    "\n"
    "SYNOPSIS\n"
    "    kms-bench core (--module M --token-uri U --pin-file F --store DIR | --throwaway)\n"
    "                   [--seconds S] [--size N] [--json]\n"
    "    kms-bench http --url URL --cert F --key F --cacert F [--admin-cert F --admin-key F]\n"
    "                   [--connections LIST] [--rate R] [--ops LIST] [--seconds S]\n"
    "                   [--client-threads N] [--rounds N] [--background-batch N]\n"
    "                   [--server-pid PID]\n"
    "                   [--module M --token-uri U --pin-file F] [--json]\n"
    "    kms-bench audit (--module M --token-uri U --pin-file F --store DIR | --throwaway)\n"
    "                   [--connections THREADS] [--seconds S] [--size N] [--json]\n"
    "                   wrap ops/s with the durable audit trail off and on, alternating\n"
    "                   in half-second slices, in one run\n"
    "                   (THREADS: comma-separated thread counts, default 1,4,16,64)\n"
    "    kms-bench --help\n"
    "\n"
    "DESCRIPTION\n"
    "    core measures, in one run on one token, wrap and unwrap through the domain layer\n"
    "    (kms_wrap, kms_unwrap) on 1 and 2 threads and on 2 processes, next to the raw\n"
    "    PKCS#11 baseline (C_EncryptInit+C_Encrypt and C_DecryptInit+C_Decrypt of AES-256-GCM\n"
    "    on a session key, kms_hsm_bench_raw) on the same threads and processes, and prints\n"
    "    the ratio kms/raw. Each kms measurement alternates with its raw counterpart in\n"
    "    0.5 s slices, so that both see the same machine and the ratio holds on a busy\n"
    "    host. SoftHSM serialises calls within a process, so the 2-process columns show\n"
    "    what a second worker process buys.\n"
    "\n"
    "    http drives a running kmsd with keep-alive HTTPS clients (one libcurl handle and\n"
    "    one TLS connection per client; client threads drive 16 connections each through\n"
    "    libcurl's multi interface) for every connection count of LIST: /healthz (the\n"
    "    floor: TLS, HTTP and routing without the HSM), wrap, unwrap, datakey, and batch\n"
    "    rewrap of 1,000 items per request. It reports requests/s, p50 and p99 latency as\n"
    "    the client sees it, the server's own p99 (from kmsd's latency histogram on\n"
    "    /metrics, read with the admin certificate before and after each cell) and,\n"
    "    with --server-pid, the server's CPU time per request (utime+stime from /proc of\n"
    "    every process in the server's process group, so worker processes count too).\n"
    "    With the server's audit trail on, a second table gives per cell what the answers\n"
    "    waited for: audit records and journal syncs per second, records per sync, the\n"
    "    mean sync and the mean wait of a record until durable (kmsd_audit_* on /metrics).\n"
    "    With\n"
    "    --module/--token-uri/--pin-file it also measures the raw PKCS#11 baseline on that\n"
    "    token, and prints the comparisons: CPU per wrap <= 1.25 x (floor + raw op), batch\n"
    "    rewrap items/s >= 0.8 x raw decrypt+encrypt, p99 wrap at 16 connections <= 2 ms\n"
    "    (as the client sees it, and on the server's side).\n"
    "    Setup creates a key named kms-bench-<random> with the admin certificate (default:\n"
    "    the client certificate) and rotates it once, so that rewrap has work to do.\n"
    "\n"
    "OPTIONS\n"
    "    --module M         PKCS#11 module: p11-kit module name or path\n"
    "    --token-uri U      RFC 7512 URI of the token, e.g. pkcs11:token=kmsd\n"
    "    --pin-file F       file holding the user PIN (mode 0600; never pass a PIN in argv)\n"
    "    --store DIR        LMDB store directory (core; the key kms-bench is created in it)\n"
    "    --throwaway        core: make a fresh SoftHSM token and store in a temporary\n"
    "                       directory (module: --module, else $KMS_SOFTHSM_MODULE, else\n"
    "                       " BENCH_DEFAULT_MODULE "), remove them afterwards\n"
    "    --seconds S        duration of each measurement (default 3)\n"
    "    --size N           plaintext bytes per wrap / raw message (default 32, max 1024)\n"
    "    --url URL          base URL of kmsd, e.g. https://127.0.0.1:8443\n"
    "    --cert F, --key F  client certificate and key (role app) for the data operations\n"
    "    --cacert F         CA certificate that signed the server certificate\n"
    "    --admin-cert F, --admin-key F\n"
    "                       certificate with the admin role, for setup\n"
    "    --connections LIST comma-separated connection counts (default 1,4,16,64)\n"
    "    --rate R           http: offer R requests/s in total (spread evenly over the\n"
    "                       connections, open loop) instead of sending back to back;\n"
    "                       latency then counts from each request's scheduled time, so a\n"
    "                       server that falls behind shows it (no coordinated omission).\n"
    "                       Batch rewrap stays back to back.\n"
    "    --client-threads N http: spread each cell's connections over N client threads\n"
    "                       (default: one thread per 16 connections). N equal to the\n"
    "                       connection count gives a thread per connection, whose\n"
    "                       threads compete with the server's for a small machine's CPUs.\n"
    "    --rounds N         http: measure every cell N times (default 1, at most 50), the\n"
    "                       operations of one connection count taking turns, each for\n"
    "                       --seconds; requests/s and CPU per request are pooled over the\n"
    "                       rounds, p50 and p99 are the median of the rounds'. The floor\n"
    "                       and the wrap then see the same machine, so the CPU check\n"
    "                       holds on a host whose speed drifts.\n"
    "    --background-batch N\n"
    "                       http: while each single-operation cell runs, N more\n"
    "                       connections send 1,000-item batch rewraps back to back, as a\n"
    "                       bulk re-encryption beside applications would (1 to 64). The\n"
    "                       cell's latencies are then those of its operation beside the\n"
    "                       batches; the items the batches rewrapped per second are\n"
    "                       reported with it, and the server's CPU per request is n/a.\n"
    "    --ops LIST         http: only these of healthz, wrap, unwrap, datakey,\n"
    "                       rewrap-batch (default: all)\n"
    "    --server-pid PID   kmsd's pid, for CPU time per request\n"
    "    --json             print one JSON object instead of markdown tables\n"
    "    --help             this manual\n"
    "\n"
    "OUTPUT\n"
    "    Markdown tables on stdout (docs/performance.md is made of them), or JSON with\n"
    "    --json. Progress goes to stderr.\n"
    "\n"
    "EXIT STATUS\n"
    "    0 measured (whether or not a target was met: read the met? column), 64 usage\n"
    "    error, otherwise the exit code of the error table entry that stopped the run\n"
    "    (e.g. 78 configuration, 69/75 HSM unavailable).\n"
    "\n"
    "EXAMPLES\n"
    "    kms-bench core --throwaway --seconds 3\n"
    "    kms-bench core --module /usr/lib/softhsm/libsofthsm2.so --token-uri pkcs11:token=kmsd \\\n"
    "        --pin-file /etc/kmsd/pin --store /var/lib/kmsd\n"
    "    kms-bench http --url https://127.0.0.1:8443 --cert app.crt --key app.key \\\n"
    "        --cacert ca.crt --admin-cert admin.crt --admin-key admin.key --server-pid 4242\n";

double kms_bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void kms_bench_fail(const char *what, kms_result r)
{
    const char *detail = kms_error_detail();
    fprintf(stderr, "kms-bench: %s: %s: %s%s%s\n", what, kms_error_code(r.err),
            kms_error_message(r.err), *detail ? ": " : "", detail);
}

kms_result kms_bench_raw_measure(kms_hsm *hsm, size_t size, double seconds, kms_bench_raw *out)
{
    for (unsigned t = 1; t <= 2; t++) {
        fprintf(stderr, "kms-bench: raw PKCS#11 encrypt, %u thread(s)\n", t);
        KMS_GUARD(kms_hsm_bench_raw(hsm, KMS_HSM_RAW_ENCRYPT, size, t, seconds, &out->enc[t - 1]));
        fprintf(stderr, "kms-bench: raw PKCS#11 decrypt, %u thread(s)\n", t);
        KMS_GUARD(kms_hsm_bench_raw(hsm, KMS_HSM_RAW_DECRYPT, size, t, seconds, &out->dec[t - 1]));
    }
    return KMS_OK_RESULT;
}

/* ---- throwaway token ---- */

typedef struct {
    char dir[256];
    char conf[320];
    char pin_file[320];
    char store[320];
    char label[40];
    char uri[96];
} bench_throwaway;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    (void)remove(path);
    return 0;
}

static void throwaway_remove(bench_throwaway *tw)
{
    if (tw->dir[0] != '\0') {
        (void)nftw(tw->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        tw->dir[0] = '\0';
    }
}

static KMS_RESULT write_file(const char *path, const void *data, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    KMS_ENSURE_MSG(fd >= 0, KMS_ERR_IO, "create %s: %s", path, strerror(errno));
    ssize_t w = write(fd, data, len);
    int c = close(fd);
    KMS_ENSURE_MSG(w == (ssize_t)len && c == 0, KMS_ERR_IO, "write %s", path);
    return KMS_OK_RESULT;
}

/* Random PIN as hex text in secret memory. */
static KMS_RESULT random_pin(kms_buf *pin)
{
    uint8_t raw[BENCH_PIN_BYTES];
    static const char hex[] = "0123456789abcdef";
    KMS_GUARD(kms_rand_bytes(raw, sizeof(raw)));
    for (size_t i = 0; i < sizeof(raw); i++) {
        char two[2] = {hex[raw[i] >> 4], hex[raw[i] & 15]};
        kms_result r = kms_buf_append(pin, two, 2);
        if (!kms_is_ok(r)) {
            kms_secmem_wipe(raw, sizeof(raw));
            return r;
        }
    }
    kms_secmem_wipe(raw, sizeof(raw));
    return KMS_OK_RESULT;
}

/* A fresh SoftHSM token in a temporary directory, initialised through
 * kms_hsm_token_init (C_InitToken/C_InitPIN: no PIN on any command line);
 * SOFTHSM2_CONF is exported so that the worker processes see it too. */
static KMS_RESULT throwaway_make(bench_throwaway *tw, const char *module)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(tw->dir, sizeof(tw->dir), "%s/kms-bench-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    KMS_ENSURE_MSG(mkdtemp(tw->dir) != NULL, KMS_ERR_IO, "mkdtemp: %s", strerror(errno));
    char tokens[300];
    snprintf(tokens, sizeof(tokens), "%s/tokens", tw->dir);
    snprintf(tw->conf, sizeof(tw->conf), "%s/softhsm2.conf", tw->dir);
    snprintf(tw->pin_file, sizeof(tw->pin_file), "%s/user.pin", tw->dir);
    snprintf(tw->store, sizeof(tw->store), "%s/store", tw->dir);
    KMS_ENSURE_MSG(mkdir(tokens, 0700) == 0 && mkdir(tw->store, 0700) == 0, KMS_ERR_IO, "mkdir: %s",
                   strerror(errno));
    char conf[512];
    int n = snprintf(conf, sizeof(conf),
                     "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
                     "slots.removable = false\n",
                     tokens);
    KMS_GUARD(write_file(tw->conf, conf, (size_t)n, 0600));
    KMS_ENSURE(setenv("SOFTHSM2_CONF", tw->conf, 1) == 0, KMS_ERR_IO);

    uint8_t id[4];
    KMS_GUARD(kms_rand_bytes(id, sizeof(id)));
    snprintf(tw->label, sizeof(tw->label), "kms-bench-%02x%02x%02x%02x", id[0], id[1], id[2],
             id[3]);
    snprintf(tw->uri, sizeof(tw->uri), "pkcs11:token=%s", tw->label);

    kms_buf so KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf user KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&so, 64);
    kms_buf_init_secret(&user, 64);
    KMS_GUARD(random_pin(&so));
    KMS_GUARD(random_pin(&user));
    KMS_GUARD(write_file(tw->pin_file, user.data, user.len, 0600));
    KMS_GUARD(kms_hsm_token_init(module, tw->label, &so, &user));
    return KMS_OK_RESULT;
}

/* ---- kms/ measurements ---- */

typedef enum { OP_WRAP = 1, OP_UNWRAP = 2 } bench_op;

typedef struct {
    kms *k;
    bench_op op;
    const uint8_t *pt;
    size_t size;
    const kms_buf *token;
    double seconds;
    pthread_barrier_t *start;
    uint64_t ops;
    double elapsed;
    kms_result r;
} kms_thread;

static void *kms_thread_run(void *arg)
{
    kms_thread *t = arg;
    kms_buf out;
    if (t->op == OP_UNWRAP) {
        kms_buf_init_secret(&out, 0);
    } else {
        kms_buf_init(&out, 0);
    }
    uint32_t v = 0;
    t->r = KMS_OK_RESULT;
    (void)pthread_barrier_wait(t->start);
    double t0 = kms_bench_now(), end = t0 + t->seconds, now = t0;
    uint64_t ops = 0;
    while (now < end) {
        for (int i = 0; i < 16; i++) {
            kms_buf_reset(&out);
            kms_result r = t->op == OP_WRAP
                               ? kms_wrap(t->k, &bench_caller, BENCH_KEY_NAME, t->pt, t->size, NULL,
                                          0, &out, &v)
                               : kms_unwrap(t->k, &bench_caller, BENCH_KEY_NAME, t->token->data,
                                            t->token->len, NULL, 0, &out, &v);
            if (!kms_is_ok(r)) {
                t->r = r;
                goto done;
            }
            ops++;
        }
        now = kms_bench_now();
    }
done:
    t->elapsed = kms_bench_now() - t0;
    t->ops = ops;
    kms_buf_free(&out);
    return NULL;
}

static KMS_RESULT kms_measure(kms *k, bench_op op, unsigned threads, const uint8_t *pt, size_t size,
                              const kms_buf *token, double seconds, double *ops_s)
{
    kms_thread th[2];
    pthread_t tid[2];
    pthread_barrier_t bar;
    KMS_ENSURE(threads >= 1 && threads <= 2, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(pthread_barrier_init(&bar, NULL, threads) == 0, KMS_ERR_INTERNAL);
    for (unsigned i = 0; i < threads; i++) {
        th[i] = (kms_thread){.k = k,
                             .op = op,
                             .pt = pt,
                             .size = size,
                             .token = token,
                             .seconds = seconds,
                             .start = &bar};
        if (pthread_create(&tid[i], NULL, kms_thread_run, &th[i]) != 0) {
            /* The threads already started would wait at the barrier
             * forever: give up loudly instead. */
            abort();
        }
    }
    double sum = 0;
    kms_result r = KMS_OK_RESULT;
    for (unsigned i = 0; i < threads; i++) {
        (void)pthread_join(tid[i], NULL);
        sum += th[i].elapsed > 0 ? (double)th[i].ops / th[i].elapsed : 0;
        if (!kms_is_ok(th[i].r)) {
            r = th[i].r;
        }
    }
    (void)pthread_barrier_destroy(&bar);
    KMS_GUARD(r);
    *ops_s = sum;
    return KMS_OK_RESULT;
}

/* The slice length of interleaved runs: kms and raw alternate this often,
 * so that both see the same machine (other jobs, frequency changes) and
 * their ratio stays meaningful on a shared host. */
#define BENCH_SLICE_S 0.5

/* kms op (wrap or unwrap) and its raw counterpart (encrypt or decrypt),
 * alternating in slices for `seconds` each in total; ops/s of both. */
static KMS_RESULT interleave_measure(kms *k, bench_op op, unsigned threads, const uint8_t *pt,
                                     size_t size, const kms_buf *token, double seconds,
                                     double *kms_ops_s, double *raw_ops_s)
{
    unsigned rounds = (unsigned)(seconds / BENCH_SLICE_S + 0.5);
    rounds = rounds == 0 ? 1 : rounds;
    double slice = seconds / rounds, kms_sum = 0, raw_sum = 0;
    kms_hsm_raw_op raw = op == OP_WRAP ? KMS_HSM_RAW_ENCRYPT : KMS_HSM_RAW_DECRYPT;
    for (unsigned i = 0; i < rounds; i++) {
        double a = 0, b = 0;
        KMS_GUARD(kms_measure(k, op, threads, pt, size, token, slice, &a));
        KMS_GUARD(kms_hsm_bench_raw(kms_hsm_of(k), raw, size, threads, slice, &b));
        kms_sum += a;
        raw_sum += b;
    }
    *kms_ops_s = kms_sum / rounds;
    *raw_ops_s = raw_sum / rounds;
    return KMS_OK_RESULT;
}

/* ---- 2-process runs: this binary re-executed as a worker ---- */

static const char *op_name(bench_op op)
{
    switch (op) {
    case OP_WRAP:
        return "wrap";
    case OP_UNWRAP:
        return "unwrap";
    default:
        return "?";
    }
}

static bench_op op_parse(const char *s)
{
    for (int op = OP_WRAP; op <= OP_UNWRAP; op++) {
        if (strcmp(s, op_name((bench_op)op)) == 0) {
            return (bench_op)op;
        }
    }
    return 0;
}

static KMS_RESULT bench_key_ensure(kms *k)
{
    kms_key_spec spec = {.name = BENCH_KEY_NAME, .purpose = KMS_PURPOSE_ENCRYPT};
    kms_key_info info;
    kms_result r = kms_key_create(k, &bench_caller, &spec, &info);
    if (!kms_is_ok(r) && r.err != KMS_ERR_KEY_EXISTS) {
        return r;
    }
    return KMS_OK_RESULT;
}

/* core-worker OP STORE MODULE URI PIN_FILE SECONDS SIZE: opens its own kms
 * (own module instance, own LMDB environment), says "ready", waits for
 * "go" on stdin, measures OP (wrap or unwrap) interleaved with its raw
 * counterpart, prints both ops/s. */
int kms_bench_core_worker(int argc, char **argv)
{
    if (argc != 7) {
        return KMS_BENCH_EXIT_USAGE;
    }
    bench_op op = op_parse(argv[0]);
    double seconds = strtod(argv[5], NULL);
    size_t size = strtoul(argv[6], NULL, 10);
    if ((op != OP_WRAP && op != OP_UNWRAP) || seconds <= 0 || size == 0 ||
        size > KMS_WRAP_PLAINTEXT_MAX_BYTES) {
        return KMS_BENCH_EXIT_USAGE;
    }
    kms_config cfg = {.store_path = argv[1]};
    cfg.hsm = (kms_hsm_config){.module = argv[2], .token_uri = argv[3], .pin_file = argv[4]};
    kms *k = NULL;
    kms_result r = kms_open(&cfg, &k);
    if (!kms_is_ok(r)) {
        kms_bench_fail("worker: kms_open", r);
        return kms_error_exit_code(r.err);
    }
    uint8_t pt[KMS_WRAP_PLAINTEXT_MAX_BYTES] = {0};
    kms_buf token;
    kms_buf_init(&token, 0);
    uint32_t v = 0;
    r = kms_wrap(k, &bench_caller, BENCH_KEY_NAME, pt, size, NULL, 0, &token, &v);
    if (kms_is_ok(r)) {
        printf("ready\n");
        fflush(stdout);
        char go[8];
        if (fgets(go, sizeof(go), stdin) == NULL) {
            r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "no start signal");
        }
    }
    double kms_ops = 0, raw_ops = 0;
    if (kms_is_ok(r)) {
        r = interleave_measure(k, op, 1, pt, size, &token, seconds, &kms_ops, &raw_ops);
    }
    kms_buf_free(&token);
    kms_close(k);
    if (!kms_is_ok(r)) {
        kms_bench_fail("worker", r);
        return kms_error_exit_code(r.err);
    }
    printf("%.3f %.3f\n", kms_ops, raw_ops);
    fflush(stdout);
    return 0;
}

typedef struct {
    pid_t pid;
    FILE *in;  /* worker's stdin */
    FILE *out; /* worker's stdout */
} bench_worker;

static int worker_spawn(bench_worker *w, bench_op op, const kms_hsm_config *hsm, const char *store,
                        double seconds, size_t size)
{
    int to[2], from[2];
    if (pipe2(to, O_CLOEXEC) != 0) {
        return -1;
    }
    if (pipe2(from, O_CLOEXEC) != 0) {
        close(to[0]);
        close(to[1]);
        return -1;
    }
    char sec[32], sz[32];
    snprintf(sec, sizeof(sec), "%.3f", seconds);
    snprintf(sz, sizeof(sz), "%zu", size);
    pid_t pid = fork();
    if (pid < 0) {
        close(to[0]);
        close(to[1]);
        close(from[0]);
        close(from[1]);
        return -1;
    }
    if (pid == 0) {
        (void)dup2(to[0], STDIN_FILENO);
        (void)dup2(from[1], STDOUT_FILENO);
        char *argv[] = {"kms-bench",
                        "core-worker",
                        (char *)op_name(op),
                        (char *)store,
                        (char *)hsm->module,
                        (char *)hsm->token_uri,
                        (char *)hsm->pin_file,
                        sec,
                        sz,
                        NULL};
        execv(bench_self, argv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    w->pid = pid;
    w->in = fdopen(to[1], "w");
    w->out = fdopen(from[0], "r");
    return w->in != NULL && w->out != NULL ? 0 : -1;
}

static int worker_finish(bench_worker *w)
{
    if (w->in != NULL) {
        fclose(w->in);
    }
    if (w->out != NULL) {
        fclose(w->out);
    }
    int status = 0;
    (void)waitpid(w->pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 70;
}

/* Two worker processes, started together after both are ready; the sums
 * of their kms and raw ops/s. */
static KMS_RESULT procs_measure(bench_op op, const kms_hsm_config *hsm, const char *store,
                                double seconds, size_t size, double *kms_ops_s, double *raw_ops_s)
{
    bench_worker w[2] = {0};
    int ok = 1;
    char line[64];
    /* One after the other: SoftHSM's file store can fail to list the token
     * in a process that starts while another is opening it (seen here as
     * hsm_token_not_found), so each worker is ready before the next starts. */
    for (int i = 0; ok && i < 2; i++) {
        if (worker_spawn(&w[i], op, hsm, store, seconds, size) != 0 ||
            fgets(line, sizeof(line), w[i].out) == NULL || strcmp(line, "ready\n") != 0) {
            ok = 0;
        }
    }
    for (int i = 0; ok && i < 2; i++) {
        fprintf(w[i].in, "go\n");
        fflush(w[i].in);
    }
    double kms_sum = 0, raw_sum = 0;
    for (int i = 0; ok && i < 2; i++) {
        if (fgets(line, sizeof(line), w[i].out) == NULL) {
            ok = 0;
            break;
        }
        char *end = NULL;
        kms_sum += strtod(line, &end);
        raw_sum += strtod(end, NULL);
    }
    for (int i = 0; i < 2; i++) {
        if (w[i].pid > 0 && !ok) {
            (void)kill(w[i].pid, SIGTERM);
        }
        if (w[i].pid > 0 && worker_finish(&w[i]) != 0) {
            ok = 0;
        }
    }
    KMS_ENSURE_MSG(ok, KMS_ERR_INTERNAL, "a %s worker process failed", op_name(op));
    *kms_ops_s = kms_sum;
    *raw_ops_s = raw_sum;
    return KMS_OK_RESULT;
}

/* ---- core mode ---- */

typedef struct {
    double wrap[3], unwrap[3]; /* 1 thread, 2 threads, 2 processes */
    double enc[3], dec[3];
} core_results;

static double ratio(double a, double b)
{
    return b > 0 ? a / b : 0;
}

static void core_print(const kms_bench_opts *o, const core_results *c)
{
    if (o->json) {
        printf("{\"mode\":\"core\",\"seconds\":%.2f,\"size\":%zu,\"columns\":[\"1 thread\","
               "\"2 threads\",\"2 processes\"],",
               o->seconds, o->size);
        const char *names[4] = {"kms_wrap", "raw_encrypt", "kms_unwrap", "raw_decrypt"};
        const double *vals[4] = {c->wrap, c->enc, c->unwrap, c->dec};
        for (int i = 0; i < 4; i++) {
            printf("\"%s\":[%.1f,%.1f,%.1f],", names[i], vals[i][0], vals[i][1], vals[i][2]);
        }
        printf("\"ratio_wrap\":[%.3f,%.3f,%.3f],\"ratio_unwrap\":[%.3f,%.3f,%.3f]}\n",
               ratio(c->wrap[0], c->enc[0]), ratio(c->wrap[1], c->enc[1]),
               ratio(c->wrap[2], c->enc[2]), ratio(c->unwrap[0], c->dec[0]),
               ratio(c->unwrap[1], c->dec[1]), ratio(c->unwrap[2], c->dec[2]));
        return;
    }
    printf("kms-bench core: %zu-byte plaintexts, %.1f s per cell, ops/s\n\n", o->size, o->seconds);
    printf("| operation | 1 thread | 2 threads | 2 processes |\n");
    printf("|---|---:|---:|---:|\n");
    printf("| kms wrap (kms_wrap) | %.0f | %.0f | %.0f |\n", c->wrap[0], c->wrap[1], c->wrap[2]);
    printf("| raw PKCS#11 encrypt | %.0f | %.0f | %.0f |\n", c->enc[0], c->enc[1], c->enc[2]);
    printf("| **wrap / raw** | %.2f | %.2f | %.2f |\n", ratio(c->wrap[0], c->enc[0]),
           ratio(c->wrap[1], c->enc[1]), ratio(c->wrap[2], c->enc[2]));
    printf("| kms unwrap (kms_unwrap) | %.0f | %.0f | %.0f |\n", c->unwrap[0], c->unwrap[1],
           c->unwrap[2]);
    printf("| raw PKCS#11 decrypt | %.0f | %.0f | %.0f |\n", c->dec[0], c->dec[1], c->dec[2]);
    printf("| **unwrap / raw** | %.2f | %.2f | %.2f |\n", ratio(c->unwrap[0], c->dec[0]),
           ratio(c->unwrap[1], c->dec[1]), ratio(c->unwrap[2], c->dec[2]));
}

static KMS_RESULT core_run(const kms_bench_opts *o, const kms_hsm_config *hsm, const char *store,
                           core_results *c)
{
    kms_config cfg = {.store_path = store, .hsm = *hsm};
    kms *k = NULL;
    KMS_GUARD(kms_open(&cfg, &k));
    uint8_t pt[KMS_WRAP_PLAINTEXT_MAX_BYTES];
    kms_buf token;
    kms_buf_init(&token, 0);
    uint32_t v = 0;
    kms_result r = kms_rand_bytes(pt, o->size);
    if (kms_is_ok(r)) {
        r = bench_key_ensure(k);
    }
    if (kms_is_ok(r)) {
        r = kms_wrap(k, &bench_caller, BENCH_KEY_NAME, pt, o->size, NULL, 0, &token, &v);
    }
    for (unsigned t = 1; kms_is_ok(r) && t <= 2; t++) {
        fprintf(stderr, "kms-bench: kms wrap and raw encrypt, %u thread(s)\n", t);
        r = interleave_measure(k, OP_WRAP, t, pt, o->size, &token, o->seconds, &c->wrap[t - 1],
                               &c->enc[t - 1]);
        if (kms_is_ok(r)) {
            fprintf(stderr, "kms-bench: kms unwrap and raw decrypt, %u thread(s)\n", t);
            r = interleave_measure(k, OP_UNWRAP, t, pt, o->size, &token, o->seconds,
                                   &c->unwrap[t - 1], &c->dec[t - 1]);
        }
    }
    kms_buf_free(&token);
    kms_close(k);
    KMS_GUARD(r);

    fprintf(stderr, "kms-bench: wrap and raw encrypt, 2 processes\n");
    KMS_GUARD(procs_measure(OP_WRAP, hsm, store, o->seconds, o->size, &c->wrap[2], &c->enc[2]));
    fprintf(stderr, "kms-bench: unwrap and raw decrypt, 2 processes\n");
    KMS_GUARD(procs_measure(OP_UNWRAP, hsm, store, o->seconds, o->size, &c->unwrap[2], &c->dec[2]));
    return KMS_OK_RESULT;
}

int kms_bench_core(const kms_bench_opts *o)
{
    bench_throwaway tw = {0};
    kms_hsm_config hsm = {0};
    const char *store = o->store;
    kms_result r = KMS_OK_RESULT;
    if (o->throwaway) {
        const char *module = o->module;
        if (module == NULL) {
            module = getenv("KMS_SOFTHSM_MODULE");
        }
        if (module == NULL || *module == '\0') {
            module = BENCH_DEFAULT_MODULE;
        }
        r = throwaway_make(&tw, module);
        hsm = (kms_hsm_config){.module = module, .token_uri = tw.uri, .pin_file = tw.pin_file};
        store = tw.store;
    } else {
        if (o->module == NULL || o->token_uri == NULL || o->pin_file == NULL || store == NULL) {
            fprintf(stderr, "kms-bench core: --module, --token-uri, --pin-file and --store are "
                            "required (or --throwaway); see --help\n");
            return KMS_BENCH_EXIT_USAGE;
        }
        hsm = (kms_hsm_config){
            .module = o->module, .token_uri = o->token_uri, .pin_file = o->pin_file};
    }
    core_results c = {0};
    if (kms_is_ok(r)) {
        r = core_run(o, &hsm, store, &c);
    }
    throwaway_remove(&tw);
    if (!kms_is_ok(r)) {
        kms_bench_fail("core", r);
        return kms_error_exit_code(r.err);
    }
    core_print(o, &c);
    return 0;
}

/* ---- options ---- */

enum {
    OPT_MODULE,
    OPT_TOKEN_URI,
    OPT_PIN_FILE,
    OPT_STORE,
    OPT_THROWAWAY,
    OPT_SECONDS,
    OPT_SIZE,
    OPT_URL,
    OPT_CERT,
    OPT_KEY,
    OPT_CACERT,
    OPT_ADMIN_CERT,
    OPT_ADMIN_KEY,
    OPT_CONNECTIONS,
    OPT_SERVER_PID,
    OPT_RATE,
    OPT_OPS,
    OPT_CLIENT_THREADS,
    OPT_ROUNDS,
    OPT_BACKGROUND_BATCH,
    OPT_JSON,
};

static const struct {
    const char *name;
    int id;
    bool has_arg;
} bench_options[] = {
    {"--module", OPT_MODULE, true},
    {"--token-uri", OPT_TOKEN_URI, true},
    {"--pin-file", OPT_PIN_FILE, true},
    {"--store", OPT_STORE, true},
    {"--throwaway", OPT_THROWAWAY, false},
    {"--seconds", OPT_SECONDS, true},
    {"--size", OPT_SIZE, true},
    {"--url", OPT_URL, true},
    {"--cert", OPT_CERT, true},
    {"--key", OPT_KEY, true},
    {"--cacert", OPT_CACERT, true},
    {"--admin-cert", OPT_ADMIN_CERT, true},
    {"--admin-key", OPT_ADMIN_KEY, true},
    {"--connections", OPT_CONNECTIONS, true},
    {"--server-pid", OPT_SERVER_PID, true},
    {"--rate", OPT_RATE, true},
    {"--ops", OPT_OPS, true},
    {"--client-threads", OPT_CLIENT_THREADS, true},
    {"--rounds", OPT_ROUNDS, true},
    {"--background-batch", OPT_BACKGROUND_BATCH, true},
    {"--json", OPT_JSON, false},
};

static int parse_conns(const char *s, kms_bench_opts *o)
{
    o->n_conns = 0;
    while (*s != '\0') {
        char *end = NULL;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno != 0 || end == s || v == 0 || v > 1024 ||
            o->n_conns == KMS_BENCH_MAX_CONNS_LIST || (*end != ',' && *end != '\0')) {
            return -1;
        }
        o->conns[o->n_conns++] = (unsigned)v;
        s = *end == ',' ? end + 1 : end;
    }
    return o->n_conns > 0 ? 0 : -1;
}

/* A whole number in [1, max]; 0 and -1 as parse_option. */
static int parse_count(const char *arg, unsigned long max, unsigned *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long v = strtoul(arg, &end, 10);
    *out = (unsigned)v;
    return errno == 0 && *end == '\0' && v > 0 && v <= max ? 0 : -1;
}

static int parse_option(kms_bench_opts *o, int id, const char *arg)
{
    char *end = NULL;
    switch (id) {
    case OPT_MODULE:
        o->module = arg;
        return 0;
    case OPT_TOKEN_URI:
        o->token_uri = arg;
        return 0;
    case OPT_PIN_FILE:
        o->pin_file = arg;
        return 0;
    case OPT_STORE:
        o->store = arg;
        return 0;
    case OPT_THROWAWAY:
        o->throwaway = true;
        return 0;
    case OPT_SECONDS:
        o->seconds = strtod(arg, &end);
        return *end == '\0' && o->seconds > 0 && o->seconds <= 3600 ? 0 : -1;
    case OPT_SIZE:
        o->size = strtoul(arg, &end, 10);
        return *end == '\0' && o->size >= KMS_WRAP_PLAINTEXT_MIN_BYTES &&
                       o->size <= KMS_WRAP_PLAINTEXT_MAX_BYTES
                   ? 0
                   : -1;
    case OPT_URL:
        o->url = arg;
        return 0;
    case OPT_CERT:
        o->cert = arg;
        return 0;
    case OPT_KEY:
        o->key = arg;
        return 0;
    case OPT_CACERT:
        o->cacert = arg;
        return 0;
    case OPT_ADMIN_CERT:
        o->admin_cert = arg;
        return 0;
    case OPT_ADMIN_KEY:
        o->admin_key = arg;
        return 0;
    case OPT_CONNECTIONS:
        return parse_conns(arg, o);
    case OPT_SERVER_PID:
        o->server_pid = strtol(arg, &end, 10);
        return *end == '\0' && o->server_pid > 0 ? 0 : -1;
    case OPT_RATE:
        o->rate = strtod(arg, &end);
        return *end == '\0' && o->rate > 0 && o->rate <= 1e7 ? 0 : -1;
    case OPT_OPS:
        o->ops = arg;
        return *arg != '\0' ? 0 : -1;
    case OPT_CLIENT_THREADS:
        return parse_count(arg, 1024, &o->client_threads);
    case OPT_ROUNDS:
        return parse_count(arg, KMS_BENCH_ROUNDS_MAX, &o->rounds);
    case OPT_BACKGROUND_BATCH:
        return parse_count(arg, 64, &o->background_batch);
    case OPT_JSON:
        o->json = true;
        return 0;
    default:
        return -1;
    }
}

int main(int argc, char **argv)
{
    ssize_t self_len = readlink("/proc/self/exe", bench_self, sizeof(bench_self) - 1);
    if (self_len <= 0) {
        fprintf(stderr, "kms-bench: cannot resolve /proc/self/exe\n");
        return 70;
    }
    bench_self[self_len] = '\0';
    /* A worker that dies must not take the parent with it when it writes
     * "go" to its pipe: EPIPE is handled where it happens. */
    (void)signal(SIGPIPE, SIG_IGN);
    /* The benchmark handles PINs and plaintext DEKs like the service does:
     * no core dumps. */
    kms_result r = kms_process_harden();
    if (!kms_is_ok(r)) {
        kms_bench_fail("process hardening", r);
        return kms_error_exit_code(r.err);
    }
    if (argc >= 2 && strcmp(argv[1], "core-worker") == 0) {
        return kms_bench_core_worker(argc - 2, argv + 2);
    }
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(bench_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? KMS_BENCH_EXIT_USAGE : 0;
    }
    const char *mode = argv[1];
    if (strcmp(mode, "core") != 0 && strcmp(mode, "http") != 0 && strcmp(mode, "audit") != 0) {
        fprintf(stderr, "kms-bench: unknown mode '%s' (core, http or audit); see --help\n", mode);
        return KMS_BENCH_EXIT_USAGE;
    }
    kms_bench_opts o = {.seconds = BENCH_DEFAULT_SECONDS, .size = BENCH_DEFAULT_SIZE};
    o.n_conns = 4;
    o.conns[0] = 1;
    o.conns[1] = 4;
    o.conns[2] = 16;
    o.conns[3] = 64;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            fputs(bench_help, stdout);
            return 0;
        }
        size_t j = 0;
        while (j < KMS_ARRAY_LEN(bench_options) && strcmp(argv[i], bench_options[j].name) != 0) {
            j++;
        }
        if (j == KMS_ARRAY_LEN(bench_options)) {
            fprintf(stderr, "kms-bench: unknown option '%s'; see --help\n", argv[i]);
            return KMS_BENCH_EXIT_USAGE;
        }
        const char *arg = NULL;
        if (bench_options[j].has_arg) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kms-bench: %s needs a value\n", argv[i]);
                return KMS_BENCH_EXIT_USAGE;
            }
            arg = argv[++i];
        }
        if (parse_option(&o, bench_options[j].id, arg) != 0) {
            fprintf(stderr, "kms-bench: invalid value for %s: '%s'\n", bench_options[j].name,
                    arg ? arg : "");
            return KMS_BENCH_EXIT_USAGE;
        }
    }
    if (strcmp(mode, "audit") == 0) {
        return kms_bench_audit(&o);
    }
    return strcmp(mode, "core") == 0 ? kms_bench_core(&o) : kms_bench_http(&o);
}
