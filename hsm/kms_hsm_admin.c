/*
 * hsm/: token set-up (kms_hsm_token_init) and the raw PKCS#11 benchmark
 * baseline (kms_hsm_bench_raw).
 */
#define _GNU_SOURCE
#include "kms_hsm_int.h"

#include <p11-kit/p11-kit.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HSM_LABEL_BYTES 32

static CK_FUNCTION_LIST *admin_module_load(const char *module)
{
    /* Set-up only loads modules by path or by p11-kit's file name. */
    return p11_kit_module_load(module, P11_KIT_MODULE_CRITICAL);
}

static KMS_RESULT admin_find_slot(kms_p11 *p11, bool want_initialized,
                                  const uint8_t label[HSM_LABEL_BYTES], CK_SLOT_ID *out)
{
    CK_ULONG n = 0;
    CK_RV rv = kms_p11_get_slot_list(p11, CK_TRUE, NULL, &n);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    CK_ULONG cap = n + 4;
    CK_SLOT_ID *slots = calloc(cap, sizeof(*slots));
    KMS_ENSURE(slots != NULL, KMS_ERR_NO_MEMORY);
    n = cap;
    rv = kms_p11_get_slot_list(p11, CK_TRUE, slots, &n);
    if (rv != CKR_OK) {
        free(slots);
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    }
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (kms_p11_get_token_info(p11, slots[i], &info) != CKR_OK)
            continue;
        bool init = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
        if (!want_initialized && !init) {
            *out = slots[i];
            free(slots);
            return KMS_OK_RESULT;
        }
        if (want_initialized && init && (info.flags & CKF_USER_PIN_INITIALIZED) == 0 &&
            memcmp(info.label, label, HSM_LABEL_BYTES) == 0) {
            *out = slots[i];
            free(slots);
            return KMS_OK_RESULT;
        }
    }
    free(slots);
    KMS_BAIL_MSG(KMS_ERR_HSM_TOKEN_NOT_FOUND, want_initialized
                                                  ? "the newly initialised token was not found"
                                                  : "no uninitialised token in the module");
}

static KMS_RESULT admin_token_init(kms_p11 *p11, const char *label, const kms_buf *so_pin,
                                   const kms_buf *user_pin)
{
    /* PKCS#11 v2.40 section 3.2: CK_TOKEN_INFO.label is 32 bytes, "padded
     * with the blank character (' ')", not NUL-terminated. */
    uint8_t label32[HSM_LABEL_BYTES];
    memset(label32, ' ', sizeof(label32));
    memcpy(label32, label, strlen(label));

    CK_SLOT_ID slot;
    KMS_GUARD(admin_find_slot(p11, false, NULL, &slot));
    CK_RV rv = kms_p11_init_token(p11, slot, so_pin->data, so_pin->len, label32);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_InitToken", KMS_P11_CTX_LOGIN);
    /* SoftHSM gives the initialised token a new slot id: look it up again
     * by its label. */
    KMS_GUARD(admin_find_slot(p11, true, label32, &slot));

    CK_SESSION_HANDLE s;
    rv = kms_p11_open_session(p11, slot, &s);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_OpenSession", KMS_P11_CTX_ANY);
    const char *fn = "C_Login";
    rv = kms_p11_login(p11, s, CKU_SO, so_pin->data, so_pin->len);
    if (rv == CKR_OK) {
        fn = "C_InitPIN";
        rv = kms_p11_init_pin(p11, s, user_pin->data, user_pin->len);
        (void)kms_p11_logout(p11, s);
    }
    (void)kms_p11_close_session(p11, s);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, fn, KMS_P11_CTX_LOGIN);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_hsm_token_init(const char *module, const char *label, const kms_buf *so_pin,
                              const kms_buf *user_pin)
{
    KMS_ENSURE(module != NULL && label != NULL && so_pin != NULL && user_pin != NULL,
               KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(*label != '\0' && strlen(label) <= HSM_LABEL_BYTES, KMS_ERR_INVALID_ARGUMENT,
                   "token label must be 1 to 32 bytes");
    KMS_ENSURE_MSG(so_pin->len > 0 && user_pin->len > 0, KMS_ERR_INVALID_ARGUMENT, "empty PIN");
    kms_hsm_counters counted = {0}; /* the seam counts every call; nobody reads these */
    kms_p11 p11 = {.f = admin_module_load(module), .c = &counted};
    KMS_ENSURE_MSG(p11.f != NULL, KMS_ERR_HSM_MODULE, "cannot load PKCS#11 module: %s",
                   p11_kit_message() ? p11_kit_message() : "unknown error");
    CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
    CK_RV rv = kms_p11_initialize(&p11, &args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        p11_kit_module_release(p11.f);
        KMS_BAIL_MSG(KMS_ERR_HSM_MODULE, "C_Initialize: %s", p11_kit_strerror(rv));
    }
    kms_result r = admin_token_init(&p11, label, so_pin, user_pin);
    if (rv == CKR_OK)
        (void)kms_p11_finalize(&p11);
    p11_kit_module_release(p11.f);
    return r;
}

/* Copies a blank-padded PKCS#11 string field into a C string. */
static void admin_field(char *out, const unsigned char *in, size_t n)
{
    while (n > 0 && (in[n - 1] == ' ' || in[n - 1] == '\0'))
        n--;
    for (size_t i = 0; i < n; i++)
        out[i] = (in[i] >= 0x20 && in[i] < 0x7f) ? (char)in[i] : '?';
    out[n] = '\0';
}

static KMS_RESULT admin_token_list(kms_p11 *p11, kms_hsm_token_info **tokens, size_t *count)
{
    CK_ULONG n = 0;
    CK_RV rv = kms_p11_get_slot_list(p11, CK_TRUE, NULL, &n);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    CK_ULONG cap = n + 4;
    CK_SLOT_ID *slots = calloc(cap, sizeof(*slots));
    kms_hsm_token_info *out = calloc(cap, sizeof(*out));
    if (slots == NULL || out == NULL) {
        free(slots);
        free(out);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    n = cap;
    rv = kms_p11_get_slot_list(p11, CK_TRUE, slots, &n);
    if (rv != CKR_OK) {
        free(slots);
        free(out);
        return kms_p11_fail(rv, "C_GetSlotList", KMS_P11_CTX_ANY);
    }
    size_t k = 0;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (kms_p11_get_token_info(p11, slots[i], &info) != CKR_OK)
            continue;
        kms_hsm_token_info *t = &out[k++];
        t->slot_id = slots[i];
        admin_field(t->label, info.label, sizeof(info.label));
        admin_field(t->manufacturer, info.manufacturerID, sizeof(info.manufacturerID));
        admin_field(t->model, info.model, sizeof(info.model));
        admin_field(t->serial, info.serialNumber, sizeof(info.serialNumber));
        t->initialized = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
        t->user_pin_initialized = (info.flags & CKF_USER_PIN_INITIALIZED) != 0;
    }
    free(slots);
    *tokens = out;
    *count = k;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_hsm_token_list(const char *module, kms_hsm_token_info **tokens, size_t *count)
{
    KMS_ENSURE(module != NULL && tokens != NULL && count != NULL, KMS_ERR_INVALID_ARGUMENT);
    kms_hsm_counters counted = {0}; /* the seam counts every call; nobody reads these */
    kms_p11 p11 = {.f = admin_module_load(module), .c = &counted};
    KMS_ENSURE_MSG(p11.f != NULL, KMS_ERR_HSM_MODULE, "cannot load PKCS#11 module: %s",
                   p11_kit_message() ? p11_kit_message() : "unknown error");
    CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
    CK_RV rv = kms_p11_initialize(&p11, &args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        p11_kit_module_release(p11.f);
        KMS_BAIL_MSG(KMS_ERR_HSM_MODULE, "C_Initialize: %s", p11_kit_strerror(rv));
    }
    kms_result r = admin_token_list(&p11, tokens, count);
    if (rv == CKR_OK)
        (void)kms_p11_finalize(&p11);
    p11_kit_module_release(p11.f);
    return r;
}

/* ---- raw benchmark ---- */

typedef struct {
    kms_hsm *hsm;
    kms_hsm_raw_op op;
    size_t msg_len;
    double seconds;
    uint64_t ops;
    kms_result r;
} bench_thread;

static double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static KMS_RESULT bench_loop(bench_thread *t, CK_SESSION_HANDLE s, uint8_t *msg, uint8_t *ct,
                             uint8_t *pt)
{
    kms_hsm *h = t->hsm;
    static const CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const CK_KEY_TYPE kt = CKK_AES;
    static const CK_ULONG len = 32;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, (void *)&cls, sizeof(cls)},     {CKA_KEY_TYPE, (void *)&kt, sizeof(kt)},
        {CKA_VALUE_LEN, (void *)&len, sizeof(len)}, {CKA_TOKEN, (void *)&no, sizeof(no)},
        {CKA_SENSITIVE, (void *)&yes, sizeof(yes)}, {CKA_EXTRACTABLE, (void *)&no, sizeof(no)},
        {CKA_ENCRYPT, (void *)&yes, sizeof(yes)},   {CKA_DECRYPT, (void *)&yes, sizeof(yes)},
    };
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE key;
    CK_RV rv = kms_p11_generate_key(&h->p11, s, &gen, tmpl, KMS_ARRAY_LEN(tmpl), &key);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, "C_GenerateKey", KMS_P11_CTX_ANY);
    uint8_t nonce[KMS_HSM_NONCE_BYTES] = {0};
    CK_GCM_PARAMS gcm = {.pIv = nonce,
                         .ulIvLen = sizeof(nonce),
                         .ulIvBits = sizeof(nonce) * 8,
                         .ulTagBits = KMS_HSM_TAG_BYTES * 8};
    CK_MECHANISM m = {CKM_AES_GCM, &gcm, sizeof(gcm)};
    const char *fn = "C_EncryptInit";
    /* The decrypt loop needs one valid ciphertext. */
    rv = kms_p11_encrypt_init(&h->p11, s, &m, key);
    if (rv == CKR_OK) {
        fn = "C_Encrypt";
        CK_ULONG ol = t->msg_len + KMS_HSM_TAG_BYTES;
        rv = kms_p11_encrypt(&h->p11, s, msg, t->msg_len, ct, &ol);
    }
    double end = bench_now() + t->seconds;
    /* Bounded by time; the clock is read every 16 operations. */
    for (uint64_t i = 0; rv == CKR_OK; i++) {
        if ((i & 15) == 0 && bench_now() >= end)
            break;
        if (t->op == KMS_HSM_RAW_ENCRYPT) {
            /* A distinct nonce per message, as real use would have. */
            memcpy(nonce, &i, sizeof(i));
            fn = "C_EncryptInit";
            rv = kms_p11_encrypt_init(&h->p11, s, &m, key);
            if (rv != CKR_OK)
                break;
            fn = "C_Encrypt";
            CK_ULONG ol = t->msg_len + KMS_HSM_TAG_BYTES;
            rv = kms_p11_encrypt(&h->p11, s, msg, t->msg_len, ct, &ol);
        } else {
            fn = "C_DecryptInit";
            rv = kms_p11_decrypt_init(&h->p11, s, &m, key);
            if (rv != CKR_OK)
                break;
            fn = "C_Decrypt";
            CK_ULONG ol = t->msg_len + KMS_HSM_TAG_BYTES;
            rv = kms_p11_decrypt(&h->p11, s, ct, t->msg_len + KMS_HSM_TAG_BYTES, pt, &ol);
        }
        if (rv == CKR_OK)
            t->ops++;
    }
    (void)kms_p11_destroy_object(&h->p11, s, key);
    if (rv != CKR_OK)
        return kms_p11_fail(rv, fn, KMS_P11_CTX_ANY);
    return KMS_OK_RESULT;
}

static void *bench_main(void *arg)
{
    bench_thread *t = arg;
    kms_hsm *h = t->hsm;
    uint8_t *msg = calloc(1, t->msg_len + 1);
    uint8_t *ct = calloc(1, t->msg_len + KMS_HSM_TAG_BYTES);
    uint8_t *pt = calloc(1, t->msg_len + KMS_HSM_TAG_BYTES);
    if (msg == NULL || ct == NULL || pt == NULL) {
        t->r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    } else {
        /* Each thread its own session, outside the pool; the login is the
         * application's and already done. */
        CK_SESSION_HANDLE s;
        CK_RV rv = kms_p11_open_session(&h->p11, h->slot, &s);
        if (rv != CKR_OK) {
            t->r = kms_p11_fail(rv, "C_OpenSession", KMS_P11_CTX_ANY);
        } else {
            t->r = bench_loop(t, s, msg, ct, pt);
            (void)kms_p11_close_session(&h->p11, s);
        }
    }
    free(msg);
    free(ct);
    free(pt);
    return NULL;
}

KMS_RESULT kms_hsm_bench_raw(kms_hsm *h, kms_hsm_raw_op op, size_t msg_len, unsigned threads,
                             double seconds, double *ops_per_sec)
{
    KMS_ENSURE(op == KMS_HSM_RAW_ENCRYPT || op == KMS_HSM_RAW_DECRYPT, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(threads >= 1 && threads <= 64 && seconds > 0 && seconds <= 3600 &&
                   msg_len <= 1024 * 1024,
               KMS_ERR_INVALID_ARGUMENT);
    bench_thread *t = calloc(threads, sizeof(*t));
    pthread_t *tid = calloc(threads, sizeof(*tid));
    if (t == NULL || tid == NULL) {
        free(t);
        free(tid);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    /* Shared: no recovery may close the module under the benchmark. */
    pthread_rwlock_rdlock(&h->life);
    double start = bench_now();
    unsigned started = 0;
    for (unsigned i = 0; i < threads; i++) {
        t[i] = (bench_thread){
            .hsm = h, .op = op, .msg_len = msg_len, .seconds = seconds, .r = KMS_OK_RESULT};
        if (pthread_create(&tid[i], NULL, bench_main, &t[i]) != 0)
            break;
        started++;
    }
    uint64_t total = 0;
    kms_result r =
        started == threads ? KMS_OK_RESULT : kms_error_raise(KMS_ERR_INTERNAL, __FILE__, __LINE__);
    for (unsigned i = 0; i < started; i++) {
        pthread_join(tid[i], NULL);
        total += t[i].ops;
        if (kms_is_ok(r) && !kms_is_ok(t[i].r))
            r = t[i].r;
    }
    double elapsed = bench_now() - start;
    pthread_rwlock_unlock(&h->life);
    free(t);
    free(tid);
    KMS_GUARD(r);
    *ops_per_sec = elapsed > 0 ? (double)total / elapsed : 0;
    return KMS_OK_RESULT;
}
