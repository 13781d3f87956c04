/* Fuzz target: the JSON request parsers of every route that takes a body.
 * The first byte picks the parser, the rest is the body. */
#include "fuzz_check.h"
#include "kms_api_internal.h"

#include <stdint.h>
#include <stdlib.h>

static bool expected(kms_err e)
{
    switch (e) {
    case KMS_ERR_JSON_INVALID:
    case KMS_ERR_BASE64_INVALID:
    case KMS_ERR_LIMIT_EXCEEDED:
    case KMS_ERR_INVALID_ARGUMENT:
    case KMS_ERR_TOKEN_INVALID:
    case KMS_ERR_KEY_NAME_INVALID:
    case KMS_ERR_NO_MEMORY:
    case KMS_ERR_SECURE_MEMORY:
        return true;
    default:
        return false;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    unsigned sel = data[0] % 16;
    json_t *body = NULL;
    kms_result r = kms_api_body_parse(data + 1, size - 1, &body);
    if (!kms_is_ok(r)) {
        if (r.err != KMS_ERR_JSON_INVALID) {
            abort();
        }
        return 0;
    }
    if (sel >= 1 && sel <= 8) {
        kms_api_item it;
        r = kms_api_item_parse((kms_op)sel, body, "", &it);
        kms_api_item_free(&it);
    } else if (sel == 9) {
        json_t *items = NULL;
        r = kms_api_batch_parse(body, 1000, &items);
        for (size_t i = 0; kms_is_ok(r) && i < json_array_size(items); i++) {
            kms_api_item it;
            kms_result ir =
                kms_api_item_parse(KMS_OP_UNWRAP, json_array_get(items, i), "items[0].", &it);
            kms_api_item_free(&it);
            if (!kms_is_ok(ir) && !expected(ir.err)) {
                abort();
            }
        }
    } else if (sel == 10) {
        kms_api_create_req c;
        r = kms_api_create_parse(body, &c);
    } else if (sel == 11) {
        kms_key_update u;
        r = kms_api_patch_parse(body, &u);
    } else if (sel == 12 || sel == 13) {
        kms_api_rotate_req rr;
        r = kms_api_rotate_parse(body, sel == 12, &rr);
    } else if (sel == 14) {
        kms_api_state_req sr;
        r = kms_api_state_parse(body, &sr);
    } else {
        bool repair;
        r = kms_api_check_parse(body, &repair);
    }
    json_decref(body);
    if (!kms_is_ok(r) && !expected(r.err)) {
        abort();
    }
    return 0;
}
