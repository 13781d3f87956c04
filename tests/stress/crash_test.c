/*
 * kill -9 at random moments (label integration).
 *
 * kms_rotate_loop rotates keys, rotates the master every 20th iteration and
 * records wrapped DEKs; this test starts it, SIGKILLs it a random 5..150 ms
 * after it has opened the store (seeded: the seed is printed, and
 * KMS_STRESS_SEED replays the schedule), and restarts it on the same store
 * and token, CRASH_KILLS times. Then:
 *   - kms_check with repair leaves nothing it cannot fix: no master missing
 *     from the token, no unreadable version; a second check finds nothing;
 *   - no rotation record is left `started`;
 *   - every key's versions are 1..latest with none missing, the primary is
 *     active, and the token holds exactly the masters LMDB still uses;
 *   - every token recorded in the file unwraps to its recorded plaintext.
 *
 * Why the clock starts when the victim has opened the store, not at exec:
 * SoftHSM 2.6.1's file object store (Debian builds no other backend)
 * rewrites the token's token.object in place at every C_Login (ftruncate to
 * 0, then write). A SIGKILL between the two leaves an empty token.object and
 * the token is gone for good (hsm_token_not_found from then on): a property
 * of the test HSM, seen here within 200 kills timed from exec, not of kmsd.
 * Everything after the login (rotations, master rotations with token object
 * creation and destruction, wraps, the resume of an interrupted master
 * rotation done by kms_open) is inside the kill window.
 */
#define _GNU_SOURCE /* pipe2 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kms.h"
#include "kms_test_hsm.h"
#include "stress_util.h"

#ifndef KMS_ROTATE_LOOP_PATH
#error "KMS_ROTATE_LOOP_PATH must name the kms_rotate_loop executable"
#endif

/* The sanitizer build runs the victim several times slower (its start
 * alone takes a few hundred ms), so it gets fewer kills, to keep the suite
 * inside its budget. */
#ifdef KMS_SANITIZE
#define CRASH_KILLS    60
#define CRASH_MIN_MS   5
#define CRASH_MAX_MS   150
#define CRASH_BUDGET_S 150.0
#define TWO_WRITERS_S  3.0
#else
#define CRASH_KILLS    200
#define CRASH_MIN_MS   5
#define CRASH_MAX_MS   150
#define CRASH_BUDGET_S 90.0
#define TWO_WRITERS_S  5.0
#endif

static const kms_caller caller = {.identity = "stress-crash", .request_id = "crash-check"};

typedef struct {
    kms_test_token t;
    char store[400];
    char records[400];
    char log[400];
    unsigned master_every; /* 0: the victim's default */
} crash;

static void dump_log(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return;
    }
    if (fseek(f, 0, SEEK_END) == 0) {
        long end = ftell(f);
        (void)fseek(f, end > 4096 ? end - 4096 : 0, SEEK_SET);
    }
    char buf[512];
    while (fgets(buf, sizeof(buf), f) != NULL) {
        print_message("  | %s", buf);
    }
    fclose(f);
}

/* Starts the victim; *ready_fd becomes readable (one byte) once it has
 * opened the store. */
static pid_t start_loop(crash *C, unsigned long start_iter, const char *mode, int *ready_fd)
{
    char start[32];
    snprintf(start, sizeof(start), "%lu", start_iter);
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(C->log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0) {
            (void)dup2(fd, STDOUT_FILENO);
            (void)dup2(fd, STDERR_FILENO);
        }
        /* fd 3: the victim's "store open" signal (dup2 clears CLOEXEC). */
        (void)dup2(p[1], 3);
        (void)setenv("KMS_ROTATE_LOOP_READY_FD", "3", 1);
        if (C->master_every > 0) {
            char every[16];
            snprintf(every, sizeof(every), "%u", C->master_every);
            (void)setenv("KMS_ROTATE_LOOP_MASTER_EVERY", every, 1);
        }
        char *argv[] = {(char *)KMS_ROTATE_LOOP_PATH,
                        C->store,
                        (char *)C->t.cfg.module,
                        (char *)C->t.cfg.token_uri,
                        (char *)C->t.cfg.pin_file,
                        C->records,
                        start,
                        (char *)mode, /* NULL (rotate) ends the list here */
                        NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    close(p[1]);
    *ready_fd = p[0];
    return pid;
}

/* Waits (bounded) for the victim's ready byte; false if it exited or hung. */
static bool wait_ready(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    char b;
    return poll(&pfd, 1, 30000) == 1 && read(fd, &b, 1) == 1;
}

/* Replays every complete record line; returns how many were checked. */
static size_t check_records(crash *C, kms *k)
{
    FILE *f = fopen(C->records, "r");
    if (f == NULL) {
        return 0;
    }
    size_t checked = 0, torn = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] != '\n') {
            torn++; /* cut by the kill before its fsync: never acknowledged */
            continue;
        }
        line[len - 1] = '\0';
        char *save = NULL;
        char *key = strtok_r(line, " ", &save);
        char *pt_hex = strtok_r(NULL, " ", &save);
        char *ctx_hex = strtok_r(NULL, " ", &save);
        char *tok = strtok_r(NULL, " ", &save);
        assert_non_null(tok);
        uint8_t pt[64], ctx[64];
        long pt_len = stress_hex_decode(pt_hex, strlen(pt_hex), pt, sizeof(pt));
        long ctx_len = stress_hex_decode(ctx_hex, strlen(ctx_hex), ctx, sizeof(ctx));
        assert_true(pt_len > 0 && ctx_len >= 0);
        kms_buf out;
        kms_buf_init_secret(&out, 0);
        uint32_t v = 0;
        kms_result r = kms_unwrap(k, &caller, key, (const uint8_t *)tok, strlen(tok), ctx,
                                  (size_t)ctx_len, &out, &v);
        if (!kms_is_ok(r)) {
            fail_msg("record %zu (key %s): unwrap failed: %s (%s)", checked + 1, key,
                     kms_error_code(r.err), kms_error_detail());
        }
        assert_int_equal(out.len, (size_t)pt_len);
        assert_memory_equal(out.data, pt, (size_t)pt_len);
        kms_buf_free(&out);
        checked++;
    }
    free(line);
    fclose(f);
    print_message("crash: %zu recorded tokens unwrap to their plaintext (%zu torn line(s) "
                  "ignored)\n",
                  checked, torn);
    return checked;
}

/* After the victims are gone: kms_check with repair leaves nothing it
 * cannot fix and a second check finds nothing; no rotation `started`;
 * versions 1..latest with an active primary; the token holds exactly the
 * masters in use; every recorded token unwraps to its plaintext. */
static void store_check(crash *C, const char *what)
{
    kms_config cfg;
    stress_config_init(&cfg, C->store, &C->t.cfg);
    kms *k = NULL;
    kms_result r = kms_open(&cfg, &k);
    if (!kms_is_ok(r)) {
        dump_log(C->log);
        fail_msg("%s: kms_open: %s (%s)", what, kms_error_code(r.err), kms_error_detail());
    }

    kms_check_report rep;
    memset(&rep, 0, sizeof(rep));
    assert_true(kms_is_ok(kms_check(k, true, &rep)));
    print_message("%s: repair: keys %zu versions %zu masters %zu problems %zu repaired %zu "
                  "orphans %zu missing %zu unreadable %zu\n  %s\n",
                  what, rep.keys, rep.versions, rep.masters, rep.problems, rep.repaired,
                  rep.orphan_objects, rep.missing_objects, rep.unreadable_versions, rep.summary);
    assert_int_equal(rep.missing_objects, 0);
    assert_int_equal(rep.unreadable_versions, 0);
    assert_int_equal(rep.problems, rep.repaired);

    memset(&rep, 0, sizeof(rep));
    assert_true(kms_is_ok(kms_check(k, false, &rep)));
    if (rep.problems != 0) {
        fail_msg("problems left after repair: %zu (%s)", rep.problems, rep.summary);
    }

    kms_rotation_filter f = {.status = KMS_ROTATION_STARTED};
    kms_rotation_info *rots = NULL;
    size_t nrot = 0;
    assert_true(kms_is_ok(kms_rotations_list(k, &f, &rots, &nrot)));
    free(rots);
    assert_int_equal(nrot, 0);

    /* Versions 1..latest, none missing, primary active. */
    kms_key_info *keys = NULL;
    size_t nk = 0, total_versions = 0;
    assert_true(kms_is_ok(stress_key_list_all(k, &keys, &nk)));
    assert_true(nk > 0);
    for (size_t i = 0; i < nk; i++) {
        kms_version_info *v = NULL;
        size_t nv = 0;
        assert_true(kms_is_ok(kms_key_versions(k, keys[i].name, &v, &nv)));
        assert_int_equal(nv, keys[i].latest_version);
        for (size_t j = 0; j < nv; j++) {
            assert_int_equal(v[j].version, j + 1);
        }
        assert_true(keys[i].primary_version >= 1 && keys[i].primary_version <= nv);
        assert_int_equal(v[keys[i].primary_version - 1].state, KMS_VERSION_ACTIVE);
        total_versions += nv;
        free(v);
    }
    free(keys);

    /* The token holds exactly the masters still in use. */
    kms_master_info *m = NULL;
    size_t nm = 0, live = 0, current = 0;
    assert_true(kms_is_ok(kms_master_list(k, &m, &nm)));
    for (size_t i = 0; i < nm; i++) {
        live += m[i].retired_at == 0;
        current += m[i].current;
    }
    free(m);
    assert_int_equal(current, 1);
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t nids = 0;
    assert_true(kms_is_ok(kms_hsm_master_list(kms_hsm_of(k), &ids, &nids)));
    free(ids);
    assert_int_equal(nids, live);

    f = (kms_rotation_filter){.type = KMS_ROTATION_MASTER, .status = KMS_ROTATION_SUCCEEDED};
    rots = NULL;
    size_t nmaster = 0;
    assert_true(kms_is_ok(kms_rotations_list(k, &f, &rots, &nmaster)));
    free(rots);

    size_t records = check_records(C, k);
    print_message("%s: %zu keys, %zu versions, %zu master rotations completed, %zu masters "
                  "recorded, %zu tokens verified\n",
                  what, nk, total_versions, nmaster, nm, records);
    /* The victim must have got real work done between kills, or the test
     * proved nothing. */
    assert_true(records > 0);
    assert_true(total_versions > nk);
    kms_close(k);
}

static void test_crash(void **state)
{
    crash *C = *state;
    uint64_t seed;
    const char *env = getenv("KMS_STRESS_SEED");
    if (env != NULL && *env != '\0') {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (uint64_t)ts.tv_sec * 1000003u ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
    }
    print_message("crash: seed %llu (replay with KMS_STRESS_SEED=%llu), %d kills, %d..%d ms\n",
                  (unsigned long long)seed, (unsigned long long)seed, CRASH_KILLS, CRASH_MIN_MS,
                  CRASH_MAX_MS);
    uint64_t rng = seed;
    double t0 = stress_now_s();
    int kills = 0;
    for (; kills < CRASH_KILLS; kills++) {
        if (stress_now_s() - t0 > CRASH_BUDGET_S) {
            print_message("crash: time budget of %.0f s reached after %d kills\n", CRASH_BUDGET_S,
                          kills);
            break;
        }
        unsigned long start_iter = (unsigned long)(stress_rand_next(&rng) % 20);
        unsigned delay_ms =
            CRASH_MIN_MS + (unsigned)(stress_rand_next(&rng) % (CRASH_MAX_MS - CRASH_MIN_MS + 1));
        int ready_fd = -1;
        pid_t pid = start_loop(C, start_iter, NULL, &ready_fd);
        assert_true(pid > 0);
        if (!wait_ready(ready_fd)) {
            stress_dump_stacks(pid);
            (void)kill(pid, SIGKILL);
            (void)waitpid(pid, NULL, 0);
            close(ready_fd);
            dump_log(C->log);
            fail_msg("kms_rotate_loop life %d did not open the store", kills + 1);
        }
        close(ready_fd);
        struct timespec ts = {delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        (void)kill(pid, SIGKILL);
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
            dump_log(C->log);
            fail_msg("kms_rotate_loop life %d ended by itself (status 0x%x) before its kill at "
                     "%u ms",
                     kills + 1, status, delay_ms);
        }
    }
    print_message("crash: %d kills in %.1f s\n", kills, stress_now_s() - t0);
    assert_true(kills >= CRASH_KILLS / 2);
    store_check(C, "crash");
}

/* Several processes on one store and token, as kmsd's `workers =
 * processes:N` runs them, for `seconds`: modes[i] is NULL (rotate keys and
 * the master) or "data" (wrap and unwrap only). Each must keep working (a
 * refused concurrent master rotation would have to be a clean conflict,
 * never a missing object), and the store must check clean afterwards. They
 * are started one after the other (see the header on SoftHSM's C_Login) and
 * SIGKILLed at the end. */
static void run_together(crash *C, const char *what, const char *const *modes,
                         const unsigned long *starts, size_t n, double seconds)
{
    pid_t pids[4];
    int status[4] = {0};
    bool done[4] = {false};
    assert_true(n <= KMS_ARRAY_LEN(pids));
    for (size_t i = 0; i < n; i++) {
        int ready_fd = -1;
        pids[i] = start_loop(C, starts[i], modes[i], &ready_fd);
        assert_true(pids[i] > 0);
        bool ready = wait_ready(ready_fd);
        close(ready_fd);
        if (!ready) {
            for (size_t j = 0; j <= i; j++)
                stress_dump_stacks(pids[j]);
            for (size_t j = 0; j <= i; j++) {
                (void)kill(pids[j], SIGKILL);
                (void)waitpid(pids[j], NULL, 0);
            }
            dump_log(C->log);
            fail_msg("%s: process %zu did not open the store", what, i + 1);
        }
    }
    /* Run together; stop early if one gives up. */
    double t0 = stress_now_s();
    bool early = false;
    while (!early && stress_now_s() - t0 < seconds) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        for (size_t i = 0; i < n; i++) {
            if (!done[i] && waitpid(pids[i], &status[i], WNOHANG) == pids[i]) {
                done[i] = early = true;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (!done[i]) {
            (void)kill(pids[i], SIGKILL);
            assert_int_equal(waitpid(pids[i], &status[i], 0), pids[i]);
        }
    }
    /* Check the store first, so that a process giving up is reported
     * together with whether anything was lost. */
    print_message("%s: %zu processes ran together for %.1f s\n", what, n, stress_now_s() - t0);
    store_check(C, what);
    for (size_t i = 0; i < n; i++) {
        if (!(WIFSIGNALED(status[i]) && WTERMSIG(status[i]) == SIGKILL)) {
            dump_log(C->log);
            fail_msg("%s: process %zu (%s) gave up (status 0x%x): see its error above; the "
                     "store itself checked clean",
                     what, i + 1, modes[i] ? modes[i] : "rotate", status[i]);
        }
    }
}

/* The everyday case: one process rotates (the master as often as it can),
 * another serves wraps and unwraps. */
static void test_rotator_and_reader(void **state)
{
    crash *C = *state;
    const char *const modes[] = {NULL, "data"};
    const unsigned long starts[] = {0, 0};
    C->master_every = 2;
    run_together(C, "rotator and reader", modes, starts, KMS_ARRAY_LEN(modes), TWO_WRITERS_S);
}

/* Two processes rotating keys and the master at once (two admins, or two
 * workers each taking a rotation request), and a reader. */
static void test_two_rotators(void **state)
{
    crash *C = *state;
    const char *const modes[] = {NULL, NULL, "data"};
    const unsigned long starts[] = {0, 10, 0};
    run_together(C, "two rotators", modes, starts, KMS_ARRAY_LEN(modes), TWO_WRITERS_S);
}

static int setup(void **state)
{
    crash *C = calloc(1, sizeof(*C));
    if (C == NULL || kms_test_token_setup(&C->t, false) != 0) {
        free(C);
        return -1;
    }
    snprintf(C->store, sizeof(C->store), "%s/store", C->t.dir);
    snprintf(C->records, sizeof(C->records), "%s/records.txt", C->t.dir);
    snprintf(C->log, sizeof(C->log), "%s/loop.log", C->t.dir);
    if (stress_mkdir(C->store) != 0) {
        return -1;
    }
    *state = C;
    return 0;
}

static int teardown(void **state)
{
    crash *C = *state;
    kms_test_token_teardown(&C->t);
    free(C);
    return 0;
}

/* No argument: the kill -9 test (ctest kms_crash_test). "two-writers":
 * the multi-process tests (ctest kms_multiproc_test), registered apart so
 * that each has its own verdict. */
int main(int argc, char **argv)
{
    const struct CMUnitTest crash_tests[] = {
        cmocka_unit_test_setup_teardown(test_crash, setup, teardown),
    };
    const struct CMUnitTest multi_tests[] = {
        cmocka_unit_test_setup_teardown(test_rotator_and_reader, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_rotators, setup, teardown),
    };
    if (argc > 1 && strcmp(argv[1], "two-writers") == 0) {
        return cmocka_run_group_tests(multi_tests, NULL, NULL);
    }
    return cmocka_run_group_tests(crash_tests, NULL, NULL);
}
