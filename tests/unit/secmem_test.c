/* Secure memory, process hardening and secret input (files and env). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kms_secmem.h"

#define ERR(x) ((x).err)

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] != 0) {
            return false;
        }
    }
    return true;
}

static void test_alloc_sizes(void **state)
{
    (void)state;
    kms_secmem_stats before, after;
    kms_secmem_stats_get(&before);
    for (size_t n = 0; n < 10000; n = n < 64 ? n + 1 : n * 3 / 2 + 7) {
        uint8_t *p = kms_secmem_alloc(n);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 16, 0);
        assert_true(all_zero(p, n));
        memset(p, 0xA5, n);
        kms_secmem_free(p, n);
    }
    kms_secmem_free(NULL, 0);
    kms_secmem_stats_get(&after);
    assert_int_equal(after.blocks_in_use, before.blocks_in_use);
    assert_int_equal(after.bytes_in_use, before.bytes_in_use);
    /* Every mapping is accounted for as locked or as a counted failure. */
    assert_true(after.bytes_mapped > 0);
    assert_true(after.bytes_locked <= after.bytes_mapped);
}

/* 100,000 live 32-byte secrets must fit in a few MiB, not 100,000 pages. */
static void test_many_small_secrets(void **state)
{
    (void)state;
    enum { COUNT = 100000, SIZE = 32 };
    kms_secmem_stats before, during;
    kms_secmem_stats_get(&before);
    uint8_t **v = calloc(COUNT, sizeof(*v));
    assert_non_null(v);
    for (size_t i = 0; i < COUNT; i++) {
        v[i] = kms_secmem_alloc(SIZE);
        assert_non_null(v[i]);
        memset(v[i], (int)(i & 0xff), SIZE);
    }
    kms_secmem_stats_get(&during);
    const size_t grew = during.bytes_mapped - before.bytes_mapped;
    print_message("100000 x 32-byte secrets: %zu KiB mapped, %zu KiB locked, %zu lock failures\n",
                  grew / 1024, during.bytes_locked / 1024, during.lock_failures);
    assert_true(grew <= (size_t)8 * 1024 * 1024);
    for (size_t i = 0; i < COUNT; i++) {
        assert_int_equal(v[i][0], (uint8_t)(i & 0xff));
        assert_int_equal(v[i][SIZE - 1], (uint8_t)(i & 0xff));
        kms_secmem_free(v[i], SIZE);
    }
    free(v);
    /* Freed blocks are reused: a second round maps nothing new. */
    kms_secmem_stats mid, again;
    kms_secmem_stats_get(&mid);
    uint8_t *p = kms_secmem_alloc(SIZE);
    assert_non_null(p);
    kms_secmem_stats_get(&again);
    assert_int_equal(again.bytes_mapped, mid.bytes_mapped);
    kms_secmem_free(p, SIZE);
}

#define THREADS      4
#define THREAD_ITERS 20000

static void *thread_churn(void *arg)
{
    const uint8_t tag = (uint8_t)(uintptr_t)arg;
    uint8_t *live[16] = {0};
    size_t sizes[16] = {0};
    for (unsigned i = 0; i < THREAD_ITERS; i++) {
        const unsigned k = i % 16;
        if (live[k] != NULL) {
            for (size_t j = 0; j < sizes[k]; j++) {
                if (live[k][j] != tag) {
                    return (void *)1;
                }
            }
            kms_secmem_free(live[k], sizes[k]);
        }
        sizes[k] = (i * 37u) % 6000;
        live[k] = kms_secmem_alloc(sizes[k]);
        if (live[k] == NULL) {
            return (void *)1;
        }
        memset(live[k], tag, sizes[k]);
    }
    for (unsigned k = 0; k < 16; k++) {
        kms_secmem_free(live[k], sizes[k]);
    }
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    pthread_t t[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++) {
        assert_int_equal(pthread_create(&t[i], NULL, thread_churn, (void *)(i + 1)), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        void *r;
        assert_int_equal(pthread_join(t[i], &r), 0);
        assert_null(r);
    }
}

/* With RLIMIT_MEMLOCK at 0 (an unprivileged user's worst case), secure
 * memory still works: the mlock failure is counted, not fatal, and the
 * counters stay consistent through free. (root ignores the limit.) */
static void child_no_memlock(void)
{
    const struct rlimit none = {0, 0};
    if (setrlimit(RLIMIT_MEMLOCK, &none) != 0) {
        _exit(2);
    }
    kms_secmem_stats before, mid, after;
    kms_secmem_stats_get(&before);
    const size_t n = 100000;
    uint8_t *p = kms_secmem_alloc(n);
    uint8_t *q = kms_secmem_alloc(3000);
    if (p == NULL || q == NULL) {
        _exit(3);
    }
    memset(p, 0x11, n);
    memset(q, 0x22, 3000);
    kms_secmem_stats_get(&mid);
    const size_t failed = mid.lock_failures - before.lock_failures;
#ifndef KMS_SANITIZE
    /* (ASan replaces mlock with a no-op that reports success.) */
    if (geteuid() != 0 && failed == 0) {
        _exit(4);
    }
#endif
    const size_t large_bytes = (n + 16 + 4095) / 4096 * 4096;
    kms_secmem_free(p, n);
    kms_secmem_free(q, 3000);
    kms_secmem_stats_get(&after);
    if (after.bytes_mapped != mid.bytes_mapped - large_bytes ||
        after.bytes_locked > after.bytes_mapped || after.blocks_in_use != before.blocks_in_use) {
        _exit(5);
    }
    if (failed == 0 && after.bytes_locked != mid.bytes_locked - large_bytes) {
        _exit(6);
    }
    if (failed == 2 && after.bytes_locked != mid.bytes_locked) {
        _exit(7);
    }
    _exit(0);
}

static void test_without_memlock(void **state)
{
    (void)state;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        child_no_memlock();
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* Freeing with the wrong size or twice is a memory-safety bug: abort. */
static void expect_abort(void (*fn)(void))
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, STDERR_FILENO);
        }
        fn();
        _exit(0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
}

static void free_wrong_size(void)
{
    void *p = kms_secmem_alloc(40);
    kms_secmem_free(p, 41);
}

static void free_twice(void)
{
    void *p = kms_secmem_alloc(40);
    kms_secmem_free(p, 40);
    kms_secmem_free(p, 40);
}

static void test_misuse_aborts(void **state)
{
    (void)state;
    expect_abort(free_wrong_size);
    expect_abort(free_twice);
}

#ifndef KMS_SANITIZE
/* A freed small block stays mapped in the arena, so its payload can be
 * inspected after free: it must be wiped. (Under ASan the freed block is
 * poisoned and this read would be reported, as it should be.) */
static void test_free_wipes(void **state)
{
    (void)state;
    volatile uint8_t *p = kms_secmem_alloc(48);
    assert_non_null(p);
    for (size_t i = 0; i < 48; i++) {
        p[i] = 0xA5;
    }
    kms_secmem_free((void *)p, 48);
    for (size_t i = 0; i < 48; i++) {
        assert_int_equal(p[i], 0);
    }
}
#else
static void overflow_by_one(void)
{
    volatile uint8_t *p = kms_secmem_alloc(40);
    p[40] = 1;
}

static void use_after_free(void)
{
    volatile uint8_t *p = kms_secmem_alloc(40);
    kms_secmem_free((void *)p, 40);
    p[0] = 1;
}

static void expect_asan_report(void (*fn)(void))
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, STDERR_FILENO);
        }
        fn();
        _exit(0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_false(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* The arena poisons slack and free blocks, so ASan sees secret memory
 * errors like heap ones. */
static void test_free_wipes(void **state)
{
    (void)state;
    expect_asan_report(overflow_by_one);
    expect_asan_report(use_after_free);
}
#endif

static void test_wipe_and_ct_equal(void **state)
{
    (void)state;
    uint8_t buf[64];
    memset(buf, 0x5A, sizeof(buf));
    kms_secmem_wipe(buf, sizeof(buf));
    assert_true(all_zero(buf, sizeof(buf)));
    kms_secmem_wipe(NULL, 10);

    const uint8_t a[4] = {1, 2, 3, 4}, b[4] = {1, 2, 3, 5};
    assert_true(kms_ct_equal(a, a, 4));
    assert_false(kms_ct_equal(a, b, 4));
    assert_true(kms_ct_equal(a, b, 3));
    assert_true(kms_ct_equal(a, b, 0));
}

static void child_harden(void)
{
    kms_result r = kms_process_harden();
    struct rlimit rl;
    if (!kms_is_ok(r) || getrlimit(RLIMIT_CORE, &rl) != 0 || rl.rlim_cur != 0 || rl.rlim_max != 0 ||
        prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0) {
        _exit(1);
    }
    _exit(0);
}

static void test_process_harden(void **state)
{
    (void)state;
    /* In a child: the test process itself stays dumpable for debuggers. */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        child_harden();
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* ---- secret files ---- */

typedef struct {
    char dir[64];
    char path[128];
} fixture;

static int setup_dir(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        return -1;
    }
    strcpy(f->dir, "/tmp/kms-secmem-test-XXXXXX");
    if (mkdtemp(f->dir) == NULL) {
        free(f);
        return -1;
    }
    snprintf(f->path, sizeof(f->path), "%s/pin", f->dir);
    *state = f;
    return 0;
}

static int teardown_dir(void **state)
{
    fixture *f = *state;
    char p[160];
    static const char *names[] = {"pin", "link", "sub"};
    for (size_t i = 0; i < KMS_ARRAY_LEN(names); i++) {
        snprintf(p, sizeof(p), "%s/%s", f->dir, names[i]);
        unlink(p);
        rmdir(p);
    }
    rmdir(f->dir);
    free(f);
    return 0;
}

static void write_file(const char *path, const void *data, size_t n, mode_t mode)
{
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, n), (ssize_t)n);
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
}

static void test_file_modes(void **state)
{
    fixture *f = *state;
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    write_file(f->path, "s3cret-PIN\n", 11, 0644);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), f->path));
    assert_non_null(strstr(kms_error_detail(), "0644"));
    assert_null(strstr(kms_error_detail(), "s3cret"));
    assert_int_equal(out.len, 0);

    static const mode_t refused[] = {0640, 0604, 0620, 0602, 0610, 0601, 0660, 0666};
    for (size_t i = 0; i < KMS_ARRAY_LEN(refused); i++) {
        assert_int_equal(chmod(f->path, refused[i]), 0);
        assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);
    }
    static const mode_t accepted[] = {0600, 0400, 0700};
    for (size_t i = 0; i < KMS_ARRAY_LEN(accepted); i++) {
        assert_int_equal(chmod(f->path, accepted[i]), 0);
        assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_OK);
        assert_true(out.secret);
        assert_int_equal(out.len, 10);
        assert_memory_equal(out.data, "s3cret-PIN", 10);
    }
}

static void test_file_newlines(void **state)
{
    fixture *f = *state;
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    static const struct {
        const char *content, *want;
    } v[] = {
        {"1234", "1234"},   {"1234\n", "1234"},     {"1234\r\n", "1234"},
        {"12\n\n", "12\n"}, {"a b\tc\n", "a b\tc"}, {"12\r", "12\r"},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(v); i++) {
        write_file(f->path, v[i].content, strlen(v[i].content), 0600);
        assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_OK);
        assert_int_equal(out.len, strlen(v[i].want));
        assert_memory_equal(out.data, v[i].want, out.len);
    }
}

static void test_file_refusals(void **state)
{
    fixture *f = *state;
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    char link[160], sub[160];
    snprintf(link, sizeof(link), "%s/link", f->dir);
    snprintf(sub, sizeof(sub), "%s/sub", f->dir);

    /* empty, or only a newline */
    write_file(f->path, "", 0, 0600);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);
    write_file(f->path, "\n", 1, 0600);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);
    write_file(f->path, "\r\n", 2, 0600);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);

    /* a symlink to a good file */
    write_file(f->path, "1234", 4, 0600);
    assert_int_equal(symlink(f->path, link), 0);
    assert_int_equal(ERR(kms_secret_read_file(link, &out)), KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), "symbolic link"));

    /* not a regular file; missing file */
    assert_int_equal(mkdir(sub, 0700), 0);
    assert_int_equal(ERR(kms_secret_read_file(sub, &out)), KMS_ERR_CONFIG);
    assert_int_equal(ERR(kms_secret_read_file("/nonexistent/kms/pin", &out)), KMS_ERR_CONFIG);

    /* 1024 bytes are fine, 1025 are not (1025 with a final newline is 1024) */
    char big[1026];
    memset(big, 'x', sizeof(big));
    write_file(f->path, big, 1024, 0600);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_OK);
    assert_int_equal(out.len, 1024);
    write_file(f->path, big, 1025, 0600);
    assert_int_equal(ERR(kms_secret_read_file(f->path, &out)), KMS_ERR_CONFIG);
    assert_int_equal(out.len, 0);
}

static void test_env(void **state)
{
    (void)state;
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    assert_int_equal(setenv("KMS_TEST_PIN", "0000-1111\n", 1), 0);
    const char *raw = getenv("KMS_TEST_PIN");
    assert_non_null(raw);
    assert_int_equal(ERR(kms_secret_read_env("KMS_TEST_PIN", &out)), KMS_OK);
    assert_true(out.secret);
    assert_int_equal(out.len, 9);
    assert_memory_equal(out.data, "0000-1111", 9);
    assert_null(getenv("KMS_TEST_PIN"));
    /* glibc keeps a setenv'd string allocated after unsetenv; it was wiped
     * in place first. */
    assert_int_equal(raw[0], 0);

    assert_int_equal(ERR(kms_secret_read_env("KMS_TEST_PIN", &out)), KMS_ERR_CONFIG);
    assert_non_null(strstr(kms_error_detail(), "KMS_TEST_PIN"));

    assert_int_equal(setenv("KMS_TEST_PIN", "", 1), 0);
    assert_int_equal(ERR(kms_secret_read_env("KMS_TEST_PIN", &out)), KMS_ERR_CONFIG);
    assert_null(getenv("KMS_TEST_PIN"));

    char big[1100];
    memset(big, 'p', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(setenv("KMS_TEST_PIN", big, 1), 0);
    assert_int_equal(ERR(kms_secret_read_env("KMS_TEST_PIN", &out)), KMS_ERR_CONFIG);
    assert_null(getenv("KMS_TEST_PIN"));
    assert_int_equal(out.len, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_sizes),
        cmocka_unit_test(test_many_small_secrets),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_without_memlock),
        cmocka_unit_test(test_misuse_aborts),
        cmocka_unit_test(test_free_wipes),
        cmocka_unit_test(test_wipe_and_ct_equal),
        cmocka_unit_test(test_process_harden),
        cmocka_unit_test_setup_teardown(test_file_modes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_file_newlines, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_file_refusals, setup_dir, teardown_dir),
        cmocka_unit_test(test_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
