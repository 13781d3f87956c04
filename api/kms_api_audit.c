/*
 * The audit routes and the compliance export (kms_api_audit.h). The export
 * layout and how to verify it by hand are in docs/audit.md.
 */
#define _GNU_SOURCE
#include "kms_api_audit.h"

#include "kms_base64.h"
#include "kms_hash.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- one record per request ---- */

void kms_api_audit_record_fill(const kms_api_audit_event *e, kms_audit_record *r)
{
    memset(r, 0, sizeof(*r));
    /* snprintf truncates to the field: record fields are bounded. */
    snprintf(r->identity, sizeof(r->identity), "%s", e->identity != NULL ? e->identity : "");
    snprintf(r->source, sizeof(r->source), "%s", e->source != NULL ? e->source : "");
    snprintf(r->request_id, sizeof(r->request_id), "%s",
             e->request_id != NULL ? e->request_id : "");
    snprintf(r->operation, sizeof(r->operation), "%s", e->operation != NULL ? e->operation : "");
    snprintf(r->key, sizeof(r->key), "%s", e->key != NULL ? e->key : "");
    snprintf(r->result, sizeof(r->result), "%s", e->err == KMS_OK ? "ok" : kms_error_code(e->err));
    r->version = e->version;
    r->to_version = e->to_version;
    r->items = e->items;
    r->status = e->status > 0 && e->status < 1000 ? (uint16_t)e->status : 0;
}

KMS_RESULT kms_api_audit_event_append(kms *k, const kms_api_audit_event *e)
{
    kms_audit_record r;
    kms_api_audit_record_fill(e, &r);
    return kms_audit_append_announced(k, &r, e->announced);
}

/* ---- GET /v1/audit ---- */

static json_t *record_json(const kms_audit_record *r)
{
    char hex[2 * KMS_AUDIT_HASH_BYTES + 1];
    kms_hex_encode(r->hash, KMS_AUDIT_HASH_BYTES, hex);
    return json_pack("{s:I,s:I,s:s,s:s,s:s,s:s,s:s,s:I,s:I,s:I,s:i,s:s,s:s}", "seq",
                     (json_int_t)r->seq, "time", (json_int_t)r->time, "identity", r->identity,
                     "source", r->source, "request_id", r->request_id, "operation", r->operation,
                     "key", r->key, "version", (json_int_t)r->version, "to_version",
                     (json_int_t)r->to_version, "items", (json_int_t)r->items, "status",
                     (int)r->status, "result", r->result, "hash", hex);
}

KMS_RESULT kms_api_audit_list(kms *k, const kms_audit_filter *f, json_t **out)
{
    kms_audit_record *v = NULL;
    size_t n = 0;
    KMS_GUARD(kms_audit_query(k, f, &v, &n));
    json_t *arr = json_array();
    bool bad = arr == NULL;
    for (size_t i = 0; i < n && !bad; i++)
        bad = json_array_append_new(arr, record_json(&v[i])) != 0;
    size_t limit = f->limit == 0 ? KMS_AUDIT_QUERY_DEFAULT : f->limit;
    if (limit > KMS_AUDIT_QUERY_MAX)
        limit = KMS_AUDIT_QUERY_MAX;
    json_t *next = n == limit && n > 0 ? json_integer((json_int_t)v[n - 1].seq) : json_null();
    free(v);
    if (bad) {
        json_decref(arr);
        json_decref(next);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    *out = json_pack("{s:o,s:o}", "records", arr, "next", next);
    KMS_ENSURE(*out != NULL, KMS_ERR_NO_MEMORY);
    return KMS_OK_RESULT;
}

/* ---- POST /v1/export ---- */

static void buf_free(kms_buf *b)
{
    kms_buf_free(b);
}
static void json_free(json_t **j)
{
    json_decref(*j);
}

static void hex32(const uint8_t h[32], char out[65])
{
    kms_hex_encode(h, 32, out);
}

/* The audit records of the range, as JSON Lines of their canonical bytes. */
typedef struct {
    int64_t from, to;
    uint8_t prev[KMS_AUDIT_HASH_BYTES]; /* hash of the record before the current */
    uint64_t prev_seq;
    uint64_t first, last;
    uint8_t anchor[KMS_AUDIT_HASH_BYTES];
    uint64_t anchor_seq;
    uint8_t end[KMS_AUDIT_HASH_BYTES];
    size_t count;
    kms_buf *lines;
} export_scan;

static kms_result export_visit(uint64_t seq, const uint8_t *bytes, size_t len,
                               const uint8_t hash[KMS_AUDIT_HASH_BYTES], void *arg, bool *stop)
{
    export_scan *x = arg;
    kms_audit_record r;
    KMS_GUARD(kms_audit_record_parse(bytes, len, &r));
    if (x->first == 0) {
        if (x->from != 0 && r.time < x->from) {
            memcpy(x->prev, hash, KMS_AUDIT_HASH_BYTES);
            x->prev_seq = seq;
            return KMS_OK_RESULT;
        }
        x->first = seq;
        memcpy(x->anchor, x->prev, KMS_AUDIT_HASH_BYTES);
        x->anchor_seq = x->prev_seq;
    }
    /* The range is contiguous in the chain: it ends before the first record
     * past `to`, so that the export verifies as one piece of the chain. */
    if (x->to != 0 && r.time > x->to) {
        *stop = true;
        return KMS_OK_RESULT;
    }
    KMS_ENSURE_MSG(x->count < KMS_API_EXPORT_MAX_RECORDS, KMS_ERR_LIMIT_EXCEEDED,
                   "more than %d audit records in the range: export a smaller range",
                   KMS_API_EXPORT_MAX_RECORDS);
    KMS_GUARD(kms_buf_append(x->lines, bytes, len));
    KMS_GUARD(kms_buf_append_u8(x->lines, '\n'));
    x->last = seq;
    x->count++;
    memcpy(x->end, hash, KMS_AUDIT_HASH_BYTES);
    return KMS_OK_RESULT;
}

static json_t *time_json(int64_t t)
{
    return t != 0 ? json_integer((json_int_t)t) : json_null();
}

/* Inventory: one JSON object per key with its versions; one CSV row per
 * version. Metadata only: no secret, wrapped or not, ever leaves. */
static KMS_RESULT export_inventory(kms *k, kms_buf *csv, json_t *arr)
{
    KMS_GUARD(kms_buf_appendf(csv, "key,purpose,primary_version,min_decryption_version,"
                                   "rotation_period_s,key_created_at,rotated_at,version,state,"
                                   "created_at,primary_at,deprecated_at,grace_until,destroy_at,"
                                   "last_used_at,encryptions,master_version\r\n"));
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    for (;;) {
        kms_key_info *keys = NULL;
        size_t n = 0;
        KMS_GUARD(kms_key_list(k, after[0] != 0 ? after : NULL, 256, &keys, &n));
        kms_result r = KMS_OK_RESULT;
        for (size_t i = 0; i < n && kms_is_ok(r); i++) {
            const kms_key_info *ki = &keys[i];
            kms_version_info *vs = NULL;
            size_t nv = 0;
            r = kms_key_versions(k, ki->name, &vs, &nv);
            if (!kms_is_ok(r))
                break;
            json_t *va = json_array();
            for (size_t j = 0; j < nv && kms_is_ok(r); j++) {
                const kms_version_info *v = &vs[j];
                json_array_append_new(
                    va,
                    json_pack("{s:I,s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:I,s:I}", "version",
                              (json_int_t)v->version, "state", kms_version_state_name(v->state),
                              "created_at", time_json(v->created_at), "primary_at",
                              time_json(v->primary_at), "deprecated_at",
                              time_json(v->deprecated_at), "grace_until", time_json(v->grace_until),
                              "destroy_at", time_json(v->destroy_at), "last_used_at",
                              time_json(v->last_used_at), "encryptions", (json_int_t)v->encryptions,
                              "master_version", (json_int_t)v->master_version));
                /* Key names are [A-Za-z0-9._-] (kms_names.c): no CSV quoting. */
                r = kms_buf_appendf(csv,
                                    "%s,%s,%" PRIu32 ",%" PRIu32 ",%" PRId64 ",%" PRId64 ",%" PRId64
                                    ",%" PRIu32 ",%s,%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                                    ",%" PRId64 ",%" PRId64 ",%" PRIu64 ",%" PRIu32 "\r\n",
                                    ki->name, kms_purpose_name(ki->purpose), ki->primary_version,
                                    ki->min_decryption_version, ki->rotation_period_s,
                                    ki->created_at, ki->rotated_at, v->version,
                                    kms_version_state_name(v->state), v->created_at, v->primary_at,
                                    v->deprecated_at, v->grace_until, v->destroy_at,
                                    v->last_used_at, v->encryptions, v->master_version);
            }
            free(vs);
            json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:I,s:I,s:I,s:b,s:o,s:o,s:o}", "name", ki->name,
                                  "purpose", kms_purpose_name(ki->purpose), "primary_version",
                                  (json_int_t)ki->primary_version, "latest_version",
                                  (json_int_t)ki->latest_version, "min_decryption_version",
                                  (json_int_t)ki->min_decryption_version, "rotation_period_s",
                                  (json_int_t)ki->rotation_period_s, "warning_window_s",
                                  (json_int_t)ki->warning_window_s, "deletion_protection",
                                  ki->deletion_protection, "created_at", time_json(ki->created_at),
                                  "rotated_at", time_json(ki->rotated_at), "versions", va);
            if (o == NULL || json_array_append_new(arr, o) != 0)
                r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        }
        bool more = n == 256;
        if (n > 0)
            snprintf(after, sizeof(after), "%s", keys[n - 1].name);
        free(keys);
        KMS_GUARD(r);
        if (!more)
            break;
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT export_rotations(kms *k, int64_t from, int64_t to, json_t *arr)
{
    kms_rotation_filter f = {.from = from, .to = to, .limit = 100000};
    kms_rotation_info *rs = NULL;
    size_t n = 0;
    KMS_GUARD(kms_rotations_list(k, &f, &rs, &n));
    for (size_t i = 0; i < n; i++) {
        const kms_rotation_info *r = &rs[i];
        json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:s,s:s,s:s,s:o,s:o,s:s}", "id", r->id, "key",
                              r->key, "from_version", (json_int_t)r->from_version, "to_version",
                              (json_int_t)r->to_version, "type", kms_rotation_type_name(r->type),
                              "status", kms_rotation_status_name(r->status), "initiator",
                              r->initiator, "started_at", time_json(r->started_at), "finished_at",
                              time_json(r->finished_at), "reason", r->reason);
        if (o == NULL || json_array_append_new(arr, o) != 0) {
            free(rs);
            KMS_BAIL(KMS_ERR_NO_MEMORY);
        }
    }
    free(rs);
    return KMS_OK_RESULT;
}

static json_t *signed_json(const kms_audit_signed *s)
{
    char hex[65];
    hex32(s->hash, hex);
    json_t *sig = json_null();
    if (s->sig_len > 0) {
        kms_buf b;
        kms_buf_init(&b, 0);
        if (kms_is_ok(kms_base64_encode(s->sig, s->sig_len, &b)) &&
            kms_is_ok(kms_buf_terminate(&b)))
            sig = json_string((const char *)b.data);
        kms_buf_free(&b);
    }
    return json_pack("{s:I,s:s,s:I,s:s%,s:o}", "seq", (json_int_t)s->seq, "hash", hex, "time",
                     (json_int_t)s->time, "message", s->msg, s->msg_len, "signature", sig);
}

static KMS_RESULT sha_hex(const kms_buf *b, char out[65])
{
    uint8_t h[KMS_SHA256_BYTES];
    KMS_GUARD(kms_sha256(b->data != NULL ? b->data : (const uint8_t *)"", b->len, h));
    hex32(h, out);
    return KMS_OK_RESULT;
}

/* Serialised into b directly: jansson's allocator is kmsd's wiping one, so
 * nothing it allocates may reach free(). */
static KMS_RESULT json_to_buf(json_t *doc, size_t flags, kms_buf *b)
{
    size_t n = json_dumpb(doc, NULL, 0, flags);
    KMS_ENSURE(n > 0, KMS_ERR_NO_MEMORY);
    uint8_t *dst;
    KMS_GUARD(kms_buf_extend(b, n, &dst));
    KMS_ENSURE(json_dumpb(doc, (char *)dst, n, flags) == n, KMS_ERR_INTERNAL);
    return kms_buf_append_u8(b, '\n');
}

static KMS_RESULT files_put(json_t *files, const char *name, const kms_buf *b)
{
    json_t *s = json_stringn(b->data != NULL ? (const char *)b->data : "", b->len);
    KMS_ENSURE(s != NULL, KMS_ERR_NO_MEMORY);
    KMS_ENSURE(json_object_set_new(files, name, s) == 0, KMS_ERR_NO_MEMORY);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_export_build(kms *k, int64_t from, int64_t to, json_t **out)
{
    KMS_ENSURE(k != NULL && out != NULL && from >= 0 && to >= 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(to == 0 || from <= to, KMS_ERR_INVALID_ARGUMENT, "from is after to");
    KMS_ENSURE_MSG(kms_audit_enabled(k), KMS_ERR_AUDIT_UNAVAILABLE, "the audit trail is off");
    kms_buf lines KMS_DEFER(buf_free) = {0};
    kms_buf_init(&lines, (size_t)1 << 30);
    kms_buf csv KMS_DEFER(buf_free) = {0};
    kms_buf_init(&csv, (size_t)256 << 20);

    /* The head is signed first: every record of the range is then covered
     * by a signature made at export time, whatever is appended meanwhile. */
    kms_audit_signed head;
    KMS_GUARD(kms_audit_head_sign(k, &head));
    kms_audit_signed start;
    KMS_GUARD(kms_audit_anchor_get(k, &start));

    export_scan x = {.from = from, .to = to, .lines = &lines, .prev_seq = start.seq};
    memcpy(x.prev, start.hash, sizeof(x.prev));
    /* Bounded by the signed head (last_seq 0 would mean "no bound"). */
    if (head.seq > start.seq)
        KMS_GUARD(kms_audit_scan_raw(k, start.seq, head.seq, export_visit, &x));
    if (x.first == 0) {
        /* No record in range: an empty piece at the end of the scan. */
        x.anchor_seq = x.prev_seq;
        memcpy(x.anchor, x.prev, sizeof(x.anchor));
    }
    if (x.count == 0)
        memcpy(x.end, x.anchor, sizeof(x.end));
    uint64_t last = x.count > 0 ? x.last : x.anchor_seq;

    json_t *inv KMS_DEFER(json_free) = json_array();
    json_t *rot KMS_DEFER(json_free) = json_array();
    KMS_ENSURE(inv != NULL && rot != NULL, KMS_ERR_NO_MEMORY);
    KMS_GUARD(export_inventory(k, &csv, inv));
    KMS_GUARD(export_rotations(k, from, to, rot));
    kms_buf inv_json KMS_DEFER(buf_free) = {0};
    kms_buf rot_json KMS_DEFER(buf_free) = {0};
    kms_buf_init(&inv_json, (size_t)256 << 20);
    kms_buf_init(&rot_json, (size_t)256 << 20);
    KMS_GUARD(json_to_buf(inv, JSON_INDENT(2), &inv_json));
    KMS_GUARD(json_to_buf(rot, JSON_INDENT(2), &rot_json));

    char *pem_s = NULL;
    KMS_GUARD(kms_audit_public_key_pem(k, &pem_s));
    kms_buf pem KMS_DEFER(buf_free) = {0};
    kms_buf_init(&pem, 0);
    kms_result r = kms_buf_append(&pem, pem_s, strlen(pem_s));
    free(pem_s);
    KMS_GUARD(r);

    /* Signed positions inside the exported piece of the chain. */
    kms_audit_signed *heads = NULL;
    size_t nheads = 0;
    KMS_GUARD(kms_audit_heads_list(k, x.anchor_seq, last, 1000, &heads, &nheads));
    json_t *ha = json_array();
    for (size_t i = 0; i < nheads && ha != NULL; i++)
        json_array_append_new(ha, signed_json(&heads[i]));
    free(heads);
    KMS_ENSURE(ha != NULL, KMS_ERR_NO_MEMORY);

    kms_audit_signed anchor = {.seq = x.anchor_seq};
    memcpy(anchor.hash, x.anchor, sizeof(anchor.hash));
    if (start.seq == x.anchor_seq && start.sig_len > 0)
        anchor = start; /* the signed anchor pruning left */

    char h_csv[65], h_inv[65], h_rot[65], h_aud[65], h_pem[65], h_end[65], h_anchor[65];
    KMS_GUARD(sha_hex(&csv, h_csv));
    KMS_GUARD(sha_hex(&inv_json, h_inv));
    KMS_GUARD(sha_hex(&rot_json, h_rot));
    KMS_GUARD(sha_hex(&lines, h_aud));
    KMS_GUARD(sha_hex(&pem, h_pem));
    hex32(x.end, h_end);
    hex32(anchor.hash, h_anchor);
    json_t *anchor_sig = NULL;
    if (anchor.sig_len > 0) {
        anchor_sig = signed_json(&anchor);
    } else {
        anchor_sig = json_null();
    }
    json_t *manifest KMS_DEFER(json_free) = json_pack(
        "{s:s,s:I,s:o,s:o,"
        "s:{s:I,s:I,s:I},"
        "s:{s:I,s:s,s:o},"
        "s:{s:I,s:s},"
        "s:o,s:o,"
        "s:{s:s,s:s,s:s,s:s,s:s},"
        "s:s}",
        "format", KMS_EXPORT_FORMAT, "created_at", (json_int_t)head.time, "from", time_json(from),
        "to", time_json(to), "records", "first_seq", (json_int_t)(x.count > 0 ? x.first : 0),
        "last_seq", (json_int_t)(x.count > 0 ? x.last : 0), "count", (json_int_t)x.count, "anchor",
        "seq", (json_int_t)anchor.seq, "hash", h_anchor, "signed", anchor_sig, "end", "seq",
        (json_int_t)last, "hash", h_end, "head", signed_json(&head), "signed_heads", ha, "files",
        KMS_EXPORT_FILE_INVENTORY_CSV, h_csv, KMS_EXPORT_FILE_INVENTORY_JSON, h_inv,
        KMS_EXPORT_FILE_ROTATIONS, h_rot, KMS_EXPORT_FILE_AUDIT, h_aud, KMS_EXPORT_FILE_PUBKEY,
        h_pem, "chain",
        "hash_i = SHA-256(hash_{i-1} || line_i without its newline); hash_0 = 32 zero bytes");
    KMS_ENSURE(manifest != NULL, KMS_ERR_NO_MEMORY);
    kms_buf man KMS_DEFER(buf_free) = {0};
    kms_buf_init(&man, 0);
    KMS_GUARD(json_to_buf(manifest, JSON_INDENT(2), &man));

    uint8_t sig[KMS_AUDIT_SIG_MAX_BYTES];
    size_t sig_len = 0;
    KMS_GUARD(kms_audit_sign(k, man.data, man.len, sig, &sig_len));
    kms_buf sig_b64 KMS_DEFER(buf_free) = {0};
    kms_buf_init(&sig_b64, 0);
    KMS_GUARD(kms_base64_encode(sig, sig_len, &sig_b64));

    json_t *files KMS_DEFER(json_free) = json_object();
    KMS_ENSURE(files != NULL, KMS_ERR_NO_MEMORY);
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_INVENTORY_CSV, &csv));
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_INVENTORY_JSON, &inv_json));
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_ROTATIONS, &rot_json));
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_AUDIT, &lines));
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_PUBKEY, &pem));
    KMS_GUARD(files_put(files, KMS_EXPORT_FILE_MANIFEST, &man));
    json_t *doc = json_pack("{s:O,s:s%}", "files", files, "manifest_signature",
                            (const char *)sig_b64.data, sig_b64.len);
    KMS_ENSURE(doc != NULL, KMS_ERR_NO_MEMORY);
    *out = doc;
    return KMS_OK_RESULT;
}
