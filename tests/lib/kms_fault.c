/* Test-side control of the fault-injecting PKCS#11 module (kms_fault.h). */
#define _GNU_SOURCE
#include "kms_fault.h"

#include "p11fault/kms_fault_ctl.h"

#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static kms_fault_ctl *fault_ctl;

int kms_fault_attach(const char *control_path)
{
    kms_fault_detach();
    int fd = open(control_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 ||
        (st.st_size < (off_t)sizeof(kms_fault_ctl) && ftruncate(fd, sizeof(kms_fault_ctl)) != 0)) {
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, sizeof(kms_fault_ctl), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return -1;
    fault_ctl = p;
    if (fault_ctl->magic != KMS_FAULT_CTL_MAGIC) {
        fault_ctl->version = KMS_FAULT_CTL_VERSION;
        fault_ctl->magic = KMS_FAULT_CTL_MAGIC;
    }
    return 0;
}

void kms_fault_detach(void)
{
    if (fault_ctl != NULL)
        munmap(fault_ctl, sizeof(kms_fault_ctl));
    fault_ctl = NULL;
}

void kms_fault_disarm(void)
{
    if (fault_ctl == NULL)
        return;
    atomic_store_explicit(&fault_ctl->armed, 0, memory_order_release);
}

void kms_fault_reset(void)
{
    if (fault_ctl == NULL)
        return;
    kms_fault_disarm();
    atomic_store(&fault_ctl->calls, 0);
    atomic_store(&fault_ctl->matched, 0);
    atomic_store(&fault_ctl->fired, 0);
}

uint64_t kms_fault_calls(void)
{
    return fault_ctl == NULL ? 0 : atomic_load(&fault_ctl->calls);
}

uint64_t kms_fault_fired(void)
{
    return fault_ctl == NULL ? 0 : atomic_load(&fault_ctl->fired);
}

static void fault_arm(const char *function, uint64_t nth, unsigned long ckr, unsigned delay_ms,
                      bool sticky)
{
    if (fault_ctl == NULL)
        return;
    kms_fault_disarm();
    memset(fault_ctl->function, 0, sizeof(fault_ctl->function));
    if (function != NULL)
        strncpy(fault_ctl->function, function, sizeof(fault_ctl->function) - 1);
    atomic_store(&fault_ctl->nth, nth == 0 ? 1 : nth);
    atomic_store(&fault_ctl->ckr, ckr);
    atomic_store(&fault_ctl->delay_ms, delay_ms);
    atomic_store(&fault_ctl->sticky, sticky ? 1u : 0u);
    atomic_store(&fault_ctl->matched, 0);
    atomic_store_explicit(&fault_ctl->armed, 1, memory_order_release);
}

void kms_fault_arm(const char *function, uint64_t nth, unsigned long ckr, unsigned delay_ms)
{
    fault_arm(function, nth, ckr, delay_ms, false);
}

void kms_fault_arm_sticky(const char *function, uint64_t nth, unsigned long ckr)
{
    fault_arm(function, nth, ckr, 0, true);
}
