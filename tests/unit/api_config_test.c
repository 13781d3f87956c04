/* The kmsd configuration parser: every option, every class of error, and
 * error messages that name file:line. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "kms_api.h"

#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

static kms_result parse(const char *text, kms_daemon_config *cfg)
{
    kms_config_defaults(cfg);
    return kms_config_parse(text, strlen(text), "t.conf", cfg);
}

static void expect_error(const char *text, const char *detail_part)
{
    kms_daemon_config cfg;
    kms_result r = parse(text, &cfg);
    assert_int_equal(r.err, KMS_ERR_CONFIG);
    if (strstr(kms_error_detail(), detail_part) == NULL) {
        fail_msg("detail '%s' lacks '%s'", kms_error_detail(), detail_part);
    }
}

static void test_full_config(void **state)
{
    (void)state;
    const char *text = "# kmsd\n"
                       "listen = 127.0.0.1:9443\n"
                       "listen = [::1]:9443   # also IPv6\n"
                       "tls_cert = /etc/kmsd/server.crt\n"
                       "tls_key=/etc/kmsd/server.key\n"
                       "tls_ca = /etc/kmsd/ca.crt\n"
                       "tls_crl = /etc/kmsd/crl.pem\n"
                       "policy = /etc/kmsd/policy.json\n"
                       "store_path = /var/lib/kmsd\n"
                       "store_map_size_initial = 16M\n"
                       "store_map_size_max = 2G\n"
                       "hsm_module = /usr/lib/softhsm/libsofthsm2.so\n"
                       "hsm_token_uri = pkcs11:token=kmsd\n"
                       "hsm_pin_file = /etc/kmsd/pin\n"
                       "hsm_pool_size = 8\n"
                       "hsm_cache_capacity = 10000\n"
                       "workers = threads:16\n"
                       "thread_spill_ms = 0\n"
                       "max_body_bytes = 512K\n"
                       "max_batch_items = 500\n"
                       "connection_timeout = 2m\n"
                       "connection_limit = 100\n"
                       "per_ip_connection_limit = 10\n"
                       "ready_timeout_ms = 500\n"
                       "drain_timeout = 10\n"
                       "rotation_period = 30d\n"
                       "warning_window = 2d\n"
                       "scheduler_interval = 0\n"
                       "log_level = debug\n";
    kms_daemon_config cfg;
    assert_true(kms_is_ok(parse(text, &cfg)));
    assert_true(kms_is_ok(kms_config_validate(&cfg, "t.conf")));
    assert_int_equal(cfg.listen_count, 2);
    assert_string_equal(cfg.listen[0].host, "127.0.0.1");
    assert_int_equal(cfg.listen[0].port, 9443);
    assert_string_equal(cfg.listen[1].host, "::1");
    assert_string_equal(cfg.tls_key, "/etc/kmsd/server.key");
    assert_int_equal(cfg.store_map_size_initial, 16u << 20);
    assert_int_equal(cfg.store_map_size_max, (size_t)2 << 30);
    assert_int_equal(cfg.hsm_pool_size, 8);
    assert_int_equal(cfg.workers_mode, KMS_WORKERS_THREADS);
    assert_int_equal(cfg.workers, 16);
    assert_int_equal(cfg.thread_spill_ms, 0);
    assert_int_equal(cfg.max_body_bytes, 512 * 1024);
    assert_int_equal(cfg.connection_timeout_s, 120);
    assert_int_equal(cfg.rotation_period_s, 30 * 86400);
    assert_int_equal(cfg.scheduler_interval_s, 0);
    assert_int_equal(cfg.log_level, KMS_LOG_DEBUG);
}

static void test_defaults(void **state)
{
    (void)state;
    kms_daemon_config cfg;
    assert_true(kms_is_ok(parse("\n\n# only comments\n   \n", &cfg)));
    assert_int_equal(cfg.listen_count, 1);
    assert_string_equal(cfg.listen[0].host, "127.0.0.1");
    assert_int_equal(cfg.listen[0].port, 8443);
    assert_int_equal(cfg.max_body_bytes, 1024 * 1024);
    assert_int_equal(cfg.max_batch_items, 1000);
    assert_int_equal(cfg.connection_timeout_s, 30);
    assert_int_equal(cfg.process_threads, 4);
    assert_int_equal(cfg.thread_spill_ms, 100);
    /* Required options are missing. */
    assert_int_equal(kms_config_validate(&cfg, "t.conf").err, KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), "required option 'tls_cert'"));
}

static void test_errors(void **state)
{
    (void)state;
    expect_error("listen = 127.0.0.1:8443\nbogus = 1\n", "t.conf:2: unknown option 'bogus'");
    expect_error("no equals sign\n", "t.conf:1: expected 'option = value'");
    expect_error("workers = threads\n", "t.conf:1: workers");
    expect_error("workers = forks:2\n", "t.conf:1: workers");
    expect_error("workers = threads:0\n", "t.conf:1: workers");
    expect_error("workers = processes:autox\n", "t.conf:1: workers: N must be 1..256 or auto");
    expect_error("workers = processes:\n", "t.conf:1: workers");
    expect_error("max_batch_items = 1001\n", "t.conf:1: max_batch_items: must be between");
    expect_error("thread_spill_ms = 60001\n", "t.conf:1: thread_spill_ms: must be between");
    expect_error("max_body_bytes = -5\n", "t.conf:1: max_body_bytes");
    expect_error("max_body_bytes = 5X\n", "t.conf:1: max_body_bytes");
    expect_error("hsm_pool_size = 99999999999999999999999\n", "t.conf:1: hsm_pool_size");
    expect_error("listen = localhost\n", "t.conf:1: listen");
    expect_error("listen = ::1:8443\n", "t.conf:1: listen");
    expect_error("listen = 127.0.0.1:70000\n", "t.conf:1: listen");
    expect_error("listen = [::1]8443\n", "t.conf:1: listen");
    expect_error("log_level = loud\n", "t.conf:1: log_level");
    expect_error("tls_cert =\n", "t.conf:1: tls_cert: empty value");
    expect_error("\n\n\nconnection_timeout = 1w\n", "t.conf:4: connection_timeout");
}

/* auto: one per CPU the process may run on, counted here independently of
 * the parser, and narrowed by the affinity mask as taskset would. */
static void test_workers_auto(void **state)
{
    (void)state;
    cpu_set_t all;
    assert_int_equal(sched_getaffinity(0, sizeof(all), &all), 0);
    kms_daemon_config cfg;
    assert_int_equal(parse("workers = processes:auto\n", &cfg).err, KMS_OK);
    assert_int_equal(cfg.workers_mode, KMS_WORKERS_PROCESSES);
    assert_int_equal(cfg.workers, CPU_COUNT(&all));
    assert_int_equal(parse("workers = threads:auto\n", &cfg).err, KMS_OK);
    assert_int_equal(cfg.workers_mode, KMS_WORKERS_THREADS);
    assert_int_equal(cfg.workers, CPU_COUNT(&all));
    /* One CPU of the mask: auto follows it. */
    int first = -1;
    for (int c = 0; c < CPU_SETSIZE && first < 0; c++) {
        if (CPU_ISSET(c, &all)) {
            first = c;
        }
    }
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    assert_int_equal(sched_setaffinity(0, sizeof(one), &one), 0);
    kms_result r = parse("workers = processes:auto\n", &cfg);
    assert_int_equal(sched_setaffinity(0, sizeof(all), &all), 0);
    assert_int_equal(r.err, KMS_OK);
    assert_int_equal(cfg.workers, 1);
}

static void test_validate(void **state)
{
    (void)state;
    const char *base = "tls_cert = a\ntls_key = b\ntls_ca = c\npolicy = d\nstore_path = e\n"
                       "hsm_module = f\nhsm_token_uri = pkcs11:token=x\n";
    char text[1024];
    kms_daemon_config cfg;
    snprintf(text, sizeof(text), "%s", base);
    assert_true(kms_is_ok(parse(text, &cfg)));
    assert_int_equal(kms_config_validate(&cfg, "t.conf").err, KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), "exactly one of hsm_pin_file and hsm_pin_env"));
    snprintf(text, sizeof(text), "%shsm_pin_file = p\nhsm_pin_env = P\n", base);
    assert_true(kms_is_ok(parse(text, &cfg)));
    assert_int_equal(kms_config_validate(&cfg, "t.conf").err, KMS_ERR_CONFIG);
    snprintf(text, sizeof(text), "%shsm_pin_env = KMSD_PIN\n", base);
    assert_true(kms_is_ok(parse(text, &cfg)));
    assert_true(kms_is_ok(kms_config_validate(&cfg, "t.conf")));
    snprintf(text, sizeof(text),
             "%shsm_pin_env = KMSD_PIN\nconnection_limit = 5\nper_ip_connection_limit = 6\n", base);
    assert_true(kms_is_ok(parse(text, &cfg)));
    assert_int_equal(kms_config_validate(&cfg, "t.conf").err, KMS_ERR_CONFIG);
}

/* The audit options (docs/audit.md): on by default; off only when asked. */
static void test_audit_options(void **state)
{
    (void)state;
    kms_daemon_config cfg;
    assert_true(kms_is_ok(parse("", &cfg)));
    assert_int_equal(cfg.audit, 1);
    assert_int_equal(cfg.audit_retention_s, 0);
    assert_true(kms_is_ok(parse("audit = off\naudit_sign_every = 500\n"
                                "audit_sign_interval = 2m\naudit_retention = 2555d\n",
                                &cfg)));
    assert_int_equal(cfg.audit, 0);
    assert_int_equal(cfg.audit_sign_every, 500);
    assert_int_equal(cfg.audit_sign_interval_s, 120);
    assert_int_equal(cfg.audit_retention_s, 2555 * 86400);
    assert_true(kms_is_ok(parse("audit = on\n", &cfg)));
    assert_int_equal(cfg.audit, 1);
    expect_error("audit = maybe\n", "t.conf:1: audit: expected on or off");
    expect_error("audit = 0\n", "t.conf:1: audit: expected on or off");
    expect_error("audit_sign_every = 0\n", "t.conf:1: audit_sign_every: must be between");
}

static void test_scheduler_options(void **state)
{
    (void)state;
    kms_daemon_config cfg;
    assert_true(kms_is_ok(parse("scheduler_interval = 30\n", &cfg)));
    assert_int_equal(cfg.scheduler_jitter_s, 3600); /* default: one hour */
    assert_true(kms_is_ok(parse("scheduler_interval = 1m\nscheduler_jitter = 2h\n", &cfg)));
    assert_int_equal(cfg.scheduler_interval_s, 60);
    assert_int_equal(cfg.scheduler_jitter_s, 7200);
    assert_true(kms_is_ok(parse("scheduler_jitter = 0\n", &cfg)));
    assert_int_equal(cfg.scheduler_jitter_s, 0);
    expect_error("scheduler_jitter = 8d\n", "scheduler_jitter: must be between 0 and 604800");
    expect_error("scheduler_jitter = -1\n", "scheduler_jitter: expected seconds");
}

static void test_load_missing_file(void **state)
{
    (void)state;
    kms_daemon_config cfg;
    assert_int_equal(kms_config_load("/nonexistent/kmsd.conf", &cfg).err, KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), "/nonexistent/kmsd.conf"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_config),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_workers_auto),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_audit_options),
        cmocka_unit_test(test_load_missing_file),
        cmocka_unit_test(test_scheduler_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
