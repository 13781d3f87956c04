/*
 * Compliance export end to end without the network: kmsd's export builder
 * (api/kms_api_audit.c) over a real SoftHSM token and store, written to a
 * directory by kmsctl's writer, checked by kmsctl's offline verifier. Then
 * the tamper matrix: every kind of change an auditor must catch, each
 * detected with its own message.
 */
#define _GNU_SOURCE
#include "kms_api_audit.h"
#include "kmsctl_verify.h"
#include "kms_test_fixture.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    kms_fx *f;
    json_t *doc; /* the export answer */
    char root[600];
    int n;
} ex_state;

static void append(kms *k, const char *identity, const char *op, const char *key, uint32_t v)
{
    kms_api_audit_event e = {.operation = op,
                             .identity = identity,
                             .source = "127.0.0.1",
                             .request_id = "rid",
                             .key = key,
                             .version = v,
                             .status = 200};
    assert_ok(kms_api_audit_event_append(k, &e));
}

static int setup(void **state)
{
    ex_state *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    s->f = kms_fx_new(0);
    kms_audit_config cfg = {.enabled = true, .sign_every_records = 7};
    assert_ok(kms_audit_start(s->f->k, &cfg));
    kms_fx_key(s->f, "orders", KMS_PURPOSE_ENCRYPT);
    kms_fx_key(s->f, "tags", KMS_PURPOSE_MAC);
    assert_ok(kms_key_rotate(s->f->k, &s->f->admin, "orders", KMS_ROTATION_MANUAL, "test", NULL));
    /* Records before the range, in it, and after it. */
    for (int i = 0; i < 5; i++) {
        s->f->now = KMS_FX_T0 + i;
        append(s->f->k, "app", "wrap", "orders", 1);
    }
    for (int i = 0; i < 20; i++) {
        s->f->now = KMS_FX_T0 + 100 + i;
        append(s->f->k, i % 2 ? "app" : "CN=\"odd\\name\"", i % 3 ? "unwrap" : "key.rotate",
               "orders", 2);
    }
    for (int i = 0; i < 3; i++) {
        s->f->now = KMS_FX_T0 + 500 + i;
        append(s->f->k, "app", "wrap", "orders", 2);
    }
    s->f->now = KMS_FX_T0 + 1000;
    assert_ok(kms_api_export_build(s->f->k, KMS_FX_T0 + 100, KMS_FX_T0 + 200, &s->doc));
    snprintf(s->root, sizeof(s->root), "%s/exports", s->f->tok.dir);
    assert_int_equal(mkdir(s->root, 0700), 0);
    *state = s;
    return 0;
}

static int teardown(void **state)
{
    ex_state *s = *state;
    json_decref(s->doc);
    kms_fx_free(s->f); /* removes the token dir, exports included */
    free(s);
    return 0;
}

/* A fresh copy of the export; returns its directory. */
static const char *fresh(ex_state *s, char *dir, size_t n)
{
    snprintf(dir, n, "%s/e%d", s->root, s->n++);
    assert_ok(kmsctl_export_write(s->doc, dir));
    return dir;
}

/* Runs the verifier; returns its output (malloc'd). */
static char *verify(const char *dir, const char *pin, kmsctl_verify_report *rep)
{
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    assert_ok(kmsctl_verify_export(dir, pin, out, rep));
    fclose(out);
    return text;
}

static void expect_fail(const char *dir, const char *needle)
{
    kmsctl_verify_report rep;
    char *text = verify(dir, NULL, &rep);
    if (rep.problems == 0 || strstr(text, needle) == NULL)
        fail_msg("expected a FAIL containing \"%s\", got:\n%s", needle, text);
    free(text);
}

static char *slurp(const char *dir, const char *name, size_t *len)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = calloc(1, (size_t)n + 1);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void spit(const char *dir, const char *name, const char *b, size_t len)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    fclose(f);
}

/* Lines of audit.jsonl (pointers into buf, NUL-terminated in place). */
static size_t lines_of(char *buf, char **lines, size_t max)
{
    size_t n = 0;
    for (char *p = buf; *p != '\0' && n < max;) {
        char *nl = strchr(p, '\n');
        assert_non_null(nl);
        *nl = '\0';
        lines[n++] = p;
        p = nl + 1;
    }
    return n;
}

static void write_lines(const char *dir, char **lines, size_t n)
{
    char p[1024];
    snprintf(p, sizeof(p), "%s/audit.jsonl", dir);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s\n", lines[i]);
    fclose(f);
}

static void test_export_verifies(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    kmsctl_verify_report rep;
    char *text = verify(dir, NULL, &rep);
    if (rep.problems != 0)
        fail_msg("clean export does not verify:\n%s", text);
    assert_int_equal(rep.records, 20);
    /* Records 1..5 are before `from`: the piece starts at seq 6. */
    assert_int_equal(rep.first_seq, 6);
    assert_int_equal(rep.last_seq, 25);
    assert_non_null(strstr(text, "chain verifies"));
    free(text);
    /* With the right key pinned it still verifies. */
    char pin[800];
    snprintf(pin, sizeof(pin), "%s/public-key.pem", dir);
    text = verify(dir, pin, &rep);
    assert_int_equal(rep.problems, 0);
    assert_non_null(strstr(text, "is the pinned public key"));
    free(text);
    /* Inventory and rotations are there, with no secret material. */
    size_t len;
    char *inv = slurp(dir, "inventory.json", &len);
    assert_non_null(strstr(inv, "\"orders\""));
    assert_null(strstr(inv, "wrapped"));
    free(inv);
    char *csv = slurp(dir, "inventory.csv", &len);
    assert_non_null(strstr(csv, "orders,encrypt,2,"));
    free(csv);
    /* A second export into the same non-empty directory is refused. */
    assert_err(kmsctl_export_write(s->doc, dir), KMS_ERR_IO);
}

static void test_tamper_record_field(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "audit.jsonl", &len);
    char *lines[64];
    size_t n = lines_of(b, lines, 64);
    /* Line 3 is seq 8: change its operation. */
    char *op = strstr(lines[2], "\"operation\":\"");
    assert_non_null(op);
    op[13] = op[13] == 'u' ? 'v' : 'u';
    write_lines(dir, lines, n);
    free(b);
    expect_fail(dir, "record seq 8 changed");
    expect_fail(dir, "file audit.jsonl changed");
}

static void test_tamper_prev_field(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "audit.jsonl", &len);
    char *lines[64];
    size_t n = lines_of(b, lines, 64);
    char *prev = strstr(lines[4], "\"prev\":\"");
    assert_non_null(prev);
    prev[8] = prev[8] == '0' ? '1' : '0';
    write_lines(dir, lines, n);
    free(b);
    expect_fail(dir, "record seq 10 changed");
}

static void test_tamper_delete_record(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "audit.jsonl", &len);
    char *lines[64];
    size_t n = lines_of(b, lines, 64);
    memmove(&lines[5], &lines[6], (n - 6) * sizeof(lines[0])); /* drop seq 11 */
    write_lines(dir, lines, n - 1);
    free(b);
    expect_fail(dir, "record seq 11 missing");
}

static void test_tamper_swap_records(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "audit.jsonl", &len);
    char *lines[64];
    size_t n = lines_of(b, lines, 64);
    char *t = lines[7];
    lines[7] = lines[8];
    lines[8] = t; /* seq 13 and 14 */
    write_lines(dir, lines, n);
    free(b);
    expect_fail(dir, "record seq 13 out of order");
}

static void test_tamper_truncate(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "audit.jsonl", &len);
    char *lines[64];
    size_t n = lines_of(b, lines, 64);
    write_lines(dir, lines, n - 3);
    free(b);
    expect_fail(dir, "chain truncated: audit.jsonl ends at seq 22");
}

static void test_tamper_changed_file(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "inventory.csv", &len);
    b[len - 3] = b[len - 3] == '1' ? '2' : '1';
    spit(dir, "inventory.csv", b, len);
    free(b);
    expect_fail(dir, "file inventory.csv changed");
    fresh(s, dir, sizeof(dir));
    char p[800];
    snprintf(p, sizeof(p), "%s/rotations.json", dir);
    assert_int_equal(unlink(p), 0);
    expect_fail(dir, "file rotations.json missing");
}

static void test_tamper_manifest(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "manifest.json", &len);
    /* Hide the truncation of the chain in the manifest. */
    char *c = strstr(b, "\"count\": 20");
    assert_non_null(c);
    c[10] = '7';
    spit(dir, "manifest.json", b, len);
    free(b);
    expect_fail(dir, "bad signature: manifest.sig does not verify manifest.json");
}

static void test_tamper_signature(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "manifest.sig", &len);
    b[len / 2] ^= 0x01;
    spit(dir, "manifest.sig", b, len);
    free(b);
    expect_fail(dir, "bad signature: manifest.sig does not verify manifest.json");
}

/* Signed positions inside the manifest: a forged head signature (here an
 * oversized one, which must not overrun the verifier's buffer) is named. */
static void test_tamper_head_signature(void **state)
{
    ex_state *s = *state;
    char dir[700];
    fresh(s, dir, sizeof(dir));
    size_t len;
    char *b = slurp(dir, "manifest.json", &len);
    json_t *m = json_loads(b, 0, NULL);
    free(b);
    assert_non_null(m);
    char big[601];
    memset(big, 'A', 600);
    big[600] = '\0';
    json_t *head = json_object_get(m, "head");
    assert_int_equal(json_object_set_new(head, "signature", json_string(big)), 0);
    char *text = json_dumps(m, JSON_INDENT(2));
    spit(dir, "manifest.json", text, strlen(text));
    free(text);
    json_decref(m);
    expect_fail(dir, "bad signature: head seq");
    fresh(s, dir, sizeof(dir));
    b = slurp(dir, "manifest.json", &len);
    m = json_loads(b, 0, NULL);
    free(b);
    assert_int_equal(
        json_object_set_new(json_object_get(m, "head"), "signature", json_string("====")), 0);
    text = json_dumps(m, JSON_INDENT(2));
    spit(dir, "manifest.json", text, strlen(text));
    free(text);
    json_decref(m);
    expect_fail(dir, "bad signature: head seq");
}

/* A whole forged export signed with another key: it verifies against its
 * own public-key.pem, but not against the pinned key. */
static void test_tamper_other_key(void **state)
{
    ex_state *s = *state;
    char dir[700], pin[800];
    fresh(s, dir, sizeof(dir));
    snprintf(pin, sizeof(pin), "%s/pinned.pem", s->root);
    size_t len;
    char *good = slurp(dir, "public-key.pem", &len);
    spit(s->root, "pinned.pem", good, len);
    free(good);
    EVP_PKEY *other = EVP_EC_gen("P-256");
    assert_non_null(other);
    char p[800];
    snprintf(p, sizeof(p), "%s/public-key.pem", dir);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(PEM_write_PUBKEY(f, other), 1);
    fclose(f);
    EVP_PKEY_free(other);
    kmsctl_verify_report rep;
    char *text = verify(dir, pin, &rep);
    assert_true(rep.problems > 0);
    assert_non_null(strstr(text, "bad signature: public-key.pem is not the pinned public key"));
    assert_non_null(strstr(text, "bad signature: manifest.sig does not verify manifest.json"));
    free(text);
}

/* After pruning, the export starts at the signed anchor and verifies. */
static void test_pruned_anchor(void **state)
{
    ex_state *s = *state;
    uint64_t removed = 0;
    assert_ok(kms_audit_prune(s->f->k, KMS_FX_T0 + 110, &removed));
    assert_int_equal(removed, 15);
    json_t *doc = NULL;
    assert_ok(kms_api_export_build(s->f->k, 0, 0, &doc));
    char dir[700];
    snprintf(dir, sizeof(dir), "%s/pruned", s->root);
    assert_ok(kmsctl_export_write(doc, dir));
    json_decref(doc);
    kmsctl_verify_report rep;
    char *text = verify(dir, NULL, &rep);
    if (rep.problems != 0)
        fail_msg("pruned export does not verify:\n%s", text);
    assert_non_null(strstr(text, "anchor at seq 15 signed"));
    assert_int_equal(rep.first_seq, 16);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_export_verifies),     cmocka_unit_test(test_tamper_record_field),
        cmocka_unit_test(test_tamper_prev_field),   cmocka_unit_test(test_tamper_delete_record),
        cmocka_unit_test(test_tamper_swap_records), cmocka_unit_test(test_tamper_truncate),
        cmocka_unit_test(test_tamper_changed_file), cmocka_unit_test(test_tamper_manifest),
        cmocka_unit_test(test_tamper_signature),    cmocka_unit_test(test_tamper_head_signature),
        cmocka_unit_test(test_tamper_other_key),    cmocka_unit_test(test_pruned_anchor),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
