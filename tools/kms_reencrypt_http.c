/*
 * kms-reencrypt's client of kmsd (see kms_reencrypt_http.h).
 */
#define _GNU_SOURCE
#include "kms_reencrypt_http.h"
#include "kms_curl_cut.h"

#include "kms_buf.h"
#include "kms_error.h"
#include "kms_secmem.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RX_RESPONSE_MAX_BYTES ((size_t)32 * 1024 * 1024)
#define RX_URL_BYTES          1024
#define RX_BACKOFF_FIRST_S    0.2
#define RX_BACKOFF_MAX_S      10.0
/* A Retry-After longer than this is capped: the tool keeps probing. */
#define RX_RETRY_AFTER_MAX_S 60.0

struct rx_http {
    CURL *h;
    struct curl_slist *headers;
    const rx_http_conf *conf;
    volatile sig_atomic_t *stop;
    char errbuf[CURL_ERROR_SIZE];
    kms_buf resp; /* secret: decrypt answers carry plaintext */
    long status;
    double retry_after_s;
    uint64_t requests;
    uint64_t retries;
    char last_error[512];
};

double rx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void rx_sleep(double s, volatile sig_atomic_t *stop)
{
    double end = rx_now() + s;
    for (;;) {
        double left = end - rx_now();
        if (left <= 0 || (stop != NULL && *stop)) {
            return;
        }
        double step = left < 0.1 ? left : 0.1;
        struct timespec ts = {.tv_sec = (time_t)step,
                              .tv_nsec = (long)((step - (double)(time_t)step) * 1e9)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

static void *rx_json_malloc(size_t n)
{
    return malloc(n);
}

static void rx_json_free(void *p)
{
    if (p != NULL) {
        kms_secmem_wipe(p, malloc_usable_size(p));
        free(p);
    }
}

void rx_json_alloc_init(void)
{
    json_set_alloc_funcs(rx_json_malloc, rx_json_free);
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *arg)
{
    rx_http *c = arg;
    size_t n = size * nmemb;
    /* Returning less than n makes libcurl fail with CURLE_WRITE_ERROR. */
    return kms_is_ok(kms_buf_append(&c->resp, p, n)) ? n : 0;
}

/* Retry-After (RFC 9110 section 10.2.3) as delay-seconds; the HTTP-date
 * form is not sent by kmsd and is ignored (the back-off applies). */
static size_t on_header(char *p, size_t size, size_t nmemb, void *arg)
{
    rx_http *c = arg;
    size_t n = size * nmemb;
    static const char name[] = "retry-after:";
    if (n > sizeof(name) - 1 && strncasecmp(p, name, sizeof(name) - 1) == 0) {
        char tmp[32];
        size_t m = n - (sizeof(name) - 1);
        if (m >= sizeof(tmp)) {
            m = sizeof(tmp) - 1;
        }
        memcpy(tmp, p + sizeof(name) - 1, m);
        tmp[m] = '\0';
        char *end = NULL;
        long v = strtol(tmp, &end, 10);
        if (end != tmp && v >= 0) {
            c->retry_after_s = (double)v < RX_RETRY_AFTER_MAX_S ? (double)v : RX_RETRY_AFTER_MAX_S;
        }
    }
    return n;
}

KMS_RESULT rx_http_new(const rx_http_conf *conf, volatile sig_atomic_t *stop, rx_http **out)
{
    rx_http *c = calloc(1, sizeof(*c));
    KMS_ENSURE(c != NULL, KMS_ERR_NO_MEMORY);
    *out = c;
    c->conf = conf;
    c->stop = stop;
    kms_buf_init_secret(&c->resp, RX_RESPONSE_MAX_BYTES);
    c->h = curl_easy_init();
    KMS_ENSURE(c->h != NULL, KMS_ERR_NO_MEMORY);
    static const char *const hdrs[] = {"Accept: application/json", "Content-Type: application/json",
                                       /* no 100-continue round trip */ "Expect:"};
    for (size_t i = 0; i < KMS_ARRAY_LEN(hdrs); i++) {
        struct curl_slist *n = curl_slist_append(c->headers, hdrs[i]);
        KMS_ENSURE(n != NULL, KMS_ERR_NO_MEMORY);
        c->headers = n;
    }
    CURL *h = c->h;
    bool ok = curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https") == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_TIMEOUT, conf->timeout_s) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_WRITEDATA, c) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_HEADERDATA, c) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->headers) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_USERAGENT, "kms-reencrypt/0.1") == CURLE_OK;
    KMS_ENSURE(ok, KMS_ERR_INTERNAL);
    if (conf->cacert != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_CAINFO, conf->cacert) == CURLE_OK, KMS_ERR_INTERNAL);
    }
    if (conf->cert != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_SSLCERT, conf->cert) == CURLE_OK, KMS_ERR_INTERNAL);
    }
    if (conf->key != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_SSLKEY, conf->key) == CURLE_OK, KMS_ERR_INTERNAL);
    }
    return KMS_OK_RESULT;
}

void rx_http_free(rx_http *c)
{
    if (c == NULL) {
        return;
    }
    if (c->h != NULL) {
        curl_easy_cleanup(c->h);
    }
    curl_slist_free_all(c->headers);
    kms_buf_free(&c->resp);
    free(c);
}

void rx_http_stats(const rx_http *c, uint64_t *requests, uint64_t *retries)
{
    *requests = c->requests;
    *retries = c->retries;
}

const char *rx_http_last_error(const rx_http *c)
{
    return c->last_error;
}

typedef enum {
    RX_SENT,      /* an answer arrived; c->status holds its status */
    RX_TRANSIENT, /* kmsd unreachable or the connection broke: retry */
} rx_send;

/* Transport failures that a restarting kmsd produces are transient; TLS
 * and configuration failures are not (retrying cannot fix a wrong
 * certificate). */
static bool curl_transient(CURLcode rc, const char *detail)
{
    switch (rc) {
    case CURLE_SSL_CONNECT_ERROR:
        /* A handshake cut by a server going down, coming up or at its
         * connection limit is transient; a refused certificate is not. */
        return kms_curl_handshake_cut(detail);
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE:
        return true;
    default:
        return false;
    }
}

static kms_err curl_error(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST:
        return KMS_ERR_UNAVAILABLE;
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CLIENTCERT:
    case CURLE_SSL_CONNECT_ERROR:
        return KMS_ERR_UNAUTHENTICATED;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
        return KMS_ERR_INVALID_ARGUMENT;
    case CURLE_WRITE_ERROR:
        return KMS_ERR_LIMIT_EXCEEDED;
    default:
        return KMS_ERR_INTERNAL;
    }
}

static kms_result send_once(rx_http *c, const char *url, const kms_buf *body, rx_send *how)
{
    kms_buf_reset(&c->resp);
    c->errbuf[0] = '\0';
    c->status = 0;
    c->retry_after_s = -1;
    CURL *h = c->h;
    bool ok = curl_easy_setopt(h, CURLOPT_URL, url) == CURLE_OK;
    if (body == NULL) {
        ok = ok && curl_easy_setopt(h, CURLOPT_HTTPGET, 1L) == CURLE_OK;
    } else {
        ok = ok && curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)body->len) == CURLE_OK &&
             curl_easy_setopt(h, CURLOPT_POSTFIELDS, (const char *)body->data) == CURLE_OK;
    }
    KMS_ENSURE(ok, KMS_ERR_INTERNAL);
    c->requests++;
    CURLcode rc = curl_easy_perform(h);
    if (rc != CURLE_OK) {
        snprintf(c->last_error, sizeof(c->last_error), "kmsd at %s: %s", c->conf->url,
                 c->errbuf[0] != '\0' ? c->errbuf : curl_easy_strerror(rc));
        if (curl_transient(rc, c->errbuf)) {
            *how = RX_TRANSIENT;
            return KMS_OK_RESULT;
        }
        KMS_BAIL_MSG(curl_error(rc), "%s", c->last_error);
    }
    KMS_ENSURE(curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &c->status) == CURLE_OK,
               KMS_ERR_INTERNAL);
    *how = c->status == 503 ? RX_TRANSIENT : RX_SENT;
    if (c->status == 503) {
        snprintf(c->last_error, sizeof(c->last_error), "kmsd answered 503 (unavailable)");
    }
    return KMS_OK_RESULT;
}

/* A non-2xx answer as an error: the API's error code names the kms_err. */
static kms_result answer_error(rx_http *c)
{
    json_error_t jerr;
    json_t *doc = json_loadb((const char *)c->resp.data, c->resp.len, 0, &jerr);
    json_t *e = json_object_get(doc, "error");
    const char *code = json_string_value(json_object_get(e, "code"));
    const char *msg = json_string_value(json_object_get(e, "message"));
    kms_err err = code != NULL ? kms_error_from_code(code) : KMS_ERR_INTERNAL;
    snprintf(c->last_error, sizeof(c->last_error), "kmsd answered %ld %s: %s", c->status,
             code != NULL ? code : "?", msg != NULL ? msg : "(no message)");
    for (char *p = c->last_error; *p != '\0'; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            *p = '?';
        }
    }
    json_decref(doc);
    KMS_BAIL_MSG(err, "%s", c->last_error);
}

/* Sends until an answer that is not transient arrives, backing off
 * between attempts; then parses a 2xx answer into *out. */
static kms_result request(rx_http *c, const char *path, const kms_buf *body, json_t **out)
{
    char url[RX_URL_BYTES];
    int n = snprintf(url, sizeof(url), "%s%s", c->conf->url, path);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(url), KMS_ERR_LIMIT_EXCEEDED);
    *out = NULL;
    double first_failure = 0;
    double delay = RX_BACKOFF_FIRST_S;
    for (;;) {
        rx_send how = RX_SENT;
        KMS_GUARD(send_once(c, url, body, &how));
        if (how == RX_SENT) {
            break;
        }
        double now = rx_now();
        if (first_failure == 0) {
            first_failure = now;
        }
        KMS_ENSURE_MSG(now - first_failure < c->conf->retry_max_s, KMS_ERR_UNAVAILABLE,
                       "%s; gave up after %.0f s of retries", c->last_error, now - first_failure);
        KMS_ENSURE_MSG(!*c->stop, KMS_ERR_UNAVAILABLE, "interrupted while waiting for kmsd");
        c->retries++;
        rx_sleep(c->retry_after_s >= 0 ? c->retry_after_s : delay, c->stop);
        delay = delay * 2 < RX_BACKOFF_MAX_S ? delay * 2 : RX_BACKOFF_MAX_S;
    }
    if (c->status < 200 || c->status > 299) {
        return answer_error(c);
    }
    json_error_t jerr;
    *out = json_loadb((const char *)c->resp.data, c->resp.len, JSON_REJECT_DUPLICATES, &jerr);
    if (*out == NULL || !json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        KMS_BAIL_MSG(KMS_ERR_JSON_INVALID, "kmsd answered with invalid JSON");
    }
    return KMS_OK_RESULT;
}

KMS_RESULT rx_http_key_primary(rx_http *c, const char *key, uint32_t *primary, bool *encrypt)
{
    char path[256];
    int n = snprintf(path, sizeof(path), "/v1/keys/%s", key);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(path), KMS_ERR_KEY_NAME_INVALID);
    json_t *doc = NULL;
    KMS_GUARD(request(c, path, NULL, &doc));
    json_t *pv = json_object_get(doc, "primary_version");
    const char *purpose = json_string_value(json_object_get(doc, "purpose"));
    bool ok = json_is_integer(pv) && json_integer_value(pv) >= 1 &&
              json_integer_value(pv) <= UINT32_MAX && purpose != NULL;
    if (ok) {
        *primary = (uint32_t)json_integer_value(pv);
        *encrypt = strcmp(purpose, "encrypt") == 0;
    }
    json_decref(doc);
    KMS_ENSURE_MSG(ok, KMS_ERR_JSON_INVALID, "kmsd's key object lacks primary_version/purpose");
    return KMS_OK_RESULT;
}

void rx_items_free(rx_item *res, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(res[i].token);
        res[i].token = NULL;
    }
}

static kms_result body_of(char *const *tokens, size_t n, kms_buf *body)
{
    /* Tokens are "kms1:" + strict base64 (checked by the caller's parse),
     * so they need no JSON escaping; building the body by hand avoids a
     * jansson tree per batch. */
    KMS_GUARD(kms_buf_append(body, "{\"items\":[", 10));
    for (size_t i = 0; i < n; i++) {
        if (i > 0) {
            KMS_GUARD(kms_buf_append(body, ",", 1));
        }
        KMS_GUARD(kms_buf_append(body, "{\"ciphertext\":\"", 15));
        for (const char *p = tokens[i]; *p != '\0'; p++) {
            KMS_ENSURE(*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20, KMS_ERR_TOKEN_INVALID);
        }
        KMS_GUARD(kms_buf_append(body, tokens[i], strlen(tokens[i])));
        KMS_GUARD(kms_buf_append(body, "\"}", 2));
    }
    KMS_GUARD(kms_buf_append(body, "]}", 2));
    return kms_buf_terminate(body);
}

KMS_RESULT rx_http_batch(rx_http *c, const char *key, const char *op, char *const *tokens, size_t n,
                         rx_item *res)
{
    char path[256];
    int pn = snprintf(path, sizeof(path), "/v1/keys/%s/batch/%s", key, op);
    KMS_ENSURE(pn > 0 && (size_t)pn < sizeof(path), KMS_ERR_KEY_NAME_INVALID);
    kms_buf body KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&body, 0);
    KMS_GUARD(body_of(tokens, n, &body));
    bool rewrap = strcmp(op, "rewrap") == 0;
    double first_failure = 0;
    double delay = RX_BACKOFF_FIRST_S;
    for (;;) {
        memset(res, 0, n * sizeof(*res));
        json_t *doc = NULL;
        KMS_GUARD(request(c, path, &body, &doc));
        json_t *results = json_object_get(doc, "results");
        if (!json_is_array(results) || json_array_size(results) != n) {
            json_decref(doc);
            KMS_BAIL_MSG(KMS_ERR_JSON_INVALID, "kmsd's batch answer has %zu results for %zu items",
                         json_array_size(results), n);
        }
        bool transient = false;
        kms_result r = KMS_OK_RESULT;
        for (size_t i = 0; i < n && kms_is_ok(r); i++) {
            json_t *it = json_array_get(results, i);
            json_t *e = json_object_get(it, "error");
            if (e != NULL) {
                const char *code = json_string_value(json_object_get(e, "code"));
                res[i].err = code != NULL ? kms_error_from_code(code) : KMS_ERR_INTERNAL;
                snprintf(res[i].code, sizeof(res[i].code), "%s", code != NULL ? code : "unknown");
                transient |= kms_error_is_transient(res[i].err);
                continue;
            }
            json_t *v = json_object_get(it, "version");
            if (!json_is_integer(v) || json_integer_value(v) < 1 ||
                json_integer_value(v) > UINT32_MAX) {
                r = kms_error_raisef(KMS_ERR_JSON_INVALID, __FILE__, __LINE__,
                                     "kmsd's batch item %zu lacks a version", i);
                break;
            }
            res[i].version = (uint32_t)json_integer_value(v);
            if (rewrap) {
                const char *t = json_string_value(json_object_get(it, "ciphertext"));
                if (t == NULL) {
                    r = kms_error_raisef(KMS_ERR_JSON_INVALID, __FILE__, __LINE__,
                                         "kmsd's batch item %zu lacks a ciphertext", i);
                    break;
                }
                res[i].token = strdup(t);
                res[i].changed = json_is_true(json_object_get(it, "changed"));
                if (res[i].token == NULL) {
                    r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
                }
            }
        }
        json_decref(doc);
        if (!kms_is_ok(r)) {
            rx_items_free(res, n);
            return r;
        }
        if (!transient) {
            return KMS_OK_RESULT;
        }
        /* Some item met a passing condition (the HSM busy or away): the
         * whole batch again, after a pause. */
        rx_items_free(res, n);
        double now = rx_now();
        if (first_failure == 0) {
            first_failure = now;
        }
        KMS_ENSURE_MSG(now - first_failure < c->conf->retry_max_s, KMS_ERR_UNAVAILABLE,
                       "batch items kept failing with transient errors for %.0f s",
                       now - first_failure);
        KMS_ENSURE_MSG(!*c->stop, KMS_ERR_UNAVAILABLE, "interrupted while waiting for kmsd");
        c->retries++;
        rx_sleep(delay, c->stop);
        delay = delay * 2 < RX_BACKOFF_MAX_S ? delay * 2 : RX_BACKOFF_MAX_S;
    }
}
