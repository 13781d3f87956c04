/*
 * Offline verification of a compliance export (kmsctl_verify.h). Only the
 * files and OpenSSL: no kmsd, no HSM. The checks, in order:
 *   1. manifest.sig is a signature of manifest.json by public-key.pem (and
 *      that key is the pinned one, when one is given);
 *   2. every file listed in the manifest has the listed SHA-256;
 *   3. every signed chain position (anchor, head, stored heads) verifies;
 *   4. audit.jsonl is the piece of the chain the manifest describes: seqs
 *      consecutive from anchor.seq + 1, each record's "prev" the hash of the
 *      record before, the last hash equal to the manifest's end hash, and
 *      every signed head inside the piece matching the recomputed hash.
 * A changed record shows as a broken link after it; a changed "prev" as
 * broken links on both sides of its record, which is then the one named.
 */
#define _GNU_SOURCE
#include "kmsctl_verify.h"

#include "kms_base64.h"
#include "kms_buf.h"
#include "kms_hash.h"

#include <jansson.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define V_FILE_MAX ((size_t)1 << 30)
#define V_HASH     32

typedef struct {
    FILE *out;
    kmsctl_verify_report *rep;
} vctx;

static void vfail(vctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void vfail(vctx *v, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL: ", v->out);
    vfprintf(v->out, fmt, ap);
    fputc('\n', v->out);
    va_end(ap);
    v->rep->problems++;
}

static void vok(vctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void vok(vctx *v, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ok: ", v->out);
    vfprintf(v->out, fmt, ap);
    fputc('\n', v->out);
    va_end(ap);
}

/* Reads dir/name; *found false if it does not exist. */
static KMS_RESULT read_file(const char *dir, const char *name, kms_buf *b, bool *found)
{
    char path[4096];
    int n = dir != NULL ? snprintf(path, sizeof(path), "%s/%s", dir, name)
                        : snprintf(path, sizeof(path), "%s", name);
    KMS_ENSURE(n > 0 && (size_t)n < sizeof(path), KMS_ERR_INVALID_ARGUMENT);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        *found = false;
        KMS_ENSURE_MSG(errno == ENOENT, KMS_ERR_IO, "%s: %s", path, strerror(errno));
        return KMS_OK_RESULT;
    }
    *found = true;
    kms_buf_init(b, V_FILE_MAX);
    char tmp[65536];
    size_t got;
    kms_result r = KMS_OK_RESULT;
    while ((got = fread(tmp, 1, sizeof(tmp), f)) > 0 && kms_is_ok(r))
        r = kms_buf_append(b, tmp, got);
    if (kms_is_ok(r) && ferror(f))
        r = kms_error_raisef(KMS_ERR_IO, __FILE__, __LINE__, "%s: read error", path);
    fclose(f);
    return r;
}

static bool hex_to_hash(const char *hex, uint8_t out[V_HASH])
{
    return hex != NULL && strlen(hex) == 2 * V_HASH &&
           kms_is_ok(kms_hex_decode(hex, 2 * V_HASH, out, V_HASH));
}

/* On an empty error queue: OpenSSL 3's PEM reader skips a block it cannot
 * decode only when the first error queued is its own "unsupported", so an
 * error left by an earlier call (a bad public-key.pem read before the pinned
 * key) would make a readable key unreadable (found by fuzz_export). */
static EVP_PKEY *pem_key(const kms_buf *b)
{
    ERR_clear_error();
    BIO *bio = BIO_new_mem_buf(b->data, (int)b->len);
    if (bio == NULL)
        return NULL;
    EVP_PKEY *k = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (k == NULL)
        ERR_clear_error();
    return k;
}

static bool sig_ok(EVP_PKEY *key, const uint8_t *msg, size_t n, const uint8_t *sig, size_t sig_len)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, key) == 1 &&
              EVP_DigestVerify(md, sig, sig_len, msg, n) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

/* A signed chain position from the manifest: its message must state the
 * seq and hash listed beside it, and the signature must verify. */
static void check_signed(vctx *v, EVP_PKEY *key, const json_t *o, const char *what,
                         uint64_t *seq_out, uint8_t hash_out[V_HASH], bool *valid)
{
    *valid = false;
    json_t *jseq = json_object_get(o, "seq");
    const char *hash = json_string_value(json_object_get(o, "hash"));
    const char *msg = json_string_value(json_object_get(o, "message"));
    const char *sig64 = json_string_value(json_object_get(o, "signature"));
    if (!json_is_integer(jseq) || !hex_to_hash(hash, hash_out) || msg == NULL || sig64 == NULL) {
        vfail(v, "%s: malformed in manifest.json", what);
        return;
    }
    *seq_out = (uint64_t)json_integer_value(jseq);
    json_t *m = json_loads(msg, JSON_REJECT_DUPLICATES, NULL);
    bool consistent =
        m != NULL &&
        strcmp(json_string_value(json_object_get(m, "type")) ?: "", "kmsd-audit-head") == 0 &&
        json_integer_value(json_object_get(m, "seq")) == json_integer_value(jseq) &&
        strcmp(json_string_value(json_object_get(m, "hash")) ?: "", hash) == 0;
    json_decref(m);
    if (!consistent) {
        vfail(v, "%s (seq %" PRIu64 "): signed message does not state this seq and hash", what,
              *seq_out);
        return;
    }
    /* The length is checked before decoding: EVP_DecodeBlock writes 3 bytes
     * per 4 characters, and the text comes from the export. */
    unsigned char sig[256];
    size_t sig64_len = strlen(sig64);
    int sl = sig64_len <= 340 && sig64_len % 4 == 0
                 ? EVP_DecodeBlock(sig, (const unsigned char *)sig64, (int)sig64_len)
                 : -1;
    if (sl < 0) {
        vfail(v, "bad signature: %s seq %" PRIu64 " (not base64)", what, *seq_out);
        return;
    }
    /* EVP_DecodeBlock counts the '=' padding as zero bytes. */
    size_t len = (size_t)sl, pad = 0;
    for (size_t i = sig64_len; i > 0 && sig64[i - 1] == '=' && pad < 3; i--)
        pad++;
    if (pad > 2 || pad > len) {
        vfail(v, "bad signature: %s seq %" PRIu64 " (not base64)", what, *seq_out);
        return;
    }
    len -= pad;
    if (!sig_ok(key, (const uint8_t *)msg, strlen(msg), sig, len)) {
        vfail(v, "bad signature: %s seq %" PRIu64, what, *seq_out);
        return;
    }
    *valid = true;
}

typedef struct {
    uint64_t seq;
    uint8_t prev[V_HASH]; /* as the line states it */
    uint8_t h[V_HASH];    /* SHA-256(prev || line) */
    bool ok;              /* parsed */
} vline;

static void check_chain(vctx *v, const kms_buf *audit, const json_t *man, json_t *heads)
{
    json_t *anchor = json_object_get(man, "anchor");
    json_t *end = json_object_get(man, "end");
    json_t *records = json_object_get(man, "records");
    uint8_t anchor_h[V_HASH], end_h[V_HASH];
    if (!json_is_integer(json_object_get(anchor, "seq")) ||
        !hex_to_hash(json_string_value(json_object_get(anchor, "hash")), anchor_h) ||
        !json_is_integer(json_object_get(end, "seq")) ||
        !hex_to_hash(json_string_value(json_object_get(end, "hash")), end_h) ||
        !json_is_integer(json_object_get(records, "count"))) {
        vfail(v, "manifest.json: anchor, end or records malformed");
        return;
    }
    uint64_t anchor_seq = (uint64_t)json_integer_value(json_object_get(anchor, "seq"));
    uint64_t end_seq = (uint64_t)json_integer_value(json_object_get(end, "seq"));
    uint64_t count = (uint64_t)json_integer_value(json_object_get(records, "count"));

    /* Split into lines; each record line ends with '\n'. */
    size_t nlines = 0;
    for (size_t i = 0; i < audit->len; i++)
        nlines += audit->data[i] == '\n';
    if (audit->len > 0 && audit->data[audit->len - 1] != '\n') {
        vfail(v, "audit.jsonl: last line has no newline (file truncated)");
        nlines++;
    }
    vline *ls = calloc(nlines + 1, sizeof(*ls));
    if (ls == NULL) {
        vfail(v, "out of memory");
        return;
    }
    size_t pos = 0;
    for (size_t i = 0; i < nlines; i++) {
        const uint8_t *p = audit->data + pos;
        size_t rem = audit->len - pos;
        const uint8_t *nl = memchr(p, '\n', rem);
        size_t n = nl != NULL ? (size_t)(nl - p) : rem;
        pos += n + (nl != NULL ? 1 : 0);
        json_t *o = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, NULL);
        json_t *js = json_object_get(o, "seq");
        if (o == NULL || !json_is_integer(js) || json_integer_value(js) < 1 ||
            !hex_to_hash(json_string_value(json_object_get(o, "prev")), ls[i].prev)) {
            vfail(v, "audit.jsonl line %zu: not an audit record", i + 1);
        } else {
            ls[i].seq = (uint64_t)json_integer_value(js);
            ls[i].ok = true;
            kms_iov parts[2] = {{ls[i].prev, V_HASH}, {p, n}};
            if (!kms_is_ok(kms_sha256_iov(parts, 2, ls[i].h)))
                ls[i].ok = false;
        }
        json_decref(o);
    }

    /* Order: consecutive seqs from the anchor on. */
    uint64_t expect = anchor_seq + 1;
    bool order_ok = true;
    for (size_t i = 0; i < nlines; i++) {
        if (!ls[i].ok)
            continue;
        if (ls[i].seq < expect) {
            vfail(v, "record seq %" PRIu64 " out of order (line %zu, after seq %" PRIu64 ")",
                  ls[i].seq, i + 1, expect - 1);
            order_ok = false;
            continue;
        }
        if (ls[i].seq > expect) {
            if (ls[i].seq == expect + 1)
                vfail(v, "record seq %" PRIu64 " missing (chain gap before line %zu)", expect,
                      i + 1);
            else
                vfail(v, "records seq %" PRIu64 "..%" PRIu64 " missing (chain gap before line %zu)",
                      expect, ls[i].seq - 1, i + 1);
            order_ok = false;
        }
        expect = ls[i].seq + 1;
    }

    /* Links: link[i] joins line i-1 (or the anchor) to line i; link[n]
     * joins the last line to the manifest's end hash. */
    bool *bad = calloc(nlines + 1, sizeof(*bad));
    if (bad == NULL) {
        free(ls);
        vfail(v, "out of memory");
        return;
    }
    for (size_t i = 0; i <= nlines; i++) {
        const uint8_t *before = i == 0 ? anchor_h : ls[i - 1].h;
        const uint8_t *after = i == nlines ? end_h : ls[i].prev;
        if (i < nlines && !ls[i].ok)
            continue;
        if (i > 0 && !ls[i - 1].ok)
            continue;
        bad[i] = memcmp(before, after, V_HASH) != 0;
    }
    if (order_ok) {
        for (size_t i = 0; i <= nlines; i++) {
            if (!bad[i])
                continue;
            if (i < nlines && bad[i + 1]) {
                /* Both links of line i broken: its own "prev" was changed. */
                vfail(v, "record seq %" PRIu64 " changed (line %zu)", ls[i].seq, i + 1);
                bad[i + 1] = false;
            } else if (i == 0) {
                vfail(v,
                      "record seq %" PRIu64 " does not continue the anchor at seq %" PRIu64
                      " (chain gap or changed record)",
                      ls[0].seq, anchor_seq);
            } else {
                vfail(v, "record seq %" PRIu64 " changed (line %zu)", ls[i - 1].seq, i);
            }
        }
    } else {
        bool any = false;
        for (size_t i = 0; i <= nlines; i++)
            any |= bad[i];
        if (any)
            vfail(v, "chain does not verify across the misplaced records");
    }

    /* Truncation and count. */
    uint64_t last = nlines > 0 && ls[nlines - 1].ok ? ls[nlines - 1].seq : anchor_seq;
    if (order_ok && last < end_seq)
        vfail(v,
              "chain truncated: audit.jsonl ends at seq %" PRIu64
              ", the manifest's range ends at seq %" PRIu64,
              last, end_seq);
    if (nlines != count)
        vfail(v, "audit.jsonl has %zu records, the manifest says %" PRIu64, nlines, count);

    /* Signed heads inside the piece must match the recomputed chain. */
    size_t hi;
    json_t *h;
    json_array_foreach(heads, hi, h)
    {
        uint64_t s = (uint64_t)json_integer_value(json_object_get(h, "seq"));
        uint8_t hh[V_HASH];
        if (!hex_to_hash(json_string_value(json_object_get(h, "hash")), hh))
            continue;
        for (size_t i = 0; i < nlines; i++) {
            if (ls[i].ok && ls[i].seq == s && memcmp(ls[i].h, hh, V_HASH) != 0)
                vfail(v, "record seq %" PRIu64 " does not match the signed head at seq %" PRIu64, s,
                      s);
        }
        if (s == anchor_seq && memcmp(anchor_h, hh, V_HASH) != 0)
            vfail(v, "anchor at seq %" PRIu64 " does not match the signed head there", s);
    }
    v->rep->records = nlines;
    v->rep->first_seq = nlines > 0 ? ls[0].seq : 0;
    v->rep->last_seq = last;
    free(bad);
    free(ls);
}

static const char *const v_files[] = {"inventory.csv", "inventory.json", "rotations.json",
                                      "audit.jsonl", "public-key.pem"};

KMS_RESULT kmsctl_verify_export(const char *dir, const char *pinned_pem, FILE *out,
                                kmsctl_verify_report *rep)
{
    KMS_ENSURE(dir != NULL && out != NULL && rep != NULL, KMS_ERR_INVALID_ARGUMENT);
    memset(rep, 0, sizeof(*rep));
    vctx v = {.out = out, .rep = rep};
    kms_buf man = {0}, sig = {0}, pem = {0}, audit = {0};
    kms_buf_init(&man, 0);
    kms_buf_init(&sig, 0);
    kms_buf_init(&pem, 0);
    kms_buf_init(&audit, 0);
    EVP_PKEY *key = NULL, *pinned = NULL;
    json_t *doc = NULL;
    kms_result r = KMS_OK_RESULT;
    bool found, audit_found = false;

    KMS_GUARD_GOTO(r, read_file(dir, "manifest.json", &man, &found), done);
    if (!found) {
        r = kms_error_raisef(KMS_ERR_NOT_FOUND, __FILE__, __LINE__,
                             "%s: no manifest.json: not an export", dir);
        goto done;
    }
    KMS_GUARD_GOTO(r, read_file(dir, "public-key.pem", &pem, &found), done);
    if (!found) {
        vfail(&v, "file public-key.pem missing");
    } else if ((key = pem_key(&pem)) == NULL) {
        vfail(&v, "file public-key.pem: not a PEM public key");
    }
    if (pinned_pem != NULL) {
        kms_buf pb = {0};
        KMS_GUARD_GOTO(r, read_file(NULL, pinned_pem, &pb, &found), done);
        if (found)
            pinned = pem_key(&pb);
        kms_buf_free(&pb);
        if (pinned == NULL) {
            r = kms_error_raisef(KMS_ERR_INVALID_ARGUMENT, __FILE__, __LINE__,
                                 "--public-key %s: not a readable PEM public key", pinned_pem);
            goto done;
        }
        if (key != NULL && EVP_PKEY_eq(key, pinned) != 1)
            vfail(&v, "bad signature: public-key.pem is not the pinned public key");
        else if (key != NULL)
            vok(&v, "public-key.pem is the pinned public key");
    } else if (key != NULL) {
        uint8_t *der = NULL;
        int dl = i2d_PUBKEY(key, &der);
        uint8_t fp[32];
        char hex[65];
        if (dl > 0 && kms_is_ok(kms_sha256(der, (size_t)dl, fp))) {
            kms_hex_encode(fp, 32, hex);
            vok(&v,
                "public key SHA-256 (DER) %s: compare with the key you trust, or pass "
                "--public-key",
                hex);
        }
        OPENSSL_free(der);
    }
    /* 1. The manifest's signature. */
    KMS_GUARD_GOTO(r, read_file(dir, "manifest.sig", &sig, &found), done);
    if (!found)
        vfail(&v, "file manifest.sig missing");
    else if (key != NULL && !sig_ok(key, man.data, man.len, sig.data, sig.len))
        vfail(&v, "bad signature: manifest.sig does not verify manifest.json");
    else if (key != NULL)
        vok(&v, "manifest.json signed by the public key");

    doc = json_loadb((const char *)man.data, man.len, JSON_REJECT_DUPLICATES, NULL);
    if (doc == NULL ||
        strcmp(json_string_value(json_object_get(doc, "format")) ?: "", "kmsd-export-1") != 0) {
        vfail(&v, "manifest.json: not a kmsd-export-1 manifest");
        goto done;
    }
    /* 2. Files. */
    json_t *files = json_object_get(doc, "files");
    for (size_t i = 0; i < KMS_ARRAY_LEN(v_files); i++) {
        const char *want = json_string_value(json_object_get(files, v_files[i]));
        kms_buf b = {0};
        KMS_GUARD_GOTO(r, read_file(dir, v_files[i], &b, &found), done);
        uint8_t h[32];
        char hex[65];
        if (!found) {
            vfail(&v, "file %s missing", v_files[i]);
        } else if (want == NULL) {
            vfail(&v, "file %s not listed in manifest.json", v_files[i]);
        } else if (!kms_is_ok(
                       kms_sha256(b.data != NULL ? b.data : (const uint8_t *)"", b.len, h))) {
            vfail(&v, "file %s: cannot hash", v_files[i]);
        } else {
            kms_hex_encode(h, 32, hex);
            if (strcmp(hex, want) != 0)
                vfail(&v, "file %s changed (SHA-256 %s, manifest says %s)", v_files[i], hex, want);
            else
                vok(&v, "file %s SHA-256 matches", v_files[i]);
        }
        if (i == 3 && found) {
            audit_found = true;
            kms_buf_free(&audit);
            audit = b;
        } else {
            kms_buf_free(&b);
        }
    }
    /* 3. Signed positions. */
    uint64_t s;
    uint8_t hh[V_HASH];
    bool valid;
    json_t *heads = json_object_get(doc, "signed_heads");
    if (key != NULL) {
        check_signed(&v, key, json_object_get(doc, "head"), "head", &s, hh, &valid);
        if (valid)
            vok(&v, "head at seq %" PRIu64 " signed", s);
        json_t *as = json_object_get(json_object_get(doc, "anchor"), "signed");
        if (json_is_object(as)) {
            check_signed(&v, key, as, "anchor", &s, hh, &valid);
            if (valid)
                vok(&v, "anchor at seq %" PRIu64 " signed (retention start)", s);
        }
        size_t i;
        json_t *h;
        json_array_foreach(heads, i, h)
        {
            check_signed(&v, key, h, "signed head", &s, hh, &valid);
        }
    }
    /* 4. The chain. */
    if (audit_found)
        check_chain(&v, &audit, doc, heads);
    if (rep->problems == 0)
        vok(&v, "%zu audit records, seq %llu..%llu, chain verifies", rep->records, rep->first_seq,
            rep->last_seq);
done:
    json_decref(doc);
    EVP_PKEY_free(key);
    EVP_PKEY_free(pinned);
    kms_buf_free(&man);
    kms_buf_free(&sig);
    kms_buf_free(&pem);
    kms_buf_free(&audit);
    return r;
}

/* ---- writing an export ---- */

static KMS_RESULT write_file(const char *dir, const char *name, const void *p, size_t n)
{
    char path[4096];
    int len = snprintf(path, sizeof(path), "%s/%s", dir, name);
    KMS_ENSURE(len > 0 && (size_t)len < sizeof(path), KMS_ERR_INVALID_ARGUMENT);
    FILE *f = fopen(path, "wbx");
    KMS_ENSURE_MSG(f != NULL, KMS_ERR_IO, "%s: %s", path, strerror(errno));
    bool ok = fwrite(p, 1, n, f) == n;
    ok &= fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    KMS_ENSURE_MSG(ok, KMS_ERR_IO, "%s: write failed", path);
    return KMS_OK_RESULT;
}

static bool name_is_plain(const char *name)
{
    /* Names come from the server: no path separators, no dot files. */
    if (name[0] == '\0' || name[0] == '.' || strlen(name) > 64)
        return false;
    for (const char *c = name; *c != '\0'; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '.' || *c == '-' ||
              *c == '_'))
            return false;
    }
    return true;
}

KMS_RESULT kmsctl_export_write(const struct json_t *cdoc, const char *dir)
{
    json_t *doc = (json_t *)cdoc;
    json_t *files = json_object_get(doc, "files");
    const char *sig64 = json_string_value(json_object_get(doc, "manifest_signature"));
    KMS_ENSURE_MSG(json_is_object(files) && sig64 != NULL &&
                       json_is_string(json_object_get(files, "manifest.json")),
                   KMS_ERR_JSON_INVALID, "the export answer lacks files or manifest_signature");
    if (mkdir(dir, 0700) != 0) {
        KMS_ENSURE_MSG(errno == EEXIST, KMS_ERR_IO, "%s: %s", dir, strerror(errno));
        DIR *d = opendir(dir);
        KMS_ENSURE_MSG(d != NULL, KMS_ERR_IO, "%s: %s", dir, strerror(errno));
        struct dirent *e;
        bool empty = true;
        while ((e = readdir(d)) != NULL)
            empty &= strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
        closedir(d);
        KMS_ENSURE_MSG(empty, KMS_ERR_IO, "%s: directory not empty", dir);
    }
    const char *name;
    json_t *val;
    json_object_foreach(files, name, val)
    {
        KMS_ENSURE_MSG(name_is_plain(name) && json_is_string(val), KMS_ERR_JSON_INVALID,
                       "the export answer names an unexpected file");
        KMS_GUARD(write_file(dir, name, json_string_value(val), json_string_length(val)));
    }
    kms_buf sig = {0};
    kms_buf_init(&sig, 4096);
    kms_result r = kms_base64_decode(sig64, strlen(sig64), &sig);
    if (kms_is_ok(r))
        r = write_file(dir, "manifest.sig", sig.data, sig.len);
    kms_buf_free(&sig);
    return r;
}
