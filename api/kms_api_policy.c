/*
 * The authorization policy: which certificate identities hold which role on
 * which keys. Format (docs/config.md, "Policy file"):
 *
 *   {"rules": [
 *     {"identity": "spiffe://example.org/billing-*", "role": "app",
 *      "keys": ["billing-*"]},
 *     {"identity": "admin.example.org", "role": "admin", "keys": ["*"]}
 *   ]}
 *
 * Globs are fnmatch(3) patterns without FNM_PATHNAME ('*' also matches '/').
 * Deny by default: an identity that no rule names holds no role. A loaded
 * policy is immutable; the server swaps whole policies on reload.
 */
#include "kms_api.h"

#include <fnmatch.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char identity[KMS_POLICY_PATTERN_BYTES];
    kms_role role;
    size_t key_count;
    char (*keys)[KMS_POLICY_PATTERN_BYTES];
} policy_rule;

struct kms_policy {
    size_t count;
    policy_rule *rules;
};

KMS_RESULT kms_api_read_file(const char *path, size_t max, char **out, size_t *len);

const char *kms_role_name(kms_role r)
{
    switch (r) {
    case KMS_ROLE_APP:
        return "app";
    case KMS_ROLE_MIGRATOR:
        return "migrator";
    case KMS_ROLE_ADMIN:
        return "admin";
    case KMS_ROLE_AUDITOR:
        return "auditor";
    default:
        return "none";
    }
}

static bool role_parse(const char *s, kms_role *out)
{
    static const kms_role roles[] = {KMS_ROLE_APP, KMS_ROLE_MIGRATOR, KMS_ROLE_ADMIN,
                                     KMS_ROLE_AUDITOR};
    for (size_t i = 0; i < KMS_ARRAY_LEN(roles); i++) {
        if (strcmp(s, kms_role_name(roles[i])) == 0) {
            *out = roles[i];
            return true;
        }
    }
    return false;
}

void kms_policy_free(kms_policy *p)
{
    if (p == NULL) {
        return;
    }
    for (size_t i = 0; i < p->count; i++) {
        free(p->rules[i].keys);
    }
    free(p->rules);
    free(p);
}

size_t kms_policy_rule_count(const kms_policy *p)
{
    return p->count;
}

/* A pattern is printable ASCII without blanks: identities and key names
 * are, and a stray control character is far more likely a mistake. */
static bool pattern_ok(const char *s, size_t n)
{
    if (n == 0 || n >= KMS_POLICY_PATTERN_BYTES) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f) {
            return false;
        }
    }
    return true;
}

static kms_result rule_parse(json_t *r, const char *name, size_t idx, policy_rule *out)
{
    KMS_ENSURE_MSG(json_is_object(r), KMS_ERR_CONFIG, "%s: rule %zu: not an object", name, idx);
    const char *field;
    json_t *v;
    json_object_foreach(r, field, v)
    {
        KMS_ENSURE_MSG(strcmp(field, "identity") == 0 || strcmp(field, "role") == 0 ||
                           strcmp(field, "keys") == 0 || strcmp(field, "comment") == 0,
                       KMS_ERR_CONFIG, "%s: rule %zu: unknown field '%.64s'", name, idx, field);
    }
    json_t *id = json_object_get(r, "identity");
    json_t *role = json_object_get(r, "role");
    json_t *keys = json_object_get(r, "keys");
    json_t *comment = json_object_get(r, "comment");
    KMS_ENSURE_MSG(comment == NULL || json_is_string(comment), KMS_ERR_CONFIG,
                   "%s: rule %zu: comment must be a string", name, idx);
    KMS_ENSURE_MSG(json_is_string(id), KMS_ERR_CONFIG,
                   "%s: rule %zu: identity must be a string (a glob)", name, idx);
    KMS_ENSURE_MSG(pattern_ok(json_string_value(id), json_string_length(id)), KMS_ERR_CONFIG,
                   "%s: rule %zu: identity must be 1..%d printable characters without blanks", name,
                   idx, KMS_POLICY_PATTERN_BYTES - 1);
    KMS_ENSURE_MSG(json_is_string(role) && role_parse(json_string_value(role), &out->role),
                   KMS_ERR_CONFIG, "%s: rule %zu: role must be app, migrator, admin or auditor",
                   name, idx);
    KMS_ENSURE_MSG(json_is_array(keys) && json_array_size(keys) > 0 &&
                       json_array_size(keys) <= KMS_POLICY_KEYS_MAX,
                   KMS_ERR_CONFIG, "%s: rule %zu: keys must be an array of 1..%d key globs", name,
                   idx, KMS_POLICY_KEYS_MAX);
    memcpy(out->identity, json_string_value(id), json_string_length(id) + 1);
    out->key_count = json_array_size(keys);
    out->keys = calloc(out->key_count, sizeof(*out->keys));
    KMS_ENSURE(out->keys != NULL, KMS_ERR_NO_MEMORY);
    for (size_t k = 0; k < out->key_count; k++) {
        json_t *g = json_array_get(keys, k);
        KMS_ENSURE_MSG(json_is_string(g) && pattern_ok(json_string_value(g), json_string_length(g)),
                       KMS_ERR_CONFIG,
                       "%s: rule %zu: keys[%zu] must be a glob of 1..%d printable characters", name,
                       idx, k, KMS_POLICY_PATTERN_BYTES - 1);
        memcpy(out->keys[k], json_string_value(g), json_string_length(g) + 1);
    }
    return KMS_OK_RESULT;
}

KMS_RESULT kms_policy_parse(const char *text, size_t len, const char *name, kms_policy **out)
{
    KMS_ENSURE_MSG(len <= KMS_POLICY_FILE_BYTES, KMS_ERR_CONFIG, "%s: larger than %d bytes", name,
                   KMS_POLICY_FILE_BYTES);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    KMS_ENSURE_MSG(root != NULL, KMS_ERR_CONFIG, "%s:%d:%d: %s", name, jerr.line, jerr.column,
                   jerr.text);
    kms_result res = KMS_OK_RESULT;
    kms_policy *p = calloc(1, sizeof(*p));
    json_t *rules = json_object_get(root, "rules");
    if (p == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto done;
    }
    if (!json_is_object(root) || json_object_size(root) != 1 || !json_is_array(rules)) {
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__,
                               "%s: expected an object with one field, \"rules\": [...]", name);
        goto done;
    }
    if (json_array_size(rules) > KMS_POLICY_RULES_MAX) {
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__, "%s: more than %d rules", name,
                               KMS_POLICY_RULES_MAX);
        goto done;
    }
    p->rules = calloc(json_array_size(rules) + 1, sizeof(*p->rules));
    if (p->rules == NULL) {
        res = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
        goto done;
    }
    for (size_t i = 0; i < json_array_size(rules); i++) {
        p->count = i + 1; /* so that free() sees a partially filled rule */
        KMS_GUARD_GOTO(res, rule_parse(json_array_get(rules, i), name, i, &p->rules[i]), done);
    }
done:
    json_decref(root);
    if (!kms_is_ok(res)) {
        kms_policy_free(p);
        return res;
    }
    *out = p;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_policy_load(const char *path, kms_policy **out)
{
    char *text = NULL;
    size_t len = 0;
    KMS_GUARD(kms_api_read_file(path, KMS_POLICY_FILE_BYTES, &text, &len));
    kms_result r = kms_policy_parse(text, len, path, out);
    free(text);
    return r;
}

unsigned kms_policy_roles(const kms_policy *p, const char *identity, const char *key)
{
    unsigned roles = 0;
    if (p == NULL || identity == NULL) {
        return 0;
    }
    for (size_t i = 0; i < p->count; i++) {
        const policy_rule *r = &p->rules[i];
        if (fnmatch(r->identity, identity, 0) != 0) {
            continue;
        }
        if (key == NULL) {
            roles |= r->role;
            continue;
        }
        for (size_t k = 0; k < r->key_count; k++) {
            if (fnmatch(r->keys[k], key, 0) == 0) {
                roles |= r->role;
                break;
            }
        }
    }
    return roles;
}
