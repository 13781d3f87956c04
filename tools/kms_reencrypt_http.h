/*
 * kms-reencrypt's client of kmsd: one libcurl easy handle per worker (so
 * each worker keeps its own TLS connection alive across batches), mTLS with
 * the migrator role's certificate, TLS 1.2 or later, https only.
 *
 * Transient failures are retried here, with exponential back-off that
 * honours the server's Retry-After: kmsd unreachable (restarting), any 503,
 * and a batch whose items failed with a transient error (kms_error.c
 * "transient" column, e.g. hsm_unavailable). A batch is retried whole: no
 * result of it has been written anywhere yet, so repeating it is harmless.
 * After retry_max_s seconds of continuous failure the call gives up with
 * KMS_ERR_UNAVAILABLE.
 */
#ifndef KMS_REENCRYPT_HTTP_H
#define KMS_REENCRYPT_HTTP_H

#include "kms_result.h"

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *url; /* https://host:port, no trailing slash */
    const char *cert;
    const char *key;
    const char *cacert;
    long timeout_s;
    double retry_max_s;
} rx_http_conf;

typedef struct rx_http rx_http;

/* One item of a batch answer. token is the text form (NUL-terminated) of
 * a rewrap's new token, NULL for other operations. */
typedef struct {
    kms_err err;
    char code[48]; /* the API error code when err != KMS_OK */
    char *token;
    uint32_t version;
    bool changed;
} rx_item;

/* The stop flag (set by SIGINT/SIGTERM) cuts back-off short. */
KMS_RESULT rx_http_new(const rx_http_conf *conf, volatile sig_atomic_t *stop, rx_http **out);
void rx_http_free(rx_http *h);

/* GET /v1/keys/{name}: the primary version and whether it is an
 * encryption key. */
KMS_RESULT rx_http_key_primary(rx_http *h, const char *key, uint32_t *primary, bool *encrypt);

/* POST /v1/keys/{key}/batch/{op} with {"items":[{"ciphertext":t}...]};
 * op is "rewrap" or "decrypt". res[i] receives item i (free with
 * rx_items_free). Plaintext in a decrypt answer is wiped, never kept. */
KMS_RESULT rx_http_batch(rx_http *h, const char *key, const char *op, char *const *tokens, size_t n,
                         rx_item *res);
void rx_items_free(rx_item *res, size_t n);

/* Counters for the summary: requests sent, retries after back-off. */
void rx_http_stats(const rx_http *h, uint64_t *requests, uint64_t *retries);

/* The message of the last failure of this handle (for people). */
const char *rx_http_last_error(const rx_http *h);

/* Sleeps up to s seconds, waking early when *stop is set. */
void rx_sleep(double s, volatile sig_atomic_t *stop);
double rx_now(void);

/* A jansson allocator that wipes every block it frees (responses of
 * decrypt carry plaintext). Call once before any thread starts. */
void rx_json_alloc_init(void);

#endif /* KMS_REENCRYPT_HTTP_H */
