/*
 * kmsctl: the command-line client of kmsd over its HTTPS API (libcurl).
 *
 * One libcurl easy handle serves every request of a run, so a multi-page
 * listing reuses one TLS connection (keep-alive). TLS 1.2 or later, the
 * server's certificate verified against --cacert and its name checked,
 * https only, no redirects.
 *
 * Secrets: plaintext is read only from a file or stdin, never from argv.
 * It lives in secret buffers (kms_buf_init_secret); jansson's allocator is
 * replaced by one that wipes every block it frees, because request and
 * response bodies carrying plaintext pass through jansson strings.
 *
 * The verbs, their options and help come from the tables in kmsctl_args.c;
 * output for people from kmsctl_out.c. Exit codes: docs/cli.md.
 */
#define _GNU_SOURCE
#include "kms_base64.h"
#include "kms_buf.h"
#include "kms_curl_cut.h"
#include "kms_error.h"
#include "kms_result.h"
#include "kms_secmem.h"
#include "kms_token.h"
#include "kmsctl_args.h"
#include "kmsctl_out.h"
#include "kmsctl_report.h"
#include "kmsctl_verify.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <malloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KMSCTL_DEFAULT_URL        "https://127.0.0.1:8443"
#define KMSCTL_DEFAULT_TIMEOUT_S  30
#define KMSCTL_CONNECT_TIMEOUT_S  10
#define KMSCTL_RESPONSE_MAX_BYTES ((size_t)16 * 1024 * 1024)
/* Inputs are bounded by kmsd's request body limit (1 MiB by default). */
#define KMSCTL_INPUT_MAX_BYTES   ((size_t)1024 * 1024)
#define KMSCTL_CONFIG_MAX_BYTES  ((size_t)64 * 1024)
#define KMSCTL_PATH_BYTES        1024
#define KMSCTL_MSG_BYTES         1024
#define KMSCTL_REQUEST_ID_BYTES  128
#define KMSCTL_LIST_PAGE_DEFAULT 100
/* A listing stops after this many pages even if the server keeps
 * answering with a "next" (a loop guard, not a product limit). */
#define KMSCTL_LIST_PAGES_MAX 100000

/* Exit status of a verify whose MAC does not match (like cmp(1)). */
#define KMSCTL_EXIT_MISMATCH 1

/* ---- error reporting ---- */

/* The line main prints for a failure ("kmsctl: <msg>"); longer than the
 * error slot's detail because it carries the server's message. */
static char g_msg[KMSCTL_MSG_BYTES];

__attribute__((format(printf, 2, 3))) static kms_result fail(kms_err e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof(g_msg), fmt, ap);
    va_end(ap);
    return kms_error_raise(e, __FILE__, __LINE__);
}

/* ---- jansson allocator that wipes ---- */

static void *json_wipe_malloc(size_t n)
{
    return malloc(n);
}

static void json_wipe_free(void *p)
{
    if (p != NULL) {
        kms_secmem_wipe(p, malloc_usable_size(p));
        free(p);
    }
}

/* ---- settings ---- */

typedef struct {
    char *url;
    char *cert;
    char *key;
    char *cacert;
    int64_t timeout_s;
} kmsctl_conn;

static void conn_free(kmsctl_conn *c)
{
    free(c->url);
    free(c->cert);
    free(c->key);
    free(c->cacert);
    memset(c, 0, sizeof(*c));
}

static KMS_RESULT conn_set(char **slot, const char *value)
{
    char *v = strdup(value);
    KMS_ENSURE(v != NULL, KMS_ERR_NO_MEMORY);
    free(*slot);
    *slot = v;
    return KMS_OK_RESULT;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t') {
        s++;
    }
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) {
        s[--n] = '\0';
    }
    return s;
}

/* "key = value" lines, '#' comments, blank lines. Unknown keys are errors
 * (a typo must not silently fall back to a default). */
static KMS_RESULT config_load(const char *path, bool must_exist, kmsctl_conn *c)
{
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        if (!must_exist && errno == ENOENT) {
            return KMS_OK_RESULT;
        }
        return fail(KMS_ERR_CONFIG, "config %s: %s", path, strerror(errno));
    }
    char line[4096];
    unsigned lineno = 0;
    size_t total = 0;
    kms_result r = KMS_OK_RESULT;
    while (fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        size_t n = strlen(line);
        total += n;
        if (total > KMSCTL_CONFIG_MAX_BYTES || (n == sizeof(line) - 1 && line[n - 1] != '\n')) {
            r = fail(KMS_ERR_CONFIG, "config %s:%u: line or file too long", path, lineno);
            break;
        }
        if (n > 0 && line[n - 1] == '\n') {
            line[n - 1] = '\0';
        }
        char *s = trim(line);
        if (*s == '\0' || *s == '#') {
            continue;
        }
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            r = fail(KMS_ERR_CONFIG, "config %s:%u: expected \"key = value\"", path, lineno);
            break;
        }
        *eq = '\0';
        const char *k = trim(s);
        const char *v = trim(eq + 1);
        if (*v == '\0') {
            r = fail(KMS_ERR_CONFIG, "config %s:%u: %s has no value", path, lineno, k);
            break;
        }
        if (strcmp(k, "url") == 0) {
            r = conn_set(&c->url, v);
        } else if (strcmp(k, "cert") == 0) {
            r = conn_set(&c->cert, v);
        } else if (strcmp(k, "key") == 0) {
            r = conn_set(&c->key, v);
        } else if (strcmp(k, "cacert") == 0) {
            r = conn_set(&c->cacert, v);
        } else if (strcmp(k, "timeout") == 0) {
            if (!kms_is_ok(kmsctl_duration_parse(v, &c->timeout_s)) || c->timeout_s == 0) {
                r = fail(KMS_ERR_CONFIG, "config %s:%u: timeout: not a duration", path, lineno);
            }
        } else {
            r = fail(KMS_ERR_CONFIG, "config %s:%u: unknown key \"%s\"", path, lineno, k);
        }
        if (!kms_is_ok(r)) {
            break;
        }
    }
    if (kms_is_ok(r) && ferror(f)) {
        r = fail(KMS_ERR_CONFIG, "config %s: read error", path);
    }
    fclose(f);
    return r;
}

/* Precedence: command line, then environment, then config file, then
 * defaults. */
static KMS_RESULT conn_resolve(const kmsctl_args *a, kmsctl_conn *c)
{
    c->timeout_s = KMSCTL_DEFAULT_TIMEOUT_S;
    if (a->opt[KMSCTL_OPT_CONFIG].set) {
        KMS_GUARD(config_load(a->opt[KMSCTL_OPT_CONFIG].str, true, c));
    } else {
        char path[KMSCTL_PATH_BYTES];
        const char *xdg = getenv("XDG_CONFIG_HOME");
        const char *home = getenv("HOME");
        int n = -1;
        if (xdg != NULL && *xdg == '/') {
            n = snprintf(path, sizeof(path), "%s/kmsctl.conf", xdg);
        } else if (home != NULL && *home != '\0') {
            n = snprintf(path, sizeof(path), "%s/.config/kmsctl.conf", home);
        }
        if (n > 0 && (size_t)n < sizeof(path)) {
            KMS_GUARD(config_load(path, false, c));
        }
    }
    static const struct {
        const char *env;
        kmsctl_opt_id opt;
        size_t offset;
    } sources[] = {
        {"KMSCTL_URL", KMSCTL_OPT_URL, offsetof(kmsctl_conn, url)},
        {"KMSCTL_CERT", KMSCTL_OPT_CERT, offsetof(kmsctl_conn, cert)},
        {"KMSCTL_KEY", KMSCTL_OPT_KEY, offsetof(kmsctl_conn, key)},
        {"KMSCTL_CACERT", KMSCTL_OPT_CACERT, offsetof(kmsctl_conn, cacert)},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(sources); i++) {
        char **slot = (char **)((char *)c + sources[i].offset);
        const char *env = getenv(sources[i].env);
        if (a->opt[sources[i].opt].set) {
            KMS_GUARD(conn_set(slot, a->opt[sources[i].opt].str));
        } else if (env != NULL && *env != '\0') {
            KMS_GUARD(conn_set(slot, env));
        }
    }
    if (a->opt[KMSCTL_OPT_TIMEOUT].set) {
        c->timeout_s = a->opt[KMSCTL_OPT_TIMEOUT].num;
    }
    if (c->url == NULL) {
        KMS_GUARD(conn_set(&c->url, KMSCTL_DEFAULT_URL));
    }
    size_t n = strlen(c->url);
    while (n > 0 && c->url[n - 1] == '/') {
        c->url[--n] = '\0';
    }
    if (strncmp(c->url, "https://", 8) != 0 || n <= 8) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "url \"%s\": kmsd is reached over https:// only",
                    c->url);
    }
    if (c->timeout_s <= 0 || c->timeout_s > 3600) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "timeout must be 1s..1h");
    }
    return KMS_OK_RESULT;
}

/* ---- HTTP ---- */

typedef struct {
    CURL *h;
    struct curl_slist *headers;
    const kmsctl_conn *conn;
    char errbuf[CURL_ERROR_SIZE];
    kms_buf resp; /* secret: responses may carry plaintext */
    long status;
    char request_id[KMSCTL_REQUEST_ID_BYTES];
} kmsctl_http;

static size_t on_body(char *p, size_t size, size_t nmemb, void *arg)
{
    kmsctl_http *c = arg;
    size_t n = size * nmemb;
    /* Returning less than n makes libcurl abort with CURLE_WRITE_ERROR. */
    if (!kms_is_ok(kms_buf_append(&c->resp, p, n))) {
        return 0;
    }
    return n;
}

static KMS_RESULT http_init(kmsctl_http *c, const kmsctl_conn *conn)
{
    memset(c, 0, sizeof(*c));
    c->conn = conn;
    kms_buf_init_secret(&c->resp, KMSCTL_RESPONSE_MAX_BYTES);
    KMS_ENSURE(curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK, KMS_ERR_INTERNAL);
    c->h = curl_easy_init();
    KMS_ENSURE(c->h != NULL, KMS_ERR_NO_MEMORY);
    struct curl_slist *h1 = curl_slist_append(NULL, "Accept: application/json");
    KMS_ENSURE(h1 != NULL, KMS_ERR_NO_MEMORY);
    c->headers = h1;
    static const char *const more[] = {"Content-Type: application/json",
                                       /* no 100-continue round trip */ "Expect:"};
    for (size_t i = 0; i < KMS_ARRAY_LEN(more); i++) {
        struct curl_slist *n = curl_slist_append(c->headers, more[i]);
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
              curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)conn->timeout_s) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT,
                               (long)(conn->timeout_s < KMSCTL_CONNECT_TIMEOUT_S
                                          ? conn->timeout_s
                                          : KMSCTL_CONNECT_TIMEOUT_S)) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_WRITEDATA, c) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->headers) == CURLE_OK &&
              curl_easy_setopt(h, CURLOPT_USERAGENT, "kmsctl/0.1") == CURLE_OK;
    KMS_ENSURE(ok, KMS_ERR_INTERNAL);
    if (conn->cacert != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_CAINFO, conn->cacert) == CURLE_OK, KMS_ERR_INTERNAL);
    }
    if (conn->cert != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_SSLCERT, conn->cert) == CURLE_OK &&
                       curl_easy_setopt(h, CURLOPT_SSLCERTTYPE, "PEM") == CURLE_OK,
                   KMS_ERR_INTERNAL);
    }
    if (conn->key != NULL) {
        KMS_ENSURE(curl_easy_setopt(h, CURLOPT_SSLKEY, conn->key) == CURLE_OK &&
                       curl_easy_setopt(h, CURLOPT_SSLKEYTYPE, "PEM") == CURLE_OK,
                   KMS_ERR_INTERNAL);
    }
    return KMS_OK_RESULT;
}

static void http_free(kmsctl_http *c)
{
    if (c->h != NULL) {
        curl_easy_cleanup(c->h);
    }
    curl_slist_free_all(c->headers);
    kms_buf_free(&c->resp);
    curl_global_cleanup();
}

/* Maps a transport failure to the documented exit codes: 69 when kmsd
 * cannot be reached, 77 for TLS failures (and says which). */
static kms_result transport_fail(kmsctl_http *c, CURLcode rc)
{
    const char *detail = c->errbuf[0] != '\0' ? c->errbuf : curl_easy_strerror(rc);
    const char *url = c->conn->url;
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
        return fail(KMS_ERR_UNAVAILABLE, "cannot reach kmsd at %s: %s", url, detail);
    case CURLE_RECV_ERROR:
        /* A TLS 1.3 server refuses a client certificate with an alert that
         * arrives after the handshake, as a receive error. */
        if (strstr(detail, "alert") != NULL || strstr(detail, "SSL") != NULL) {
            return fail(KMS_ERR_UNAUTHENTICATED, "TLS failure (the server refused the client): %s",
                        detail);
        }
        return fail(KMS_ERR_UNAVAILABLE, "cannot reach kmsd at %s: %s", url, detail);
    case CURLE_PEER_FAILED_VERIFICATION:
        return fail(KMS_ERR_UNAUTHENTICATED,
                    "TLS failure (server certificate not trusted or wrong name; check "
                    "--cacert and --url): %s",
                    detail);
    case CURLE_SSL_CACERT_BADFILE:
        return fail(KMS_ERR_UNAUTHENTICATED, "TLS failure (CA file --cacert unusable): %s", detail);
    case CURLE_SSL_CERTPROBLEM:
        return fail(KMS_ERR_UNAUTHENTICATED,
                    "TLS failure (client certificate or key unusable; check --cert and --key): "
                    "%s",
                    detail);
    case CURLE_SSL_CLIENTCERT:
        return fail(KMS_ERR_UNAUTHENTICATED,
                    "TLS failure (the server requires or refused the client certificate): %s",
                    detail);
    case CURLE_SSL_CONNECT_ERROR:
        if (kms_curl_handshake_cut(detail)) {
            return fail(KMS_ERR_UNAVAILABLE,
                        "kmsd at %s closed the connection during the TLS handshake (stopping, "
                        "restarting, or at its connection limit; try again): %s",
                        url, detail);
        }
        return fail(KMS_ERR_UNAUTHENTICATED, "TLS failure (handshake): %s", detail);
    case CURLE_SSL_CIPHER:
    case CURLE_USE_SSL_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
        return fail(KMS_ERR_UNAUTHENTICATED, "TLS failure (handshake): %s", detail);
    case CURLE_WRITE_ERROR:
        return fail(KMS_ERR_LIMIT_EXCEEDED, "response larger than %zu bytes",
                    KMSCTL_RESPONSE_MAX_BYTES);
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
        return fail(KMS_ERR_INVALID_ARGUMENT, "url %s: %s", url, detail);
    default:
        return fail(KMS_ERR_INTERNAL, "request to %s failed: %s", url, detail);
    }
}

/* One request. body may be NULL (no body). On return c->status and c->resp
 * hold the answer, whatever its status. */
static KMS_RESULT http_do(kmsctl_http *c, const char *method, const char *path, const kms_buf *body)
{
    char url[KMSCTL_PATH_BYTES * 2];
    int n = snprintf(url, sizeof(url), "%s%s", c->conn->url, path);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(url), KMS_ERR_LIMIT_EXCEEDED);
    kms_buf_reset(&c->resp);
    c->errbuf[0] = '\0';
    c->status = 0;
    c->request_id[0] = '\0';
    CURL *h = c->h;
    bool ok = curl_easy_setopt(h, CURLOPT_URL, url) == CURLE_OK;
    if (body == NULL) {
        ok = ok && curl_easy_setopt(h, CURLOPT_HTTPGET, 1L) == CURLE_OK &&
             curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST,
                              strcmp(method, "GET") == 0 ? NULL : method) == CURLE_OK;
    } else {
        ok = ok && curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)body->len) == CURLE_OK &&
             curl_easy_setopt(h, CURLOPT_POSTFIELDS, (const char *)body->data) == CURLE_OK &&
             curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST,
                              strcmp(method, "POST") == 0 ? NULL : method) == CURLE_OK;
    }
    KMS_ENSURE(ok, KMS_ERR_INTERNAL);
    CURLcode rc = curl_easy_perform(h);
    if (rc != CURLE_OK) {
        return transport_fail(c, rc);
    }
    KMS_ENSURE(curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &c->status) == CURLE_OK,
               KMS_ERR_INTERNAL);
    struct curl_header *hdr = NULL;
    if (curl_easy_header(h, "X-Request-Id", 0, CURLH_HEADER, -1, &hdr) == CURLHE_OK) {
        snprintf(c->request_id, sizeof(c->request_id), "%s", hdr->value);
    }
    /* Text consumers (json_loadb takes a length, but /metrics-style text and
     * error messages are printed). */
    KMS_GUARD(kms_buf_terminate(&c->resp));
    return KMS_OK_RESULT;
}

static void sanitize(char *s)
{
    for (; *s != '\0'; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f) {
            *s = '?';
        }
    }
}

/* A non-2xx answer: the API's error shape gives the code, which names the
 * exit status in the error table. */
static kms_result answer_fail(kmsctl_http *c)
{
    json_error_t jerr;
    json_t *doc = json_loadb((const char *)c->resp.data, c->resp.len, 0, &jerr);
    const char *code = NULL;
    const char *message = NULL;
    const char *rid = c->request_id;
    if (doc != NULL) {
        json_t *e = json_object_get(doc, "error");
        code = json_string_value(json_object_get(e, "code"));
        message = json_string_value(json_object_get(e, "message"));
        if (*rid == '\0' && json_string_value(json_object_get(doc, "request_id")) != NULL) {
            rid = json_string_value(json_object_get(doc, "request_id"));
        }
    }
    kms_result r;
    if (code != NULL) {
        kms_err e = kms_error_from_code(code);
        r = fail(e, "%s: %s (request %s)", code, message ? message : kms_error_message(e),
                 *rid ? rid : "-");
    } else {
        kms_err e = c->status == 401   ? KMS_ERR_UNAUTHENTICATED
                    : c->status == 403 ? KMS_ERR_FORBIDDEN
                    : c->status == 404 ? KMS_ERR_NOT_FOUND
                    : c->status == 503 ? KMS_ERR_UNAVAILABLE
                                       : KMS_ERR_INTERNAL;
        r = fail(e, "http_%ld: unexpected answer from kmsd (request %s)", c->status,
                 *rid ? rid : "-");
    }
    sanitize(g_msg);
    json_decref(doc);
    return r;
}

/* method + path (+ JSON body) -> parsed JSON of a 2xx answer. */
static KMS_RESULT api_call(kmsctl_http *c, const char *method, const char *path,
                           const kms_buf *body, json_t **out)
{
    *out = NULL;
    KMS_GUARD(http_do(c, method, path, body));
    if (c->status < 200 || c->status > 299) {
        return answer_fail(c);
    }
    json_error_t jerr;
    *out = json_loadb((const char *)c->resp.data, c->resp.len, JSON_REJECT_DUPLICATES, &jerr);
    if (*out == NULL || !json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        return fail(KMS_ERR_JSON_INVALID, "kmsd answered with invalid JSON (request %s)",
                    *c->request_id ? c->request_id : "-");
    }
    return KMS_OK_RESULT;
}

/* ---- bodies ---- */

/* Serialises a JSON object into a secret buffer (the object may hold
 * plaintext in base64). */
static KMS_RESULT body_dump(const json_t *obj, kms_buf *out)
{
    size_t n = json_dumpb(obj, NULL, 0, JSON_COMPACT);
    KMS_ENSURE(n > 0, KMS_ERR_NO_MEMORY);
    uint8_t *p = NULL;
    KMS_GUARD(kms_buf_extend(out, n, &p));
    KMS_ENSURE(json_dumpb(obj, (char *)p, n, JSON_COMPACT) == n, KMS_ERR_INTERNAL);
    return KMS_OK_RESULT;
}

static KMS_RESULT obj_set(json_t *obj, const char *k, json_t *v)
{
    KMS_ENSURE(v != NULL && json_object_set_new(obj, k, v) == 0, KMS_ERR_NO_MEMORY);
    return KMS_OK_RESULT;
}

/* Sets k to the base64 of bytes (built in secret memory). */
static KMS_RESULT obj_set_b64(json_t *obj, const char *k, const kms_buf *bytes)
{
    kms_buf b64 KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&b64, KMSCTL_INPUT_MAX_BYTES * 2);
    KMS_GUARD(kms_base64_encode(bytes->data, bytes->len, &b64));
    return obj_set(obj, k, json_stringn(b64.len ? (const char *)b64.data : "", b64.len));
}

/* ---- input and output ---- */

static KMS_RESULT read_fd(int fd, const char *what, kms_buf *out)
{
    for (;;) {
        uint8_t *p = NULL;
        size_t room = 64 * 1024;
        if (out->len + room > KMSCTL_INPUT_MAX_BYTES + 1) {
            room = KMSCTL_INPUT_MAX_BYTES + 1 - out->len;
        }
        if (room == 0) {
            return fail(KMS_ERR_LIMIT_EXCEEDED, "%s: larger than %zu bytes", what,
                        KMSCTL_INPUT_MAX_BYTES);
        }
        size_t before = out->len;
        KMS_GUARD(kms_buf_extend(out, room, &p));
        ssize_t got = read(fd, p, room);
        if (got < 0 && errno == EINTR) {
            out->len = before;
            continue;
        }
        if (got < 0) {
            out->len = before;
            return fail(KMS_ERR_IO, "%s: %s", what, strerror(errno));
        }
        out->len = before + (size_t)got;
        if (got == 0) {
            return KMS_OK_RESULT;
        }
    }
}

typedef enum {
    IN_SECRET,  /* plaintext: @FILE or stdin only */
    IN_LITERAL, /* not secret: literal text allowed too */
} in_kind;

/* --in / --context values: "@FILE", "-" (stdin), or literal TEXT. */
static KMS_RESULT input_read(const char *opt, const char *spec, in_kind kind, kms_buf *out)
{
    if (spec == NULL) {
        spec = "-";
    }
    if (strcmp(spec, "-") == 0) {
        return read_fd(STDIN_FILENO, "stdin", out);
    }
    if (spec[0] == '@') {
        int fd = open(spec + 1, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            return fail(KMS_ERR_IO, "--%s %s: %s", opt, spec, strerror(errno));
        }
        kms_result r = read_fd(fd, spec + 1, out);
        close(fd);
        return r;
    }
    if (kind == IN_SECRET) {
        return fail(KMS_ERR_INVALID_ARGUMENT,
                    "--%s: plaintext is never taken from the command line; use --%s @FILE or "
                    "--%s - (stdin)",
                    opt, opt, opt);
    }
    return kms_buf_append(out, spec, strlen(spec));
}

/* Tokens are text: surrounding whitespace (a trailing newline from a file
 * or echo) is not part of them. */
static void token_trim(kms_buf *b)
{
    while (b->len > 0 && (b->data[b->len - 1] == '\n' || b->data[b->len - 1] == '\r' ||
                          b->data[b->len - 1] == ' ' || b->data[b->len - 1] == '\t')) {
        b->len--;
    }
}

static KMS_RESULT token_read(const char *opt, const char *spec, kms_buf *out)
{
    KMS_GUARD(input_read(opt, spec, IN_LITERAL, out));
    token_trim(out);
    if (out->len < KMS_TOKEN_TEXT_PREFIX_BYTES ||
        memcmp(out->data, KMS_TOKEN_TEXT_PREFIX, KMS_TOKEN_TEXT_PREFIX_BYTES) != 0 ||
        memchr(out->data, '\0', out->len) != NULL) {
        return fail(KMS_ERR_TOKEN_INVALID, "--%s: not a token (kms1:...)", opt);
    }
    return KMS_OK_RESULT;
}

/* Writes the result to --out FILE or stdout. A file that receives plaintext
 * is created 0600, and an existing one is reset to 0600 before anything is
 * written into it. */
static KMS_RESULT output_write(const kmsctl_args *a, const void *p, size_t n, bool secret,
                               bool newline)
{
    const char *path = a->opt[KMSCTL_OPT_OUT].set ? a->opt[KMSCTL_OPT_OUT].str : NULL;
    int fd = STDOUT_FILENO;
    if (path != NULL && strcmp(path, "-") != 0) {
        fd =
            open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, secret ? 0600 : 0644);
        if (fd < 0) {
            return fail(KMS_ERR_IO, "--out %s: %s", path, strerror(errno));
        }
        struct stat st;
        if (fstat(fd, &st) != 0 || (secret && S_ISREG(st.st_mode) && fchmod(fd, 0600) != 0)) {
            int e = errno;
            close(fd);
            return fail(KMS_ERR_IO, "--out %s: %s", path, strerror(e));
        }
    }
    const uint8_t *b = p;
    size_t done = 0;
    kms_result r = KMS_OK_RESULT;
    while (done < n || newline) {
        const uint8_t *src = done < n ? b + done : (const uint8_t *)"\n";
        size_t len = done < n ? n - done : 1;
        ssize_t w = write(fd, src, len);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w < 0) {
            r = fail(KMS_ERR_IO, "%s: %s", path ? path : "stdout", strerror(errno));
            break;
        }
        if (done < n) {
            done += (size_t)w;
        } else {
            newline = false;
        }
    }
    if (fd != STDOUT_FILENO && close(fd) != 0 && kms_is_ok(r)) {
        r = fail(KMS_ERR_IO, "%s: %s", path, strerror(errno));
    }
    return r;
}

/* --json: the server's JSON, as it sent it. */
static KMS_RESULT print_raw(const kmsctl_args *a, kmsctl_http *c, bool secret)
{
    bool nl = c->resp.len == 0 || c->resp.data[c->resp.len - 1] != '\n';
    return output_write(a, c->resp.data, c->resp.len, secret, nl);
}

static KMS_RESULT print_string_field(const kmsctl_args *a, const json_t *doc, const char *field)
{
    const json_t *v = json_object_get(doc, field);
    if (!json_is_string(v)) {
        return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"%s\"", field);
    }
    return output_write(a, json_string_value(v), json_string_length(v), false, true);
}

/* Decodes a base64 plaintext from the answer and writes it raw, or as
 * base64 text with --base64. */
static KMS_RESULT print_plaintext(const kmsctl_args *a, const json_t *doc, const char *field)
{
    const json_t *v = json_object_get(doc, field);
    if (!json_is_string(v)) {
        return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"%s\"", field);
    }
    if (a->opt[KMSCTL_OPT_BASE64].set) {
        return output_write(a, json_string_value(v), json_string_length(v), true, true);
    }
    kms_buf pt KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&pt, KMSCTL_RESPONSE_MAX_BYTES);
    if (!kms_is_ok(kms_base64_decode(json_string_value(v), json_string_length(v), &pt))) {
        return fail(KMS_ERR_BASE64_INVALID, "kmsd's \"%s\" is not base64", field);
    }
    return output_write(a, pt.data, pt.len, true, false);
}

/* ---- verbs ---- */

typedef struct {
    const kmsctl_args *a;
    kmsctl_http *http;
    int exit_code; /* set by verbs whose success has more than one outcome */
} kmsctl_run;

static KMS_RESULT key_path(const char *name, const char *suffix, char *out, size_t n)
{
    if (!kms_key_name_valid(name, strlen(name))) {
        return fail(KMS_ERR_KEY_NAME_INVALID, "\"%s\" is not a key name: %s", name,
                    kms_error_message(KMS_ERR_KEY_NAME_INVALID));
    }
    int w = snprintf(out, n, "/v1/keys/%s%s", name, suffix);
    KMS_ENSURE(w > 0 && (size_t)w < n, KMS_ERR_LIMIT_EXCEEDED);
    return KMS_OK_RESULT;
}

static KMS_RESULT opt_to_json(const kmsctl_args *a, kmsctl_opt_id id, json_t *obj,
                              const char *field)
{
    const kmsctl_value *v = &a->opt[id];
    if (!v->set) {
        return KMS_OK_RESULT;
    }
    switch (kmsctl_option_get(id)->kind) {
    case KMSCTL_KIND_FLAG:
        return obj_set(obj, field, json_true());
    case KMSCTL_KIND_DURATION:
    case KMSCTL_KIND_UINT:
    case KMSCTL_KIND_TIME:
        return obj_set(obj, field, json_integer((json_int_t)v->num));
    case KMSCTL_KIND_STRING:
    case KMSCTL_KIND_ENUM:
    default:
        return obj_set(obj, field, json_string(v->str));
    }
}

/* Runs method+path with obj as the body (NULL: none), prints the answer
 * with --json, else hands the parsed answer to the caller. */
static KMS_RESULT call(kmsctl_run *r, const char *method, const char *path, const json_t *obj,
                       json_t **doc)
{
    kms_buf body KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&body, KMSCTL_INPUT_MAX_BYTES * 3);
    if (obj != NULL) {
        KMS_GUARD(body_dump(obj, &body));
    }
    return api_call(r->http, method, path, obj ? &body : NULL, doc);
}

static void json_cleanup(json_t **j)
{
    json_decref(*j);
}
#define JSON_AUTO KMS_DEFER(json_cleanup)

static KMS_RESULT new_object(json_t **out)
{
    *out = json_object();
    KMS_ENSURE(*out != NULL, KMS_ERR_NO_MEMORY);
    return KMS_OK_RESULT;
}

static KMS_RESULT print_key_doc(kmsctl_run *r, const json_t *doc)
{
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    return kmsctl_print_key(doc, stdout);
}

static KMS_RESULT verb_key_create(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "", path, sizeof(path))); /* validates the name */
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "name", json_string(a->pos[0])));
    /* The API requires the purpose; kmsctl's default is encrypt. */
    KMS_GUARD(obj_set(
        body, "purpose",
        json_string(a->opt[KMSCTL_OPT_PURPOSE].set ? a->opt[KMSCTL_OPT_PURPOSE].str : "encrypt")));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_ROTATION_PERIOD, body, "rotation_period"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_WARNING_WINDOW, body, "warning_window"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_DELETION_PROTECTION, body, "deletion_protection"));
    KMS_GUARD(call(r, "POST", "/v1/keys", body, &doc));
    return print_key_doc(r, doc);
}

static KMS_RESULT verb_key_list(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    int64_t limit =
        a->opt[KMSCTL_OPT_LIMIT].set ? a->opt[KMSCTL_OPT_LIMIT].num : KMSCTL_LIST_PAGE_DEFAULT;
    json_t *all JSON_AUTO = json_array();
    KMS_ENSURE(all != NULL, KMS_ERR_NO_MEMORY);
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    for (unsigned page = 0;; page++) {
        if (page >= KMSCTL_LIST_PAGES_MAX) {
            return fail(KMS_ERR_LIMIT_EXCEEDED, "key list: more than %u pages",
                        KMSCTL_LIST_PAGES_MAX);
        }
        char path[KMSCTL_PATH_BYTES];
        snprintf(path, sizeof(path), "/v1/keys?limit=%lld%s%s", (long long)limit,
                 *after ? "&after=" : "", after);
        json_t *doc JSON_AUTO = NULL;
        KMS_GUARD(call(r, "GET", path, NULL, &doc));
        json_t *keys = json_object_get(doc, "keys");
        if (!json_is_array(keys)) {
            return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"keys\" array");
        }
        KMS_ENSURE(json_array_extend(all, keys) == 0, KMS_ERR_NO_MEMORY);
        const char *next = json_string_value(json_object_get(doc, "next"));
        if (next == NULL || *next == '\0') {
            break;
        }
        /* Names sort, so a page must move forward; anything else would loop. */
        if (!kms_key_name_valid(next, strlen(next)) || strcmp(next, after) <= 0) {
            return fail(KMS_ERR_JSON_INVALID, "kmsd's \"next\" does not advance");
        }
        snprintf(after, sizeof(after), "%s", next);
    }
    if (a->opt[KMSCTL_OPT_JSON].set) {
        /* The pages joined into one answer of the same shape. */
        json_t *out JSON_AUTO = json_pack("{s:O,s:n}", "keys", all, "next");
        KMS_ENSURE(out != NULL, KMS_ERR_NO_MEMORY);
        char *text = json_dumps(out, JSON_COMPACT);
        KMS_ENSURE(text != NULL, KMS_ERR_NO_MEMORY);
        kms_result res = output_write(a, text, strlen(text), false, true);
        json_wipe_free(text);
        return res;
    }
    return kmsctl_print_keys(all, stdout);
}

static KMS_RESULT verb_key_show(kmsctl_run *r)
{
    char path[KMSCTL_PATH_BYTES];
    /* With each version's uses in the last 30 days (from the audit log). */
    KMS_GUARD(key_path(r->a->pos[0], "?uses=true", path, sizeof(path)));
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", path, NULL, &doc));
    return print_key_doc(r, doc);
}

static KMS_RESULT verb_key_update(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "", path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_ROTATION_PERIOD, body, "rotation_period"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_WARNING_WINDOW, body, "warning_window"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_MIN_DECRYPTION_VERSION, body, "min_decryption_version"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_DELETION_PROTECTION, body, "deletion_protection"));
    if (a->opt[KMSCTL_OPT_NO_DELETION_PROTECTION].set) {
        KMS_GUARD(obj_set(body, "deletion_protection", json_false()));
    }
    if (json_object_size(body) == 0) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "key update: nothing to change (see --help)");
    }
    KMS_GUARD(call(r, "PATCH", path, body, &doc));
    return print_key_doc(r, doc);
}

static KMS_RESULT print_rotation_answer(kmsctl_run *r, const json_t *doc)
{
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    json_t *one JSON_AUTO = json_array();
    json_t *rot = json_object_get(doc, "rotation");
    KMS_ENSURE(one != NULL, KMS_ERR_NO_MEMORY);
    if (!json_is_object(rot)) {
        return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"rotation\"");
    }
    KMS_ENSURE(json_array_append(one, rot) == 0, KMS_ERR_NO_MEMORY);
    KMS_GUARD(kmsctl_print_rotations(one, stdout));
    const json_t *key = json_object_get(doc, "key");
    if (json_is_object(key)) {
        fputc('\n', stdout);
        KMS_GUARD(kmsctl_print_key(key, stdout));
    }
    /* Emergency rotations: who used the compromised version. */
    const json_t *usage = json_object_get(doc, "usage");
    if (json_is_object(usage)) {
        fputc('\n', stdout);
        KMS_GUARD(kmsctl_print_usage(usage, stdout));
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_key_rotate(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/rotate", path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "type",
                      json_string(a->opt[KMSCTL_OPT_EMERGENCY].set ? "emergency" : "manual")));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_REASON, body, "reason"));
    if (a->opt[KMSCTL_OPT_LOOKBACK].set) {
        if (!a->opt[KMSCTL_OPT_EMERGENCY].set) {
            return fail(KMS_ERR_INVALID_ARGUMENT, "key rotate: --lookback needs --emergency");
        }
        KMS_GUARD(opt_to_json(a, KMSCTL_OPT_LOOKBACK, body, "lookback"));
    }
    KMS_GUARD(call(r, "POST", path, body, &doc));
    return print_rotation_answer(r, doc);
}

static KMS_RESULT verb_key_rollback(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/rollback", path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_REASON, body, "reason"));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    return print_rotation_answer(r, doc);
}

static KMS_RESULT print_one_version(kmsctl_run *r, json_t *doc)
{
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    json_t *one JSON_AUTO = json_array();
    KMS_ENSURE(one != NULL && json_array_append(one, doc) == 0, KMS_ERR_NO_MEMORY);
    return kmsctl_print_versions(one, stdout);
}

static KMS_RESULT verb_key_set_state(kmsctl_run *r)
{
    static const char *const actions[] = {"deprecate", "compromise",       "disable",
                                          "enable",    "schedule_destroy", "cancel_destroy"};
    const kmsctl_args *a = r->a;
    int64_t version = 0;
    const char *v = a->pos[1];
    if (strspn(v, "0123456789") != strlen(v) || !kms_is_ok(kmsctl_duration_parse(v, &version)) ||
        version <= 0 || version > (int64_t)UINT32_MAX) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "key set-state: VERSION \"%s\" is not a number", v);
    }
    char action[32];
    snprintf(action, sizeof(action), "%s", a->pos[2]);
    for (char *p = action; *p != '\0'; p++) {
        *p = *p == '-' ? '_' : *p;
    }
    bool known = false;
    for (size_t i = 0; i < KMS_ARRAY_LEN(actions); i++) {
        known = known || strcmp(action, actions[i]) == 0;
    }
    if (!known || strlen(a->pos[2]) >= sizeof(action)) {
        return fail(KMS_ERR_INVALID_ARGUMENT,
                    "key set-state: ACTION \"%s\" is not one of deprecate, compromise, disable, "
                    "enable, schedule_destroy, cancel_destroy",
                    a->pos[2]);
    }
    char suffix[64];
    snprintf(suffix, sizeof(suffix), "/versions/%lld/state", (long long)version);
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], suffix, path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "action", json_string(action)));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_GRACE_PERIOD, body, "grace_period"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_WAITING_PERIOD, body, "waiting_period"));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_REASON, body, "reason"));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    return print_one_version(r, doc);
}

static KMS_RESULT verb_master_rotate(kmsctl_run *r)
{
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(opt_to_json(r->a, KMSCTL_OPT_REASON, body, "reason"));
    KMS_GUARD(call(r, "POST", "/v1/master/rotate", body, &doc));
    return print_rotation_answer(r, doc);
}

static KMS_RESULT verb_master_show(kmsctl_run *r)
{
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", "/v1/master", NULL, &doc));
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    return kmsctl_print_masters(json_object_get(doc, "masters"), stdout);
}

static KMS_RESULT query_add(CURL *h, char *q, size_t n, const char *k, const char *v)
{
    char *esc = curl_easy_escape(h, v, 0);
    KMS_ENSURE(esc != NULL, KMS_ERR_NO_MEMORY);
    size_t used = strlen(q);
    int w = snprintf(q + used, n - used, "%s%s=%s", used ? "&" : "?", k, esc);
    curl_free(esc);
    KMS_ENSURE(w > 0 && (size_t)w < n - used, KMS_ERR_LIMIT_EXCEEDED);
    return KMS_OK_RESULT;
}

/* A filter option of a listing verb and the query parameter it becomes. */
typedef struct {
    kmsctl_opt_id id;
    const char *param;
} kmsctl_query_param;

/* Appends ?name=value&... for every option of params that was given;
 * numeric options (times, durations, counts) are sent as integers. */
static KMS_RESULT query_from_options(kmsctl_run *r, const kmsctl_query_param *params, size_t n,
                                     char *query, size_t size)
{
    for (size_t i = 0; i < n; i++) {
        const kmsctl_value *v = &r->a->opt[params[i].id];
        if (!v->set) {
            continue;
        }
        char num[32];
        const char *text = v->str;
        if (kmsctl_option_get(params[i].id)->kind != KMSCTL_KIND_STRING) {
            snprintf(num, sizeof(num), "%lld", (long long)v->num);
            text = num;
        }
        KMS_GUARD(query_add(r->http->h, query, size, params[i].param, text));
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_rotations(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    static const kmsctl_query_param params[] = {
        {KMSCTL_OPT_FILTER_KEY, "key"}, {KMSCTL_OPT_TYPE, "type"}, {KMSCTL_OPT_STATUS, "status"},
        {KMSCTL_OPT_SINCE, "from"},     {KMSCTL_OPT_UNTIL, "to"},  {KMSCTL_OPT_LIMIT, "limit"},
    };
    char query[KMSCTL_PATH_BYTES] = "";
    KMS_GUARD(query_from_options(r, params, KMS_ARRAY_LEN(params), query, sizeof(query)));
    char path[KMSCTL_PATH_BYTES + 32];
    snprintf(path, sizeof(path), "/v1/rotations%s", query);
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", path, NULL, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return kmsctl_print_rotations(json_object_get(doc, "rotations"), stdout);
}

static KMS_RESULT verb_status(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char query[KMSCTL_PATH_BYTES] = "";
    if (a->opt[KMSCTL_OPT_DUE_WITHIN].set) {
        char num[32];
        snprintf(num, sizeof(num), "%lld", (long long)a->opt[KMSCTL_OPT_DUE_WITHIN].num);
        KMS_GUARD(query_add(r->http->h, query, sizeof(query), "due_within", num));
    }
    if (a->opt[KMSCTL_OPT_OVERDUE].set) {
        KMS_GUARD(query_add(r->http->h, query, sizeof(query), "overdue", "true"));
    }
    char path[KMSCTL_PATH_BYTES + 32];
    snprintf(path, sizeof(path), "/v1/status%s", query);
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", path, NULL, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return kmsctl_print_status(doc, stdout);
}

static KMS_RESULT verb_report(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char query[KMSCTL_PATH_BYTES] = "";
    KMS_GUARD(query_add(r->http->h, query, sizeof(query), "month", a->opt[KMSCTL_OPT_MONTH].str));
    char path[KMSCTL_PATH_BYTES + 32];
    snprintf(path, sizeof(path), "/v1/report%s", query);
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", path, NULL, &doc));
    if (a->opt[KMSCTL_OPT_HTML].set) {
        const char *file = a->opt[KMSCTL_OPT_HTML].str;
        FILE *f = fopen(file, "w");
        if (f == NULL) {
            return fail(KMS_ERR_IO, "--html %s: %s", file, strerror(errno));
        }
        kms_result res = kmsctl_report_html(doc, f);
        if (fclose(f) != 0 && kms_is_ok(res)) {
            res = fail(KMS_ERR_IO, "--html %s: %s", file, strerror(errno));
        }
        KMS_GUARD(res);
    }
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return kmsctl_print_report(doc, stdout);
}

static KMS_RESULT verb_check(kmsctl_run *r)
{
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "repair", json_boolean(r->a->opt[KMSCTL_OPT_REPAIR].set)));
    KMS_GUARD(call(r, "POST", "/v1/admin/check", body, &doc));
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    kmsctl_print_generic(doc, 0, stdout);
    return KMS_OK_RESULT;
}

/* Adds "context" from --context TEXT|@FILE. */
static KMS_RESULT context_add(const kmsctl_args *a, json_t *body)
{
    if (!a->opt[KMSCTL_OPT_CONTEXT].set) {
        return KMS_OK_RESULT;
    }
    const char *spec = a->opt[KMSCTL_OPT_CONTEXT].str;
    if (strcmp(spec, "-") == 0) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "--context: use TEXT or @FILE (stdin is --in's)");
    }
    kms_buf ctx KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&ctx, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(input_read("context", spec, IN_LITERAL, &ctx));
    return obj_set_b64(body, "context", &ctx);
}

/* wrap, encrypt: plaintext in, token out. */
static KMS_RESULT verb_seal(kmsctl_run *r, const char *op)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], op, path, sizeof(path)));
    kms_buf pt KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&pt, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(input_read("in", a->opt[KMSCTL_OPT_IN].str, IN_SECRET, &pt));
    if (pt.len == 0) {
        return fail(KMS_ERR_INVALID_ARGUMENT, "%s: the plaintext is empty", a->verb->name);
    }
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set_b64(body, "plaintext", &pt));
    KMS_GUARD(context_add(a, body));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return print_string_field(a, doc, "ciphertext");
}

/* unwrap, decrypt: token in, plaintext out. */
static KMS_RESULT verb_open(kmsctl_run *r, const char *op)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], op, path, sizeof(path)));
    kms_buf token KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&token, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(token_read("in", a->opt[KMSCTL_OPT_IN].str, &token));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "ciphertext", json_stringn((const char *)token.data, token.len)));
    KMS_GUARD(context_add(a, body));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, true);
    }
    return print_plaintext(a, doc, "plaintext");
}

static KMS_RESULT verb_datakey(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    bool with_pt = a->opt[KMSCTL_OPT_PLAINTEXT].set;
    if (with_pt && !a->opt[KMSCTL_OPT_JSON].set &&
        (!a->opt[KMSCTL_OPT_OUT].set || strcmp(a->opt[KMSCTL_OPT_OUT].str, "-") == 0)) {
        return fail(KMS_ERR_INVALID_ARGUMENT,
                    "datakey --plaintext: give --out FILE for the plaintext key (the "
                    "ciphertext goes to stdout)");
    }
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/datakey", path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_BYTES, body, "bytes"));
    KMS_GUARD(context_add(a, body));
    KMS_GUARD(opt_to_json(a, KMSCTL_OPT_PLAINTEXT, body, "include_plaintext"));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, with_pt);
    }
    if (!with_pt) {
        return print_string_field(a, doc, "ciphertext");
    }
    /* Plaintext to --out first: the token is useless without the key file. */
    KMS_GUARD(print_plaintext(a, doc, "plaintext"));
    const json_t *ct = json_object_get(doc, "ciphertext");
    if (!json_is_string(ct)) {
        return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"ciphertext\"");
    }
    printf("%s\n", json_string_value(ct));
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_rewrap(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/rewrap", path, sizeof(path)));
    kms_buf token KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&token, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(token_read("in", a->opt[KMSCTL_OPT_IN].str, &token));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(obj_set(body, "ciphertext", json_stringn((const char *)token.data, token.len)));
    KMS_GUARD(context_add(a, body));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return print_string_field(a, doc, "ciphertext");
}

static KMS_RESULT message_body(const kmsctl_args *a, json_t *body)
{
    kms_buf msg KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init_secret(&msg, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(input_read("in", a->opt[KMSCTL_OPT_IN].str, IN_LITERAL, &msg));
    return obj_set_b64(body, "message", &msg);
}

static KMS_RESULT verb_mac(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/mac", path, sizeof(path)));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(message_body(a, body));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    return print_string_field(a, doc, "mac");
}

static KMS_RESULT verb_verify(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    char path[KMSCTL_PATH_BYTES];
    KMS_GUARD(key_path(a->pos[0], "/verify", path, sizeof(path)));
    if (a->opt[KMSCTL_OPT_MAC].str[0] == '-') {
        return fail(KMS_ERR_INVALID_ARGUMENT, "--mac: use TOKEN or @FILE (stdin is --in's)");
    }
    kms_buf mac KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&mac, KMSCTL_INPUT_MAX_BYTES + 1);
    KMS_GUARD(token_read("mac", a->opt[KMSCTL_OPT_MAC].str, &mac));
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    KMS_GUARD(message_body(a, body));
    KMS_GUARD(obj_set(body, "mac", json_stringn((const char *)mac.data, mac.len)));
    KMS_GUARD(call(r, "POST", path, body, &doc));
    const json_t *valid = json_object_get(doc, "valid");
    if (!json_is_boolean(valid)) {
        return fail(KMS_ERR_JSON_INVALID, "kmsd's answer has no \"valid\"");
    }
    if (!json_is_true(valid)) {
        r->exit_code = KMSCTL_EXIT_MISMATCH;
    }
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    const json_t *ver = json_object_get(doc, "version");
    if (json_is_true(valid) && json_is_integer(ver)) {
        printf("valid (version %lld)\n", (long long)json_integer_value(ver));
    } else {
        printf("%s\n", json_is_true(valid) ? "valid" : "invalid");
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_health(kmsctl_run *r)
{
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", "/healthz", NULL, &doc));
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, r->http, false);
    }
    const char *status = json_string_value(json_object_get(doc, "status"));
    printf("%s\n", status ? status : "ok");
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_ready(kmsctl_run *r)
{
    kmsctl_http *c = r->http;
    KMS_GUARD(http_do(c, "GET", "/readyz", NULL));
    json_error_t jerr;
    json_t *doc JSON_AUTO =
        json_loadb((const char *)c->resp.data, c->resp.len, JSON_REJECT_DUPLICATES, &jerr);
    const char *status = json_string_value(json_object_get(doc, "status"));
    bool ready = c->status == 200 && status != NULL && strcmp(status, "ready") == 0;
    bool not_ready = c->status == 503 && status != NULL;
    if (!ready && !not_ready) {
        return answer_fail(c);
    }
    if (!ready) {
        r->exit_code = kms_error_exit_code(KMS_ERR_UNAVAILABLE);
    }
    if (r->a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(r->a, c, false);
    }
    if (ready) {
        printf("ready\n");
        return KMS_OK_RESULT;
    }
    const char *reason = json_string_value(json_object_get(doc, "reason"));
    char line[KMSCTL_MSG_BYTES];
    snprintf(line, sizeof(line), "not ready: %s", reason ? reason : "no reason given");
    sanitize(line);
    printf("%s\n", line);
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_wrap(kmsctl_run *r)
{
    return verb_seal(r, "/wrap");
}
static KMS_RESULT verb_encrypt(kmsctl_run *r)
{
    return verb_seal(r, "/encrypt");
}
static KMS_RESULT verb_unwrap(kmsctl_run *r)
{
    return verb_open(r, "/unwrap");
}
static KMS_RESULT verb_decrypt(kmsctl_run *r)
{
    return verb_open(r, "/decrypt");
}

/* ---- audit trail and exports (docs/audit.md) ---- */

static void time_text(int64_t t, char *out, size_t n)
{
    time_t tt = (time_t)t;
    struct tm tm;
    if (gmtime_r(&tt, &tm) == NULL || strftime(out, n, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
        snprintf(out, n, "%lld", (long long)t);
    }
}

static KMS_RESULT verb_audit(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    static const kmsctl_query_param params[] = {
        {KMSCTL_OPT_FROM, "from"},         {KMSCTL_OPT_TO, "to"},
        {KMSCTL_OPT_IDENTITY, "identity"}, {KMSCTL_OPT_OPERATION, "operation"},
        {KMSCTL_OPT_AUDIT_KEY, "key"},     {KMSCTL_OPT_AFTER, "after"},
        {KMSCTL_OPT_LIMIT, "limit"},
    };
    char query[KMSCTL_PATH_BYTES] = "";
    KMS_GUARD(query_from_options(r, params, KMS_ARRAY_LEN(params), query, sizeof(query)));
    char path[KMSCTL_PATH_BYTES + 32];
    snprintf(path, sizeof(path), "/v1/audit%s", query);
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(call(r, "GET", path, NULL, &doc));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        return print_raw(a, r->http, false);
    }
    json_t *recs = json_object_get(doc, "records");
    printf("%-8s %-20s %-28s %-22s %-16s %-16s %-7s %s\n", "SEQ", "TIME", "IDENTITY", "SOURCE",
           "OPERATION", "KEY", "VERSION", "RESULT");
    size_t i;
    json_t *e;
    json_array_foreach(recs, i, e)
    {
        char when[32], ver[24];
        time_text((int64_t)json_integer_value(json_object_get(e, "time")), when, sizeof(when));
        json_int_t v = json_integer_value(json_object_get(e, "version"));
        json_int_t tv = json_integer_value(json_object_get(e, "to_version"));
        if (tv != 0) {
            snprintf(ver, sizeof(ver), "%lld>%lld", (long long)v, (long long)tv);
        } else if (v != 0) {
            snprintf(ver, sizeof(ver), "%lld", (long long)v);
        } else {
            snprintf(ver, sizeof(ver), "-");
        }
        const char *id = json_string_value(json_object_get(e, "identity"));
        const char *key = json_string_value(json_object_get(e, "key"));
        printf("%-8lld %-20s %-28s %-22s %-16s %-16s %-7s %lld %s\n",
               (long long)json_integer_value(json_object_get(e, "seq")), when,
               id != NULL && id[0] ? id : "-",
               json_string_value(json_object_get(e, "source")) ?: "-",
               json_string_value(json_object_get(e, "operation")) ?: "-",
               key != NULL && key[0] ? key : "-", ver,
               (long long)json_integer_value(json_object_get(e, "status")),
               json_string_value(json_object_get(e, "result")) ?: "-");
    }
    json_t *next = json_object_get(doc, "next");
    if (json_is_integer(next)) {
        printf("more: kmsctl audit ... --after %lld\n", (long long)json_integer_value(next));
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT verb_export(kmsctl_run *r)
{
    const kmsctl_args *a = r->a;
    json_t *body JSON_AUTO = NULL;
    json_t *doc JSON_AUTO = NULL;
    KMS_GUARD(new_object(&body));
    if (a->opt[KMSCTL_OPT_FROM].set) {
        KMS_GUARD(obj_set(body, "from", json_integer(a->opt[KMSCTL_OPT_FROM].num)));
    }
    if (a->opt[KMSCTL_OPT_TO].set) {
        KMS_GUARD(obj_set(body, "to", json_integer(a->opt[KMSCTL_OPT_TO].num)));
    }
    KMS_GUARD(call(r, "POST", "/v1/export", body, &doc));
    const char *dir = a->opt[KMSCTL_OPT_OUT_DIR].str;
    KMS_GUARD(kmsctl_export_write(doc, dir));
    const char *man =
        json_string_value(json_object_get(json_object_get(doc, "files"), "manifest.json"));
    if (a->opt[KMSCTL_OPT_JSON].set) {
        fputs(man != NULL ? man : "{}\n", stdout);
        return KMS_OK_RESULT;
    }
    json_t *m JSON_AUTO = man != NULL ? json_loads(man, 0, NULL) : NULL;
    json_t *recs = json_object_get(m, "records");
    printf("export written to %s: %lld audit records (seq %lld..%lld), head signed at seq %lld\n",
           dir, (long long)json_integer_value(json_object_get(recs, "count")),
           (long long)json_integer_value(json_object_get(recs, "first_seq")),
           (long long)json_integer_value(json_object_get(recs, "last_seq")),
           (long long)json_integer_value(json_object_get(json_object_get(m, "head"), "seq")));
    printf("check it offline: kmsctl verify-export %s --public-key <trusted key>\n", dir);
    return KMS_OK_RESULT;
}

/* Offline: no connection is made (main does not resolve one for it). */
static KMS_RESULT verb_verify_export(kmsctl_run *r)
{
    kmsctl_verify_report rep;
    const kmsctl_value *pin = &r->a->opt[KMSCTL_OPT_PUBLIC_KEY];
    KMS_GUARD(kmsctl_verify_export(r->a->pos[0], pin->set ? pin->str : NULL, stdout, &rep));
    if (rep.problems > 0) {
        printf("verify-export: %zu problem(s): the export does not verify\n", rep.problems);
        r->exit_code = 1;
    } else {
        printf("verify-export: the export verifies\n");
    }
    return KMS_OK_RESULT;
}

typedef KMS_RESULT (*verb_fn)(kmsctl_run *r);

static const verb_fn verb_run[KMSCTL_VERB_COUNT] = {
    [KMSCTL_VERB_KEY_CREATE] = verb_key_create,
    [KMSCTL_VERB_KEY_LIST] = verb_key_list,
    [KMSCTL_VERB_KEY_SHOW] = verb_key_show,
    [KMSCTL_VERB_KEY_UPDATE] = verb_key_update,
    [KMSCTL_VERB_KEY_ROTATE] = verb_key_rotate,
    [KMSCTL_VERB_KEY_ROLLBACK] = verb_key_rollback,
    [KMSCTL_VERB_KEY_SET_STATE] = verb_key_set_state,
    [KMSCTL_VERB_MASTER_ROTATE] = verb_master_rotate,
    [KMSCTL_VERB_MASTER_SHOW] = verb_master_show,
    [KMSCTL_VERB_ROTATIONS] = verb_rotations,
    [KMSCTL_VERB_CHECK] = verb_check,
    [KMSCTL_VERB_WRAP] = verb_wrap,
    [KMSCTL_VERB_UNWRAP] = verb_unwrap,
    [KMSCTL_VERB_ENCRYPT] = verb_encrypt,
    [KMSCTL_VERB_DECRYPT] = verb_decrypt,
    [KMSCTL_VERB_DATAKEY] = verb_datakey,
    [KMSCTL_VERB_REWRAP] = verb_rewrap,
    [KMSCTL_VERB_MAC] = verb_mac,
    [KMSCTL_VERB_VERIFY] = verb_verify,
    [KMSCTL_VERB_HEALTH] = verb_health,
    [KMSCTL_VERB_READY] = verb_ready,
    [KMSCTL_VERB_STATUS] = verb_status,
    [KMSCTL_VERB_REPORT] = verb_report,
    [KMSCTL_VERB_AUDIT] = verb_audit,
    [KMSCTL_VERB_EXPORT] = verb_export,
    [KMSCTL_VERB_VERIFY_EXPORT] = verb_verify_export,
};

static int finish(kms_result r)
{
    if (kms_is_ok(r)) {
        return 0;
    }
    const char *msg = g_msg[0] != '\0'                ? g_msg
                      : kms_error_detail()[0] != '\0' ? kms_error_detail()
                                                      : kms_error_message(r.err);
    fflush(stdout);
    fprintf(stderr, "kmsctl: %s\n", msg);
    return kms_error_exit_code(r.err);
}

int main(int argc, char **argv)
{
    /* kmsctl holds plaintext keys: no core dumps, no ptrace by other
     * processes of the same user. */
    kms_result r = kms_process_harden();
    if (!kms_is_ok(r)) {
        return finish(r);
    }
    json_set_alloc_funcs(json_wipe_malloc, json_wipe_free);
    kmsctl_args args;
    r = kmsctl_args_parse(argc, argv, (int64_t)time(NULL), &args);
    if (!kms_is_ok(r)) {
        return finish(r);
    }
    if (args.opt[KMSCTL_OPT_HELP].set || args.verb == NULL) {
        if (args.verb != NULL) {
            kmsctl_help_verb(args.verb, stdout);
        } else {
            kmsctl_help_main(stdout);
        }
        return 0;
    }
    kmsctl_conn conn = {0};
    kmsctl_http http;
    memset(&http, 0, sizeof(http));
    kmsctl_run run = {.a = &args, .http = &http, .exit_code = 0};
    if (args.verb->id == KMSCTL_VERB_VERIFY_EXPORT) {
        r = verb_verify_export(&run); /* offline: no kmsd */
    } else {
        r = conn_resolve(&args, &conn);
        if (kms_is_ok(r)) {
            r = http_init(&http, &conn);
        }
        if (kms_is_ok(r)) {
            r = verb_run[args.verb->id](&run);
        }
    }
    if (fflush(stdout) != 0 && kms_is_ok(r)) {
        r = fail(KMS_ERR_IO, "stdout: %s", strerror(errno));
    }
    http_free(&http);
    conn_free(&conn);
    int code = finish(r);
    return code != 0 ? code : run.exit_code;
}
