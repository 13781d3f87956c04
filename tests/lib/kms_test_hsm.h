/*
 * Throwaway SoftHSM tokens for tests (target kms_testlib).
 *
 *   kms_test_token t;
 *   assert_int_equal(kms_test_token_setup(&t, false), 0);
 *   kms_hsm *hsm;
 *   assert_true(kms_is_ok(kms_hsm_open(&t.cfg, &hsm)));
 *   ...
 *   kms_hsm_close(hsm);
 *   kms_test_token_teardown(&t);
 *
 * setup makes a mkdtemp directory holding softhsm2.conf, tokens/, the user
 * and SO PIN files (random PINs, mode 0600, never on a command line) and the
 * fault control file; sets SOFTHSM2_CONF for this process (and the children
 * it starts) and initialises a fresh token with a random label through
 * kms_hsm_token_init. With fault = true, cfg.module is the fault-injecting
 * module (libkmsfault.so) in front of SoftHSM, KMS_FAULT_CONTROL and
 * KMS_FAULT_MODULE are exported, and kms_fault_attach() has been called, so
 * kms_fault.h is ready to use.
 *
 * Paths come from the environment ctest sets (kms_add_test): SoftHSM from
 * KMS_SOFTHSM_MODULE, the fault module from KMS_FAULT_MODULE_PATH (compile
 * definition of kms_testlib; env overrides), falling back to Debian's path.
 *
 * The environment is process-wide: one token set up at a time per process.
 */
#ifndef KMS_TEST_HSM_H
#define KMS_TEST_HSM_H

#include "kms_hsm.h"

#include <stdbool.h>

typedef struct {
    char dir[256]; /* mkdtemp dir: softhsm2.conf, tokens/, pin file (0600), fault control file */
    char conf_path[320];
    char pin_path[320];
    char so_pin_path[320];
    char fault_control[320];
    char module_path[512]; /* SoftHSM, or libkmsfault.so when fault */
    char token_label[33];
    char token_uri[96];
    kms_hsm_config cfg; /* ready for kms_hsm_open / kms_config.hsm (points into this struct) */
} kms_test_token;

/* Fresh token; sets SOFTHSM2_CONF (and the fault env vars); 0 ok. */
int kms_test_token_setup(kms_test_token *t, bool fault);
/* Removes the whole dir, detaches the fault control file and unsets the
 * environment variables setup exported. Close every kms_hsm first. */
void kms_test_token_teardown(kms_test_token *t);

/* SoftHSM's module path (env KMS_SOFTHSM_MODULE or Debian's default). */
const char *kms_test_softhsm_module(void);
/* The fault module's path (env KMS_FAULT_MODULE_PATH or the build's). */
const char *kms_test_fault_module(void);

#endif /* KMS_TEST_HSM_H */
