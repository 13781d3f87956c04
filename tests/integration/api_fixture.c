#define _GNU_SOURCE
#include "api_fixture.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Whether [::1]:port can be bound (hosts without IPv6 loopback skip it). */
static bool ipv6_port_free(int port)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6,
                             .sin6_port = htons((uint16_t)port),
                             .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (fd >= 0) {
        close(fd);
    }
    return ok;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &l) != 0) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) {
        return -1;
    }
    size_t n = strlen(text);
    ssize_t w = write(fd, text, n);
    close(fd);
    return w == (ssize_t)n ? 0 : -1;
}

static const char default_policy[] =
    "{\"rules\": [\n"
    " {\"identity\": \"spiffe://kmsd.dev/app\", \"role\": \"app\", \"keys\": [\"app-*\", "
    "\"mac-*\"]},\n"
    " {\"identity\": \"spiffe://kmsd.dev/migrator\", \"role\": \"migrator\", \"keys\": "
    "[\"app-*\"]},\n"
    " {\"identity\": \"spiffe://kmsd.dev/admin\", \"role\": \"admin\", \"keys\": [\"*\"]},\n"
    " {\"identity\": \"spiffe://kmsd.dev/auditor\", \"role\": \"auditor\", \"keys\": [\"*\"]}\n"
    "]}\n";

int api_fixture_write_policy(api_fixture *f, const char *json)
{
    /* Atomic replace, as an operator's deploy tool would do. */
    char tmp[400];
    if (json == NULL) {
        json = default_policy;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp", f->policy);
    if (write_file(tmp, json, 0644) != 0) {
        return -1;
    }
    return rename(tmp, f->policy);
}

int api_fixture_start(api_fixture *f, const char *extra_conf)
{
    const char *src = getenv("KMS_SOURCE_DIR");
    const char *build = getenv("KMS_BUILD_DIR");
    if (src == NULL || build == NULL) {
        fprintf(stderr, "KMS_SOURCE_DIR / KMS_BUILD_DIR not set (run under ctest)\n");
        return -1;
    }
    /* A test that restarts kmsd with other settings stops the one running
     * first: no kmsd outlives the test that started it. */
    if (f->pid > 0) {
        (void)api_fixture_stop(f, SIGTERM);
    }
    if (f->dir[0] == '\0') {
        if (kms_test_token_setup(&f->tok, f->fault) != 0) {
            return -1;
        }
        snprintf(f->dir, sizeof(f->dir), "%s/api", f->tok.dir);
        if (mkdir(f->dir, 0700) != 0) {
            return -1;
        }
        snprintf(f->pki, sizeof(f->pki), "%s/pki", f->dir);
        char cmd[1200];
        snprintf(cmd, sizeof(cmd), "'%s/certs/make-dev-pki' '%s' >'%s/pki.log' 2>&1", src, f->pki,
                 f->dir);
        if (system(cmd) != 0) {
            fprintf(stderr, "make-dev-pki failed; see %s/pki.log\n", f->dir);
            return -1;
        }
        snprintf(f->policy, sizeof(f->policy), "%s/policy.json", f->dir);
        if (api_fixture_write_policy(f, default_policy) != 0) {
            return -1;
        }
    }
    f->port = free_port();
    f->ipv6 = f->port > 0 && ipv6_port_free(f->port);
    char listen6[64] = "";
    if (f->ipv6) {
        snprintf(listen6, sizeof(listen6), "listen = [::1]:%d\n", f->port);
    }
    snprintf(f->conf, sizeof(f->conf), "%s/kmsd.conf", f->dir);
    snprintf(f->log, sizeof(f->log), "%s/kmsd.log", f->dir);
    snprintf(f->kmsd, sizeof(f->kmsd), "%s/tools/kmsd", build);
    char conf[4096];
    snprintf(conf, sizeof(conf),
             "listen = 127.0.0.1:%d\n%s"
             "tls_cert = %s/server.crt\ntls_key = %s/server.key\ntls_ca = %s/ca.crt\n"
             "tls_crl = %s/crl.pem\npolicy = %s\nstore_path = %s/store\n"
             "hsm_module = %s\nhsm_token_uri = %s\nhsm_pin_file = %s\n"
             "connection_timeout = 3\nready_timeout_ms = 3000\ndrain_timeout = 10\n"
             "scheduler_interval = 0\nlog_level = info\n%s",
             f->port, listen6, f->pki, f->pki, f->pki, f->pki, f->policy, f->dir,
             f->tok.module_path, f->tok.token_uri, f->tok.pin_path,
             extra_conf != NULL ? extra_conf : "");
    char store[400];
    snprintf(store, sizeof(store), "%s/store", f->dir);
    mkdir(store, 0700);
    if (write_file(f->conf, conf, 0600) != 0) {
        return -1;
    }
    f->pid = fork();
    if (f->pid < 0) {
        return -1;
    }
    if (f->pid == 0) {
        /* Its own process group, so that cleanup reaches every worker. */
        setpgid(0, 0);
        int fd = open(f->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
            dup2(fd, STDOUT_FILENO);
        }
        execl(f->kmsd, "kmsd", "--config", f->conf, (char *)NULL);
        _exit(127);
    }
    /* Ready when /healthz answers; bounded to 20 s. */
    for (int i = 0; i < 200; i++) {
        api_resp r;
        api_call(f, "admin", "GET", "/healthz", NULL, &r);
        long st = r.status;
        api_resp_free(&r);
        if (st == 200) {
            return 0;
        }
        int ws;
        if (waitpid(f->pid, &ws, WNOHANG) == f->pid) {
            fprintf(stderr, "kmsd exited at start; see %s\n", f->log);
            f->pid = 0;
            return -1;
        }
        struct timespec d = {0, 100 * 1000000L};
        nanosleep(&d, NULL);
    }
    fprintf(stderr, "kmsd did not become healthy; see %s\n", f->log);
    return -1;
}

int api_fixture_stop(api_fixture *f, int sig)
{
    if (f->pid <= 0) {
        return -1;
    }
    kill(f->pid, sig);
    int ws = 0;
    for (int i = 0; i < 300; i++) {
        pid_t p = waitpid(f->pid, &ws, WNOHANG);
        if (p == f->pid) {
            f->pid = 0;
            return WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
        }
        struct timespec d = {0, 50 * 1000000L};
        nanosleep(&d, NULL);
    }
    kill(-f->pid, SIGKILL);
    waitpid(f->pid, &ws, 0);
    f->pid = 0;
    return -1;
}

void api_fixture_cleanup(api_fixture *f)
{
    if (f->pid > 0) {
        /* A failed test may leave kmsd running: stop the whole group. */
        pid_t pg = f->pid;
        api_fixture_stop(f, SIGKILL);
        kill(-pg, SIGKILL);
    }
    if (getenv("KMS_KEEP_TEST_DIR") == NULL && f->tok.dir[0] != '\0') {
        kms_test_token_teardown(&f->tok);
    }
}

typedef struct {
    char *buf;
    size_t len;
} sink;

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
    sink *s = arg;
    size_t add = sz * n;
    char *nb = realloc(s->buf, s->len + add + 1);
    if (nb == NULL) {
        return 0;
    }
    memcpy(nb + s->len, p, add);
    s->buf = nb;
    s->len += add;
    s->buf[s->len] = '\0';
    return add;
}

static size_t on_header(char *p, size_t sz, size_t n, void *arg)
{
    api_resp *r = arg;
    size_t len = sz * n;
    static const struct {
        const char *name;
        size_t off, cap;
    } want[] = {
        {"x-request-id:", offsetof(api_resp, request_id), sizeof(((api_resp *)0)->request_id)},
        {"retry-after:", offsetof(api_resp, retry_after), sizeof(((api_resp *)0)->retry_after)},
    };
    for (size_t i = 0; i < 2; i++) {
        size_t nl = strlen(want[i].name);
        if (len > nl && strncasecmp(p, want[i].name, nl) == 0) {
            const char *v = p + nl;
            size_t vl = len - nl;
            while (vl > 0 && (*v == ' ')) {
                v++, vl--;
            }
            while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n')) {
                vl--;
            }
            if (vl >= want[i].cap) {
                vl = want[i].cap - 1;
            }
            char *dst = (char *)r + want[i].off;
            memcpy(dst, v, vl);
            dst[vl] = '\0';
        }
    }
    return len;
}

void api_call_ct(api_fixture *f, const char *role, const char *method, const char *path,
                 const char *body, const char *content_type, api_resp *r)
{
    memset(r, 0, sizeof(*r));
    CURL *c = curl_easy_init();
    if (c == NULL) {
        return;
    }
    char url[1024], cert[400], key[400], ca[400], ct[200];
    snprintf(url, sizeof(url), "https://%s:%d%s", f->use_ipv6 ? "[::1]" : "127.0.0.1", f->port,
             path);
    snprintf(ca, sizeof(ca), "%s/ca.crt", f->pki);
    sink s = {0};
    struct curl_slist *h = NULL;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, ca);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (role != NULL) {
        snprintf(cert, sizeof(cert), "%s/%s.crt", f->pki, role);
        snprintf(key, sizeof(key), "%s/%s.key", f->pki, role);
        curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
        curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    }
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (body != NULL) {
        snprintf(ct, sizeof(ct), "Content-Type: %s",
                 content_type != NULL ? content_type : "application/json");
        h = curl_slist_append(h, ct);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &s);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    r->curl_code = (int)curl_easy_perform(c);
    if (r->curl_code == CURLE_OK) {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    }
    r->body = s.buf;
    r->len = s.len;
    if (s.buf != NULL) {
        r->json = json_loadb(s.buf, s.len, 0, NULL);
    }
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
}

void api_call(api_fixture *f, const char *role, const char *method, const char *path,
              const char *body, api_resp *r)
{
    api_call_ct(f, role, method, path, body, NULL, r);
}

void api_resp_free(api_resp *r)
{
    free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof(*r));
}
