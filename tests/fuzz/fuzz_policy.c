/* Fuzz target: the authorization policy parser and matcher. */
#include "fuzz_check.h"
#include "kms_api.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kms_policy *p = NULL;
    kms_result r = kms_policy_parse((const char *)data, size, "fuzz", &p);
    if (!kms_is_ok(r)) {
        if (r.err != KMS_ERR_CONFIG && r.err != KMS_ERR_NO_MEMORY) {
            abort();
        }
        if (p != NULL) {
            abort();
        }
        return 0;
    }
    /* Matching must terminate and never grant a role outside the four. */
    static const char *ids[] = {"spiffe://kmsd.dev/app", "admin", "", "*"};
    static const char *keys[] = {"app-1", "x", "*"};
    for (size_t i = 0; i < 4; i++) {
        for (size_t k = 0; k < 3; k++) {
            unsigned roles = kms_policy_roles(p, ids[i], keys[k]);
            if ((roles & ~0xfu) != 0) {
                abort();
            }
        }
        (void)kms_policy_roles(p, ids[i], NULL);
    }
    kms_policy_free(p);
    return 0;
}
