/*
 * Fuzz target: `kmsctl verify-export` (tools/kmsctl_verify.c), which reads
 * an export directory that an auditor received from elsewhere: any byte of
 * it may have been changed by whoever wants a tampered trail to pass.
 *
 * The input is a bundle of files: sections "=== NAME\n" followed by the
 * file's bytes, which end where "\n=== " starts the next section (that
 * newline belongs to the separator) or at the end of the input. The section
 * "@pin" is the public key given out of band (--public-key FILE); any other
 * plain NAME is a file of the export directory. tests/fuzz/make_export_seeds.sh
 * makes the seeds from a real kmsd's export.
 *
 * Invariants:
 *  - the verifier fails only when it cannot examine the export at all (no
 *    manifest.json, an unreadable pinned key); everything else is a report;
 *    an error left in OpenSSL's queue beforehand changes nothing;
 *  - an export it accepts (no problem reported) is one the signing key
 *    vouches for. Checked here independently, with OpenSSL and jansson:
 *    manifest.sig verifies manifest.json under public-key.pem, that key is
 *    the pinned one when one is given, and every file the manifest lists
 *    hashes to the SHA-256 it states.
 */
#include "fuzz_check.h"
#include "kms_hash.h"
#include "kmsctl_verify.h"

#include <jansson.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <limits.h>
#include <sys/stat.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SECTIONS 16
#define MAX_NAME     64

typedef struct {
    char name[MAX_NAME + 1];
    const uint8_t *data;
    size_t len;
} section;

/* One scratch directory for the process: the export in dir/x, the pinned
 * key in dir/pin.pem; emptied before each input, removed at exit. */
static char dir[] = "/tmp/kms-fuzz-export-XXXXXX";
static char written[MAX_SECTIONS][MAX_NAME + 1];
static size_t nwritten;
static FILE *sink;

static void path_of(char *out, size_t cap, const char *name)
{
    int n = snprintf(out, cap, "%s/x/%s", dir, name);
    CHECK(n > 0 && (size_t)n < cap);
}

static void empty_export(void)
{
    char p[PATH_MAX];
    for (size_t i = 0; i < nwritten; i++) {
        path_of(p, sizeof(p), written[i]);
        unlink(p);
    }
    nwritten = 0;
    snprintf(p, sizeof(p), "%s/pin.pem", dir);
    unlink(p);
}

static void remove_scratch(void)
{
    empty_export();
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/x", dir);
    rmdir(p);
    rmdir(dir);
    fclose(sink);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    CHECK(mkdtemp(dir) != NULL);
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/x", dir);
    CHECK(mkdir(p, 0700) == 0);
    sink = fopen("/dev/null", "w");
    CHECK(sink != NULL);
    atexit(remove_scratch);
    return 0;
}

/* A name the bundle may use: plain, no separators, not "." or "..". */
static bool plain_name(const uint8_t *p, size_t n)
{
    if (n == 0 || n > MAX_NAME || (n <= 2 && p[0] == '.' && (n == 1 || p[1] == '.'))) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '/' || p[i] == '\0' || p[i] == '\n') {
            return false;
        }
    }
    return true;
}

static size_t split(const uint8_t *data, size_t size, section *out)
{
    static const char mark[] = "=== ";
    const size_t ml = sizeof(mark) - 1;
    size_t n = 0, at = 0;
    if (size < ml || memcmp(data, mark, ml) != 0) {
        return 0;
    }
    while (at < size && n < MAX_SECTIONS) {
        const uint8_t *nl = memchr(data + at + ml, '\n', size - at - ml);
        if (nl == NULL) {
            break;
        }
        const uint8_t *name = data + at + ml;
        size_t name_len = (size_t)(nl - name);
        size_t body = (size_t)(nl - data) + 1;
        /* The body runs to the next "\n=== " or the end. */
        size_t end = size, next = size;
        for (size_t i = body; i + ml < size; i++) {
            if (data[i] == '\n' && memcmp(data + i + 1, mark, ml) == 0) {
                end = i;
                next = i + 1;
                break;
            }
        }
        if (plain_name(name, name_len)) {
            memcpy(out[n].name, name, name_len);
            out[n].name[name_len] = '\0';
            out[n].data = data + body;
            out[n].len = end - body;
            n++;
        }
        at = next;
    }
    return n;
}

static void write_file(const char *path, const uint8_t *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    CHECK(n == 0 || fwrite(p, 1, n, f) == n);
    CHECK(fclose(f) == 0);
}

static const section *find(const section *s, size_t n, const char *name)
{
    const section *hit = NULL;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(s[i].name, name) == 0) {
            hit = &s[i]; /* the last one written wins, as on disk */
        }
    }
    return hit;
}

/* The key in a section, parsed on an empty error queue. */
static EVP_PKEY *key_of(const section *s)
{
    ERR_clear_error();
    if (s == NULL || s->len > INT_MAX) {
        return NULL;
    }
    BIO *b = BIO_new_mem_buf(s->data, (int)s->len);
    CHECK(b != NULL);
    EVP_PKEY *k = PEM_read_bio_PUBKEY(b, NULL, NULL, NULL);
    BIO_free(b);
    return k;
}

/* What acceptance must mean, checked without the verifier's code. */
static void check_accepted(const section *s, size_t n, bool pinned)
{
    const section *man = find(s, n, "manifest.json");
    const section *sig = find(s, n, "manifest.sig");
    CHECK(man != NULL && sig != NULL);
    EVP_PKEY *key = key_of(find(s, n, "public-key.pem"));
    CHECK(key != NULL);
    if (pinned) {
        EVP_PKEY *pin = key_of(find(s, n, "@pin"));
        CHECK(pin != NULL && EVP_PKEY_eq(key, pin) == 1);
        EVP_PKEY_free(pin);
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    CHECK(ctx != NULL);
    CHECK(EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, key) == 1);
    CHECK(EVP_DigestVerify(ctx, sig->data, sig->len, man->data, man->len) == 1);
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);

    json_t *doc = json_loadb((const char *)man->data, man->len, JSON_REJECT_DUPLICATES, NULL);
    CHECK(doc != NULL);
    json_t *files = json_object_get(doc, "files");
    CHECK(json_is_object(files) && json_object_size(files) > 0);
    const char *name;
    json_t *want;
    json_object_foreach(files, name, want)
    {
        const section *f = find(s, n, name);
        CHECK(f != NULL && json_is_string(want));
        uint8_t h[32];
        char hex[65];
        CHECK(kms_is_ok(kms_sha256(f->data != NULL ? f->data : (const uint8_t *)"", f->len, h)));
        kms_hex_encode(h, sizeof(h), hex);
        CHECK(strcmp(hex, json_string_value(want)) == 0);
    }
    json_decref(doc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    section s[MAX_SECTIONS];
    size_t n = split(data, size, s);
    empty_export();
    char p[PATH_MAX], pin[PATH_MAX];
    bool pinned = false, has_manifest = false;
    snprintf(pin, sizeof(pin), "%s/pin.pem", dir);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(s[i].name, "@pin") == 0) {
            write_file(pin, s[i].data, s[i].len);
            pinned = true;
            continue;
        }
        path_of(p, sizeof(p), s[i].name);
        write_file(p, s[i].data, s[i].len);
        has_manifest = has_manifest || strcmp(s[i].name, "manifest.json") == 0;
        bool seen = false;
        for (size_t j = 0; j < nwritten; j++) {
            seen = seen || strcmp(written[j], s[i].name) == 0;
        }
        if (!seen) {
            memcpy(written[nwritten++], s[i].name, sizeof(written[0]));
        }
    }
    snprintf(p, sizeof(p), "%s/x", dir);
    /* An error an earlier call left in OpenSSL's queue (in kmsctl: a bad
     * public-key.pem read before the pinned key) must not change the
     * answer. */
    ERR_raise_data(ERR_LIB_USER, ERR_R_INTERNAL_ERROR, "left by an earlier call");
    kmsctl_verify_report rep;
    kms_result r = kmsctl_verify_export(p, pinned ? pin : NULL, sink, &rep);
    if (!kms_is_ok(r)) {
        /* Only an export that cannot be examined at all. */
        CHECK(r.err == KMS_ERR_NOT_FOUND || r.err == KMS_ERR_INVALID_ARGUMENT);
        CHECK(r.err != KMS_ERR_NOT_FOUND || !has_manifest);
        if (r.err == KMS_ERR_INVALID_ARGUMENT) {
            CHECK(pinned);
            EVP_PKEY *k = key_of(find(s, n, "@pin"));
            CHECK(k == NULL);
        }
        return 0;
    }
    CHECK(has_manifest);
    if (rep.problems == 0) {
        check_accepted(s, n, pinned);
    }
    return 0;
}
