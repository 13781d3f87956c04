/*
 * kmsctl's rotation-operations output (see kmsctl_report.h). Everything
 * printed comes from the server's JSON; missing fields print as "-".
 *
 * The HTML page is for auditors: one file, readable offline and printable,
 * with no script and no reference outside itself (inline CSS, inline SVG),
 * so that it can be attached to an audit and opened anywhere. Every text
 * that comes from the server (key names, identities, reasons) is escaped.
 */
#include "kmsctl_report.h"

#include "kms_error.h"
#include "kmsctl_out.h"

#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TXT_BYTES 256

/* ---- small readers ---- */

static int64_t num(const json_t *o, const char *field)
{
    const json_t *v = json_object_get(o, field);
    if (json_is_integer(v))
        return (int64_t)json_integer_value(v);
    if (json_is_real(v))
        return (int64_t)json_real_value(v);
    return 0;
}

static double real(const json_t *o, const char *field, bool *present)
{
    const json_t *v = json_object_get(o, field);
    *present = json_is_number(v);
    return json_number_value(v);
}

static const char *str(const json_t *o, const char *field)
{
    const char *s = json_string_value(json_object_get(o, field));
    return s != NULL ? s : "-";
}

/* Server text for a terminal: control characters replaced. */
static const char *safe(const char *s, char *buf, size_t n)
{
    snprintf(buf, n, "%s", s);
    for (char *p = buf; *p != '\0'; p++)
        *p = ((unsigned char)*p < 0x20 || *p == 0x7f) ? '?' : *p;
    return buf;
}

void kmsctl_duration_human(int64_t s, char *out, size_t n)
{
    if (s < 0) {
        snprintf(out, n, "-");
        return;
    }
    static const struct {
        int64_t secs;
        const char *unit;
    } units[] = {{86400, "d"}, {3600, "h"}, {60, "m"}, {1, "s"}};
    size_t used = 0;
    int parts = 0;
    out[0] = '\0';
    for (size_t i = 0; i < KMS_ARRAY_LEN(units) && parts < 2; i++) {
        int64_t q = s / units[i].secs;
        if (q == 0 && !(parts == 0 && units[i].secs == 1))
            continue;
        int w =
            snprintf(out + used, n - used, "%s%" PRId64 "%s", parts ? " " : "", q, units[i].unit);
        if (w < 0 || (size_t)w >= n - used)
            return;
        used += (size_t)w;
        s -= q * units[i].secs;
        parts++;
        if (s == 0)
            break;
    }
}

static void time_cell(const json_t *o, const char *field, char *buf, size_t n)
{
    const json_t *v = json_object_get(o, field);
    if (!json_is_integer(v)) {
        snprintf(buf, n, "-");
        return;
    }
    kmsctl_time_format((int64_t)json_integer_value(v), buf, n);
}

/* ---- tables ---- */

typedef KMS_RESULT (*row_fn)(const json_t *item, char cells[][TXT_BYTES]);

static KMS_RESULT table(const json_t *arr, const char *const *headers, size_t ncols, row_fn fn,
                        FILE *f)
{
    KMS_ENSURE(json_is_array(arr), KMS_ERR_JSON_INVALID);
    kmsctl_table *t = NULL;
    KMS_GUARD(kmsctl_table_new(headers, ncols, &t));
    size_t i;
    const json_t *item;
    kms_result r = KMS_OK_RESULT;
    json_array_foreach(arr, i, item)
    {
        char cells[KMSCTL_TABLE_MAX_COLS][TXT_BYTES];
        const char *ptrs[KMSCTL_TABLE_MAX_COLS];
        r = fn(item, cells);
        for (size_t c = 0; c < ncols; c++)
            ptrs[c] = cells[c];
        if (kms_is_ok(r))
            r = kmsctl_table_add(t, ptrs);
        if (!kms_is_ok(r))
            break;
    }
    if (kms_is_ok(r))
        kmsctl_table_print(t, f);
    kmsctl_table_free(t);
    return r;
}

static const char *status_word(const json_t *k)
{
    if (json_is_true(json_object_get(k, "overdue")))
        return "OVERDUE";
    if (json_is_true(json_object_get(k, "due_soon")))
        return "due soon";
    return "ok";
}

static KMS_RESULT status_row(const json_t *k, char c[][TXT_BYTES])
{
    safe(str(k, "name"), c[0], TXT_BYTES);
    snprintf(c[1], TXT_BYTES, "%" PRId64, num(k, "primary_version"));
    time_cell(k, "rotated_at", c[2], TXT_BYTES);
    time_cell(k, "due_at", c[3], TXT_BYTES);
    snprintf(c[4], TXT_BYTES, "%" PRId64, num(k, "days_until_due"));
    kmsctl_duration_human(num(k, "rotation_period"), c[5], TXT_BYTES);
    snprintf(c[6], TXT_BYTES, "%s", status_word(k));
    return KMS_OK_RESULT;
}

static const char *const status_headers[] = {"NAME", "PRIMARY", "LAST ROTATED", "DUE",
                                             "DAYS", "PERIOD",  "STATUS"};

static int status_cmp(const void *a, const void *b)
{
    int64_t x = num(*(json_t *const *)a, "seconds_until_due");
    int64_t y = num(*(json_t *const *)b, "seconds_until_due");
    return (x > y) - (x < y);
}

KMS_RESULT kmsctl_print_status(const json_t *doc, FILE *f)
{
    const json_t *keys = json_object_get(doc, "keys");
    KMS_ENSURE(json_is_array(keys), KMS_ERR_JSON_INVALID);
    /* For people: the most urgent first (overdue, then due soonest). */
    size_t n = json_array_size(keys);
    json_t **v = calloc(n ? n : 1, sizeof(*v));
    json_t *sorted = json_array();
    if (v == NULL || sorted == NULL) {
        free(v);
        json_decref(sorted);
        KMS_BAIL(KMS_ERR_NO_MEMORY);
    }
    for (size_t i = 0; i < n; i++)
        v[i] = json_array_get(keys, i);
    qsort(v, n, sizeof(*v), status_cmp);
    kms_result r = KMS_OK_RESULT;
    for (size_t i = 0; i < n && kms_is_ok(r); i++)
        if (json_array_append(sorted, v[i]) != 0)
            r = kms_error_raise(KMS_ERR_NO_MEMORY, __FILE__, __LINE__);
    free(v);
    if (kms_is_ok(r))
        r = table(sorted, status_headers, KMS_ARRAY_LEN(status_headers), status_row, f);
    json_decref(sorted);
    KMS_GUARD(r);
    const json_t *s = json_object_get(doc, "summary");
    fprintf(f, "\n%" PRId64 " keys: %" PRId64 " due soon, %" PRId64 " overdue\n", num(s, "keys"),
            num(s, "due_soon"), num(s, "overdue"));
    return KMS_OK_RESULT;
}

static KMS_RESULT usage_row(const json_t *u, char c[][TXT_BYTES])
{
    safe(str(u, "identity"), c[0], TXT_BYTES);
    safe(str(u, "operation"), c[1], TXT_BYTES);
    safe(str(u, "source"), c[2], TXT_BYTES);
    snprintf(c[3], TXT_BYTES, "%" PRId64, num(u, "count"));
    snprintf(c[4], TXT_BYTES, "%" PRId64, num(u, "items"));
    snprintf(c[5], TXT_BYTES, "%" PRId64, num(u, "failures"));
    time_cell(u, "first", c[6], TXT_BYTES);
    time_cell(u, "last", c[7], TXT_BYTES);
    return KMS_OK_RESULT;
}

KMS_RESULT kmsctl_print_usage(const json_t *usage, FILE *f)
{
    static const char *const h[] = {"IDENTITY", "OPERATION", "SOURCE", "REQUESTS",
                                    "ITEMS",    "FAILED",    "FIRST",  "LAST"};
    KMS_ENSURE(json_is_object(usage), KMS_ERR_JSON_INVALID);
    char from[TXT_BYTES], to[TXT_BYTES];
    time_cell(usage, "from", from, sizeof(from));
    time_cell(usage, "to", to, sizeof(to));
    const json_t *by = json_object_get(usage, "by");
    fprintf(f,
            "Uses of version %" PRId64 " from %s to %s: %" PRId64 " requests by %zu "
            "identity/operation/address combinations\n",
            num(usage, "version"), from, to, num(usage, "uses"), json_array_size(by));
    if (json_is_true(json_object_get(usage, "truncated")))
        fprintf(f, "(incomplete: the look-back held more audit records than one report reads; "
                   "use kmsctl audit for the rest)\n");
    if (json_array_size(by) == 0)
        return KMS_OK_RESULT;
    fputc('\n', f);
    return table(by, h, KMS_ARRAY_LEN(h), usage_row, f);
}

/* ---- the report as text ---- */

static KMS_RESULT emergency_row(const json_t *e, char c[][TXT_BYTES])
{
    safe(str(e, "key"), c[0], TXT_BYTES);
    snprintf(c[1], TXT_BYTES, "%" PRId64 " -> %" PRId64, num(e, "from_version"),
             num(e, "to_version"));
    time_cell(e, "started_at", c[2], TXT_BYTES);
    time_cell(e, "finished_at", c[3], TXT_BYTES);
    const json_t *d = json_object_get(e, "duration");
    if (json_is_integer(d))
        kmsctl_duration_human((int64_t)json_integer_value(d), c[4], TXT_BYTES);
    else
        snprintf(c[4], TXT_BYTES, "-");
    snprintf(c[5], TXT_BYTES, "%s",
             json_is_true(json_object_get(e, "within_objective")) ? "met" : "MISSED");
    safe(str(e, "initiator"), c[6], TXT_BYTES);
    safe(str(e, "reason"), c[7], TXT_BYTES);
    return KMS_OK_RESULT;
}

static KMS_RESULT oop_row(const json_t *o, char c[][TXT_BYTES])
{
    safe(str(o, "name"), c[0], TXT_BYTES);
    kmsctl_duration_human(num(o, "rotation_period"), c[1], TXT_BYTES);
    time_cell(o, "overdue_since", c[2], TXT_BYTES);
    kmsctl_duration_human(num(o, "overdue"), c[3], TXT_BYTES);
    snprintf(c[4], TXT_BYTES, "%s",
             json_is_true(json_object_get(o, "still_overdue")) ? "yes" : "no");
    return KMS_OK_RESULT;
}

static const char *const type_names[] = {"scheduled", "manual", "emergency", "rollback", "master"};

KMS_RESULT kmsctl_print_report(const json_t *doc, FILE *f)
{
    KMS_ENSURE(json_is_object(doc), KMS_ERR_JSON_INVALID);
    const json_t *rot = json_object_get(doc, "rotations");
    const json_t *em = json_object_get(doc, "emergency");
    const json_t *pol = json_object_get(doc, "policy");
    const json_t *due = json_object_get(doc, "due");
    const json_t *bs = json_object_get(rot, "by_status");
    const json_t *bt = json_object_get(rot, "by_type");
    const json_t *dur = json_object_get(rot, "duration");
    char a[TXT_BYTES], b[TXT_BYTES], c[TXT_BYTES];
    time_cell(doc, "from", a, sizeof(a));
    kmsctl_time_format(num(doc, "to") - 1, b, sizeof(b));
    time_cell(doc, "generated_at", c, sizeof(c));
    char month[32];
    fprintf(f, "Rotation report %s (%s to %s), generated %s\n\n",
            safe(str(doc, "month"), month, sizeof(month)), a, b, c);

    bool have;
    double rate = real(rot, "success_rate", &have);
    fprintf(f,
            "Rotations: %" PRId64 " (succeeded %" PRId64 ", failed %" PRId64
            ", rolled back %" PRId64 ", in progress %" PRId64 ")\n",
            num(rot, "total"), num(bs, "succeeded"), num(bs, "failed"), num(bs, "rolled_back"),
            num(bs, "started"));
    if (have)
        fprintf(f, "Success rate: %.1f%%\n", rate * 100.0);
    else
        fprintf(f, "Success rate: - (no finished rotation)\n");
    double mean = real(dur, "mean", &have);
    double median = real(dur, "median", &have);
    kmsctl_duration_human((int64_t)llround(mean), a, sizeof(a));
    kmsctl_duration_human((int64_t)llround(median), b, sizeof(b));
    kmsctl_duration_human(num(dur, "max"), c, sizeof(c));
    fprintf(f, "Duration: mean %s, median %s, longest %s (%" PRId64 " timed)\n", a, b, c,
            num(dur, "timed"));
    fprintf(f, "By type:");
    for (size_t i = 0; i < KMS_ARRAY_LEN(type_names); i++)
        fprintf(f, " %s %" PRId64 "%s", type_names[i], num(bt, type_names[i]),
                i + 1 < KMS_ARRAY_LEN(type_names) ? "," : "\n");

    kmsctl_duration_human(num(em, "objective"), a, sizeof(a));
    fprintf(f, "\nEmergency rotations: %" PRId64 ", within the %s objective: %" PRId64 "\n",
            num(em, "count"), a, num(em, "within_objective"));
    const json_t *ems = json_object_get(em, "rotations");
    if (json_array_size(ems) > 0) {
        static const char *const h[] = {"KEY",      "VERSIONS",  "STARTED",   "FINISHED",
                                        "DURATION", "OBJECTIVE", "INITIATOR", "REASON"};
        fputc('\n', f);
        KMS_GUARD(table(ems, h, KMS_ARRAY_LEN(h), emergency_row, f));
    }

    fprintf(f, "\nKeys rotated within their policy: %" PRId64 " of %" PRId64 "\n",
            num(pol, "within_policy"), num(pol, "keys"));
    const json_t *oop = json_object_get(pol, "out_of_policy");
    if (json_array_size(oop) > 0) {
        static const char *const h[] = {"KEY", "PERIOD", "OVERDUE SINCE", "OVERDUE FOR",
                                        "STILL OVERDUE"};
        fputc('\n', f);
        KMS_GUARD(table(oop, h, KMS_ARRAY_LEN(h), oop_row, f));
    }

    const json_t *dk = json_object_get(due, "keys");
    kmsctl_duration_human(num(due, "ahead"), a, sizeof(a));
    fprintf(f, "\nDue in the next %s: %zu (overdue now: %" PRId64 ")\n", a, json_array_size(dk),
            num(due, "overdue_now"));
    if (json_array_size(dk) > 0) {
        fputc('\n', f);
        KMS_GUARD(table(dk, status_headers, KMS_ARRAY_LEN(status_headers), status_row, f));
    }
    return KMS_OK_RESULT;
}

/* ---- the report as HTML ---- */

static void esc(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        switch (*s) {
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '&':
            fputs("&amp;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&#39;", f);
            break;
        default:
            if ((unsigned char)*s < 0x20 || *s == 0x7f)
                fputc('?', f);
            else
                fputc(*s, f);
            break;
        }
    }
}

static const char *const html_head =
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
    "style-src 'unsafe-inline'\">\n"
    "<title>";

static const char *const html_style =
    "</title>\n<style>\n"
    ":root{--ink:#1d2733;--muted:#5b6b7d;--line:#d9e0e8;--ok:#2e7d4f;--bad:#c0392b;"
    "--warn:#b7791f;--accent:#2f5d8a;--bg:#f6f8fa}\n"
    "*{box-sizing:border-box}\n"
    "body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;"
    "color:var(--ink);background:var(--bg)}\n"
    "main{max-width:1080px;margin:0 auto;padding:28px 24px 48px}\n"
    "header{border-bottom:3px solid var(--accent);padding-bottom:12px;margin-bottom:20px}\n"
    "h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}\n"
    ".sub{color:var(--muted)}\n"
    ".cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(128px,1fr));gap:12px}\n"
    ".card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px}\n"
    ".card .v{font-size:21px;font-weight:650;white-space:nowrap}.card "
    ".l{color:var(--muted);font-size:12px;"
    "text-transform:uppercase;letter-spacing:.04em}\n"
    ".ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}\n"
    ".charts{display:grid;grid-template-columns:2fr 1fr;gap:12px}\n"
    ".panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px}\n"
    ".panel h3{margin:0 0 8px;font-size:14px}\n"
    "svg{display:block;width:100%;height:auto}\n"
    "svg text{font:11px system-ui,sans-serif;fill:var(--muted)}\n"
    "table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line)}\n"
    "th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);"
    "vertical-align:top}\n"
    "th{background:#eef2f6;font-size:12px;text-transform:uppercase;letter-spacing:.03em}\n"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}\n"
    ".pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;"
    "font-weight:600;color:#fff}\n"
    ".pill.ok{background:var(--ok);color:#fff}.pill.bad{background:var(--bad);color:#fff}"
    ".pill.warn{background:var(--warn);color:#fff}\n"
    ".none{color:var(--muted);font-style:italic}\n"
    "footer{margin-top:32px;color:var(--muted);font-size:12px}\n"
    "@media print{body{background:#fff}.card,.panel{break-inside:avoid}}\n"
    "</style>\n</head>\n<body>\n<main>\n";

static const char *const type_colors[] = {"#2f5d8a", "#6c8ebf", "#c0392b", "#b7791f", "#6b4f9e"};

static void card(FILE *f, const char *value, const char *cls, const char *label)
{
    fprintf(f, "<div class=\"card\"><div class=\"v %s\">", cls);
    esc(f, value);
    fputs("</div><div class=\"l\">", f);
    esc(f, label);
    fputs("</div></div>\n", f);
}

/* Rotations per day: a bar per day, stacked by nothing (counts are small),
 * with a light grid and the day of the month under every fifth bar. */
static void chart_days(FILE *f, const json_t *per_day)
{
    size_t n = json_array_size(per_day);
    int64_t max = 1;
    for (size_t i = 0; i < n; i++) {
        int64_t v = (int64_t)json_integer_value(json_array_get(per_day, i));
        max = v > max ? v : max;
    }
    const int W = 640, H = 200, L = 34, B = 24, T = 10;
    double bw = n ? (double)(W - L - 6) / (double)n : 0;
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"Rotations per day\">\n", W, H);
    /* Whole-number grid lines: counts are integers. */
    int lines = max < 4 ? (int)max : 4;
    if (max % lines != 0 && max > 4)
        max += lines - max % lines;
    for (int g = 0; g <= lines; g++) {
        double y = T + (double)(H - T - B) * (1.0 - (double)g / lines);
        fprintf(f,
                "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e3e8ee\"/>"
                "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n",
                L, W - 4, y, y, L - 6, y + 4, (double)max * g / lines);
    }
    for (size_t i = 0; i < n; i++) {
        int64_t v = (int64_t)json_integer_value(json_array_get(per_day, i));
        double h = (double)(H - T - B) * (double)v / (double)max;
        double x = L + bw * (double)i + 1;
        if (v > 0)
            fprintf(f,
                    "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" rx=\"2\" "
                    "fill=\"#2f5d8a\"><title>day %zu: %" PRId64 "</title></rect>\n",
                    x, (double)(H - B) - h, bw > 3 ? bw - 2 : bw, h, i + 1, v);
        if (i == 0 || (i + 1) % 5 == 0)
            fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%zu</text>\n", x + bw / 2,
                    H - 8, i + 1);
    }
    fputs("</svg>\n", f);
}

/* Rotations by type: a donut with a legend. */
static void chart_types(FILE *f, const json_t *by_type)
{
    int64_t total = 0;
    for (size_t i = 0; i < KMS_ARRAY_LEN(type_names); i++)
        total += num(by_type, type_names[i]);
    fputs("<svg viewBox=\"0 0 300 200\" role=\"img\" aria-label=\"Rotations by type\">\n", f);
    const double cx = 90, cy = 100, r = 62, sw = 26, circ = 2 * M_PI * r;
    fprintf(f,
            "<circle cx=\"%.0f\" cy=\"%.0f\" r=\"%.0f\" fill=\"none\" stroke=\"#e3e8ee\" "
            "stroke-width=\"%.0f\"/>\n",
            cx, cy, r, sw);
    double off = 0;
    for (size_t i = 0; i < KMS_ARRAY_LEN(type_names) && total > 0; i++) {
        int64_t v = num(by_type, type_names[i]);
        if (v == 0)
            continue;
        double len = circ * (double)v / (double)total;
        fprintf(f,
                "<circle cx=\"%.0f\" cy=\"%.0f\" r=\"%.0f\" fill=\"none\" stroke=\"%s\" "
                "stroke-width=\"%.0f\" stroke-dasharray=\"%.2f %.2f\" "
                "stroke-dashoffset=\"%.2f\" transform=\"rotate(-90 %.0f %.0f)\">"
                "<title>%s: %" PRId64 "</title></circle>\n",
                cx, cy, r, type_colors[i], sw, len, circ - len, -off, cx, cy, type_names[i], v);
        off += len;
    }
    fprintf(f,
            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\" "
            "style=\"font-size:22px;font-weight:650;fill:#1d2733\">%" PRId64 "</text>\n"
            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">rotations</text>\n",
            cx, cy + 4, total, cx, cy + 20);
    for (size_t i = 0; i < KMS_ARRAY_LEN(type_names); i++) {
        double y = 42 + 26.0 * (double)i;
        fprintf(f,
                "<rect x=\"180\" y=\"%.0f\" width=\"12\" height=\"12\" rx=\"2\" fill=\"%s\"/>"
                "<text x=\"198\" y=\"%.0f\" style=\"fill:#1d2733\">%s %" PRId64 "</text>\n",
                y, type_colors[i], y + 10, type_names[i], num(by_type, type_names[i]));
    }
    fputs("</svg>\n", f);
}

/* One bar per emergency rotation against the objective line. */
static void chart_emergencies(FILE *f, const json_t *ems, int64_t objective)
{
    size_t n = json_array_size(ems);
    if (n > 20)
        n = 20; /* the table below lists them all */
    int64_t max = objective;
    for (size_t i = 0; i < n; i++) {
        int64_t d = num(json_array_get(ems, i), "duration");
        max = d > max ? d : max;
    }
    max += max / 8;
    const int W = 640, L = 150, R = 70, row = 26, T = 18;
    int H = T + (int)n * row + 10;
    fprintf(f,
            "<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"Emergency rotation "
            "durations against the objective\">\n",
            W, H);
    double scale = (double)(W - L - R) / (double)max;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(ems, i);
        const json_t *dj = json_object_get(e, "duration");
        int64_t d = json_is_integer(dj) ? (int64_t)json_integer_value(dj) : -1;
        bool met = json_is_true(json_object_get(e, "within_objective"));
        double y = T + (double)i * row;
        char label[TXT_BYTES], dtxt[64];
        snprintf(label, sizeof(label), "%s v%" PRId64, str(e, "key"), num(e, "from_version"));
        kmsctl_duration_human(d, dtxt, sizeof(dtxt));
        fprintf(f, "<text x=\"%d\" y=\"%.0f\" text-anchor=\"end\" style=\"fill:#1d2733\">", L - 8,
                y + 14);
        esc(f, label);
        fputs("</text>\n", f);
        double w = d > 0 ? (double)d * scale : 2;
        fprintf(f,
                "<rect x=\"%d\" y=\"%.0f\" width=\"%.1f\" height=\"18\" rx=\"3\" fill=\"%s\"/>"
                "<text x=\"%.1f\" y=\"%.0f\">%s</text>\n",
                L, y + 1, w, met ? "#2e7d4f" : "#c0392b", L + w + 6, y + 14,
                d >= 0 ? dtxt : "unfinished");
    }
    double ox = L + (double)objective * scale;
    char otxt[64];
    kmsctl_duration_human(objective, otxt, sizeof(otxt));
    fprintf(f,
            "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"12\" y2=\"%d\" stroke=\"#c0392b\" "
            "stroke-dasharray=\"5 4\"/><text x=\"%.1f\" y=\"10\" text-anchor=\"middle\" "
            "style=\"fill:#c0392b\">objective %s</text>\n</svg>\n",
            ox, ox, H - 4, ox, otxt);
}

/* Keys within policy: a single proportion bar. */
static void chart_policy(FILE *f, int64_t within, int64_t keys)
{
    double frac = keys > 0 ? (double)within / (double)keys : 1.0;
    fputs("<svg viewBox=\"0 0 640 44\" role=\"img\" aria-label=\"Keys within policy\">\n", f);
    fprintf(f,
            "<rect x=\"0\" y=\"4\" width=\"640\" height=\"16\" rx=\"4\" fill=\"%s\"/>"
            "<rect x=\"0\" y=\"4\" width=\"%.1f\" height=\"16\" rx=\"4\" fill=\"#2e7d4f\"/>"
            "<text x=\"0\" y=\"38\">%" PRId64 " within policy (%.0f%%)</text>"
            "<text x=\"640\" y=\"38\" text-anchor=\"end\">%" PRId64 " not</text>\n</svg>\n",
            keys > within ? "#c0392b" : "#2e7d4f", 640.0 * frac, within, frac * 100.0,
            keys - within);
}

static void td_text(FILE *f, const char *s)
{
    fputs("<td>", f);
    esc(f, s);
    fputs("</td>", f);
}

static void td_time(FILE *f, const json_t *o, const char *field)
{
    char b[TXT_BYTES];
    time_cell(o, field, b, sizeof(b));
    td_text(f, b);
}

static void td_dur(FILE *f, int64_t s)
{
    char b[TXT_BYTES];
    kmsctl_duration_human(s, b, sizeof(b));
    fputs("<td class=\"n\">", f);
    esc(f, b);
    fputs("</td>", f);
}

KMS_RESULT kmsctl_report_html(const json_t *doc, FILE *f)
{
    KMS_ENSURE(json_is_object(doc), KMS_ERR_JSON_INVALID);
    const json_t *rot = json_object_get(doc, "rotations");
    const json_t *em = json_object_get(doc, "emergency");
    const json_t *pol = json_object_get(doc, "policy");
    const json_t *due = json_object_get(doc, "due");
    const json_t *bs = json_object_get(rot, "by_status");
    const json_t *dur = json_object_get(rot, "duration");
    const char *month = str(doc, "month");
    char a[TXT_BYTES], b[TXT_BYTES];

    fputs(html_head, f);
    fputs("kmsd rotation report ", f);
    esc(f, month);
    fputs(html_style, f);
    fputs("<header><h1>Key rotation report &mdash; ", f);
    esc(f, month);
    time_cell(doc, "from", a, sizeof(a));
    kmsctl_time_format(num(doc, "to") - 1, b, sizeof(b));
    fputs("</h1><div class=\"sub\">Period ", f);
    esc(f, a);
    fputs(" to ", f);
    esc(f, b);
    time_cell(doc, "generated_at", a, sizeof(a));
    fputs(" (UTC) &middot; generated ", f);
    esc(f, a);
    fputs("</div></header>\n", f);

    /* Headline figures. */
    fputs("<section class=\"cards\">\n", f);
    snprintf(a, sizeof(a), "%" PRId64, num(rot, "total"));
    card(f, a, "", "rotations");
    bool have;
    double rate = real(rot, "success_rate", &have);
    if (have)
        snprintf(a, sizeof(a), "%.1f%%", rate * 100.0);
    else
        snprintf(a, sizeof(a), "-");
    card(f, a, !have ? "" : rate >= 0.99 ? "ok" : rate >= 0.9 ? "warn" : "bad", "success rate");
    double mean = real(dur, "mean", &have);
    double median = real(dur, "median", &have);
    kmsctl_duration_human((int64_t)llround(mean), a, sizeof(a));
    kmsctl_duration_human((int64_t)llround(median), b, sizeof(b));
    card(f, a, "", "mean duration");
    card(f, b, "", "median duration");
    int64_t ecount = num(em, "count"), emet = num(em, "within_objective");
    kmsctl_duration_human(num(em, "objective"), b, sizeof(b));
    snprintf(a, sizeof(a), "%" PRId64 " of %" PRId64, emet, ecount);
    char el[TXT_BYTES + 64];
    snprintf(el, sizeof(el), "emergencies within %s", b);
    card(f, a, ecount == emet ? "ok" : "bad", el);
    int64_t keys = num(pol, "keys"), within = num(pol, "within_policy");
    snprintf(a, sizeof(a), "%" PRId64 " of %" PRId64, within, keys);
    card(f, a, keys == within ? "ok" : "bad", "keys within rotation policy");
    snprintf(a, sizeof(a), "%zu", json_array_size(json_object_get(due, "keys")));
    card(f, a, num(due, "overdue_now") > 0 ? "bad" : "", "due in the next 30 days");
    fputs("</section>\n", f);

    /* Charts. */
    fputs("<h2>Rotations</h2>\n<div class=\"charts\">\n<div class=\"panel\"><h3>Per day</h3>\n", f);
    chart_days(f, json_object_get(rot, "per_day"));
    fputs("</div>\n<div class=\"panel\"><h3>By type</h3>\n", f);
    chart_types(f, json_object_get(rot, "by_type"));
    fputs("</div>\n</div>\n", f);
    fprintf(f,
            "<p class=\"sub\">Succeeded %" PRId64 ", failed %" PRId64 ", rolled back %" PRId64
            ", in progress %" PRId64 ". A rotation later rolled back counts against the success "
            "rate. Longest: ",
            num(bs, "succeeded"), num(bs, "failed"), num(bs, "rolled_back"), num(bs, "started"));
    kmsctl_duration_human(num(dur, "max"), a, sizeof(a));
    esc(f, a);
    fputs(".</p>\n", f);

    /* Emergencies. */
    const json_t *ems = json_object_get(em, "rotations");
    kmsctl_duration_human(num(em, "objective"), b, sizeof(b));
    fputs("<h2>Emergency rotations against the ", f);
    esc(f, b);
    fputs(" objective</h2>\n", f);
    if (json_array_size(ems) == 0) {
        fputs("<p class=\"none\">No emergency rotation in this period.</p>\n", f);
    } else {
        fputs("<div class=\"panel\">\n", f);
        chart_emergencies(f, ems, num(em, "objective"));
        fputs("</div>\n<table><tr><th>Key</th><th>Versions</th><th>Started</th>"
              "<th>Finished</th><th>Duration</th><th>Objective</th><th>Initiator</th>"
              "<th>Reason</th></tr>\n",
              f);
        size_t i;
        const json_t *e;
        json_array_foreach(ems, i, e)
        {
            fputs("<tr>", f);
            td_text(f, str(e, "key"));
            snprintf(a, sizeof(a), "%" PRId64 " &rarr; %" PRId64, num(e, "from_version"),
                     num(e, "to_version"));
            fprintf(f, "<td>%s</td>", a); /* digits and an entity only */
            td_time(f, e, "started_at");
            td_time(f, e, "finished_at");
            const json_t *d = json_object_get(e, "duration");
            td_dur(f, json_is_integer(d) ? (int64_t)json_integer_value(d) : -1);
            bool met = json_is_true(json_object_get(e, "within_objective"));
            fprintf(f, "<td><span class=\"pill %s\">%s</span></td>", met ? "ok" : "bad",
                    met ? "met" : "missed");
            td_text(f, str(e, "initiator"));
            td_text(f, str(e, "reason"));
            fputs("</tr>\n", f);
        }
        fputs("</table>\n", f);
    }

    /* Policy. */
    fputs("<h2>Keys rotated within their policy</h2>\n<div class=\"panel\">\n", f);
    chart_policy(f, within, keys);
    fputs("</div>\n", f);
    const json_t *oop = json_object_get(pol, "out_of_policy");
    if (json_array_size(oop) == 0) {
        fputs("<p class=\"none\">Every key was rotated within its rotation period.</p>\n", f);
    } else {
        fputs("<table><tr><th>Key</th><th>Rotation period</th><th>Overdue since</th>"
              "<th>Overdue for</th><th>Still overdue</th></tr>\n",
              f);
        size_t i;
        const json_t *o;
        json_array_foreach(oop, i, o)
        {
            fputs("<tr>", f);
            td_text(f, str(o, "name"));
            td_dur(f, num(o, "rotation_period"));
            td_time(f, o, "overdue_since");
            td_dur(f, num(o, "overdue"));
            bool still = json_is_true(json_object_get(o, "still_overdue"));
            fprintf(f, "<td><span class=\"pill %s\">%s</span></td></tr>\n", still ? "bad" : "warn",
                    still ? "yes" : "no");
        }
        fputs("</table>\n", f);
    }

    /* Due next. */
    const json_t *dk = json_object_get(due, "keys");
    fputs("<h2>Rotations due in the next 30 days</h2>\n", f);
    if (json_array_size(dk) == 0) {
        fputs("<p class=\"none\">None.</p>\n", f);
    } else {
        fputs("<table><tr><th>Key</th><th>Primary</th><th>Last rotated</th><th>Due</th>"
              "<th>Days</th><th>Status</th></tr>\n",
              f);
        size_t i;
        const json_t *k;
        json_array_foreach(dk, i, k)
        {
            fputs("<tr>", f);
            td_text(f, str(k, "name"));
            fprintf(f, "<td class=\"n\">%" PRId64 "</td>", num(k, "primary_version"));
            td_time(f, k, "rotated_at");
            td_time(f, k, "due_at");
            fprintf(f, "<td class=\"n\">%" PRId64 "</td>", num(k, "days_until_due"));
            const char *w = status_word(k);
            fprintf(f, "<td><span class=\"pill %s\">%s</span></td></tr>\n",
                    w[0] == 'O'   ? "bad"
                    : w[0] == 'd' ? "warn"
                                  : "ok",
                    w);
        }
        fputs("</table>\n", f);
    }
    fputs("<footer>Produced by kmsctl report from kmsd's rotation records. Durations are from "
          "each rotation record's start to its finish. A key is within policy when it was never "
          "past its rotation period during the period.</footer>\n</main>\n</body>\n</html>\n",
          f);
    KMS_ENSURE(!ferror(f), KMS_ERR_IO);
    return KMS_OK_RESULT;
}
