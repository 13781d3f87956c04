/* The LMDB record codec: round trips, and every truncation, a trailing
 * byte, an unknown format byte and broken invariants -> STORE_CORRUPT. */
#include "kms_record.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

typedef kms_result (*decode_fn)(const uint8_t *p, size_t n, void *out);

static kms_result dec_key(const uint8_t *p, size_t n, void *o)
{
    return kms_rec_key_decode(p, n, o);
}
static kms_result dec_version(const uint8_t *p, size_t n, void *o)
{
    return kms_rec_version_decode(p, n, o);
}
static kms_result dec_master(const uint8_t *p, size_t n, void *o)
{
    return kms_rec_master_decode(p, n, o);
}
static kms_result dec_rotation(const uint8_t *p, size_t n, void *o)
{
    return kms_rec_rotation_decode(p, n, o);
}

/* Every proper prefix, the value plus one byte, and another format byte. */
static void damage(const kms_buf *b, decode_fn dec, void *scratch)
{
    for (size_t n = 0; n < b->len; n++)
        assert_int_equal(dec(b->data, n, scratch).err, KMS_ERR_STORE_CORRUPT);
    uint8_t more[2048];
    assert_true(b->len < sizeof(more));
    memcpy(more, b->data, b->len);
    more[b->len] = 0;
    assert_int_equal(dec(more, b->len + 1, scratch).err, KMS_ERR_STORE_CORRUPT);
    more[0] = 0x02;
    assert_int_equal(dec(more, b->len, scratch).err, KMS_ERR_STORE_CORRUPT);
}

static void test_key(void **state)
{
    kms_rec_key k;
    memset(&k, 0, sizeof(k));
    k.purpose = KMS_PURPOSE_MAC;
    k.primary_version = 2;
    k.latest_version = 3;
    k.min_decryption_version = 1;
    k.rotation_period_s = 86400 * 90;
    k.warning_window_s = 86400 * 7;
    k.deletion_protection = true;
    k.created_at = 1700000000;
    k.rotated_at = 1700000123;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    assert_true(kms_is_ok(kms_rec_key_encode(&k, &b)));
    kms_rec_key d;
    assert_true(kms_is_ok(kms_rec_key_decode(b.data, b.len, &d)));
    assert_memory_equal(&k, &d, sizeof(k));
    damage(&b, dec_key, &d);
    /* Invariants: primary within 1..latest, min <= primary, known purpose. */
    kms_rec_key bad = k;
    bad.primary_version = 4;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_key_encode(&bad, &b)));
    assert_int_equal(kms_rec_key_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
    bad = k;
    bad.min_decryption_version = 3;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_key_encode(&bad, &b)));
    assert_int_equal(kms_rec_key_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
    bad = k;
    bad.purpose = 7;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_key_encode(&bad, &b)));
    assert_int_equal(kms_rec_key_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
}

static void test_version(void **state)
{
    kms_rec_version v;
    memset(&v, 0, sizeof(v));
    v.state = KMS_VERSION_DEPRECATED;
    v.master_version = 4;
    v.created_at = 1;
    v.primary_at = 2;
    v.deprecated_at = 3;
    v.grace_until = 4;
    v.destroy_at = 5;
    v.last_used_at = 6;
    v.reserved = UINT64_C(1) << 40;
    v.wrapped_len = 40;
    for (int i = 0; i < 16; i++)
        v.uid[i] = (uint8_t)(0xA0 + i);
    for (int i = 0; i < 40; i++)
        v.wrapped[i] = (uint8_t)i;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    assert_true(kms_is_ok(kms_rec_version_encode(&v, &b)));
    kms_rec_version d;
    assert_true(kms_is_ok(kms_rec_version_decode(b.data, b.len, &d)));
    assert_memory_equal(&v, &d, sizeof(v));
    damage(&b, dec_version, &d);
    /* A destroyed version carries no secret, and only it may lack one. */
    kms_rec_version bad = v;
    bad.state = KMS_VERSION_DESTROYED;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_version_encode(&bad, &b)));
    assert_int_equal(kms_rec_version_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
    bad.wrapped_len = 0;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_version_encode(&bad, &b)));
    assert_true(kms_is_ok(kms_rec_version_decode(b.data, b.len, &d)));
    bad = v;
    bad.wrapped_len = 0;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_version_encode(&bad, &b)));
    assert_int_equal(kms_rec_version_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
    bad = v;
    bad.state = 0;
    kms_buf_reset(&b);
    assert_true(kms_is_ok(kms_rec_version_encode(&bad, &b)));
    assert_int_equal(kms_rec_version_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
}

static void test_master(void **state)
{
    kms_rec_master m;
    memset(&m, 0, sizeof(m));
    m.state = KMS_MASTER_RETIRED;
    m.created_at = 10;
    m.retired_at = 20;
    memset(m.id, 0x5A, sizeof(m.id));
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    assert_true(kms_is_ok(kms_rec_master_encode(&m, &b)));
    kms_rec_master d;
    assert_true(kms_is_ok(kms_rec_master_decode(b.data, b.len, &d)));
    assert_memory_equal(&m, &d, sizeof(m));
    damage(&b, dec_master, &d);
    uint8_t key[4];
    kms_rec_master_key(0x01020304, key);
    uint32_t v;
    assert_true(kms_is_ok(kms_rec_master_key_parse(key, 4, &v)));
    assert_int_equal(v, 0x01020304);
    assert_int_equal(kms_rec_master_key_parse(key, 3, &v).err, KMS_ERR_STORE_CORRUPT);
}

static void test_rotation(void **state)
{
    kms_rec_rotation r;
    memset(&r, 0, sizeof(r));
    memcpy(r.info.id, "0123456789abcdef0123456789abcdef", 33);
    strcpy(r.info.key, "orders.dek");
    r.info.from_version = 7;
    r.info.to_version = 8;
    r.info.type = KMS_ROTATION_EMERGENCY;
    r.info.status = KMS_ROTATION_ROLLED_BACK;
    strcpy(r.info.initiator, "spiffe://kmsd.dev/admin");
    r.info.started_at = 100;
    r.info.finished_at = 101;
    memset(r.info.reason, 'r', KMS_REASON_MAX_BYTES);
    r.owner_pid = 4242;
    kms_buf b KMS_DEFER(kms_buf_cleanup) = {0};
    assert_true(kms_is_ok(kms_rec_rotation_encode(&r, &b)));
    kms_rec_rotation d;
    assert_true(kms_is_ok(kms_rec_rotation_decode(b.data, b.len, &d)));
    assert_memory_equal(&r, &d, sizeof(r));
    damage(&b, dec_rotation, &d);
    /* A non-hex id is corrupt. */
    kms_buf_reset(&b);
    r.info.id[0] = 'G';
    assert_true(kms_is_ok(kms_rec_rotation_encode(&r, &b)));
    assert_int_equal(kms_rec_rotation_decode(b.data, b.len, &d).err, KMS_ERR_STORE_CORRUPT);
    /* Time ordered keys. */
    uint8_t k1[KMS_ROTATION_KEY_BYTES], k2[KMS_ROTATION_KEY_BYTES];
    r.info.started_at = 255;
    kms_rec_rotation_key(&r.info, k1);
    r.info.started_at = 256;
    kms_rec_rotation_key(&r.info, k2);
    assert_true(memcmp(k1, k2, sizeof(k1)) < 0);
}

static void test_version_keys(void **state)
{
    uint8_t k[KMS_VERSION_KEY_MAX_BYTES];
    size_t n = kms_rec_version_key("a.b", 258, k);
    assert_int_equal(n, 3 + 1 + 4);
    char name[KMS_KEY_NAME_MAX_BYTES + 1];
    uint32_t v;
    assert_true(kms_rec_version_key_split(k, n, name, &v));
    assert_string_equal(name, "a.b");
    assert_int_equal(v, 258);
    assert_false(kms_rec_version_key_split(k, n - 1, name, &v));
    /* Versions of one key sort together and in order; "a" < "a.b". */
    uint8_t k1[KMS_VERSION_KEY_MAX_BYTES], k2[KMS_VERSION_KEY_MAX_BYTES];
    size_t n1 = kms_rec_version_key("a", 2, k1), n2 = kms_rec_version_key("a", 10, k2);
    assert_true(memcmp(k1, k2, n1) < 0 && n1 == n2);
    n2 = kms_rec_version_key("a.b", 1, k2);
    assert_true(memcmp(k1, k2, n1 < n2 ? n1 : n2) < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key),          cmocka_unit_test(test_version),
        cmocka_unit_test(test_master),       cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_version_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
