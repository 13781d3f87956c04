/*
 * Layout of the fault module's control file, shared by the module
 * (p11fault.c) and the test-side API (tests/lib/kms_fault.c). Both map the
 * same file MAP_SHARED, possibly from different processes, so every field
 * that changes at run time is a lock-free atomic (address-free on Linux).
 *
 * Arming protocol: the controller stores armed = 0, writes the fault fields,
 * zeroes `matched`, then stores armed = 1 (release); the module loads armed
 * (acquire) before reading the fields.
 */
#ifndef KMS_FAULT_CTL_H
#define KMS_FAULT_CTL_H

#include <stdatomic.h>
#include <stdint.h>

#define KMS_FAULT_CTL_MAGIC          0x6b6d7366u /* "kmsf" */
#define KMS_FAULT_CTL_VERSION        1u
#define KMS_FAULT_FUNCTION_MAX_BYTES 48

typedef struct {
    uint32_t magic;
    uint32_t version;
    _Atomic uint64_t calls;   /* every call since reset */
    _Atomic uint64_t matched; /* calls matching the armed function since arming */
    _Atomic uint64_t fired;   /* faults injected since reset */
    _Atomic uint32_t armed;
    _Atomic uint32_t sticky; /* fail every matching call from nth on */
    _Atomic uint32_t delay_ms;
    _Atomic uint64_t nth;
    _Atomic uint64_t ckr;
    char function[KMS_FAULT_FUNCTION_MAX_BYTES]; /* "" = any function */
} kms_fault_ctl;

#endif /* KMS_FAULT_CTL_H */
