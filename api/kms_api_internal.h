/*
 * api/ internals shared by the server, the request parsers and their fuzz
 * targets. Not an interface for other layers.
 */
#ifndef KMS_API_INTERNAL_H
#define KMS_API_INTERNAL_H

#include "kms.h"
#include "kms_api.h"

#include <jansson.h>

KMS_RESULT kms_api_read_file(const char *path, size_t max, char **out, size_t *len);

/* Parses a request body: strict JSON (duplicate keys rejected, one value,
 * no NUL), an object at the top. An empty body is the empty object, for
 * routes whose fields are all optional. Errors: KMS_ERR_JSON_INVALID. */
KMS_RESULT kms_api_body_parse(const uint8_t *body, size_t len, json_t **out);

/* One data-operation item: the body of a single op, or one batch item. */
typedef struct {
    kms_buf in;  /* plaintext (secret memory), token text, or message */
    kms_buf ctx; /* context bytes; for verify, the MAC token text */
    size_t datakey_bytes;
    bool include_plaintext;
} kms_api_item;

void kms_api_item_free(kms_api_item *it);
/* Checks obj against the op's fields and decodes them into it. where
 * prefixes error messages ("" or "items[7]."). */
KMS_RESULT kms_api_item_parse(kms_op op, json_t *obj, const char *where, kms_api_item *it);
/* The batch envelope: {"items":[...]} with at most max_items items. */
KMS_RESULT kms_api_batch_parse(json_t *obj, size_t max_items, json_t **items);

typedef struct {
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    kms_key_spec spec;
} kms_api_create_req;
KMS_RESULT kms_api_create_parse(json_t *obj, kms_api_create_req *out);
KMS_RESULT kms_api_patch_parse(json_t *obj, kms_key_update *out);

typedef struct {
    kms_rotation_type type;
    char reason[KMS_REASON_MAX_BYTES + 1];
    int64_t lookback_s; /* emergency only: the usage report's window; 0 = default */
} kms_api_rotate_req;
/* rotate: type + reason; rollback, master rotate: reason only. */
KMS_RESULT kms_api_rotate_parse(json_t *obj, bool allow_type, kms_api_rotate_req *out);

typedef struct {
    kms_version_action action;
    int64_t arg;
    char reason[KMS_REASON_MAX_BYTES + 1];
} kms_api_state_req;
KMS_RESULT kms_api_state_parse(json_t *obj, kms_api_state_req *out);
KMS_RESULT kms_api_check_parse(json_t *obj, bool *repair);

/* jansson's allocator: every block is wiped before it is freed, because
 * request and response documents hold base64 plaintext. */
void kms_api_json_alloc_init(void);
/* The same allocator for other buffers that may hold plaintext (response
 * bodies): kms_api_wipe_free() wipes the whole block. */
void *kms_api_wipe_malloc(size_t n);
void kms_api_wipe_free(void *p);

#endif /* KMS_API_INTERNAL_H */
