/*
 * Test-side control of the fault-injecting PKCS#11 module (libkmsfault.so,
 * CMake target kmsfault, tests only, never installed).
 *
 * The module forwards every PKCS#11 call to the module named by env
 * KMS_FAULT_MODULE (default: SoftHSM) and consults a small control file that
 * it mmaps (env KMS_FAULT_CONTROL=/path; created if absent). The same file is
 * mapped here, so a test re-arms faults at run time, also for a separate
 * process (kmsd under test) that loaded the module.
 *
 * kms_test_token_setup(&t, true) creates the control file, sets
 * KMS_FAULT_CONTROL/KMS_FAULT_MODULE and attaches to it, so a test only
 * calls arm/reset.
 *
 * Counting: every PKCS#11 call made through the module since the last
 * kms_fault_reset() counts in kms_fault_calls(). An armed fault counts the
 * calls that match its function (or all, for NULL) since it was armed.
 */
#ifndef KMS_FAULT_H
#define KMS_FAULT_H

#include <stdint.h>

/* Maps the control file (created if absent). 0 ok, -1 on error. */
int kms_fault_attach(const char *control_path);
/* Unmaps the control file (kms_test_token_teardown calls it). */
void kms_fault_detach(void);
/* All counters to 0 and any fault disarmed. */
void kms_fault_reset(void);
/* PKCS#11 calls since the last reset, all functions. */
uint64_t kms_fault_calls(void);
/* The nth (1-based, counted over matching calls since arming) call of
 * `function` (e.g. "C_Encrypt"; NULL = any function) waits delay_ms, then
 * returns ckr instead of being forwarded. ckr 0 with a delay = only delay
 * (the call is then forwarded). One shot. */
void kms_fault_arm(const char *function, uint64_t nth, unsigned long ckr, unsigned delay_ms);
/* Every matching call from the nth on returns ckr, until disarmed
 * (simulates a removed device). */
void kms_fault_arm_sticky(const char *function, uint64_t nth, unsigned long ckr);
void kms_fault_disarm(void);
/* Faults injected since the last reset. */
uint64_t kms_fault_fired(void);

#endif /* KMS_FAULT_H */
