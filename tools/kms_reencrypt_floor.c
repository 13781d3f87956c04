/*
 * kms-reencrypt-floor: the HSM's limit for scripts/bench-reencrypt. One
 * re-encryption of a row costs one AES-256-GCM decrypt and one encrypt in
 * the HSM, so the raw PKCS#11 loop (kms_hsm_bench_raw: C_DecryptInit +
 * C_Decrypt, C_EncryptInit + C_Encrypt on a session key, no kmsd around it)
 * gives the fastest rewrap rate this process could reach:
 *     rows/s = 1 / (1/decrypt_ops_s + 1/encrypt_ops_s).
 * Prints "decrypt_ops_s encrypt_ops_s rewrap_rows_s" on one line. The bench
 * runs one instance per kmsd serving process, side by side, and adds them.
 *
 * Usage: kms-reencrypt-floor MODULE TOKEN_URI PIN_FILE SECONDS SIZE
 * (the PIN is read from the 0600 file, never from argv).
 */
#include "kms_hsm.h"
#include "kms_result.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: kms-reencrypt-floor MODULE TOKEN_URI PIN_FILE SECONDS SIZE\n");
        return 64;
    }
    double seconds = strtod(argv[4], NULL);
    long size = strtol(argv[5], NULL, 10);
    if (seconds <= 0 || seconds > 600 || size < 1 || size > 65536) {
        fprintf(stderr, "kms-reencrypt-floor: SECONDS 0..600, SIZE 1..65536\n");
        return 64;
    }
    kms_hsm_config cfg = {
        .module = argv[1], .token_uri = argv[2], .pin_file = argv[3], .pool_size = 2};
    kms_hsm *hsm = NULL;
    kms_result r = kms_hsm_open(&cfg, &hsm);
    double dec = 0, enc = 0;
    if (kms_is_ok(r)) {
        r = kms_hsm_bench_raw(hsm, KMS_HSM_RAW_DECRYPT, (size_t)size, 1, seconds / 2, &dec);
    }
    if (kms_is_ok(r)) {
        r = kms_hsm_bench_raw(hsm, KMS_HSM_RAW_ENCRYPT, (size_t)size, 1, seconds / 2, &enc);
    }
    kms_hsm_close(hsm);
    if (!kms_is_ok(r) || dec <= 0 || enc <= 0) {
        fprintf(stderr, "kms-reencrypt-floor: %s: %s\n", kms_error_code(r.err), kms_error_detail());
        return kms_is_ok(r) ? 70 : kms_error_exit_code(r.err);
    }
    printf("%.0f %.0f %.0f\n", dec, enc, 1.0 / (1.0 / dec + 1.0 / enc));
    return 0;
}
