/*
 * Replay driver for the fuzz targets (after p11-kit fuzz/main.c and s2n-tls
 * tests/fuzz): a plain main() that runs a libFuzzer-style target
 *
 *     int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
 *
 * over every file of the corpus directories (or files) named on the command
 * line, then over a bounded number of deterministic pseudo-random mutations
 * of each corpus file. Under ctest in the sanitizer build this makes every
 * corpus entry (including every past finding) a regression test, and
 * explores a little around it without needing clang or libFuzzer.
 *
 * The mutation count per file is KMS_FUZZ_MUTATIONS from the environment,
 * else the compile-time default. The sequence depends only on the corpus, so
 * a failure reproduces by running the same command again. The input that
 * made the target fail (non-zero return or abort(), including a sanitizer
 * report with abort_on_error=1) is written to ./fuzz-crash-<corpus file>,
 * ready to be added to the corpus; KMS_FUZZ_VERBOSE=1 prints each mutated
 * run's file and index.
 *
 * An empty or missing corpus is an error: a fuzz test that runs nothing
 * must not pass.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef KMS_FUZZ_DEFAULT_MUTATIONS
#define KMS_FUZZ_DEFAULT_MUTATIONS 20000
#endif
/* Mutated inputs never grow beyond this. */
#define KMS_FUZZ_MAX_INPUT_BYTES ((size_t)256 * 1024)
#define KMS_FUZZ_MAX_FILES       4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

typedef struct {
    char *path;
    uint8_t *data;
    size_t len;
} corpus_file;

static corpus_file files[KMS_FUZZ_MAX_FILES];
static size_t file_count;
static unsigned long long executions;

static uint64_t rng_state;

/* splitmix64: tiny, deterministic, good enough to pick mutations. */
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static size_t rng_below(size_t n)
{
    return n == 0 ? 0 : (size_t)(rng_next() % n);
}

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ULL;
    }
    return h;
}

static int compare_paths(const void *a, const void *b)
{
    return strcmp(((const corpus_file *)a)->path, ((const corpus_file *)b)->path);
}

static int load_file(const char *path)
{
    if (file_count == KMS_FUZZ_MAX_FILES) {
        fprintf(stderr, "replay: more than %d corpus files\n", KMS_FUZZ_MAX_FILES);
        return -1;
    }
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        return -1;
    }
    uint8_t *data = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            if (cap > KMS_FUZZ_MAX_INPUT_BYTES * 4) {
                fprintf(stderr, "replay: %s: too large\n", path);
                free(data);
                fclose(f);
                return -1;
            }
            uint8_t *n = realloc(data, cap);
            if (n == NULL) {
                free(data);
                fclose(f);
                return -1;
            }
            data = n;
        }
        size_t r = fread(data + len, 1, cap - len, f);
        len += r;
        if (r == 0) {
            break;
        }
    }
    const int err = ferror(f);
    fclose(f);
    if (err) {
        fprintf(stderr, "replay: %s: read error\n", path);
        free(data);
        return -1;
    }
    files[file_count].path = strdup(path);
    files[file_count].data = data;
    files[file_count].len = len;
    file_count++;
    return 0;
}

static int load_arg(const char *arg)
{
    struct stat st;
    if (stat(arg, &st) != 0) {
        fprintf(stderr, "replay: %s: %s\n", arg, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        return load_file(arg);
    }
    DIR *d = opendir(arg);
    if (d == NULL) {
        fprintf(stderr, "replay: %s: %s\n", arg, strerror(errno));
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", arg, e->d_name);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            rc = load_file(path);
        }
    }
    closedir(d);
    return rc;
}

/* The input being run, for the SIGABRT handler. */
static const uint8_t *volatile current_data;
static volatile size_t current_len;
static char crash_path[512];

static void on_abort(int sig)
{
    /* Only async-signal-safe calls here. */
    int fd = open(crash_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0 && current_data != NULL) {
        ssize_t w = write(fd, (const void *)current_data, current_len);
        (void)w;
        static const char msg[] = "replay: failing input written to fuzz-crash-*\n";
        w = write(STDERR_FILENO, msg, sizeof(msg) - 1);
        (void)w;
    }
    if (fd >= 0) {
        close(fd);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void set_crash_path(const char *path)
{
    const char *base = strrchr(path, '/');
    snprintf(crash_path, sizeof(crash_path), "fuzz-crash-%s", base ? base + 1 : path);
}

static void save_crash(const char *path, const uint8_t *data, size_t len)
{
    const char *base = strrchr(path, '/');
    char out[512];
    snprintf(out, sizeof(out), "fuzz-crash-%s", base ? base + 1 : path);
    FILE *f = fopen(out, "wb");
    if (f != NULL) {
        fwrite(data, 1, len, f);
        fclose(f);
        fprintf(stderr, "replay: failing input written to %s\n", out);
    }
}

/* Runs the target on an exact-size heap copy, so that a read one byte past
 * the input is an ASan report, not a silent read of the next byte. */
static int run_one(const uint8_t *data, size_t len)
{
    uint8_t *copy = malloc(len ? len : 1);
    if (copy == NULL) {
        abort();
    }
    if (len) {
        memcpy(copy, data, len);
    }
    current_data = copy;
    current_len = len;
    const int rc = LLVMFuzzerTestOneInput(copy, len);
    current_data = NULL;
    free(copy);
    executions++;
    return rc;
}

static const uint8_t interesting[] = {0x00, 0x01, 0x02, 0x7f, 0x80, 0xff, '=',  '"', '\\', '{',
                                      '}',  '[',  ']',  ':',  ',',  ' ',  '\n', '#', 'K',  0x4B};

/* Applies 1..4 random edits to buf (len bytes, capacity cap). */
static size_t mutate(uint8_t *buf, size_t len, size_t cap)
{
    const size_t edits = 1 + rng_below(4);
    for (size_t k = 0; k < edits; k++) {
        switch (rng_below(8)) {
        case 0: /* flip one bit */
            if (len) {
                buf[rng_below(len)] ^= (uint8_t)(1u << rng_below(8));
            }
            break;
        case 1: /* random byte */
            if (len) {
                buf[rng_below(len)] = (uint8_t)rng_next();
            }
            break;
        case 2: /* interesting byte */
            if (len) {
                buf[rng_below(len)] = interesting[rng_below(sizeof(interesting))];
            }
            break;
        case 3: /* insert a byte */
            if (len < cap) {
                const size_t at = rng_below(len + 1);
                memmove(buf + at + 1, buf + at, len - at);
                buf[at] = rng_below(2) ? (uint8_t)rng_next()
                                       : interesting[rng_below(sizeof(interesting))];
                len++;
            }
            break;
        case 4: /* delete a range */
            if (len) {
                const size_t at = rng_below(len);
                const size_t n = 1 + rng_below(len - at < 8 ? len - at : 8);
                memmove(buf + at, buf + at + n, len - at - n);
                len -= n;
            }
            break;
        case 5: /* truncate */
            len = rng_below(len + 1);
            break;
        case 6: /* duplicate a range of up to 64 bytes */
            if (len > 0 && len < cap) {
                uint8_t tmp[64];
                const size_t from = rng_below(len);
                size_t n = 1 + rng_below(len - from);
                n = n > sizeof(tmp) ? sizeof(tmp) : n;
                n = n > cap - len ? cap - len : n;
                memcpy(tmp, buf + from, n);
                const size_t at = rng_below(len + 1);
                const size_t tail = len - at;
                memmove(buf + at + n, buf + at, tail);
                memcpy(buf + at, tmp, n);
                len += n;
            }
            break;
        default: { /* splice: a range of another corpus file */
            const corpus_file *o = &files[rng_below(file_count)];
            if (o->len) {
                const size_t from = rng_below(o->len);
                size_t n = 1 + rng_below(o->len - from);
                const size_t at = rng_below(len + 1);
                if (n > cap - at) {
                    n = cap - at;
                }
                memcpy(buf + at, o->data + from, n);
                if (at + n > len) {
                    len = at + n;
                }
            }
            break;
        }
        }
    }
    return len;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize != NULL) {
        LLVMFuzzerInitialize(&argc, &argv);
    }
    for (int i = 1; i < argc; i++) {
        if (load_arg(argv[i]) != 0) {
            return 2;
        }
    }
    if (file_count == 0) {
        fprintf(stderr, "replay: the corpus is empty\n");
        return 2;
    }
    qsort(files, file_count, sizeof(files[0]), compare_paths);

    unsigned long mutations = KMS_FUZZ_DEFAULT_MUTATIONS;
    const char *env = getenv("KMS_FUZZ_MUTATIONS");
    if (env != NULL && *env != '\0') {
        char *end;
        mutations = strtoul(env, &end, 10);
        if (*end != '\0') {
            fprintf(stderr, "replay: KMS_FUZZ_MUTATIONS must be a number\n");
            return 2;
        }
    }
    const bool verbose = getenv("KMS_FUZZ_VERBOSE") != NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    signal(SIGABRT, on_abort);
    for (size_t i = 0; i < file_count; i++) {
        set_crash_path(files[i].path);
        if (run_one(files[i].data, files[i].len) != 0) {
            fprintf(stderr, "replay: target failed on %s\n", files[i].path);
            return 1;
        }
    }
    uint8_t *buf = malloc(KMS_FUZZ_MAX_INPUT_BYTES);
    if (buf == NULL) {
        return 2;
    }
    for (size_t i = 0; i < file_count; i++) {
        rng_state = fnv1a(files[i].data, files[i].len);
        set_crash_path(files[i].path);
        const size_t base =
            files[i].len < KMS_FUZZ_MAX_INPUT_BYTES ? files[i].len : KMS_FUZZ_MAX_INPUT_BYTES;
        for (unsigned long m = 0; m < mutations; m++) {
            memcpy(buf, files[i].data, base);
            const size_t len = mutate(buf, base, KMS_FUZZ_MAX_INPUT_BYTES);
            if (verbose) {
                fprintf(stderr, "replay: %s mutation %lu (%zu bytes)\n", files[i].path, m, len);
            }
            if (run_one(buf, len) != 0) {
                fprintf(stderr, "replay: target failed on %s mutation %lu\n", files[i].path, m);
                save_crash(files[i].path, buf, len);
                free(buf);
                return 1;
            }
        }
    }
    free(buf);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("replay: %zu corpus files, %lu mutations each, %llu executions in %.2f s\n", file_count,
           mutations, executions, secs);
    for (size_t i = 0; i < file_count; i++) {
        free(files[i].path);
        free(files[i].data);
    }
    return 0;
}
