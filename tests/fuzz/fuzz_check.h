/*
 * What every fuzz target shares (tests/fuzz.cmake): the libFuzzer entry
 * point's prototype and CHECK, which aborts when an invariant breaks (the
 * replay driver and libFuzzer both report an abort as a finding).
 */
#ifndef KMS_FUZZ_CHECK_H
#define KMS_FUZZ_CHECK_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional: once per process, before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define CHECK(c)     \
    do {             \
        if (!(c))    \
            abort(); \
    } while (0)

#endif
