/* Throwaway SoftHSM tokens for tests (kms_test_hsm.h). */
#define _GNU_SOURCE
#include "kms_test_hsm.h"

#include "kms_fault.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef KMS_FAULT_MODULE_PATH
#define KMS_FAULT_MODULE_PATH ""
#endif
#define KMS_TEST_DEFAULT_SOFTHSM "/usr/lib/softhsm/libsofthsm2.so"
#define KMS_TEST_PIN_BYTES       16 /* random bytes, rendered as 32 hex characters */

const char *kms_test_softhsm_module(void)
{
    const char *m = getenv("KMS_SOFTHSM_MODULE");
    return m != NULL && *m != '\0' ? m : KMS_TEST_DEFAULT_SOFTHSM;
}

const char *kms_test_fault_module(void)
{
    const char *m = getenv("KMS_FAULT_MODULE_PATH");
    return m != NULL && *m != '\0' ? m : KMS_FAULT_MODULE_PATH;
}

static int test_random_hex(char *out, size_t bytes)
{
    uint8_t raw[64];
    if (bytes > sizeof(raw) || getrandom(raw, bytes, 0) != (ssize_t)bytes)
        return -1;
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < bytes; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[2 * bytes] = '\0';
    explicit_bzero(raw, sizeof(raw));
    return 0;
}

static int test_write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    size_t n = strlen(text);
    int rc = write(fd, text, n) == (ssize_t)n ? 0 : -1;
    if (close(fd) != 0)
        rc = -1;
    return rc;
}

static int test_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void test_rm_tree(const char *dir)
{
    nftw(dir, test_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int test_token_init(kms_test_token *t)
{
    char pin[2 * KMS_TEST_PIN_BYTES + 1];
    char so_pin[2 * KMS_TEST_PIN_BYTES + 1];
    int rc = -1;
    if (test_random_hex(pin, KMS_TEST_PIN_BYTES) != 0 ||
        test_random_hex(so_pin, KMS_TEST_PIN_BYTES) != 0)
        goto out;
    if (test_write_file(t->pin_path, pin, 0600) != 0 ||
        test_write_file(t->so_pin_path, so_pin, 0600) != 0)
        goto out;
    /* Views of stack buffers: the token-init path only reads them. */
    kms_buf user = {.data = (uint8_t *)pin, .len = strlen(pin)};
    kms_buf so = {.data = (uint8_t *)so_pin, .len = strlen(so_pin)};
    kms_result r = kms_hsm_token_init(kms_test_softhsm_module(), t->token_label, &so, &user);
    if (!kms_is_ok(r)) {
        fprintf(stderr, "kms_test_token_setup: token init: %s (%s)\n", kms_error_code(r.err),
                kms_error_detail());
        goto out;
    }
    rc = 0;
out:
    explicit_bzero(pin, sizeof(pin));
    explicit_bzero(so_pin, sizeof(so_pin));
    return rc;
}

int kms_test_token_setup(kms_test_token *t, bool fault)
{
    memset(t, 0, sizeof(*t));
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || *tmp == '\0')
        tmp = "/tmp";
    if (snprintf(t->dir, sizeof(t->dir), "%s/kmstest.XXXXXX", tmp) >= (int)sizeof(t->dir))
        return -1;
    if (mkdtemp(t->dir) == NULL)
        return -1;
    snprintf(t->conf_path, sizeof(t->conf_path), "%s/softhsm2.conf", t->dir);
    snprintf(t->pin_path, sizeof(t->pin_path), "%s/pin", t->dir);
    snprintf(t->so_pin_path, sizeof(t->so_pin_path), "%s/so-pin", t->dir);
    snprintf(t->fault_control, sizeof(t->fault_control), "%s/fault.ctl", t->dir);

    char tokens[300];
    snprintf(tokens, sizeof(tokens), "%s/tokens", t->dir);
    if (mkdir(tokens, 0700) != 0)
        goto fail;
    char conf[512];
    snprintf(conf, sizeof(conf),
             "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
             "slots.removable = false\n",
             tokens);
    if (test_write_file(t->conf_path, conf, 0600) != 0)
        goto fail;
    if (setenv("SOFTHSM2_CONF", t->conf_path, 1) != 0)
        goto fail;

    char suffix[9];
    if (test_random_hex(suffix, 4) != 0)
        goto fail;
    snprintf(t->token_label, sizeof(t->token_label), "kmstest-%s", suffix);
    snprintf(t->token_uri, sizeof(t->token_uri), "pkcs11:token=%s", t->token_label);
    if (test_token_init(t) != 0)
        goto fail;

    if (fault) {
        const char *fm = kms_test_fault_module();
        if (*fm == '\0' || access(fm, R_OK) != 0) {
            fprintf(stderr, "kms_test_token_setup: fault module not found (%s)\n", fm);
            goto fail;
        }
        snprintf(t->module_path, sizeof(t->module_path), "%s", fm);
        if (setenv("KMS_FAULT_MODULE", kms_test_softhsm_module(), 1) != 0 ||
            setenv("KMS_FAULT_CONTROL", t->fault_control, 1) != 0)
            goto fail;
        if (kms_fault_attach(t->fault_control) != 0)
            goto fail;
        kms_fault_reset();
    } else {
        snprintf(t->module_path, sizeof(t->module_path), "%s", kms_test_softhsm_module());
    }

    t->cfg.module = t->module_path;
    t->cfg.token_uri = t->token_uri;
    t->cfg.pin_file = t->pin_path;
    t->cfg.pin_env = NULL;
    t->cfg.pool_size = 4;
    t->cfg.cache_capacity = 0; /* the library's default */
    return 0;
fail:
    fprintf(stderr, "kms_test_token_setup failed: %s\n", strerror(errno));
    test_rm_tree(t->dir);
    t->dir[0] = '\0';
    return -1;
}

void kms_test_token_teardown(kms_test_token *t)
{
    kms_fault_detach();
    if (t->dir[0] != '\0')
        test_rm_tree(t->dir);
    t->dir[0] = '\0';
    unsetenv("KMS_FAULT_CONTROL");
    unsetenv("KMS_FAULT_MODULE");
    unsetenv("SOFTHSM2_CONF");
}
