/* Randomness: output shape, and that two draws differ (a stuck generator
 * would repeat; 2^-128 false-failure odds). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kms_rand.h"

#define ERR(x) ((x).err)

static void test_rand_bytes(void **state)
{
    (void)state;
    uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
    assert_int_equal(ERR(kms_rand_bytes(a, sizeof(a))), KMS_OK);
    assert_int_equal(ERR(kms_rand_bytes(b, sizeof(b))), KMS_OK);
    assert_memory_not_equal(a, b, sizeof(a));
    assert_memory_not_equal(a, zero, sizeof(a));
    assert_int_equal(ERR(kms_rand_bytes(NULL, 0)), KMS_OK);
}

static void test_rand_id_hex(void **state)
{
    (void)state;
    char a[KMS_RAND_ID_HEX_BYTES], b[KMS_RAND_ID_HEX_BYTES];
    assert_int_equal(ERR(kms_rand_id_hex(a)), KMS_OK);
    assert_int_equal(ERR(kms_rand_id_hex(b)), KMS_OK);
    assert_int_equal(strlen(a), 32);
    for (size_t i = 0; i < 32; i++) {
        assert_true((a[i] >= '0' && a[i] <= '9') || (a[i] >= 'a' && a[i] <= 'f'));
    }
    assert_string_not_equal(a, b);
}

/* Nonces come from a per-thread buffer: none may repeat within a thread
 * across buffer refills, and sizes outside 1..KMS_NONCE_MAX_BYTES fail. */
static void test_nonce_unique(void **state)
{
    (void)state;
    enum { N = 2000 }; /* several 4 KiB refills of 12-byte nonces */
    static uint8_t seen[N][12];
    for (int i = 0; i < N; i++) {
        assert_true(kms_is_ok(kms_rand_nonce(seen[i], 12)));
        for (int j = 0; j < i; j++)
            assert_memory_not_equal(seen[i], seen[j], 12);
    }
    uint8_t big[KMS_NONCE_MAX_BYTES + 1];
    assert_int_equal(kms_rand_nonce(big, 0).err, KMS_ERR_INVALID_ARGUMENT);
    assert_int_equal(kms_rand_nonce(big, sizeof(big)).err, KMS_ERR_INVALID_ARGUMENT);
}

/* After fork, parent and child must not hand out the bytes the parent had
 * buffered but not used: that would be GCM nonce reuse across kmsd's
 * worker processes. */
static void test_nonce_fork(void **state)
{
    (void)state;
    uint8_t first[12], parent_next[12], child_next[12];
    assert_true(kms_is_ok(kms_rand_nonce(first, sizeof(first)))); /* buffer filled */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uint8_t n[12] = {0};
        int ok = kms_is_ok(kms_rand_nonce(n, sizeof(n)));
        ssize_t w = write(fds[1], n, sizeof(n));
        _exit(ok && w == (ssize_t)sizeof(n) ? 0 : 1);
    }
    close(fds[1]);
    assert_int_equal(read(fds[0], child_next, sizeof(child_next)), (ssize_t)sizeof(child_next));
    close(fds[0]);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_true(kms_is_ok(kms_rand_nonce(parent_next, sizeof(parent_next))));
    assert_memory_not_equal(parent_next, child_next, sizeof(child_next));
    assert_memory_not_equal(first, child_next, sizeof(child_next));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rand_bytes),
        cmocka_unit_test(test_rand_id_hex),
        cmocka_unit_test(test_nonce_unique),
        cmocka_unit_test(test_nonce_fork),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
