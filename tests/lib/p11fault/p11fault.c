/*
 * libkmsfault.so: a fault-injecting PKCS#11 module for tests (never
 * installed). It exports C_GetFunctionList and forwards every function to the
 * module named by env KMS_FAULT_MODULE (default: SoftHSM), counting calls in
 * a control file (env KMS_FAULT_CONTROL) that tests map too (tests/lib/
 * kms_fault.h). When armed, the nth matching call (or, sticky, every one from
 * the nth on) is delayed and/or answered with the armed CK_RV instead of
 * being forwarded, so the caller sees exactly what a failing HSM would say.
 *
 * With KMS_FAULT_VERBOSE=1 it logs function names and counters to stderr,
 * never arguments (they can hold PINs and key material).
 *
 * Shape after p11-kit's mock modules (common/mock.c): one forwarder per
 * function of the v2.40 function list, generated from the list below.
 */
#define _GNU_SOURCE
#include "kms_fault_ctl.h"

#include <p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KMS_FAULT_DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"

/* The v2.40 function list in struct ck_function_list order:
 * X(name, parameters, argument names). Generated from p11-kit's pkcs11.h. */
#define KMS_FAULT_FUNCTIONS                                                                       \
    X(C_Initialize, (CK_VOID_PTR init_args), (init_args))                                         \
    X(C_Finalize, (CK_VOID_PTR reserved), (reserved))                                             \
    X(C_GetInfo, (CK_INFO * info), (info))                                                        \
    X(C_GetSlotList, (CK_BYTE token_present, CK_SLOT_ID * slot_list, CK_ULONG * count),           \
      (token_present, slot_list, count))                                                          \
    X(C_GetSlotInfo, (CK_SLOT_ID slot_id, CK_SLOT_INFO * info), (slot_id, info))                  \
    X(C_GetTokenInfo, (CK_SLOT_ID slot_id, CK_TOKEN_INFO * info), (slot_id, info))                \
    X(C_GetMechanismList,                                                                         \
      (CK_SLOT_ID slot_id, CK_MECHANISM_TYPE * mechanism_list, CK_ULONG * count),                 \
      (slot_id, mechanism_list, count))                                                           \
    X(C_GetMechanismInfo, (CK_SLOT_ID slot_id, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO * info), \
      (slot_id, type, info))                                                                      \
    X(C_InitToken, (CK_SLOT_ID slot_id, CK_BYTE * pin, CK_ULONG pin_len, CK_BYTE * label),        \
      (slot_id, pin, pin_len, label))                                                             \
    X(C_InitPIN, (CK_SESSION_HANDLE session, CK_BYTE * pin, CK_ULONG pin_len),                    \
      (session, pin, pin_len))                                                                    \
    X(C_SetPIN,                                                                                   \
      (CK_SESSION_HANDLE session, CK_BYTE * old_pin, CK_ULONG old_len, CK_BYTE * new_pin,         \
       CK_ULONG new_len),                                                                         \
      (session, old_pin, old_len, new_pin, new_len))                                              \
    X(C_OpenSession,                                                                              \
      (CK_SLOT_ID slot_id, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify,             \
       CK_SESSION_HANDLE * session),                                                              \
      (slot_id, flags, application, notify, session))                                             \
    X(C_CloseSession, (CK_SESSION_HANDLE session), (session))                                     \
    X(C_CloseAllSessions, (CK_SLOT_ID slot_id), (slot_id))                                        \
    X(C_GetSessionInfo, (CK_SESSION_HANDLE session, CK_SESSION_INFO * info), (session, info))     \
    X(C_GetOperationState,                                                                        \
      (CK_SESSION_HANDLE session, CK_BYTE * operation_state, CK_ULONG * operation_state_len),     \
      (session, operation_state, operation_state_len))                                            \
    X(C_SetOperationState,                                                                        \
      (CK_SESSION_HANDLE session, CK_BYTE * operation_state, CK_ULONG operation_state_len,        \
       CK_OBJECT_HANDLE encryption_key, CK_OBJECT_HANDLE authentiation_key),                      \
      (session, operation_state, operation_state_len, encryption_key, authentiation_key))         \
    X(C_Login,                                                                                    \
      (CK_SESSION_HANDLE session, CK_USER_TYPE user_type, CK_BYTE * pin, CK_ULONG pin_len),       \
      (session, user_type, pin, pin_len))                                                         \
    X(C_Logout, (CK_SESSION_HANDLE session), (session))                                           \
    X(C_CreateObject,                                                                             \
      (CK_SESSION_HANDLE session, CK_ATTRIBUTE * templ, CK_ULONG count,                           \
       CK_OBJECT_HANDLE * object),                                                                \
      (session, templ, count, object))                                                            \
    X(C_CopyObject,                                                                               \
      (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE * templ, CK_ULONG count,  \
       CK_OBJECT_HANDLE * new_object),                                                            \
      (session, object, templ, count, new_object))                                                \
    X(C_DestroyObject, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object), (session, object))   \
    X(C_GetObjectSize, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ULONG * size),     \
      (session, object, size))                                                                    \
    X(C_GetAttributeValue,                                                                        \
      (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE * templ, CK_ULONG count), \
      (session, object, templ, count))                                                            \
    X(C_SetAttributeValue,                                                                        \
      (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE * templ, CK_ULONG count), \
      (session, object, templ, count))                                                            \
    X(C_FindObjectsInit, (CK_SESSION_HANDLE session, CK_ATTRIBUTE * templ, CK_ULONG count),       \
      (session, templ, count))                                                                    \
    X(C_FindObjects,                                                                              \
      (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE * object, CK_ULONG max_object_count,           \
       CK_ULONG * object_count),                                                                  \
      (session, object, max_object_count, object_count))                                          \
    X(C_FindObjectsFinal, (CK_SESSION_HANDLE session), (session))                                 \
    X(C_EncryptInit, (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key), \
      (session, mechanism, key))                                                                  \
    X(C_Encrypt,                                                                                  \
      (CK_SESSION_HANDLE session, CK_BYTE * data, CK_ULONG data_len, CK_BYTE * encrypted_data,    \
       CK_ULONG * encrypted_data_len),                                                            \
      (session, data, data_len, encrypted_data, encrypted_data_len))                              \
    X(C_EncryptUpdate,                                                                            \
      (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len, CK_BYTE * encrypted_part,    \
       CK_ULONG * encrypted_part_len),                                                            \
      (session, part, part_len, encrypted_part, encrypted_part_len))                              \
    X(C_EncryptFinal,                                                                             \
      (CK_SESSION_HANDLE session, CK_BYTE * last_encrypted_part,                                  \
       CK_ULONG * last_encrypted_part_len),                                                       \
      (session, last_encrypted_part, last_encrypted_part_len))                                    \
    X(C_DecryptInit, (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key), \
      (session, mechanism, key))                                                                  \
    X(C_Decrypt,                                                                                  \
      (CK_SESSION_HANDLE session, CK_BYTE * encrypted_data, CK_ULONG encrypted_data_len,          \
       CK_BYTE * data, CK_ULONG * data_len),                                                      \
      (session, encrypted_data, encrypted_data_len, data, data_len))                              \
    X(C_DecryptUpdate,                                                                            \
      (CK_SESSION_HANDLE session, CK_BYTE * encrypted_part, CK_ULONG encrypted_part_len,          \
       CK_BYTE * part, CK_ULONG * part_len),                                                      \
      (session, encrypted_part, encrypted_part_len, part, part_len))                              \
    X(C_DecryptFinal, (CK_SESSION_HANDLE session, CK_BYTE * last_part, CK_ULONG * last_part_len), \
      (session, last_part, last_part_len))                                                        \
    X(C_DigestInit, (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism), (session, mechanism))  \
    X(C_Digest,                                                                                   \
      (CK_SESSION_HANDLE session, CK_BYTE * data, CK_ULONG data_len, CK_BYTE * digest,            \
       CK_ULONG * digest_len),                                                                    \
      (session, data, data_len, digest, digest_len))                                              \
    X(C_DigestUpdate, (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len),             \
      (session, part, part_len))                                                                  \
    X(C_DigestKey, (CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key), (session, key))             \
    X(C_DigestFinal, (CK_SESSION_HANDLE session, CK_BYTE * digest, CK_ULONG * digest_len),        \
      (session, digest, digest_len))                                                              \
    X(C_SignInit, (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key),    \
      (session, mechanism, key))                                                                  \
    X(C_Sign,                                                                                     \
      (CK_SESSION_HANDLE session, CK_BYTE * data, CK_ULONG data_len, CK_BYTE * signature,         \
       CK_ULONG * signature_len),                                                                 \
      (session, data, data_len, signature, signature_len))                                        \
    X(C_SignUpdate, (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len),               \
      (session, part, part_len))                                                                  \
    X(C_SignFinal, (CK_SESSION_HANDLE session, CK_BYTE * signature, CK_ULONG * signature_len),    \
      (session, signature, signature_len))                                                        \
    X(C_SignRecoverInit,                                                                          \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key),                \
      (session, mechanism, key))                                                                  \
    X(C_SignRecover,                                                                              \
      (CK_SESSION_HANDLE session, CK_BYTE * data, CK_ULONG data_len, CK_BYTE * signature,         \
       CK_ULONG * signature_len),                                                                 \
      (session, data, data_len, signature, signature_len))                                        \
    X(C_VerifyInit, (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key),  \
      (session, mechanism, key))                                                                  \
    X(C_Verify,                                                                                   \
      (CK_SESSION_HANDLE session, CK_BYTE * data, CK_ULONG data_len, CK_BYTE * signature,         \
       CK_ULONG signature_len),                                                                   \
      (session, data, data_len, signature, signature_len))                                        \
    X(C_VerifyUpdate, (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len),             \
      (session, part, part_len))                                                                  \
    X(C_VerifyFinal, (CK_SESSION_HANDLE session, CK_BYTE * signature, CK_ULONG signature_len),    \
      (session, signature, signature_len))                                                        \
    X(C_VerifyRecoverInit,                                                                        \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE key),                \
      (session, mechanism, key))                                                                  \
    X(C_VerifyRecover,                                                                            \
      (CK_SESSION_HANDLE session, CK_BYTE * signature, CK_ULONG signature_len, CK_BYTE * data,    \
       CK_ULONG * data_len),                                                                      \
      (session, signature, signature_len, data, data_len))                                        \
    X(C_DigestEncryptUpdate,                                                                      \
      (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len, CK_BYTE * encrypted_part,    \
       CK_ULONG * encrypted_part_len),                                                            \
      (session, part, part_len, encrypted_part, encrypted_part_len))                              \
    X(C_DecryptDigestUpdate,                                                                      \
      (CK_SESSION_HANDLE session, CK_BYTE * encrypted_part, CK_ULONG encrypted_part_len,          \
       CK_BYTE * part, CK_ULONG * part_len),                                                      \
      (session, encrypted_part, encrypted_part_len, part, part_len))                              \
    X(C_SignEncryptUpdate,                                                                        \
      (CK_SESSION_HANDLE session, CK_BYTE * part, CK_ULONG part_len, CK_BYTE * encrypted_part,    \
       CK_ULONG * encrypted_part_len),                                                            \
      (session, part, part_len, encrypted_part, encrypted_part_len))                              \
    X(C_DecryptVerifyUpdate,                                                                      \
      (CK_SESSION_HANDLE session, CK_BYTE * encrypted_part, CK_ULONG encrypted_part_len,          \
       CK_BYTE * part, CK_ULONG * part_len),                                                      \
      (session, encrypted_part, encrypted_part_len, part, part_len))                              \
    X(C_GenerateKey,                                                                              \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_ATTRIBUTE * templ, CK_ULONG count, \
       CK_OBJECT_HANDLE * key),                                                                   \
      (session, mechanism, templ, count, key))                                                    \
    X(C_GenerateKeyPair,                                                                          \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_ATTRIBUTE * public_key_template,   \
       CK_ULONG public_key_attribute_count, CK_ATTRIBUTE * private_key_template,                  \
       CK_ULONG private_key_attribute_count, CK_OBJECT_HANDLE * public_key,                       \
       CK_OBJECT_HANDLE * private_key),                                                           \
      (session, mechanism, public_key_template, public_key_attribute_count, private_key_template, \
       private_key_attribute_count, public_key, private_key))                                     \
    X(C_WrapKey,                                                                                  \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE wrapping_key,        \
       CK_OBJECT_HANDLE key, CK_BYTE * wrapped_key, CK_ULONG * wrapped_key_len),                  \
      (session, mechanism, wrapping_key, key, wrapped_key, wrapped_key_len))                      \
    X(C_UnwrapKey,                                                                                \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE unwrapping_key,      \
       CK_BYTE * wrapped_key, CK_ULONG wrapped_key_len, CK_ATTRIBUTE * templ,                     \
       CK_ULONG attribute_count, CK_OBJECT_HANDLE * key),                                         \
      (session, mechanism, unwrapping_key, wrapped_key, wrapped_key_len, templ, attribute_count,  \
       key))                                                                                      \
    X(C_DeriveKey,                                                                                \
      (CK_SESSION_HANDLE session, CK_MECHANISM * mechanism, CK_OBJECT_HANDLE base_key,            \
       CK_ATTRIBUTE * templ, CK_ULONG attribute_count, CK_OBJECT_HANDLE * key),                   \
      (session, mechanism, base_key, templ, attribute_count, key))                                \
    X(C_SeedRandom, (CK_SESSION_HANDLE session, CK_BYTE * seed, CK_ULONG seed_len),               \
      (session, seed, seed_len))                                                                  \
    X(C_GenerateRandom, (CK_SESSION_HANDLE session, CK_BYTE * random_data, CK_ULONG random_len),  \
      (session, random_data, random_len))                                                         \
    X(C_GetFunctionStatus, (CK_SESSION_HANDLE session), (session))                                \
    X(C_CancelFunction, (CK_SESSION_HANDLE session), (session))                                   \
    X(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID * slot, CK_VOID_PTR reserved),              \
      (flags, slot, reserved))

static pthread_once_t fault_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST *fault_target;
static kms_fault_ctl *_Atomic fault_ctl;
static kms_fault_ctl fault_ctl_private; /* when no control file is named */
static bool fault_verbose;

static kms_fault_ctl *fault_ctl_map(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 ||
        (st.st_size < (off_t)sizeof(kms_fault_ctl) && ftruncate(fd, sizeof(kms_fault_ctl)) != 0)) {
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, sizeof(kms_fault_ctl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return NULL;
    kms_fault_ctl *c = p;
    /* A fresh (zero-filled) file: stamp it. Both sides stamp the same
     * values, so a race between them is harmless. */
    if (c->magic != KMS_FAULT_CTL_MAGIC) {
        c->version = KMS_FAULT_CTL_VERSION;
        c->magic = KMS_FAULT_CTL_MAGIC;
    }
    return c;
}

/* (Re)maps the control file named by the environment. Called at load and
 * on every C_Initialize, because one test process makes a fresh token (and
 * control file) per test while the module stays loaded. A replaced mapping
 * is left mapped: another thread may still be reading it, and it is small. */
static void fault_control_refresh(void)
{
    static char mapped_path[4096];
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    const char *ctl = getenv("KMS_FAULT_CONTROL");
    if (ctl == NULL)
        ctl = "";
    pthread_mutex_lock(&mu);
    if (fault_ctl == NULL || strcmp(ctl, mapped_path) != 0) {
        kms_fault_ctl *c = *ctl != '\0' ? fault_ctl_map(ctl) : NULL;
        if (c == NULL && *ctl != '\0')
            fprintf(stderr, "kmsfault: cannot map control file: %s\n", strerror(errno));
        fault_ctl = c != NULL ? c : &fault_ctl_private;
        snprintf(mapped_path, sizeof(mapped_path), "%s", c != NULL ? ctl : "");
    }
    pthread_mutex_unlock(&mu);
}

static void fault_setup(void)
{
    const char *v = getenv("KMS_FAULT_VERBOSE");
    fault_verbose = v != NULL && strcmp(v, "1") == 0;
    fault_control_refresh();

    const char *target = getenv("KMS_FAULT_MODULE");
    if (target == NULL || *target == '\0')
        target = KMS_FAULT_DEFAULT_TARGET;
    /* RTLD_LOCAL: the target's C_* symbols must not interpose ours. */
    void *dl = dlopen(target, RTLD_NOW | RTLD_LOCAL);
    if (dl == NULL) {
        fprintf(stderr, "kmsfault: cannot load target module: %s\n", dlerror());
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
    if (get == NULL || get(&fault_target) != CKR_OK)
        fault_target = NULL;
    /* dl stays loaded for the life of the process, like the target expects. */
}

static void fault_sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Counts the call and decides its fate: returns true with *rv set when the
 * call must not be forwarded. */
static bool fault_check(const char *name, CK_RV *rv)
{
    if (strcmp(name, "C_Initialize") == 0)
        fault_control_refresh();
    kms_fault_ctl *c = fault_ctl;
    uint64_t n = atomic_fetch_add(&c->calls, 1) + 1;
    if (atomic_load_explicit(&c->armed, memory_order_acquire) == 0) {
        if (fault_verbose)
            fprintf(stderr, "kmsfault: call %llu %s\n", (unsigned long long)n, name);
        return false;
    }
    char want[KMS_FAULT_FUNCTION_MAX_BYTES];
    memcpy(want, c->function, sizeof(want));
    want[sizeof(want) - 1] = '\0';
    if (want[0] != '\0' && strcmp(want, name) != 0)
        return false;

    uint64_t m = atomic_fetch_add(&c->matched, 1) + 1;
    uint64_t nth = atomic_load(&c->nth);
    bool sticky = atomic_load(&c->sticky) != 0;
    if (sticky ? m < nth : m != nth)
        return false;

    unsigned delay = atomic_load(&c->delay_ms);
    CK_RV ckr = (CK_RV)atomic_load(&c->ckr);
    atomic_fetch_add(&c->fired, 1);
    if (fault_verbose)
        fprintf(stderr, "kmsfault: call %llu %s: fault (match %llu, rv 0x%lx, delay %u ms)\n",
                (unsigned long long)n, name, (unsigned long long)m, (unsigned long)ckr, delay);
    if (delay > 0)
        fault_sleep_ms(delay);
    if (ckr == CKR_OK)
        return false;
    *rv = ckr;
    return true;
}

/* A failing C_Finalize still finalises the library behind it, as a real
 * module whose device failed does: otherwise the target would stay
 * initialised with this process's old configuration, and p11-kit, seeing
 * CKR_CRYPTOKI_ALREADY_INITIALIZED on the next C_Initialize, would never
 * finalise it again. */
static bool fault_forward_anyway(const char *name)
{
    return strcmp(name, "C_Finalize") == 0;
}

#define X(name, params, args)                                \
    static CK_RV fault_##name params                         \
    {                                                        \
        CK_RV rv;                                            \
        if (fault_check(#name, &rv)) {                       \
            if (fault_forward_anyway(#name) && fault_target) \
                (void)fault_target->name args;               \
            return rv;                                       \
        }                                                    \
        if (fault_target == NULL)                            \
            return CKR_GENERAL_ERROR;                        \
        return fault_target->name args;                      \
    }
KMS_FAULT_FUNCTIONS
#undef X

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static CK_FUNCTION_LIST fault_functions = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
    .C_GetFunctionList = C_GetFunctionList,
#define X(name, params, args) .name = fault_##name,
    KMS_FAULT_FUNCTIONS
#undef X
};

/* The module's one export. Our own C_GetFunctionList is answered directly
 * (not counted, not faulted): p11-kit calls it while loading. */
__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    pthread_once(&fault_once, fault_setup);
    if (fault_target == NULL)
        return CKR_GENERAL_ERROR;
    *list = &fault_functions;
    return CKR_OK;
}
