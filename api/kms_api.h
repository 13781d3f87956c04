/*
 * api/: the HTTPS server of kmsd (libmicrohttpd over GnuTLS, client
 * certificates verified with OpenSSL), its configuration file and its
 * authorization policy. docs/api.md and docs/config.md describe what this
 * layer accepts; docs/openapi.yaml is the route reference.
 */
#ifndef KMS_API_H
#define KMS_API_H

#include "kms_result.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- configuration file (docs/config.md) ---- */

#define KMS_CONFIG_LISTEN_MAX  8
#define KMS_CONFIG_WORKERS_MAX 256 /* workers = threads:N or processes:N */
#define KMS_CONFIG_LINE_BYTES  4096
#define KMS_CONFIG_FILE_BYTES  (256 * 1024)
#define KMS_CONFIG_PATH_BYTES  4096

typedef enum {
    KMS_WORKERS_THREADS = 1,   /* one process, a libmicrohttpd thread pool */
    KMS_WORKERS_PROCESSES = 2, /* N processes sharing the listening sockets */
} kms_workers_mode;

typedef enum {
    KMS_LOG_ERROR = 0,
    KMS_LOG_WARN = 1,
    KMS_LOG_INFO = 2,
    KMS_LOG_DEBUG = 3,
} kms_log_level;

typedef struct {
    char host[64]; /* numeric address: 127.0.0.1, ::1 */
    uint16_t port;
} kms_listen_addr;

typedef struct {
    kms_listen_addr listen[KMS_CONFIG_LISTEN_MAX];
    size_t listen_count;

    char tls_cert[KMS_CONFIG_PATH_BYTES];
    char tls_key[KMS_CONFIG_PATH_BYTES];
    char tls_ca[KMS_CONFIG_PATH_BYTES];
    char tls_crl[KMS_CONFIG_PATH_BYTES]; /* "" = no CRL */
    char policy[KMS_CONFIG_PATH_BYTES];

    char store_path[KMS_CONFIG_PATH_BYTES];
    size_t store_map_size_initial;
    size_t store_map_size_max;

    char hsm_module[KMS_CONFIG_PATH_BYTES];
    char hsm_token_uri[1024];
    char hsm_pin_file[KMS_CONFIG_PATH_BYTES];
    char hsm_pin_env[128];
    unsigned hsm_pool_size;
    size_t hsm_cache_capacity;

    kms_workers_mode workers_mode;
    unsigned workers;         /* threads or processes */
    unsigned process_threads; /* threads in each process (processes mode) */
    /* A server thread held in one request this long lets the next one
     * accept connections; 0: every server thread accepts from the start. */
    unsigned thread_spill_ms;

    size_t max_body_bytes;
    size_t max_batch_items;
    unsigned connection_timeout_s;
    unsigned connection_limit;
    unsigned per_ip_connection_limit;
    unsigned ready_timeout_ms;
    unsigned drain_timeout_s;

    int64_t rotation_period_s; /* default for new keys; 0 = kms default */
    int64_t warning_window_s;
    unsigned scheduler_interval_s; /* 0 = no scheduled rotation */
    int64_t scheduler_jitter_s;    /* spread of due keys before their due time; 0 = none */

    kms_log_level log_level;

    /* The audit trail (docs/audit.md). audit = 0 ("off") is for benchmarks
     * only. */
    unsigned audit;                /* 1 on (default), 0 off */
    unsigned audit_sign_every;     /* records; 0 = 10000 */
    int64_t audit_sign_interval_s; /* 0 = 300 */
    int64_t audit_retention_s;     /* 0 = keep for ever */
} kms_daemon_config;

/* Defaults for every option (docs/config.md lists them). */
/* The CPUs this process may run on (its affinity mask), 1 to
 * KMS_CONFIG_WORKERS_MAX: what `workers = processes:auto` means. */
unsigned kms_config_cpus(void);
void kms_config_defaults(kms_daemon_config *cfg);
/* Parses `key = value` lines; `#` starts a comment. name is used in error
 * messages ("name:line: what is wrong"), raised as KMS_ERR_CONFIG. */
KMS_RESULT kms_config_parse(const char *text, size_t len, const char *name, kms_daemon_config *cfg);
/* Reads and parses a file (at most KMS_CONFIG_FILE_BYTES), then checks that
 * the required options are present. */
KMS_RESULT kms_config_load(const char *path, kms_daemon_config *cfg);
/* Checks that the options needed to run are present and consistent. */
KMS_RESULT kms_config_validate(const kms_daemon_config *cfg, const char *name);

/* ---- authorization policy (docs/config.md, "Policy file") ---- */

typedef enum {
    KMS_ROLE_APP = 1u << 0,
    KMS_ROLE_MIGRATOR = 1u << 1,
    KMS_ROLE_ADMIN = 1u << 2,
    KMS_ROLE_AUDITOR = 1u << 3,
} kms_role;

#define KMS_POLICY_FILE_BYTES    (1024 * 1024)
#define KMS_POLICY_RULES_MAX     4096
#define KMS_POLICY_KEYS_MAX      256
#define KMS_POLICY_PATTERN_BYTES 256

typedef struct kms_policy kms_policy;

KMS_RESULT kms_policy_parse(const char *text, size_t len, const char *name, kms_policy **out);
KMS_RESULT kms_policy_load(const char *path, kms_policy **out);
void kms_policy_free(kms_policy *p);
size_t kms_policy_rule_count(const kms_policy *p);
/* Roles the identity holds on key (bitmask of kms_role). key == NULL asks
 * for roles held on any key (service-wide routes: master, rotations,
 * metrics, check). Deny by default: no matching rule, no role. */
unsigned kms_policy_roles(const kms_policy *p, const char *identity, const char *key);
const char *kms_role_name(kms_role r);

/* ---- the server ---- */

typedef struct kms kms;
typedef struct kms_api_server kms_api_server;

/* Process-wide set-up: jansson allocates through a wiping allocator. Call
 * once before any thread starts. */
void kms_api_global_init(void);

/* Processes mode: call in the supervisor before forking the workers, so
 * that their HTTP request counters and latency histograms are one set, and
 * each worker's HSM and audit counters sit in a slot that /metrics adds up
 * whichever worker answers the scrape. */
KMS_RESULT kms_api_metrics_share(void);
/* In worker idx (below KMS_CONFIG_WORKERS_MAX), after the fork: where it
 * counts its HSM and audit work (kms_hsm_config.counters,
 * kms_audit_config.counters). A restarted worker gets its slot back and
 * counts on from there. Without a shared mapping (threads mode), the
 * process's own slot, whatever idx. */
struct kms_hsm_counters;
struct kms_audit_counters;
void kms_api_metrics_slot(size_t idx, struct kms_hsm_counters **hsm,
                          struct kms_audit_counters **audit);

/* --check-config: loads the server certificate and key (and checks they
 * belong together), the CA and the CRL, then drops them. */
KMS_RESULT kms_api_tls_check(const kms_daemon_config *cfg);

/* Binds the configured listen addresses (before fork in processes mode).
 * fds receives copies * cfg->listen_count sockets, copy by copy: one copy
 * per worker process. With copies > 1 every socket of an address is bound
 * with SO_REUSEPORT, so that the kernel shares new connections out among
 * the workers (docs/architecture.md, "Threads and processes"). */
KMS_RESULT kms_api_listen(const kms_daemon_config *cfg, size_t copies, int *fds, size_t *n);

/* Starts serving on already-bound sockets: loads the server certificate,
 * the CA, the CRL and the policy. threads: libmicrohttpd thread pool size.
 * On success the server owns the sockets and closes them when it stops. */
KMS_RESULT kms_api_server_start(const kms_daemon_config *cfg, kms *k, const int *fds, size_t n,
                                unsigned threads, kms_api_server **out);
/* SIGHUP: reloads the policy, the server certificate and key, and the CRL.
 * Each part that fails to load keeps its previous version; the error says
 * which. */
KMS_RESULT kms_api_server_reload(kms_api_server *s);
/* SIGTERM: stops accepting, waits (at most drain_timeout_s) until no
 * request is in flight, then stops. */
void kms_api_server_shutdown(kms_api_server *s);
void kms_api_server_free(kms_api_server *s);

/* Log line to stderr (one write(2) per line, so processes do not interleave). */
void kms_log(kms_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kms_log_set_level(kms_log_level level);

#endif /* KMS_API_H */
