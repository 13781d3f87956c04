/* Fuzz target: the kmsd configuration file parser. */
#include "fuzz_check.h"
#include "kms_api.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static kms_daemon_config cfg;
    kms_config_defaults(&cfg);
    kms_result r = kms_config_parse((const char *)data, size, "fuzz", &cfg);
    if (kms_is_ok(r)) {
        /* Invariants of an accepted file. */
        if (cfg.listen_count == 0 || cfg.listen_count > KMS_CONFIG_LISTEN_MAX) {
            abort();
        }
        for (size_t i = 0; i < cfg.listen_count; i++) {
            if (cfg.listen[i].port == 0 ||
                memchr(cfg.listen[i].host, '\0', sizeof(cfg.listen[i].host)) == NULL) {
                abort();
            }
        }
        if (cfg.max_batch_items == 0 || cfg.max_batch_items > 1000 || cfg.workers == 0) {
            abort();
        }
        kms_result v = kms_config_validate(&cfg, "fuzz");
        if (!kms_is_ok(v) && v.err != KMS_ERR_CONFIG) {
            abort();
        }
    } else if (r.err != KMS_ERR_CONFIG) {
        abort();
    }
    return 0;
}
