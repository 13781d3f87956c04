/*
 * A real kmsd for API tests: a throwaway SoftHSM token (kms_test_hsm.h), an
 * LMDB directory, the development PKI (certs/make-dev-pki), a policy and a
 * config file in one temporary directory; kmsd started as a child process on
 * a free loopback port and stopped by the test. Calls go through libcurl
 * with a client certificate per role.
 */
#ifndef KMS_API_FIXTURE_H
#define KMS_API_FIXTURE_H

#include "kms_test_hsm.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    kms_test_token tok;
    char dir[256];
    char pki[320];
    char conf[320];
    char policy[320];
    char log[320];
    char kmsd[512];
    int port;
    pid_t pid;
    bool fault;    /* token behind the fault-injecting module (kms_fault.h) */
    bool ipv6;     /* kmsd also listens on [::1] */
    bool use_ipv6; /* api_call() goes to [::1] */
} api_fixture;

typedef struct {
    long status; /* 0: no HTTP answer (connection or TLS failure) */
    int curl_code;
    char *body;
    size_t len;
    char request_id[80];
    char retry_after[16];
    json_t *json; /* parsed body, or NULL */
} api_resp;

/* extra_conf: more config lines. Returns 0 when kmsd answers /healthz. */
int api_fixture_start(api_fixture *f, const char *extra_conf);
/* Sends sig and waits (bounded) for the exit; returns the exit status, or
 * -1 if it had to be killed. */
int api_fixture_stop(api_fixture *f, int sig);
void api_fixture_cleanup(api_fixture *f);
/* json NULL: the default test policy. */
int api_fixture_write_policy(api_fixture *f, const char *json);

/* role: "app", "migrator", "admin", "auditor", "foreign", "expired",
 * "revoked", or NULL for no client certificate. content_type NULL means
 * application/json when body != NULL. */
void api_call_ct(api_fixture *f, const char *role, const char *method, const char *path,
                 const char *body, const char *content_type, api_resp *r);
void api_call(api_fixture *f, const char *role, const char *method, const char *path,
              const char *body, api_resp *r);
void api_resp_free(api_resp *r);

#endif
