/* Names of the domain's enums, as used in JSON, the CLI and the docs. */
#include "kms.h"

#include <string.h>

typedef struct {
    int value;
    const char *name;
} kms_name_entry;

static const kms_name_entry kms_purposes[] = {
    {KMS_PURPOSE_ENCRYPT, "encrypt"},
    {KMS_PURPOSE_MAC, "mac"},
};

static const kms_name_entry kms_states[] = {
    {KMS_VERSION_ACTIVE, "active"},           {KMS_VERSION_DEPRECATED, "deprecated"},
    {KMS_VERSION_COMPROMISED, "compromised"}, {KMS_VERSION_DISABLED, "disabled"},
    {KMS_VERSION_DESTROYED, "destroyed"},
};

static const kms_name_entry kms_rotation_types[] = {
    {KMS_ROTATION_SCHEDULED, "scheduled"}, {KMS_ROTATION_MANUAL, "manual"},
    {KMS_ROTATION_EMERGENCY, "emergency"}, {KMS_ROTATION_ROLLBACK, "rollback"},
    {KMS_ROTATION_MASTER, "master"},
};

static const kms_name_entry kms_rotation_statuses[] = {
    {KMS_ROTATION_STARTED, "started"},
    {KMS_ROTATION_SUCCEEDED, "succeeded"},
    {KMS_ROTATION_FAILED, "failed"},
    {KMS_ROTATION_ROLLED_BACK, "rolled_back"},
};

static const kms_name_entry kms_actions[] = {
    {KMS_ACTION_DEPRECATE, "deprecate"},
    {KMS_ACTION_COMPROMISE, "compromise"},
    {KMS_ACTION_DISABLE, "disable"},
    {KMS_ACTION_ENABLE, "enable"},
    {KMS_ACTION_SCHEDULE_DESTROY, "schedule_destroy"},
    {KMS_ACTION_CANCEL_DESTROY, "cancel_destroy"},
};

static const kms_name_entry kms_ops[] = {
    {KMS_OP_WRAP, "wrap"},       {KMS_OP_UNWRAP, "unwrap"}, {KMS_OP_ENCRYPT, "encrypt"},
    {KMS_OP_DECRYPT, "decrypt"}, {KMS_OP_REWRAP, "rewrap"}, {KMS_OP_DATAKEY, "datakey"},
    {KMS_OP_MAC, "mac"},         {KMS_OP_VERIFY, "verify"},
};

static const char *kms_name_of(const kms_name_entry *t, size_t n, int v)
{
    for (size_t i = 0; i < n; i++)
        if (t[i].value == v)
            return t[i].name;
    return "unknown";
}

static kms_result kms_name_parse(const kms_name_entry *t, size_t n, const char *s, int *out)
{
    KMS_ENSURE(s != NULL && out != NULL, KMS_ERR_INVALID_ARGUMENT);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(t[i].name, s) == 0) {
            *out = t[i].value;
            return KMS_OK_RESULT;
        }
    }
    KMS_BAIL(KMS_ERR_INVALID_ARGUMENT);
}

#define KMS_NAMES(t) (t), KMS_ARRAY_LEN(t)

const char *kms_purpose_name(kms_purpose p)
{
    return kms_name_of(KMS_NAMES(kms_purposes), (int)p);
}

KMS_RESULT kms_purpose_parse(const char *s, kms_purpose *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_purposes), s, &v));
    *out = (kms_purpose)v;
    return KMS_OK_RESULT;
}

const char *kms_version_state_name(kms_version_state s)
{
    return kms_name_of(KMS_NAMES(kms_states), (int)s);
}

KMS_RESULT kms_version_state_parse(const char *s, kms_version_state *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_states), s, &v));
    *out = (kms_version_state)v;
    return KMS_OK_RESULT;
}

const char *kms_rotation_type_name(kms_rotation_type t)
{
    return kms_name_of(KMS_NAMES(kms_rotation_types), (int)t);
}

const char *kms_rotation_status_name(kms_rotation_status s)
{
    return kms_name_of(KMS_NAMES(kms_rotation_statuses), (int)s);
}

KMS_RESULT kms_version_action_parse(const char *s, kms_version_action *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_actions), s, &v));
    *out = (kms_version_action)v;
    return KMS_OK_RESULT;
}

const char *kms_op_name(kms_op op)
{
    return kms_name_of(KMS_NAMES(kms_ops), (int)op);
}

KMS_RESULT kms_rotation_type_parse(const char *s, kms_rotation_type *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_rotation_types), s, &v));
    *out = (kms_rotation_type)v;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rotation_status_parse(const char *s, kms_rotation_status *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_rotation_statuses), s, &v));
    *out = (kms_rotation_status)v;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_op_parse(const char *s, kms_op *out)
{
    int v;
    KMS_GUARD(kms_name_parse(KMS_NAMES(kms_ops), s, &v));
    *out = (kms_op)v;
    return KMS_OK_RESULT;
}
