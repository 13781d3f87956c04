/*
 * Shared fixture of the kms/ integration tests: a throwaway SoftHSM token
 * (kms_test_hsm.h), an LMDB store in the token's temp directory, and an
 * injectable clock.
 */
#ifndef KMS_TEST_FIXTURE_H
#define KMS_TEST_FIXTURE_H

#include "kms.h"
#include "kms_secmem.h"
#include "kms_test_hsm.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct {
    kms_test_token tok;
    char store[512];
    kms_config cfg;
    kms *k;
    int64_t now;
    kms_caller app;
    kms_caller migrator;
    kms_caller admin;
} kms_fx;

#define KMS_FX_T0 INT64_C(1700000000)

static inline int64_t kms_fx_clock(void *arg)
{
    return ((kms_fx *)arg)->now;
}

#define assert_ok(x)                                                                        \
    do {                                                                                    \
        kms_result r_ = (x);                                                                \
        if (!kms_is_ok(r_))                                                                 \
            fail_msg("%s -> %s (%s) at %s", #x, kms_error_code(r_.err), kms_error_detail(), \
                     kms_error_location());                                                 \
    } while (0)

#define assert_err(x, e)                                                                      \
    do {                                                                                      \
        kms_result r_ = (x);                                                                  \
        if (r_.err != (e))                                                                    \
            fail_msg("%s -> %s, expected %s", #x, kms_error_code(r_.err), kms_error_code(e)); \
    } while (0)

/* fault: the token sits behind the fault-injecting module (kms_fault.h). */
static inline kms_fx *kms_fx_new_ex(size_t map_initial, bool fault)
{
    kms_fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(kms_test_token_setup(&f->tok, fault), 0);
    snprintf(f->store, sizeof(f->store), "%s/store", f->tok.dir);
    f->now = KMS_FX_T0;
    f->cfg.store_path = f->store;
    f->cfg.hsm = f->tok.cfg;
    f->cfg.clock = kms_fx_clock;
    f->cfg.clock_arg = f;
    f->cfg.map_size_initial = map_initial;
    f->app = (kms_caller){.identity = "app"};
    f->migrator = (kms_caller){.identity = "migrator", .may_read_compromised = true};
    f->admin = (kms_caller){.identity = "admin"};
    assert_ok(kms_open(&f->cfg, &f->k));
    return f;
}

static inline kms_fx *kms_fx_new(size_t map_initial)
{
    return kms_fx_new_ex(map_initial, false);
}

static inline void kms_fx_reopen(kms_fx *f)
{
    kms_close(f->k);
    f->k = NULL;
    assert_ok(kms_open(&f->cfg, &f->k));
}

static inline void kms_fx_free(kms_fx *f)
{
    if (f == NULL)
        return;
    kms_close(f->k);
    kms_test_token_teardown(&f->tok);
    free(f);
}

static inline void kms_fx_key(kms_fx *f, const char *name, kms_purpose p)
{
    kms_key_spec s = {.name = name, .purpose = p};
    assert_ok(kms_key_create(f->k, &f->admin, &s, NULL));
}

#endif /* KMS_TEST_FIXTURE_H */
