/*
 * kms-token: set up and inspect the PKCS#11 token kmsd uses.
 *
 *   kms-token init  --module M --label L --pin-file F --so-pin-file F [--generate]
 *   kms-token list  --module M
 *   kms-token check --module M --uri URI --pin-file F
 *
 * PINs are read from files that only their owner may read, never from the
 * command line; --generate writes fresh random PINs to files that do not
 * exist yet (mode 0600). Exit statuses come from the error table
 * (crypto/kms_error.c, docs/cli.md).
 */
#define _GNU_SOURCE
#include "kms_error.h"
#include "kms_hash.h"
#include "kms_hsm.h"
#include "kms_rand.h"
#include "kms_secmem.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TOKEN_PIN_RANDOM_BYTES 16 /* 128 bits, written as 32 hex characters */
#define TOKEN_PIN_MAX_BYTES    256

static const char usage_text[] =
    "NAME\n"
    "    kms-token - set up and inspect the PKCS#11 token of kmsd\n"
    "\n"
    "SYNOPSIS\n"
    "    kms-token init --module MODULE --label LABEL --pin-file FILE --so-pin-file FILE\n"
    "                   [--generate]\n"
    "    kms-token list --module MODULE\n"
    "    kms-token check --module MODULE --uri URI --pin-file FILE\n"
    "    kms-token --help\n"
    "\n"
    "DESCRIPTION\n"
    "    init   initialises the first uninitialised token of MODULE with LABEL, sets its\n"
    "           security officer PIN and its user PIN (C_InitToken, C_InitPIN).\n"
    "    list   lists the slots of MODULE that hold a token.\n"
    "    check  opens the token named by URI, logs in with the user PIN and counts the\n"
    "           kmsd master keys on it.\n"
    "\n"
    "    PINs are never taken from the command line: they are read from files that\n"
    "    must not be readable by group or others.\n"
    "\n"
    "OPTIONS\n"
    "    --module MODULE     PKCS#11 module: an absolute path, or a module file name\n"
    "                        in p11-kit's module directory\n"
    "    --label LABEL       token label, 1 to 32 bytes\n"
    "    --uri URI           RFC 7512 PKCS#11 URI of the token, e.g. pkcs11:token=kmsd;\n"
    "                        pin-value and pin-source are refused\n"
    "    --pin-file FILE     file holding the user PIN\n"
    "    --so-pin-file FILE  file holding the security officer PIN\n"
    "    --generate          (init) create missing PIN files (mode 0600) with fresh\n"
    "                        random PINs; existing files are used as they are\n"
    "    -h, --help          show this text\n"
    "\n"
    "EXIT STATUS\n"
    "    0 on success; otherwise the exit code of the error in the error table\n"
    "    (docs/cli.md), e.g. a wrong PIN, a token that is not found, a module that\n"
    "    cannot be loaded. Usage errors exit with the code of invalid_argument.\n"
    "\n"
    "EXAMPLES\n"
    "    export SOFTHSM2_CONF=$PWD/data/softhsm/softhsm2.conf\n"
    "    kms-token init --module /usr/lib/softhsm/libsofthsm2.so --label kmsd \\\n"
    "        --pin-file data/pin --so-pin-file data/so-pin --generate\n"
    "    kms-token list --module /usr/lib/softhsm/libsofthsm2.so\n"
    "    kms-token check --module /usr/lib/softhsm/libsofthsm2.so \\\n"
    "        --uri 'pkcs11:token=kmsd' --pin-file data/pin\n";

typedef struct {
    const char *module;
    const char *label;
    const char *uri;
    const char *pin_file;
    const char *so_pin_file;
    bool generate;
} token_opts;

static int token_fail(kms_result r, const char *what)
{
    const char *detail = kms_error_detail();
    fprintf(stderr, "kms-token: %s: %s (%s)%s%s\n", what, kms_error_message(r.err),
            kms_error_code(r.err), detail[0] ? ": " : "", detail);
    return kms_error_exit_code(r.err);
}

static int token_usage_error(const char *msg)
{
    fprintf(stderr, "kms-token: %s\nTry 'kms-token --help'.\n", msg);
    return kms_error_exit_code(KMS_ERR_INVALID_ARGUMENT);
}

/* Writes a fresh random PIN to path, which must not exist (O_EXCL, 0600). */
static KMS_RESULT token_pin_generate(const char *path)
{
    uint8_t raw[TOKEN_PIN_RANDOM_BYTES];
    char hex[2 * TOKEN_PIN_RANDOM_BYTES + 2];
    KMS_GUARD(kms_rand_bytes(raw, sizeof(raw)));
    kms_hex_encode(raw, sizeof(raw), hex);
    kms_secmem_wipe(raw, sizeof(raw));
    size_t n = strlen(hex);
    hex[n++] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        kms_secmem_wipe(hex, sizeof(hex));
        KMS_BAIL_MSG(KMS_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    }
    ssize_t w = write(fd, hex, n);
    kms_secmem_wipe(hex, sizeof(hex));
    int c = close(fd);
    if (w != (ssize_t)n || c != 0) {
        unlink(path);
        KMS_BAIL_MSG(KMS_ERR_IO, "cannot write %s", path);
    }
    return KMS_OK_RESULT;
}

static KMS_RESULT token_pin_load(const char *path, bool generate, kms_buf *pin)
{
    if (generate && access(path, F_OK) != 0 && errno == ENOENT)
        KMS_GUARD(token_pin_generate(path));
    kms_buf_init_secret(pin, TOKEN_PIN_MAX_BYTES);
    KMS_GUARD(kms_secret_read_file(path, pin));
    KMS_ENSURE_MSG(pin->len > 0, KMS_ERR_CONFIG, "empty PIN in %s", path);
    return KMS_OK_RESULT;
}

/* RFC 7512 section 2.3: pk11-pchar is unreserved / pct-encoded / ":" /
 * "[" / "]" / "@" / "!" / "$" / "'" / "(" / ")" / "*" / "+" / "," / "=" /
 * "&"; everything else in a value is percent-encoded. */
static void token_print_uri(const char *label)
{
    static const char ok[] = "-._~:[]@!$'()*+,=&";
    fputs("pkcs11:token=", stdout);
    for (const unsigned char *p = (const unsigned char *)label; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            strchr(ok, *p) != NULL)
            putchar(*p);
        else
            printf("%%%02X", *p);
    }
    putchar('\n');
}

static int token_cmd_init(const token_opts *o)
{
    if (o->module == NULL || o->label == NULL || o->pin_file == NULL || o->so_pin_file == NULL)
        return token_usage_error("init needs --module, --label, --pin-file and --so-pin-file");
    kms_buf pin KMS_DEFER(kms_buf_cleanup) = {0};
    kms_buf so_pin KMS_DEFER(kms_buf_cleanup) = {0};
    kms_result r = token_pin_load(o->so_pin_file, o->generate, &so_pin);
    if (!kms_is_ok(r))
        return token_fail(r, "security officer PIN");
    r = token_pin_load(o->pin_file, o->generate, &pin);
    if (!kms_is_ok(r))
        return token_fail(r, "user PIN");
    r = kms_hsm_token_init(o->module, o->label, &so_pin, &pin);
    if (!kms_is_ok(r))
        return token_fail(r, "init");
    printf("initialised token '%s'; URI: ", o->label);
    token_print_uri(o->label);
    return 0;
}

static int token_cmd_list(const token_opts *o)
{
    if (o->module == NULL)
        return token_usage_error("list needs --module");
    kms_hsm_token_info *t = NULL;
    size_t n = 0;
    kms_result r = kms_hsm_token_list(o->module, &t, &n);
    if (!kms_is_ok(r))
        return token_fail(r, "list");
    printf("%-20s %-32s %-16s %-16s %s\n", "SLOT", "LABEL", "SERIAL", "MODEL", "STATE");
    for (size_t i = 0; i < n; i++) {
        const char *state = !t[i].initialized            ? "uninitialised"
                            : !t[i].user_pin_initialized ? "no user PIN"
                                                         : "ready";
        printf("%-20lu %-32s %-16s %-16s %s\n", t[i].slot_id, t[i].label, t[i].serial, t[i].model,
               state);
    }
    free(t);
    return 0;
}

static int token_cmd_check(const token_opts *o)
{
    if (o->module == NULL || o->uri == NULL || o->pin_file == NULL)
        return token_usage_error("check needs --module, --uri and --pin-file");
    kms_hsm_config cfg = {.module = o->module,
                          .token_uri = o->uri,
                          .pin_file = o->pin_file,
                          .pool_size = 1,
                          .cache_capacity = 16};
    kms_hsm *hsm = NULL;
    kms_result r = kms_hsm_open(&cfg, &hsm);
    if (!kms_is_ok(r))
        return token_fail(r, "open");
    uint8_t(*ids)[KMS_HSM_ID_BYTES] = NULL;
    size_t n = 0;
    r = kms_hsm_master_list(hsm, &ids, &n);
    if (kms_is_ok(r))
        r = kms_hsm_ping(hsm);
    kms_hsm_close(hsm);
    if (!kms_is_ok(r)) {
        free(ids);
        return token_fail(r, "check");
    }
    printf("token ok: logged in; %zu kmsd master key%s\n", n, n == 1 ? "" : "s");
    for (size_t i = 0; i < n; i++) {
        char hex[2 * KMS_HSM_ID_BYTES + 1];
        kms_hex_encode(ids[i], KMS_HSM_ID_BYTES, hex);
        printf("  master %s\n", hex);
    }
    free(ids);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"module", required_argument, NULL, 'm'},
        {"label", required_argument, NULL, 'l'},
        {"uri", required_argument, NULL, 'u'},
        {"pin-file", required_argument, NULL, 'p'},
        {"so-pin-file", required_argument, NULL, 's'},
        {"generate", no_argument, NULL, 'g'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    if (!kms_is_ok(kms_process_harden()))
        fprintf(stderr, "kms-token: warning: could not disable core dumps\n");
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
                      strcmp(argv[1], "help") == 0)) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (argc < 2)
        return token_usage_error("no command given");
    const char *cmd = argv[1];
    token_opts o = {0};
    optind = 2;
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm':
            o.module = optarg;
            break;
        case 'l':
            o.label = optarg;
            break;
        case 'u':
            o.uri = optarg;
            break;
        case 'p':
            o.pin_file = optarg;
            break;
        case 's':
            o.so_pin_file = optarg;
            break;
        case 'g':
            o.generate = true;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        default:
            return token_usage_error("unknown option");
        }
    }
    if (optind != argc)
        return token_usage_error("unexpected argument");
    if (strcmp(cmd, "init") == 0)
        return token_cmd_init(&o);
    if (strcmp(cmd, "list") == 0)
        return token_cmd_list(&o);
    if (strcmp(cmd, "check") == 0)
        return token_cmd_check(&o);
    return token_usage_error("unknown command");
}
