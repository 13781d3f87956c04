/*
 * kmsctl's command line: durations, times, the verb and option tables (every
 * verb documented, every option of a verb documented, every example parses),
 * the parser's refusals (each with the exact error), and docs/cli.md kept in
 * step with the tables.
 */
#define _GNU_SOURCE
#include "kms_error.h"
#include "kmsctl_args.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define NOW INT64_C(1800000000)

static void test_duration_valid(void **state)
{
    static const struct {
        const char *text;
        int64_t seconds;
    } cases[] = {
        {"90d", 90 * 86400}, {"12h", 12 * 3600},
        {"30m", 1800},       {"3600s", 3600},
        {"3600", 3600},      {"0", 0},
        {"0d", 0},           {"1", 1},
        {"007m", 420},       {"36500d", KMSCTL_DURATION_MAX_S},
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(cases); i++) {
        int64_t s = -1;
        assert_true(kms_is_ok(kmsctl_duration_parse(cases[i].text, &s)));
        assert_int_equal(s, cases[i].seconds);
    }
}

static void test_duration_invalid(void **state)
{
    static const char *const cases[] = {
        "",
        "d",
        "s",
        "-5",
        "+5",
        " 5",
        "5 ",
        "5x",
        "5dd",
        "1.5h",
        "5w",
        "5D",
        "1e3",
        "0x10",
        "5d5h",
        "36501d",
        "99999999999999999999",
        "9223372036854775807",
        "3153600001",
        "\n5",
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(cases); i++) {
        int64_t s = 42;
        kms_result r = kmsctl_duration_parse(cases[i], &s);
        assert_int_equal(r.err, KMS_ERR_INVALID_ARGUMENT);
        assert_int_equal(s, 42); /* untouched on failure */
    }
}

static void test_duration_format(void **state)
{
    static const struct {
        int64_t s;
        const char *text;
    } cases[] = {{7776000, "90d"}, {43200, "12h"}, {1800, "30m"}, {61, "61s"},
                 {0, "0s"},        {90000, "25h"}, {86400, "1d"}};
    char buf[32];
    for (size_t i = 0; i < KMS_ARRAY_LEN(cases); i++) {
        kmsctl_duration_format(cases[i].s, buf, sizeof(buf));
        assert_string_equal(buf, cases[i].text);
        int64_t back = -1;
        assert_true(kms_is_ok(kmsctl_duration_parse(buf, &back)));
        assert_int_equal(back, cases[i].s);
    }
}

static void test_time_parse(void **state)
{
    int64_t t = 0;
    assert_true(kms_is_ok(kmsctl_time_parse("1700000000", NOW, &t)));
    assert_int_equal(t, 1700000000);
    assert_true(kms_is_ok(kmsctl_time_parse("2026-11-01", NOW, &t)));
    assert_int_equal(t, 1793491200);
    assert_true(kms_is_ok(kmsctl_time_parse("2026-11-01T12:30:05Z", NOW, &t)));
    assert_int_equal(t, 1793491200 + 12 * 3600 + 30 * 60 + 5);
    assert_true(kms_is_ok(kmsctl_time_parse("7d", NOW, &t)));
    assert_int_equal(t, NOW - 7 * 86400);
    assert_true(kms_is_ok(kmsctl_time_parse("90m", NOW, &t)));
    assert_int_equal(t, NOW - 5400);

    static const char *const bad[] = {"",
                                      "yesterday",
                                      "2026-11-01T12:30:05",
                                      "2026-11-01 ",
                                      "2026-13-01",
                                      "2026-11-01T25:00:00Z",
                                      "-7d",
                                      "7w",
                                      "26-11-01",
                                      "2026-11-01Tx"};
    for (size_t i = 0; i < KMS_ARRAY_LEN(bad); i++) {
        kms_result r = kmsctl_time_parse(bad[i], NOW, &t);
        assert_int_equal(r.err, KMS_ERR_INVALID_ARGUMENT);
    }
}

static bool contains_word(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (const char *p = strstr(hay, needle); p != NULL; p = strstr(p + 1, needle)) {
        char after = p[n];
        if (after == ' ' || after == '\n' || after == ']' || after == '\0') {
            return true;
        }
    }
    return false;
}

__attribute__((noinline)) static char *render_help(const kmsctl_verb *v)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    kmsctl_help_verb(v, f);
    assert_int_equal(fclose(f), 0);
    return text;
}

static void test_verb_table(void **state)
{
    size_t nverbs = 0;
    size_t nopts = 0;
    const kmsctl_verb *verbs = kmsctl_verbs(&nverbs);
    const kmsctl_option *opts = kmsctl_options(&nopts);
    assert_int_equal(nverbs, KMSCTL_VERB_COUNT);
    assert_int_equal(nopts, KMSCTL_OPT_COUNT);
    assert_true(KMSCTL_OPT_COUNT <= 64);

    uint64_t used = KMSCTL_GLOBAL_OPTS;
    for (size_t i = 0; i < nverbs; i++) {
        const kmsctl_verb *v = &verbs[i];
        assert_int_equal(v->id, i);
        assert_non_null(v->name);
        assert_true(strlen(v->summary) > 5);
        assert_true(strlen(v->description) > 20);
        assert_true(strncmp(v->examples, "kmsctl ", 7) == 0 || strstr(v->examples, "| kmsctl "));
        /* Verb options are not global ones, required ones are its own. */
        assert_int_equal(v->options & KMSCTL_GLOBAL_OPTS, 0);
        assert_int_equal(v->required & ~v->options, 0);
        for (size_t j = 0; j < i; j++) {
            assert_string_not_equal(v->name, verbs[j].name);
        }
        used |= v->options;

        /* The generated page has every man section and documents every
         * option of the verb and every global option. */
        char *help = render_help(v);
        static const char *const sections[] = {
            "NAME\n",      "\nSYNOPSIS\n",       "\nDESCRIPTION\n",
            "\nOPTIONS\n", "\nGLOBAL OPTIONS\n", "\nEXIT STATUS\n",
            "\nEXAMPLES\n"};
        const char *at = help;
        for (size_t s = 0; s < KMS_ARRAY_LEN(sections); s++) {
            const char *p = strstr(at, sections[s]);
            assert_non_null(p); /* present and in order */
            at = p;
        }
        for (size_t o = 0; o < nopts; o++) {
            if ((v->options | KMSCTL_GLOBAL_OPTS) & KMSCTL_BIT(o)) {
                char flag[80];
                snprintf(flag, sizeof(flag), "--%s", opts[o].name);
                assert_true(contains_word(help, flag));
            }
        }
        for (size_t p = 0; p < KMSCTL_POS_MAX && v->pos[p] != NULL; p++) {
            assert_non_null(strstr(help, v->pos[p]));
        }
        free(help);
    }
    for (size_t o = 0; o < nopts; o++) {
        assert_int_equal(opts[o].id, o);
        assert_true(strlen(opts[o].name) > 1);
        assert_true(strlen(opts[o].help) > 10);
        assert_true((opts[o].kind == KMSCTL_KIND_FLAG) == (opts[o].metavar == NULL));
        assert_true(kmsctl_option_get((kmsctl_opt_id)o) == &opts[o]);
        /* Every option is reachable from some verb. */
        assert_true(used & KMSCTL_BIT(o));
    }
    assert_null(kmsctl_option_get(KMSCTL_OPT_COUNT));
}

/* Splits a command line the way a shell would for our examples: spaces
 * separate words, double quotes group. Returns argc. */
static int split(char *line, char **argv, int max)
{
    int argc = 0;
    char *p = line;
    while (*p != '\0' && argc < max) {
        while (*p == ' ') {
            p++;
        }
        if (*p == '\0') {
            break;
        }
        char *w = p;
        char *o = p;
        bool quoted = false;
        while (*p != '\0' && (quoted || *p != ' ')) {
            if (*p == '"') {
                quoted = !quoted;
                p++;
                continue;
            }
            *o++ = *p++;
        }
        if (*p != '\0') {
            p++;
        }
        *o = '\0';
        argv[argc++] = w;
    }
    return argc;
}

static void test_examples_parse(void **state)
{
    size_t nverbs = 0;
    const kmsctl_verb *verbs = kmsctl_verbs(&nverbs);
    for (size_t i = 0; i < nverbs; i++) {
        char *copy = strdup(verbs[i].examples);
        assert_non_null(copy);
        for (char *line = strtok(copy, "\n"); line != NULL; line = strtok(NULL, "\n")) {
            char *cmd = strstr(line, "kmsctl ");
            assert_non_null(cmd);
            char *end = strchr(cmd, '>'); /* shell redirection is not ours */
            if (end != NULL) {
                *end = '\0';
            }
            char *argv[32];
            int argc = split(cmd, argv, 32);
            kmsctl_args a;
            kms_result r = kmsctl_args_parse(argc, argv, NOW, &a);
            if (!kms_is_ok(r)) {
                fail_msg("example \"%s\": %s", line, kms_error_detail());
            }
            assert_ptr_equal(a.verb, &verbs[i]);
        }
        free(copy);
    }
}

static kms_result parse_line(const char *line, kmsctl_args *a)
{
    static char buf[512];
    snprintf(buf, sizeof(buf), "%s", line);
    char *argv[32];
    int argc = split(buf, argv, 32);
    return kmsctl_args_parse(argc, argv, NOW, a);
}

static void test_parse_values(void **state)
{
    kmsctl_args a;
    assert_true(kms_is_ok(parse_line("kmsctl --url https://h:1 key create k1 --purpose=mac "
                                     "--rotation-period 30d --deletion-protection --json",
                                     &a)));
    assert_int_equal(a.verb->id, KMSCTL_VERB_KEY_CREATE);
    assert_int_equal(a.npos, 1);
    assert_string_equal(a.pos[0], "k1");
    assert_string_equal(a.opt[KMSCTL_OPT_URL].str, "https://h:1");
    assert_string_equal(a.opt[KMSCTL_OPT_PURPOSE].str, "mac");
    assert_int_equal(a.opt[KMSCTL_OPT_ROTATION_PERIOD].num, 30 * 86400);
    assert_true(a.opt[KMSCTL_OPT_DELETION_PROTECTION].set);
    assert_true(a.opt[KMSCTL_OPT_JSON].set);
    assert_false(a.opt[KMSCTL_OPT_WARNING_WINDOW].set);

    /* --key before the verb is the TLS key; after rotations, the filter. */
    assert_true(kms_is_ok(parse_line("kmsctl --key c.key rotations --key k1 --since 7d", &a)));
    assert_string_equal(a.opt[KMSCTL_OPT_KEY].str, "c.key");
    assert_string_equal(a.opt[KMSCTL_OPT_FILTER_KEY].str, "k1");
    assert_int_equal(a.opt[KMSCTL_OPT_SINCE].num, NOW - 7 * 86400);
    /* After any other verb, --key is still the TLS key. */
    assert_true(kms_is_ok(parse_line("kmsctl key show k1 --key c.key", &a)));
    assert_string_equal(a.opt[KMSCTL_OPT_KEY].str, "c.key");

    assert_true(kms_is_ok(parse_line("kmsctl key set-state k1 3 schedule-destroy "
                                     "--waiting-period 7d",
                                     &a)));
    assert_int_equal(a.npos, 3);
    assert_string_equal(a.pos[2], "schedule-destroy");

    /* "--" ends the options: a key name may then start with a dash (the
     * server refuses it, but the parser passes it on). */
    assert_true(kms_is_ok(parse_line("kmsctl key show -- --odd", &a)));
    assert_string_equal(a.pos[0], "--odd");

    /* help in all its forms needs no arguments. */
    assert_true(kms_is_ok(parse_line("kmsctl help key create", &a)));
    assert_true(a.opt[KMSCTL_OPT_HELP].set);
    assert_int_equal(a.verb->id, KMSCTL_VERB_KEY_CREATE);
    assert_true(kms_is_ok(parse_line("kmsctl key set-state -h", &a)));
    assert_true(a.opt[KMSCTL_OPT_HELP].set);
    assert_true(kms_is_ok(parse_line("kmsctl --help", &a)));
    assert_null(a.verb);
}

static void test_parse_refusals(void **state)
{
    static const char *const bad[] = {
        "kmsctl",                                        /* no verb */
        "kmsctl frob",                                   /* unknown verb */
        "kmsctl key",                                    /* group only */
        "kmsctl key frob k",                             /* unknown verb in group */
        "kmsctl key create",                             /* missing NAME */
        "kmsctl key create a b",                         /* extra argument */
        "kmsctl key set-state k 1",                      /* missing ACTION */
        "kmsctl key create k --purpose sign",            /* enum */
        "kmsctl key create k --purpose",                 /* missing value */
        "kmsctl key create k --rotation-period 5y",      /* duration */
        "kmsctl key create k --rotation-period=",        /* empty duration */
        "kmsctl key create k --deletion-protection=yes", /* flag with value */
        "kmsctl key create k --emergency",               /* another verb's option */
        "kmsctl key create k --json --json",             /* twice */
        "kmsctl key update k --deletion-protection --no-deletion-protection",
        "kmsctl key update k --min-decryption-version 0", /* uint >= 1 */
        "kmsctl key update k --min-decryption-version 4294967296",
        "kmsctl datakey k --bytes -1",
        "kmsctl verify k",     /* --mac required */
        "kmsctl wrap k --url", /* missing value */
        "kmsctl wrap k -x",    /* short options */
        "kmsctl rotations --since yesterday",
        "kmsctl health --timeout 0x",
        "kmsctl wrap k --in=", /* empty string */
    };
    for (size_t i = 0; i < KMS_ARRAY_LEN(bad); i++) {
        kmsctl_args a;
        kms_result r = parse_line(bad[i], &a);
        if (r.err != KMS_ERR_INVALID_ARGUMENT) {
            fail_msg("\"%s\" gave %d, expected invalid_argument", bad[i], r.err);
        }
        assert_true(strlen(kms_error_detail()) > 0); /* says what was wrong */
    }
    /* Usage errors exit 64 (docs/cli.md). */
    assert_int_equal(kms_error_exit_code(KMS_ERR_INVALID_ARGUMENT), 64);
}

/* docs/cli.md carries the generated reference verbatim between markers; a
 * change to the tables without regenerating the doc fails here. The
 * expected text is written to the build dir for copying. */
static void test_docs_in_step(void **state)
{
    const char *src = getenv("KMS_SOURCE_DIR");
    const char *bld = getenv("KMS_BUILD_DIR");
    assert_non_null(src);
    char *gen = NULL;
    size_t gen_len = 0;
    FILE *g = open_memstream(&gen, &gen_len);
    assert_non_null(g);
    kmsctl_help_markdown(g);
    assert_int_equal(fclose(g), 0);
    if (bld != NULL) {
        char out[1024];
        snprintf(out, sizeof(out), "%s/kmsctl-reference.md", bld);
        FILE *o = fopen(out, "w");
        if (o != NULL) {
            fwrite(gen, 1, gen_len, o);
            fclose(o);
        }
    }
    char path[1024];
    snprintf(path, sizeof(path), "%s/docs/cli.md", src);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char *doc = NULL;
    size_t cap = 0;
    ssize_t n = getdelim(&doc, &cap, '\0', f);
    fclose(f);
    assert_true(n > 0);
    static const char begin[] = "<!-- BEGIN GENERATED (kmsctl_args.c) -->\n";
    static const char end[] = "<!-- END GENERATED -->\n";
    char *b = strstr(doc, begin);
    assert_non_null(b);
    b += strlen(begin);
    char *e = strstr(b, end);
    assert_non_null(e);
    if ((size_t)(e - b) != gen_len || memcmp(b, gen, gen_len) != 0) {
        fail_msg("docs/cli.md is out of step with tools/kmsctl_args.c: copy "
                 "$KMS_BUILD_DIR/kmsctl-reference.md between its markers");
    }
    free(doc);
    free(gen);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_duration_valid),  cmocka_unit_test(test_duration_invalid),
        cmocka_unit_test(test_duration_format), cmocka_unit_test(test_time_parse),
        cmocka_unit_test(test_verb_table),      cmocka_unit_test(test_examples_parse),
        cmocka_unit_test(test_parse_values),    cmocka_unit_test(test_parse_refusals),
        cmocka_unit_test(test_docs_in_step),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
