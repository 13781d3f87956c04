/*
 * The kmsd configuration file: `key = value` lines, `#` comments, blank
 * lines. Every option is documented in docs/config.md. The parser is fed
 * outside input (an operator's file) and is fuzzed (tests/fuzz/fuzz_config.c):
 * it reads through explicit bounds, never trusts a NUL, and names the line of
 * every error.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "kms_api.h"

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

unsigned kms_config_cpus(void)
{
    cpu_set_t set;
    long n = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        n = CPU_COUNT(&set);
    }
    if (n < 1) {
        n = sysconf(_SC_NPROCESSORS_ONLN);
    }
    if (n < 1) {
        n = 1;
    }
    return n > KMS_CONFIG_WORKERS_MAX ? KMS_CONFIG_WORKERS_MAX : (unsigned)n;
}

void kms_config_defaults(kms_daemon_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->hsm_pool_size = 4;
    cfg->hsm_cache_capacity = 4096;
    cfg->workers_mode = KMS_WORKERS_PROCESSES;
    cfg->workers = 2;
    cfg->process_threads = 4;
    cfg->thread_spill_ms = 100;
    cfg->max_body_bytes = 1024 * 1024;
    cfg->max_batch_items = 1000;
    cfg->connection_timeout_s = 30;
    cfg->connection_limit = 1024;
    cfg->per_ip_connection_limit = 256;
    cfg->ready_timeout_ms = 2000;
    cfg->drain_timeout_s = 30;
    cfg->scheduler_interval_s = 60;
    cfg->scheduler_jitter_s = 3600;
    cfg->audit = 1;
    cfg->log_level = KMS_LOG_INFO;
    cfg->listen_count = 1;
    memcpy(cfg->listen[0].host, "127.0.0.1", sizeof("127.0.0.1"));
    cfg->listen[0].port = 8443;
}

typedef enum {
    OPT_STRING,
    OPT_LISTEN,
    OPT_SIZE,     /* bytes, optional K/M/G suffix (powers of 1024) */
    OPT_UINT,     /* unsigned count */
    OPT_DURATION, /* seconds, optional s/m/h/d suffix */
    OPT_WORKERS,
    OPT_LOG_LEVEL,
    OPT_ONOFF, /* on | off -> 1 | 0 */
} opt_type;

typedef struct {
    const char *name;
    opt_type type;
    size_t offset;
    size_t size; /* string capacity or integer width */
    uint64_t min, max;
} opt_spec;

#define OPT(n, t, field, lo, hi)                                                                  \
    {                                                                                             \
        n, t, offsetof(kms_daemon_config, field), sizeof(((kms_daemon_config *)0)->field), lo, hi \
    }

static const opt_spec opts[] = {
    OPT("listen", OPT_LISTEN, listen, 0, 0),
    OPT("tls_cert", OPT_STRING, tls_cert, 0, 0),
    OPT("tls_key", OPT_STRING, tls_key, 0, 0),
    OPT("tls_ca", OPT_STRING, tls_ca, 0, 0),
    OPT("tls_crl", OPT_STRING, tls_crl, 0, 0),
    OPT("policy", OPT_STRING, policy, 0, 0),
    OPT("store_path", OPT_STRING, store_path, 0, 0),
    OPT("store_map_size_initial", OPT_SIZE, store_map_size_initial, 1u << 20, UINT64_C(1) << 40),
    OPT("store_map_size_max", OPT_SIZE, store_map_size_max, 1u << 20, UINT64_C(1) << 44),
    OPT("hsm_module", OPT_STRING, hsm_module, 0, 0),
    OPT("hsm_token_uri", OPT_STRING, hsm_token_uri, 0, 0),
    OPT("hsm_pin_file", OPT_STRING, hsm_pin_file, 0, 0),
    OPT("hsm_pin_env", OPT_STRING, hsm_pin_env, 0, 0),
    OPT("hsm_pool_size", OPT_UINT, hsm_pool_size, 1, 256),
    OPT("hsm_cache_capacity", OPT_UINT, hsm_cache_capacity, 1, 1u << 24),
    OPT("workers", OPT_WORKERS, workers, 1, KMS_CONFIG_WORKERS_MAX),
    OPT("process_threads", OPT_UINT, process_threads, 1, 256),
    OPT("thread_spill_ms", OPT_UINT, thread_spill_ms, 0, 60000),
    OPT("max_body_bytes", OPT_SIZE, max_body_bytes, 1024, 64u << 20),
    OPT("max_batch_items", OPT_UINT, max_batch_items, 1, 1000),
    OPT("connection_timeout", OPT_DURATION, connection_timeout_s, 1, 3600),
    OPT("connection_limit", OPT_UINT, connection_limit, 1, 65536),
    OPT("per_ip_connection_limit", OPT_UINT, per_ip_connection_limit, 1, 65536),
    OPT("ready_timeout_ms", OPT_UINT, ready_timeout_ms, 10, 60000),
    OPT("drain_timeout", OPT_DURATION, drain_timeout_s, 0, 3600),
    OPT("rotation_period", OPT_DURATION, rotation_period_s, 60, UINT64_C(100) * 365 * 86400),
    OPT("warning_window", OPT_DURATION, warning_window_s, 0, UINT64_C(100) * 365 * 86400),
    OPT("scheduler_interval", OPT_DURATION, scheduler_interval_s, 0, 86400),
    OPT("scheduler_jitter", OPT_DURATION, scheduler_jitter_s, 0, 7 * 86400),
    OPT("log_level", OPT_LOG_LEVEL, log_level, 0, 0),
    OPT("audit", OPT_ONOFF, audit, 0, 1),
    OPT("audit_sign_every", OPT_UINT, audit_sign_every, 1, 100000000),
    OPT("audit_sign_interval", OPT_DURATION, audit_sign_interval_s, 1, 86400),
    OPT("audit_retention", OPT_DURATION, audit_retention_s, 0, UINT64_C(100) * 365 * 86400),
};

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

/* Unsigned decimal with an optional one-letter suffix from `suffixes`
 * (each with its multiplier); rejects signs, overflow and trailing junk. */
static bool parse_scaled(const char *s, size_t n, const char *suffixes, const uint64_t *mults,
                         uint64_t *out)
{
    uint64_t v = 0;
    size_t i = 0;
    if (n == 0) {
        return false;
    }
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) {
            return false;
        }
        v = v * 10 + d;
    }
    if (i == 0) {
        return false;
    }
    if (i < n) {
        const char *hit = (i + 1 == n && suffixes != NULL) ? strchr(suffixes, s[i]) : NULL;
        if (hit == NULL || s[i] == '\0') {
            return false;
        }
        uint64_t m = mults[hit - suffixes];
        if (v > UINT64_MAX / m) {
            return false;
        }
        v *= m;
    }
    *out = v;
    return true;
}

static bool store_uint(void *field, size_t width, uint64_t v)
{
    switch (width) {
    case sizeof(uint16_t):
        if (v > UINT16_MAX) {
            return false;
        }
        *(uint16_t *)field = (uint16_t)v;
        return true;
    case sizeof(uint32_t):
        if (v > UINT32_MAX) {
            return false;
        }
        *(uint32_t *)field = (uint32_t)v;
        return true;
    case sizeof(uint64_t):
        if (v > INT64_MAX) {
            return false;
        }
        *(uint64_t *)field = v;
        return true;
    default:
        return false;
    }
}

/* "127.0.0.1:8443", "[::1]:8443". Numeric addresses only: kmsd binds
 * exactly what the operator names, never the result of a name lookup. */
static bool parse_listen(const char *v, size_t n, kms_listen_addr *out)
{
    const char *host = v;
    size_t host_len;
    const char *port;
    if (n > 0 && v[0] == '[') {
        const char *close = memchr(v, ']', n);
        if (close == NULL || (size_t)(close - v) + 1 >= n || close[1] != ':') {
            return false;
        }
        host = v + 1;
        host_len = (size_t)(close - host);
        port = close + 2;
    } else {
        const char *colon = NULL;
        for (size_t i = 0; i < n; i++) {
            if (v[i] == ':') {
                if (colon != NULL) {
                    return false; /* IPv6 must be bracketed */
                }
                colon = v + i;
            }
        }
        if (colon == NULL) {
            return false;
        }
        host_len = (size_t)(colon - v);
        port = colon + 1;
    }
    size_t port_len = (size_t)(v + n - port);
    uint64_t p;
    if (host_len == 0 || host_len >= sizeof(out->host) ||
        !parse_scaled(port, port_len, NULL, NULL, &p) || p == 0 || p > 65535) {
        return false;
    }
    memcpy(out->host, host, host_len);
    out->host[host_len] = '\0';
    if (memchr(out->host, '\0', host_len) != NULL) {
        return false;
    }
    out->port = (uint16_t)p;
    return true;
}

static kms_result set_option(kms_daemon_config *cfg, const opt_spec *o, const char *v, size_t n,
                             const char *name, unsigned line)
{
    void *field = (char *)cfg + o->offset;
    static const uint64_t size_mults[] = {1024, 1024 * 1024, 1024 * 1024 * 1024};
    static const uint64_t dur_mults[] = {1, 60, 3600, 86400};
    uint64_t num = 0;

    switch (o->type) {
    case OPT_STRING:
        KMS_ENSURE_MSG(n > 0, KMS_ERR_CONFIG, "%s:%u: %s: empty value", name, line, o->name);
        KMS_ENSURE_MSG(n < o->size, KMS_ERR_CONFIG, "%s:%u: %s: value longer than %zu bytes", name,
                       line, o->name, o->size - 1);
        KMS_ENSURE_MSG(memchr(v, '\0', n) == NULL, KMS_ERR_CONFIG, "%s:%u: %s: NUL in value", name,
                       line, o->name);
        memcpy(field, v, n);
        ((char *)field)[n] = '\0';
        return KMS_OK_RESULT;
    case OPT_LISTEN:
        KMS_ENSURE_MSG(cfg->listen_count < KMS_CONFIG_LISTEN_MAX, KMS_ERR_CONFIG,
                       "%s:%u: listen: at most %d addresses", name, line, KMS_CONFIG_LISTEN_MAX);
        KMS_ENSURE_MSG(parse_listen(v, n, &cfg->listen[cfg->listen_count]), KMS_ERR_CONFIG,
                       "%s:%u: listen: expected ADDRESS:PORT or [IPV6]:PORT with a numeric "
                       "address",
                       name, line);
        cfg->listen_count++;
        return KMS_OK_RESULT;
    case OPT_WORKERS: {
        /* N, or auto: the CPUs this process may run on (its affinity mask,
         * which taskset and cgroup cpusets narrow), as nginx's
         * worker_processes auto. */
        const char *colon = memchr(v, ':', n);
        KMS_ENSURE_MSG(colon != NULL, KMS_ERR_CONFIG,
                       "%s:%u: workers: expected threads:N or processes:N", name, line);
        size_t kind_len = (size_t)(colon - v);
        if (kind_len == 7 && memcmp(v, "threads", 7) == 0) {
            cfg->workers_mode = KMS_WORKERS_THREADS;
        } else if (kind_len == 9 && memcmp(v, "processes", 9) == 0) {
            cfg->workers_mode = KMS_WORKERS_PROCESSES;
        } else {
            KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s:%u: workers: expected threads:N or processes:N", name,
                         line);
        }
        v = colon + 1;
        n -= kind_len + 1;
        if (n == 4 && memcmp(v, "auto", 4) == 0) {
            cfg->workers = kms_config_cpus();
            return KMS_OK_RESULT;
        }
        KMS_ENSURE_MSG(parse_scaled(v, n, NULL, NULL, &num) && num >= o->min && num <= o->max,
                       KMS_ERR_CONFIG, "%s:%u: workers: N must be %" PRIu64 "..%" PRIu64 " or auto",
                       name, line, o->min, o->max);
        cfg->workers = (unsigned)num;
        return KMS_OK_RESULT;
    }
    case OPT_LOG_LEVEL: {
        static const char *levels[] = {"error", "warn", "info", "debug"};
        for (size_t i = 0; i < KMS_ARRAY_LEN(levels); i++) {
            if (strlen(levels[i]) == n && memcmp(levels[i], v, n) == 0) {
                cfg->log_level = (kms_log_level)i;
                return KMS_OK_RESULT;
            }
        }
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s:%u: log_level: expected error, warn, info or debug", name,
                     line);
    }
    case OPT_SIZE:
        KMS_ENSURE_MSG(parse_scaled(v, n, "KMG", size_mults, &num), KMS_ERR_CONFIG,
                       "%s:%u: %s: expected a byte count (suffix K, M or G allowed)", name, line,
                       o->name);
        break;
    case OPT_DURATION:
        KMS_ENSURE_MSG(parse_scaled(v, n, "smhd", dur_mults, &num), KMS_ERR_CONFIG,
                       "%s:%u: %s: expected seconds (suffix s, m, h or d allowed)", name, line,
                       o->name);
        break;
    case OPT_ONOFF:
        KMS_ENSURE_MSG((n == 2 && memcmp(v, "on", 2) == 0) || (n == 3 && memcmp(v, "off", 3) == 0),
                       KMS_ERR_CONFIG, "%s:%u: %s: expected on or off", name, line, o->name);
        num = n == 2;
        break;
    case OPT_UINT:
        KMS_ENSURE_MSG(parse_scaled(v, n, NULL, NULL, &num), KMS_ERR_CONFIG,
                       "%s:%u: %s: expected a non-negative integer", name, line, o->name);
        break;
    default:
        KMS_BAIL(KMS_ERR_INTERNAL);
    }
    KMS_ENSURE_MSG(num >= o->min && num <= o->max && store_uint(field, o->size, num),
                   KMS_ERR_CONFIG, "%s:%u: %s: must be between %" PRIu64 " and %" PRIu64, name,
                   line, o->name, o->min, o->max);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_config_parse(const char *text, size_t len, const char *name, kms_daemon_config *cfg)
{
    KMS_ENSURE_MSG(len <= KMS_CONFIG_FILE_BYTES, KMS_ERR_CONFIG, "%s: larger than %d bytes", name,
                   KMS_CONFIG_FILE_BYTES);
    bool listen_set = false;
    size_t pos = 0;
    unsigned line = 0;
    while (pos < len) {
        line++;
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl != NULL ? (size_t)(nl - text) : len;
        const char *s = text + pos;
        size_t n = end - pos;
        pos = end + 1;
        KMS_ENSURE_MSG(n < KMS_CONFIG_LINE_BYTES, KMS_ERR_CONFIG, "%s:%u: line too long", name,
                       line);

        /* Strip a comment, then surrounding blanks. '#' inside a value is
         * not allowed: no option needs it, and it keeps the rule simple. */
        const char *hash = memchr(s, '#', n);
        if (hash != NULL) {
            n = (size_t)(hash - s);
        }
        while (n > 0 && is_space(s[0])) {
            s++;
            n--;
        }
        while (n > 0 && is_space(s[n - 1])) {
            n--;
        }
        if (n == 0) {
            continue;
        }
        const char *eq = memchr(s, '=', n);
        KMS_ENSURE_MSG(eq != NULL, KMS_ERR_CONFIG, "%s:%u: expected 'option = value'", name, line);
        size_t klen = (size_t)(eq - s);
        while (klen > 0 && is_space(s[klen - 1])) {
            klen--;
        }
        const char *v = eq + 1;
        size_t vlen = n - (size_t)(v - s);
        while (vlen > 0 && is_space(v[0])) {
            v++;
            vlen--;
        }
        const opt_spec *o = NULL;
        for (size_t i = 0; i < KMS_ARRAY_LEN(opts); i++) {
            if (strlen(opts[i].name) == klen && memcmp(opts[i].name, s, klen) == 0) {
                o = &opts[i];
                break;
            }
        }
        if (o == NULL) {
            char key[64];
            size_t kl = klen < sizeof(key) - 1 ? klen : sizeof(key) - 1;
            for (size_t i = 0; i < kl; i++) {
                /* Echo printable ASCII only: the line may be anything. */
                key[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
            }
            key[kl] = '\0';
            KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s:%u: unknown option '%s'", name, line, key);
        }
        if (o->type == OPT_LISTEN && !listen_set) {
            /* The first listen line replaces the default address. */
            cfg->listen_count = 0;
            listen_set = true;
        }
        KMS_GUARD(set_option(cfg, o, v, vlen, name, line));
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_config_validate(const kms_daemon_config *cfg, const char *name)
{
    static const struct {
        const char *opt;
        size_t off;
    } required[] = {
        {"tls_cert", offsetof(kms_daemon_config, tls_cert)},
        {"tls_key", offsetof(kms_daemon_config, tls_key)},
        {"tls_ca", offsetof(kms_daemon_config, tls_ca)},
        {"policy", offsetof(kms_daemon_config, policy)},
        {"store_path", offsetof(kms_daemon_config, store_path)},
        {"hsm_module", offsetof(kms_daemon_config, hsm_module)},
        {"hsm_token_uri", offsetof(kms_daemon_config, hsm_token_uri)},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(required); i++) {
        const char *v = (const char *)cfg + required[i].off;
        KMS_ENSURE_MSG(v[0] != '\0', KMS_ERR_CONFIG, "%s: required option '%s' is missing", name,
                       required[i].opt);
    }
    KMS_ENSURE_MSG((cfg->hsm_pin_file[0] != '\0') != (cfg->hsm_pin_env[0] != '\0'), KMS_ERR_CONFIG,
                   "%s: set exactly one of hsm_pin_file and hsm_pin_env", name);
    KMS_ENSURE_MSG(cfg->listen_count > 0, KMS_ERR_CONFIG, "%s: no listen address", name);
    KMS_ENSURE_MSG(cfg->store_map_size_max == 0 ||
                       cfg->store_map_size_initial <= cfg->store_map_size_max,
                   KMS_ERR_CONFIG, "%s: store_map_size_initial exceeds store_map_size_max", name);
    KMS_ENSURE_MSG(cfg->per_ip_connection_limit <= cfg->connection_limit, KMS_ERR_CONFIG,
                   "%s: per_ip_connection_limit exceeds connection_limit", name);
    return KMS_OK_RESULT;
}

/* Reads a whole small file with a ceiling. */
static kms_result read_file(const char *path, size_t max, char **out, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    KMS_ENSURE_MSG(fd >= 0, KMS_ERR_CONFIG, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > max) {
        close(fd);
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s: not a regular file of at most %zu bytes", path, max);
    }
    char *buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL) {
        close(fd);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            break;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    *out = buf;
    *len = got;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_config_load(const char *path, kms_daemon_config *cfg)
{
    char *text = NULL;
    size_t len = 0;
    kms_config_defaults(cfg);
    KMS_GUARD(read_file(path, KMS_CONFIG_FILE_BYTES, &text, &len));
    kms_result r = kms_config_parse(text, len, path, cfg);
    free(text);
    KMS_GUARD(r);
    return kms_config_validate(cfg, path);
}

/* Shared with the policy loader. */
KMS_RESULT kms_api_read_file(const char *path, size_t max, char **out, size_t *len);
KMS_RESULT kms_api_read_file(const char *path, size_t max, char **out, size_t *len)
{
    return read_file(path, max, out, len);
}
