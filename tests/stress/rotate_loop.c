/*
 * kms_rotate_loop: the victim of kms_crash_test. Opens the store and, until
 * it is killed, rotates a few keys, runs a master rotation every 20th
 * iteration, and wraps a fresh DEK whose record (key, plaintext, context,
 * token) it appends to a file and fsyncs only after kms_wrap returned: every
 * record in that file is a promise the store must keep after any crash.
 *
 *   kms_rotate_loop STORE MODULE TOKEN_URI PIN_FILE RECORD_FILE START [data]
 *
 * With "data" it only wraps and unwraps (each wrap checked by its unwrap),
 * like a worker process serving applications while another one rotates.
 *
 * The PIN is read from PIN_FILE (a path, never the PIN itself). START is
 * the iteration number to begin at, so short lives still reach the master
 * rotation. Once the store is open it writes one byte to the descriptor
 * named by env KMS_ROTATE_LOOP_READY_FD, if set (the test's kill clock
 * starts then). Exits non-zero (with the error on stderr) on
 * any failure; the test treats any exit other than its own SIGKILL as a failure.
 */
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms.h"
#include "kms_rand.h"
#include "stress_util.h"

#define LOOP_KEYS 4

static const kms_caller caller = {.identity = "stress-crash", .request_id = "crash"};

static int die(const char *what, kms_result r)
{
    fprintf(stderr, "kms_rotate_loop[%d]: %s: %s (%s at %s)\n", (int)getpid(), what,
            kms_error_code(r.err), kms_error_detail(), kms_error_location());
    return 3;
}

static int append_record(int fd, const char *key, const uint8_t *pt, size_t pt_len,
                         const uint8_t *ctx, size_t ctx_len, const kms_buf *token)
{
    kms_buf text;
    kms_buf_init(&text, 0);
    if (!kms_is_ok(kms_token_to_text(token->data, token->len, &text))) {
        kms_buf_free(&text);
        return -1;
    }
    char pt_hex[2 * 64 + 1], ctx_hex[2 * 64 + 1];
    stress_hex_encode(pt, pt_len, pt_hex);
    stress_hex_encode(ctx, ctx_len, ctx_hex);
    size_t cap = strlen(key) + sizeof(pt_hex) + sizeof(ctx_hex) + text.len + 8;
    char *line = malloc(cap);
    if (line == NULL) {
        kms_buf_free(&text);
        return -1;
    }
    int n = snprintf(line, cap, "%s %s %s %.*s\n", key, pt_hex, ctx_hex, (int)text.len,
                     (const char *)text.data);
    kms_buf_free(&text);
    /* One write of the whole line (O_APPEND), then fsync: a line without
     * its newline is a write the kill interrupted, never acknowledged. */
    ssize_t w = write(fd, line, (size_t)n);
    free(line);
    if (w != n || fsync(fd) != 0) {
        return -1;
    }
    return 0;
}

/* One wrap under key's primary and its unwrap; a wrong plaintext is
 * reported as KMS_ERR_INTERNAL. */
static kms_result data_round(kms *k, const char *key)
{
    uint8_t pt[32];
    KMS_GUARD(kms_rand_bytes(pt, sizeof(pt)));
    kms_buf token KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf out KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&token, 0);
    kms_buf_init_secret(&out, 0);
    uint32_t v = 0, v2 = 0;
    KMS_GUARD(kms_wrap(k, &caller, key, pt, sizeof(pt), NULL, 0, &token, &v));
    KMS_GUARD(kms_unwrap(k, &caller, key, token.data, token.len, NULL, 0, &out, &v2));
    KMS_ENSURE_MSG(out.len == sizeof(pt) && memcmp(out.data, pt, sizeof(pt)) == 0 && v == v2,
                   KMS_ERR_INTERNAL, "unwrap gave another plaintext");
    return KMS_OK_RESULT;
}

/* One iteration: rotate key (and every master_every-th time the master),
 * wrap a fresh DEK and record it; or, data_only, one checked wrap/unwrap.
 * On failure *what names the step. */
static kms_result loop_step(kms *k, int fd, const char *key, unsigned long iter,
                            unsigned long master_every, bool data_only, const char **what)
{
    kms_rotation_info rot;
    if (data_only) {
        *what = "data round";
        return data_round(k, key);
    }
    *what = "rotate";
    KMS_GUARD(kms_key_rotate(k, &caller, key, KMS_ROTATION_MANUAL, "crash loop", &rot));
    if (iter % master_every == 0) {
        *what = "master rotate";
        kms_result r = kms_master_rotate(k, &caller, "crash loop", &rot);
        /* Another process's master rotation in progress may be refused as
         * a conflict: that is a clean answer, not a failure. */
        if (!kms_is_ok(r) && r.err != KMS_ERR_CONFLICT) {
            return r;
        }
    }
    *what = "wrap";
    uint8_t pt[32], ctx[16];
    KMS_GUARD(kms_rand_bytes(pt, sizeof(pt)));
    KMS_GUARD(kms_rand_bytes(ctx, sizeof(ctx)));
    kms_buf token KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf_init(&token, 0);
    uint32_t v = 0;
    KMS_GUARD(kms_wrap(k, &caller, key, pt, sizeof(pt), ctx, sizeof(ctx), &token, &v));
    *what = "record write";
    KMS_ENSURE_MSG(append_record(fd, key, pt, sizeof(pt), ctx, sizeof(ctx), &token) == 0,
                   KMS_ERR_IO, "%s", strerror(errno));
    return KMS_OK_RESULT;
}

int main(int argc, char **argv)
{
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s STORE MODULE TOKEN_URI PIN_FILE RECORD_FILE START [data]\n",
                argv[0]);
        return 64;
    }
    kms_hsm_config hsm = {.module = argv[2], .token_uri = argv[3], .pin_file = argv[4]};
    kms_config cfg;
    stress_config_init(&cfg, argv[1], &hsm);
    unsigned long iter = strtoul(argv[6], NULL, 10);

    int fd = open(argv[5], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "kms_rotate_loop: open %s: %s\n", argv[5], strerror(errno));
        return 74;
    }

    kms *k = NULL;
    kms_result r = kms_open(&cfg, &k);
    if (!kms_is_ok(r)) {
        close(fd);
        return die("kms_open", r);
    }
    char names[LOOP_KEYS][32];
    for (int i = 0; i < LOOP_KEYS; i++) {
        snprintf(names[i], sizeof(names[i]), "crash-%d", i);
        kms_key_spec spec = {.name = names[i], .purpose = KMS_PURPOSE_ENCRYPT};
        kms_key_info info;
        r = kms_key_create(k, &caller, &spec, &info);
        if (!kms_is_ok(r) && r.err != KMS_ERR_KEY_EXISTS) {
            int rc = die("create", r);
            kms_close(k);
            close(fd);
            return rc;
        }
    }

    /* Tell the test (on the descriptor it named, if any) that the store is
     * open: its kill clock starts now. */
    const char *ready = getenv("KMS_ROTATE_LOOP_READY_FD");
    if (ready != NULL && *ready != '\0') {
        int rfd = atoi(ready);
        (void)!write(rfd, "R", 1);
        close(rfd);
    }

    /* "data": no rotations, only wraps each checked by an unwrap, as a
     * kmsd worker process serving applications while another process
     * rotates. */
    bool data_only = argc == 8 && strcmp(argv[7], "data") == 0;
    /* Master rotation every 20th iteration, or as env
     * KMS_ROTATE_LOOP_MASTER_EVERY says (the multi-process test rotates the
     * master as often as it can). */
    unsigned long master_every = 20;
    const char *every = getenv("KMS_ROTATE_LOOP_MASTER_EVERY");
    if (every != NULL && strtoul(every, NULL, 10) > 0) {
        master_every = strtoul(every, NULL, 10);
    }
    const char *what = NULL;
    for (;; iter++) {
        r = loop_step(k, fd, names[iter % LOOP_KEYS], iter, master_every, data_only, &what);
        if (!kms_is_ok(r)) {
            break;
        }
    }
    /* Report first (kms_close may raise errors of its own), then release
     * everything, so that a sanitizer build reports only real leaks. */
    int rc = die(what, r);
    kms_close(k);
    close(fd);
    return rc;
}
