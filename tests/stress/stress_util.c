#define _GNU_SOURCE /* nftw */
#include "stress_util.h"

#include <errno.h>
#include <dirent.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

uint64_t stress_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double stress_now_s(void)
{
    return (double)stress_now_ns() / 1e9;
}

void stress_config_init(kms_config *cfg, const char *store_path, const kms_hsm_config *hsm)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->store_path = store_path;
    cfg->hsm = *hsm;
}

int stress_mkdir(const char *path)
{
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        return -1;
    }
    return 0;
}

static int rmtree_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    /* Best effort: a leftover file in a temp dir is not a test failure. */
    (void)remove(path);
    return 0;
}

void stress_rmtree(const char *path)
{
    (void)nftw(path, rmtree_one, 16, FTW_DEPTH | FTW_PHYS);
}

kms_result stress_key_snap_take(kms *k, const char *name, stress_key_snap *out)
{
    memset(out, 0, sizeof(*out));
    kms_result r = kms_key_get(k, name, &out->info);
    if (r.err == KMS_ERR_KEY_NOT_FOUND) {
        return KMS_OK_RESULT;
    }
    if (!kms_is_ok(r)) {
        return r;
    }
    r = kms_key_versions(k, name, &out->versions, &out->n);
    if (!kms_is_ok(r)) {
        return r;
    }
    out->exists = true;
    return KMS_OK_RESULT;
}

void stress_key_snap_free(stress_key_snap *s)
{
    free(s->versions);
    memset(s, 0, sizeof(*s));
}

kms_result stress_key_list_all(kms *k, kms_key_info **out, size_t *n)
{
    kms_key_info *all = NULL;
    size_t total = 0;
    char after[KMS_KEY_NAME_MAX_BYTES + 1] = "";
    for (;;) {
        kms_key_info *page = NULL;
        size_t got = 0;
        kms_result r = kms_key_list(k, total ? after : NULL, 1000, &page, &got);
        if (!kms_is_ok(r)) {
            free(all);
            return r;
        }
        if (got > 0) {
            kms_key_info *grown = realloc(all, (total + got) * sizeof(*all));
            if (grown == NULL) {
                free(page);
                free(all);
                return kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
            }
            all = grown;
            memcpy(all + total, page, got * sizeof(*all));
            total += got;
            snprintf(after, sizeof(after), "%s", page[got - 1].name);
        }
        free(page);
        if (got < 1000) {
            break;
        }
    }
    *out = all;
    *n = total;
    return KMS_OK_RESULT;
}

bool stress_version_same(const kms_version_info *a, const kms_version_info *b, bool ignore_master)
{
    return a->version == b->version && a->state == b->state && a->created_at == b->created_at &&
           a->primary_at == b->primary_at && a->deprecated_at == b->deprecated_at &&
           a->grace_until == b->grace_until && a->destroy_at == b->destroy_at &&
           (ignore_master || a->master_version == b->master_version);
}

bool stress_key_same(const stress_key_snap *a, const stress_key_snap *b, bool ignore_master)
{
    if (a->exists != b->exists) {
        return false;
    }
    if (!a->exists) {
        return true;
    }
    const kms_key_info *x = &a->info, *y = &b->info;
    if (strcmp(x->name, y->name) != 0 || x->purpose != y->purpose ||
        x->primary_version != y->primary_version || x->latest_version != y->latest_version ||
        x->min_decryption_version != y->min_decryption_version ||
        x->rotation_period_s != y->rotation_period_s ||
        x->warning_window_s != y->warning_window_s ||
        x->deletion_protection != y->deletion_protection || x->created_at != y->created_at ||
        x->rotated_at != y->rotated_at || a->n != b->n) {
        return false;
    }
    for (size_t i = 0; i < a->n; i++) {
        if (!stress_version_same(&a->versions[i], &b->versions[i], ignore_master)) {
            return false;
        }
    }
    return true;
}

void stress_hex_encode(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
    out[2 * n] = '\0';
}

static int hex_nibble(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

long stress_hex_decode(const char *in, size_t in_len, uint8_t *out, size_t out_cap)
{
    if (in_len % 2 != 0 || in_len / 2 > out_cap) {
        return -1;
    }
    for (size_t i = 0; i < in_len / 2; i++) {
        int hi = hex_nibble(in[2 * i]), lo = hex_nibble(in[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return -1;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return (long)(in_len / 2);
}

uint64_t stress_rand_next(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* The kernel's view of each thread: where it sleeps (wchan) and the
 * system call it is in. Readable by the parent without ptrace rights. */
static void stress_dump_wchan(pid_t pid)
{
    char dir[64];
    snprintf(dir, sizeof(dir), "/proc/%d/task", (int)pid);
    DIR *d = opendir(dir);
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[384], wchan[64] = "", sys[128] = "";
        snprintf(path, sizeof(path), "%s/%s/wchan", dir, e->d_name);
        FILE *f = fopen(path, "r");
        if (f != NULL) {
            if (fgets(wchan, sizeof(wchan), f) == NULL)
                wchan[0] = '\0';
            fclose(f);
        }
        snprintf(path, sizeof(path), "%s/%s/syscall", dir, e->d_name);
        f = fopen(path, "r");
        if (f != NULL) {
            if (fgets(sys, sizeof(sys), f) == NULL)
                sys[0] = '\0';
            fclose(f);
        }
        sys[strcspn(sys, "\n")] = '\0';
        fprintf(stderr, "  thread %s: wchan %s, syscall %s\n", e->d_name, wchan, sys);
    }
    closedir(d);
}

void stress_dump_stacks(pid_t pid)
{
    fprintf(stderr, "stacks of stuck process %d:\n", (int)pid);
    stress_dump_wchan(pid);
    char p[16];
    snprintf(p, sizeof(p), "%d", (int)pid);
    pid_t g = fork();
    if (g == 0) {
        (void)dup2(STDERR_FILENO, STDOUT_FILENO);
        /* Bounded: an attach that hangs must not hang the test. */
        execlp("timeout", "timeout", "60", "gdb", "-batch", "-nx", "-p", p, "-ex",
               "thread apply all bt", (char *)NULL);
        _exit(127);
    }
    if (g > 0)
        (void)waitpid(g, NULL, 0);
}
