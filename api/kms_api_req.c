/*
 * Request bodies: strict JSON in, typed requests out. Every route states its
 * fields; an unknown field, a missing required field or a wrong type is
 * KMS_ERR_JSON_INVALID with the field named, before any work is done.
 * Binary values are strict base64 (RFC 4648 section 4, crypto/kms_base64.h);
 * plaintext is decoded straight into secret memory.
 */
#include "kms_api_internal.h"
#include "kms_api_rotation.h"
#include "kms_base64.h"
#include "kms_secmem.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef enum {
    F_STRING = 1,
    F_INTEGER,
    F_BOOL,
    F_ARRAY,
} field_type;

typedef struct {
    const char *name;
    field_type type;
    bool required;
} field_spec;

static const char *type_name(field_type t)
{
    switch (t) {
    case F_STRING:
        return "a string";
    case F_INTEGER:
        return "an integer";
    case F_BOOL:
        return "a boolean";
    case F_ARRAY:
        return "an array";
    default:
        return "?";
    }
}

static bool type_ok(json_t *v, field_type t)
{
    switch (t) {
    case F_STRING:
        return json_is_string(v);
    case F_INTEGER:
        return json_is_integer(v);
    case F_BOOL:
        return json_is_boolean(v);
    case F_ARRAY:
        return json_is_array(v);
    default:
        return false;
    }
}

/* Field names are echoed in messages; print only a bounded, printable
 * rendering of a name the client chose. */
static void safe_name(const char *in, char out[65])
{
    size_t i = 0;
    for (; in[i] != '\0' && i < 64; i++) {
        out[i] = (in[i] >= 0x20 && in[i] < 0x7f && in[i] != '\'') ? in[i] : '?';
    }
    out[i] = '\0';
}

static kms_result fields_check(json_t *obj, const field_spec *spec, size_t n, const char *where)
{
    KMS_ENSURE_MSG(json_is_object(obj), KMS_ERR_JSON_INVALID, "%sexpected a JSON object",
                   where[0] != '\0' ? where : "body: ");
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        const field_spec *f = NULL;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(spec[i].name, key) == 0) {
                f = &spec[i];
                break;
            }
        }
        if (f == NULL) {
            char shown[65];
            safe_name(key, shown);
            KMS_BAIL_MSG(KMS_ERR_JSON_INVALID, "field '%s%s': unknown field", where, shown);
        }
        KMS_ENSURE_MSG(type_ok(v, f->type), KMS_ERR_JSON_INVALID, "field '%s%s': must be %s", where,
                       f->name, type_name(f->type));
    }
    for (size_t i = 0; i < n; i++) {
        KMS_ENSURE_MSG(!spec[i].required || json_object_get(obj, spec[i].name) != NULL,
                       KMS_ERR_JSON_INVALID, "field '%s%s': missing", where, spec[i].name);
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_body_parse(const uint8_t *body, size_t len, json_t **out)
{
    if (len == 0) {
        *out = json_object();
        KMS_ENSURE(*out != NULL, KMS_ERR_NO_MEMORY);
        return KMS_OK_RESULT;
    }
    json_error_t e;
    /* JSON_REJECT_DUPLICATES: {"plaintext":"a","plaintext":"b"} must not
     * mean whichever one a parser happens to keep. Without JSON_ALLOW_NUL,
     * "\u0000" in a string is refused. */
    json_t *root = json_loadb((const char *)body, len, JSON_REJECT_DUPLICATES, &e);
    KMS_ENSURE_MSG(root != NULL, KMS_ERR_JSON_INVALID, "line %d column %d: %s", e.line, e.column,
                   e.text);
    if (!json_is_object(root)) {
        json_decref(root);
        KMS_BAIL_MSG(KMS_ERR_JSON_INVALID, "body: expected a JSON object");
    }
    *out = root;
    return KMS_OK_RESULT;
}

void kms_api_item_free(kms_api_item *it)
{
    kms_buf_free(&it->in);
    kms_buf_free(&it->ctx);
}

/* Decodes a base64 field with an upper bound on the decoded size, checked
 * on the encoded length before any decoding. */
static kms_result b64_field(json_t *obj, const char *field, const char *where, size_t max,
                            bool secret, kms_buf *out)
{
    json_t *v = json_object_get(obj, field);
    if (v == NULL) {
        return KMS_OK_RESULT;
    }
    size_t n = json_string_length(v);
    KMS_ENSURE_MSG(KMS_BASE64_DECODED_MAX(n) <= max + 2, KMS_ERR_LIMIT_EXCEEDED,
                   "field '%s%s': at most %zu bytes", where, field, max);
    if (secret) {
        kms_buf_init_secret(out, max);
    } else {
        kms_buf_init(out, max);
    }
    kms_result r = kms_base64_decode(json_string_value(v), n, out);
    if (!kms_is_ok(r)) {
        if (r.err == KMS_ERR_LIMIT_EXCEEDED) {
            KMS_BAIL_MSG(KMS_ERR_LIMIT_EXCEEDED, "field '%s%s': at most %zu bytes", where, field,
                         max);
        }
        KMS_BAIL_MSG(KMS_ERR_BASE64_INVALID, "field '%s%s': not strict base64 (RFC 4648)", where,
                     field);
    }
    return KMS_OK_RESULT;
}

/* Tokens travel as their text form "kms1:..."; kms/ parses them. */
static kms_result token_field(json_t *obj, const char *field, const char *where, kms_buf *out)
{
    json_t *v = json_object_get(obj, field);
    size_t max = KMS_TOKEN_TEXT_PREFIX_BYTES + KMS_BASE64_ENCODED_LEN(KMS_TOKEN_BINARY_MAX_BYTES);
    if (json_string_length(v) > max) {
        /* Longer than any token can be: the same single error as any
         * other defect of a token. */
        KMS_BAIL_MSG(KMS_ERR_TOKEN_INVALID, "field '%s%s': not a valid token", where, field);
    }
    kms_buf_init(out, max);
    KMS_GUARD(kms_buf_append(out, json_string_value(v), json_string_length(v)));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_item_parse(kms_op op, json_t *obj, const char *where, kms_api_item *it)
{
    memset(it, 0, sizeof(*it));
    switch (op) {
    case KMS_OP_WRAP:
    case KMS_OP_ENCRYPT: {
        static const field_spec f[] = {{"plaintext", F_STRING, true}, {"context", F_STRING, false}};
        KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), where));
        size_t max =
            op == KMS_OP_WRAP ? KMS_WRAP_PLAINTEXT_MAX_BYTES : KMS_ENCRYPT_PLAINTEXT_MAX_BYTES;
        KMS_GUARD(b64_field(obj, "plaintext", where, max, true, &it->in));
        KMS_GUARD(b64_field(obj, "context", where, KMS_CONTEXT_MAX_BYTES, false, &it->ctx));
        return KMS_OK_RESULT;
    }
    case KMS_OP_UNWRAP:
    case KMS_OP_DECRYPT:
    case KMS_OP_REWRAP: {
        static const field_spec f[] = {{"ciphertext", F_STRING, true},
                                       {"context", F_STRING, false}};
        KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), where));
        KMS_GUARD(token_field(obj, "ciphertext", where, &it->in));
        KMS_GUARD(b64_field(obj, "context", where, KMS_CONTEXT_MAX_BYTES, false, &it->ctx));
        return KMS_OK_RESULT;
    }
    case KMS_OP_DATAKEY: {
        static const field_spec f[] = {{"bytes", F_INTEGER, false},
                                       {"context", F_STRING, false},
                                       {"include_plaintext", F_BOOL, false}};
        KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), where));
        json_t *b = json_object_get(obj, "bytes");
        it->datakey_bytes = 32;
        if (b != NULL) {
            json_int_t n = json_integer_value(b);
            KMS_ENSURE_MSG(n >= KMS_DATAKEY_MIN_BYTES && n <= KMS_DATAKEY_MAX_BYTES,
                           KMS_ERR_INVALID_ARGUMENT, "field '%sbytes': must be %d..%d", where,
                           KMS_DATAKEY_MIN_BYTES, KMS_DATAKEY_MAX_BYTES);
            it->datakey_bytes = (size_t)n;
        }
        it->include_plaintext = json_is_true(json_object_get(obj, "include_plaintext"));
        KMS_GUARD(b64_field(obj, "context", where, KMS_CONTEXT_MAX_BYTES, false, &it->ctx));
        return KMS_OK_RESULT;
    }
    case KMS_OP_MAC: {
        static const field_spec f[] = {{"message", F_STRING, true}};
        KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), where));
        KMS_GUARD(b64_field(obj, "message", where, KMS_MAC_MESSAGE_MAX_BYTES, false, &it->in));
        return KMS_OK_RESULT;
    }
    case KMS_OP_VERIFY: {
        static const field_spec f[] = {{"message", F_STRING, true}, {"mac", F_STRING, true}};
        KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), where));
        KMS_GUARD(b64_field(obj, "message", where, KMS_MAC_MESSAGE_MAX_BYTES, false, &it->in));
        KMS_GUARD(token_field(obj, "mac", where, &it->ctx));
        return KMS_OK_RESULT;
    }
    default:
        KMS_BAIL(KMS_ERR_INTERNAL);
    }
}

KMS_RESULT kms_api_batch_parse(json_t *obj, size_t max_items, json_t **items)
{
    static const field_spec f[] = {{"items", F_ARRAY, true}};
    KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), ""));
    json_t *a = json_object_get(obj, "items");
    KMS_ENSURE_MSG(json_array_size(a) <= max_items, KMS_ERR_LIMIT_EXCEEDED,
                   "field 'items': at most %zu items per batch", max_items);
    KMS_ENSURE_MSG(json_array_size(a) > 0, KMS_ERR_JSON_INVALID,
                   "field 'items': must not be empty");
    *items = a;
    return KMS_OK_RESULT;
}

static kms_result reason_copy(json_t *obj, char out[KMS_REASON_MAX_BYTES + 1])
{
    json_t *v = json_object_get(obj, "reason");
    out[0] = '\0';
    if (v == NULL) {
        return KMS_OK_RESULT;
    }
    size_t n = json_string_length(v);
    KMS_ENSURE_MSG(n <= KMS_REASON_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED,
                   "field 'reason': at most %d bytes", KMS_REASON_MAX_BYTES);
    memcpy(out, json_string_value(v), n + 1);
    return KMS_OK_RESULT;
}

/* Durations are integer seconds, positive where given. */
static kms_result seconds_field(json_t *obj, const char *field, int64_t *out)
{
    json_t *v = json_object_get(obj, field);
    if (v == NULL) {
        return KMS_OK_RESULT;
    }
    json_int_t n = json_integer_value(v);
    KMS_ENSURE_MSG(n > 0 && n <= INT64_C(100) * 365 * 86400, KMS_ERR_INVALID_ARGUMENT,
                   "field '%s': must be a positive number of seconds (at most 100 years)", field);
    *out = n;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_create_parse(json_t *obj, kms_api_create_req *out)
{
    static const field_spec f[] = {{"name", F_STRING, true},
                                   {"purpose", F_STRING, true},
                                   {"rotation_period", F_INTEGER, false},
                                   {"warning_window", F_INTEGER, false},
                                   {"deletion_protection", F_BOOL, false}};
    KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), ""));
    memset(out, 0, sizeof(*out));
    json_t *name = json_object_get(obj, "name");
    KMS_ENSURE_MSG(kms_key_name_valid(json_string_value(name), json_string_length(name)),
                   KMS_ERR_KEY_NAME_INVALID, "field 'name': must match [a-z0-9][a-z0-9._-]{0,127}");
    memcpy(out->name, json_string_value(name), json_string_length(name) + 1);
    out->spec.name = out->name;
    const char *purpose = json_string_value(json_object_get(obj, "purpose"));
    if (strcmp(purpose, "encrypt") == 0) {
        out->spec.purpose = KMS_PURPOSE_ENCRYPT;
    } else if (strcmp(purpose, "mac") == 0) {
        out->spec.purpose = KMS_PURPOSE_MAC;
    } else {
        KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT, "field 'purpose': must be \"encrypt\" or \"mac\"");
    }
    KMS_GUARD(seconds_field(obj, "rotation_period", &out->spec.rotation_period_s));
    KMS_GUARD(seconds_field(obj, "warning_window", &out->spec.warning_window_s));
    out->spec.deletion_protection = json_is_true(json_object_get(obj, "deletion_protection"));
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_patch_parse(json_t *obj, kms_key_update *out)
{
    static const field_spec f[] = {{"rotation_period", F_INTEGER, false},
                                   {"warning_window", F_INTEGER, false},
                                   {"min_decryption_version", F_INTEGER, false},
                                   {"deletion_protection", F_BOOL, false}};
    KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), ""));
    memset(out, 0, sizeof(*out));
    out->deletion_protection = -1;
    KMS_ENSURE_MSG(json_object_size(obj) > 0, KMS_ERR_JSON_INVALID,
                   "body: name at least one field to change");
    KMS_GUARD(seconds_field(obj, "rotation_period", &out->rotation_period_s));
    KMS_GUARD(seconds_field(obj, "warning_window", &out->warning_window_s));
    json_t *m = json_object_get(obj, "min_decryption_version");
    if (m != NULL) {
        json_int_t v = json_integer_value(m);
        KMS_ENSURE_MSG(v >= 1 && v <= UINT32_MAX, KMS_ERR_INVALID_ARGUMENT,
                       "field 'min_decryption_version': must be a version number >= 1");
        out->min_decryption_version = (uint32_t)v;
    }
    json_t *d = json_object_get(obj, "deletion_protection");
    if (d != NULL) {
        out->deletion_protection = json_is_true(d) ? 1 : 0;
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_rotate_parse(json_t *obj, bool allow_type, kms_api_rotate_req *out)
{
    static const field_spec with_type[] = {
        {"type", F_STRING, false}, {"reason", F_STRING, false}, {"lookback", F_INTEGER, false}};
    static const field_spec reason_only[] = {{"reason", F_STRING, false}};
    if (allow_type) {
        KMS_GUARD(fields_check(obj, with_type, KMS_ARRAY_LEN(with_type), ""));
    } else {
        KMS_GUARD(fields_check(obj, reason_only, KMS_ARRAY_LEN(reason_only), ""));
    }
    out->type = KMS_ROTATION_MANUAL;
    json_t *t = json_object_get(obj, "type");
    if (t != NULL) {
        if (strcmp(json_string_value(t), "manual") == 0) {
            out->type = KMS_ROTATION_MANUAL;
        } else if (strcmp(json_string_value(t), "emergency") == 0) {
            out->type = KMS_ROTATION_EMERGENCY;
        } else {
            KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT,
                         "field 'type': must be \"manual\" or \"emergency\"");
        }
    }
    out->lookback_s = 0;
    json_t *lb = json_object_get(obj, "lookback");
    if (lb != NULL) {
        json_int_t n = json_integer_value(lb);
        KMS_ENSURE_MSG(out->type == KMS_ROTATION_EMERGENCY, KMS_ERR_INVALID_ARGUMENT,
                       "field 'lookback': only for an emergency rotation");
        KMS_ENSURE_MSG(n > 0 && n <= KMS_API_LOOKBACK_MAX_S, KMS_ERR_INVALID_ARGUMENT,
                       "field 'lookback': 1 to %lld seconds", (long long)KMS_API_LOOKBACK_MAX_S);
        out->lookback_s = n;
    }
    return reason_copy(obj, out->reason);
}

KMS_RESULT kms_api_state_parse(json_t *obj, kms_api_state_req *out)
{
    static const field_spec f[] = {{"action", F_STRING, true},
                                   {"grace_period", F_INTEGER, false},
                                   {"waiting_period", F_INTEGER, false},
                                   {"reason", F_STRING, false}};
    KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), ""));
    memset(out, 0, sizeof(*out));
    const char *a = json_string_value(json_object_get(obj, "action"));
    if (!kms_is_ok(kms_version_action_parse(a, &out->action))) {
        KMS_BAIL_MSG(KMS_ERR_INVALID_ARGUMENT,
                     "field 'action': must be deprecate, compromise, disable, enable, "
                     "schedule_destroy or cancel_destroy");
    }
    json_t *g = json_object_get(obj, "grace_period");
    json_t *w = json_object_get(obj, "waiting_period");
    KMS_ENSURE_MSG(g == NULL || out->action == KMS_ACTION_DEPRECATE, KMS_ERR_JSON_INVALID,
                   "field 'grace_period': only with action deprecate");
    KMS_ENSURE_MSG(w == NULL || out->action == KMS_ACTION_SCHEDULE_DESTROY, KMS_ERR_JSON_INVALID,
                   "field 'waiting_period': only with action schedule_destroy");
    KMS_GUARD(seconds_field(obj, "grace_period", &out->arg));
    KMS_GUARD(seconds_field(obj, "waiting_period", &out->arg));
    return reason_copy(obj, out->reason);
}

KMS_RESULT kms_api_check_parse(json_t *obj, bool *repair)
{
    static const field_spec f[] = {{"repair", F_BOOL, false}};
    KMS_GUARD(fields_check(obj, f, KMS_ARRAY_LEN(f), ""));
    *repair = json_is_true(json_object_get(obj, "repair"));
    return KMS_OK_RESULT;
}

/* jansson gives free() no size, so each block carries its size in a
 * header; the whole block is wiped before it goes back to malloc. */
typedef union {
    size_t size;
    max_align_t align;
} alloc_header;

void *kms_api_wipe_malloc(size_t n)
{
    if (n > SIZE_MAX - sizeof(alloc_header)) {
        return NULL;
    }
    alloc_header *h = malloc(sizeof(*h) + n);
    if (h == NULL) {
        return NULL;
    }
    h->size = n;
    return h + 1;
}

void kms_api_wipe_free(void *p)
{
    if (p == NULL) {
        return;
    }
    alloc_header *h = (alloc_header *)p - 1;
    kms_secmem_wipe(h, sizeof(*h) + h->size);
    free(h);
}

void kms_api_json_alloc_init(void)
{
    json_set_alloc_funcs(kms_api_wipe_malloc, kms_api_wipe_free);
}
