/*
 * Fuzz target: the decoders of the records kmsd keeps in LMDB
 * (kms/kms_record.c). The store is a file on disk that a crash, a bad
 * restore or a careless operator may have damaged; a record that does not
 * decode must give store_corrupt and nothing else.
 *
 * The first byte picks the decoder, the rest is the value (or the database
 * key, for the two key parsers). Invariants:
 *  - a decoder either fails with KMS_ERR_STORE_CORRUPT or succeeds;
 *  - what decodes is canonical: encoding the decoded record gives back the
 *    input byte for byte (so no two stored values mean the same record, and
 *    nothing the decoder accepts is lost by the next write);
 *  - a versions key that splits is made again from its name and version.
 */
#include "fuzz_check.h"
#include "kms_record.h"

#include <string.h>

/* Decodes p[0..n) as a T; what decodes must encode back to the same bytes,
 * what does not must be store_corrupt. */
#define ROUND_TRIP(T, decode, encode)                                   \
    do {                                                                \
        T rec_;                                                         \
        kms_result r_ = decode(p, n, &rec_);                            \
        if (kms_is_ok(r_)) {                                            \
            CHECK(kms_is_ok(encode(&rec_, &b)));                        \
            CHECK(b.len == n && (n == 0 || memcmp(b.data, p, n) == 0)); \
        } else {                                                        \
            CHECK(r_.err == KMS_ERR_STORE_CORRUPT);                     \
        }                                                               \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    const uint8_t *p = data + 1;
    const size_t n = size - 1;
    kms_buf b;
    kms_buf_init(&b, 0);
    switch (data[0] % 6) {
    case 0:
        ROUND_TRIP(kms_rec_key, kms_rec_key_decode, kms_rec_key_encode);
        break;
    case 1:
        ROUND_TRIP(kms_rec_version, kms_rec_version_decode, kms_rec_version_encode);
        break;
    case 2:
        ROUND_TRIP(kms_rec_master, kms_rec_master_decode, kms_rec_master_encode);
        break;
    case 3:
        ROUND_TRIP(kms_rec_rotation, kms_rec_rotation_decode, kms_rec_rotation_encode);
        break;
    case 4: {
        char name[KMS_KEY_NAME_MAX_BYTES + 1];
        uint32_t version;
        if (kms_rec_version_key_split(p, n, name, &version)) {
            uint8_t again[KMS_VERSION_KEY_MAX_BYTES];
            size_t len = kms_rec_version_key(name, version, again);
            CHECK(len == n && memcmp(again, p, n) == 0);
        }
        break;
    }
    default: {
        uint32_t version;
        kms_result r = kms_rec_master_key_parse(p, n, &version);
        if (kms_is_ok(r)) {
            uint8_t again[4];
            kms_rec_master_key(version, again);
            CHECK(n == 4 && memcmp(again, p, 4) == 0);
        } else {
            CHECK(r.err == KMS_ERR_STORE_CORRUPT);
        }
        break;
    }
    }
    kms_buf_free(&b);
    return 0;
}
