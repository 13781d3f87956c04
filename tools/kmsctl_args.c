/*
 * kmsctl's verb and option tables and everything generated from them:
 * parsing, per-verb man-style help, and the reference section of
 * docs/cli.md. One source, so help, docs and behaviour cannot drift apart
 * (tests/unit/kmsctl_args_test.c checks docs/cli.md against this file).
 */
#define _GNU_SOURCE
#include "kmsctl_args.h"

#include "kms_error.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>
#include <time.h>

#define B(id) KMSCTL_BIT(KMSCTL_OPT_##id)

static const kmsctl_option options[KMSCTL_OPT_COUNT] = {
    [KMSCTL_OPT_URL] = {KMSCTL_OPT_URL, "url", "URL", KMSCTL_KIND_STRING,
                        "Base URL of kmsd, https only (default https://127.0.0.1:8443; env "
                        "KMSCTL_URL; config key url)."},
    [KMSCTL_OPT_CERT] = {KMSCTL_OPT_CERT, "cert", "FILE", KMSCTL_KIND_STRING,
                         "Client certificate, PEM (env KMSCTL_CERT; config key cert)."},
    [KMSCTL_OPT_KEY] = {KMSCTL_OPT_KEY, "key", "FILE", KMSCTL_KIND_STRING,
                        "Private key of the client certificate, PEM (env KMSCTL_KEY; config key "
                        "key). After the rotations verb, --key is that verb's key-name filter: "
                        "give the file before the verb or through env/config."},
    [KMSCTL_OPT_CACERT] = {KMSCTL_OPT_CACERT, "cacert", "FILE", KMSCTL_KIND_STRING,
                           "CA certificate(s) that sign kmsd's server certificate, PEM (env "
                           "KMSCTL_CACERT; config key cacert)."},
    [KMSCTL_OPT_CONFIG] = {KMSCTL_OPT_CONFIG, "config", "FILE", KMSCTL_KIND_STRING,
                           "Read \"key = value\" settings (url, cert, key, cacert, timeout) from "
                           "FILE instead of $XDG_CONFIG_HOME/kmsctl.conf or "
                           "~/.config/kmsctl.conf."},
    [KMSCTL_OPT_TIMEOUT] = {KMSCTL_OPT_TIMEOUT, "timeout", "DURATION", KMSCTL_KIND_DURATION,
                            "Give up on a request after DURATION (default 30s; config key "
                            "timeout)."},
    [KMSCTL_OPT_JSON] = {KMSCTL_OPT_JSON, "json", NULL, KMSCTL_KIND_FLAG,
                         "Print the server's JSON response instead of text for people."},
    [KMSCTL_OPT_HELP] = {KMSCTL_OPT_HELP, "help", NULL, KMSCTL_KIND_FLAG,
                         "Show the help of the verb (or the list of verbs) and exit."},

    [KMSCTL_OPT_PURPOSE] = {KMSCTL_OPT_PURPOSE, "purpose", "encrypt|mac", KMSCTL_KIND_ENUM,
                            "encrypt: AES-256-GCM (wrap, unwrap, encrypt, decrypt, datakey, "
                            "rewrap); mac: HMAC-SHA-256 (mac, verify). Default encrypt."},
    [KMSCTL_OPT_ROTATION_PERIOD] = {KMSCTL_OPT_ROTATION_PERIOD, "rotation-period", "DURATION",
                                    KMSCTL_KIND_DURATION,
                                    "Rotate automatically this long after the last rotation "
                                    "(server default 90d)."},
    [KMSCTL_OPT_WARNING_WINDOW] = {KMSCTL_OPT_WARNING_WINDOW, "warning-window", "DURATION",
                                   KMSCTL_KIND_DURATION,
                                   "Report the key as due this long before its rotation "
                                   "(server default 7d)."},
    [KMSCTL_OPT_DELETION_PROTECTION] = {KMSCTL_OPT_DELETION_PROTECTION, "deletion-protection", NULL,
                                        KMSCTL_KIND_FLAG,
                                        "Refuse destruction of the key's versions until the "
                                        "guard is lifted."},
    [KMSCTL_OPT_NO_DELETION_PROTECTION] = {KMSCTL_OPT_NO_DELETION_PROTECTION,
                                           "no-deletion-protection", NULL, KMSCTL_KIND_FLAG,
                                           "Lift the deletion guard."},
    [KMSCTL_OPT_MIN_DECRYPTION_VERSION] = {KMSCTL_OPT_MIN_DECRYPTION_VERSION,
                                           "min-decryption-version", "N", KMSCTL_KIND_UINT,
                                           "Refuse to decrypt under versions below N."},
    [KMSCTL_OPT_EMERGENCY] = {KMSCTL_OPT_EMERGENCY, "emergency", NULL, KMSCTL_KIND_FLAG,
                              "Emergency rotation: the old primary is marked compromised in the "
                              "same step."},
    [KMSCTL_OPT_REASON] = {KMSCTL_OPT_REASON, "reason", "TEXT", KMSCTL_KIND_STRING,
                           "Why; kept in the rotation record and the audit log (at most 512 "
                           "bytes)."},
    [KMSCTL_OPT_GRACE_PERIOD] = {KMSCTL_OPT_GRACE_PERIOD, "grace-period", "DURATION",
                                 KMSCTL_KIND_DURATION,
                                 "deprecate: how long the version still decrypts (server "
                                 "default)."},
    [KMSCTL_OPT_WAITING_PERIOD] = {KMSCTL_OPT_WAITING_PERIOD, "waiting-period", "DURATION",
                                   KMSCTL_KIND_DURATION,
                                   "schedule_destroy: how long before the version's secret is "
                                   "erased (server default)."},
    [KMSCTL_OPT_FILTER_KEY] =
        {KMSCTL_OPT_FILTER_KEY, "key", "NAME", KMSCTL_KIND_STRING,
         "Only rotations of key NAME. Here --key shadows the global --key: give the "
         "client key file before the verb or through KMSCTL_KEY."},
    [KMSCTL_OPT_TYPE] =
        {KMSCTL_OPT_TYPE, "type", "TYPE", KMSCTL_KIND_STRING,
         "Only rotations of TYPE (scheduled, manual, emergency, rollback, master)."},
    [KMSCTL_OPT_STATUS] = {KMSCTL_OPT_STATUS, "status", "STATUS", KMSCTL_KIND_STRING,
                           "Only rotations in STATUS (started, succeeded, failed, "
                           "rolled_back)."},
    [KMSCTL_OPT_SINCE] = {KMSCTL_OPT_SINCE, "since", "TIME", KMSCTL_KIND_TIME,
                          "Only rotations started at or after TIME: Unix seconds, YYYY-MM-DD or "
                          "YYYY-MM-DDTHH:MM:SSZ (UTC), or a duration ago (7d)."},
    [KMSCTL_OPT_UNTIL] = {KMSCTL_OPT_UNTIL, "until", "TIME", KMSCTL_KIND_TIME,
                          "Only rotations started before TIME (as --since)."},
    [KMSCTL_OPT_LIMIT] = {KMSCTL_OPT_LIMIT, "limit", "N", KMSCTL_KIND_UINT,
                          "At most N entries (key list: page size; all pages are fetched)."},
    [KMSCTL_OPT_REPAIR] = {KMSCTL_OPT_REPAIR, "repair", NULL, KMSCTL_KIND_FLAG,
                           "Also repair what can be repaired safely."},
    [KMSCTL_OPT_IN] = {KMSCTL_OPT_IN, "in", "@FILE|-|TEXT", KMSCTL_KIND_STRING,
                       "Input value: @FILE reads the file, - reads stdin (the default). A "
                       "literal TEXT is accepted only for values that are not secret "
                       "(ciphertexts, MAC messages), never for plaintext."},
    [KMSCTL_OPT_CONTEXT] = {KMSCTL_OPT_CONTEXT, "context", "TEXT|@FILE", KMSCTL_KIND_STRING,
                            "Encryption context (additional authenticated data): the same bytes "
                            "must be given to decrypt."},
    [KMSCTL_OPT_OUT] = {KMSCTL_OPT_OUT, "out", "FILE", KMSCTL_KIND_STRING,
                        "Write the result to FILE instead of stdout; a file that receives "
                        "plaintext is created (or reset to) mode 0600."},
    [KMSCTL_OPT_BASE64] = {KMSCTL_OPT_BASE64, "base64", NULL, KMSCTL_KIND_FLAG,
                           "Write plaintext as base64 text instead of raw bytes."},
    [KMSCTL_OPT_BYTES] = {KMSCTL_OPT_BYTES, "bytes", "N", KMSCTL_KIND_UINT,
                          "Length of the data key in bytes (16..64, default 32)."},
    [KMSCTL_OPT_PLAINTEXT] = {KMSCTL_OPT_PLAINTEXT, "plaintext", NULL, KMSCTL_KIND_FLAG,
                              "Also return the plaintext data key; it is written to --out FILE "
                              "(required, mode 0600), the ciphertext to stdout."},
    [KMSCTL_OPT_MAC] = {KMSCTL_OPT_MAC, "mac", "TOKEN|@FILE", KMSCTL_KIND_STRING,
                        "The MAC token (kms1:...) to verify."},
    [KMSCTL_OPT_DUE_WITHIN] = {KMSCTL_OPT_DUE_WITHIN, "due-within", "DURATION",
                               KMSCTL_KIND_DURATION,
                               "Only keys due for rotation within DURATION (overdue keys "
                               "included), e.g. 7d."},
    [KMSCTL_OPT_OVERDUE] = {KMSCTL_OPT_OVERDUE, "overdue", NULL, KMSCTL_KIND_FLAG,
                            "Only keys past their rotation period."},
    [KMSCTL_OPT_LOOKBACK] = {KMSCTL_OPT_LOOKBACK, "lookback", "DURATION", KMSCTL_KIND_DURATION,
                             "--emergency: how far back the usage report of the compromised "
                             "version reads the audit log (default 7d, at most 400d)."},
    [KMSCTL_OPT_MONTH] = {KMSCTL_OPT_MONTH, "month", "YYYY-MM", KMSCTL_KIND_STRING,
                          "The calendar month (UTC) to report on."},
    [KMSCTL_OPT_HTML] = {KMSCTL_OPT_HTML, "html", "FILE", KMSCTL_KIND_STRING,
                         "Also write the report as one self-contained HTML page (inline CSS "
                         "and SVG charts, no script, nothing fetched) to FILE."},
    [KMSCTL_OPT_FROM] = {KMSCTL_OPT_FROM, "from", "TIME", KMSCTL_KIND_TIME,
                         "Records at or after TIME: Unix seconds, YYYY-MM-DD or "
                         "YYYY-MM-DDTHH:MM:SSZ (UTC), or a duration ago (7d)."},
    [KMSCTL_OPT_TO] = {KMSCTL_OPT_TO, "to", "TIME", KMSCTL_KIND_TIME,
                       "Records at or before TIME (as --from)."},
    [KMSCTL_OPT_IDENTITY] = {KMSCTL_OPT_IDENTITY, "identity", "ID", KMSCTL_KIND_STRING,
                             "Only records of client identity ID (exact)."},
    [KMSCTL_OPT_OPERATION] = {KMSCTL_OPT_OPERATION, "operation", "OP", KMSCTL_KIND_STRING,
                              "Only records of operation OP (wrap, batch.unwrap, key.rotate, "
                              "...; docs/audit.md lists them)."},
    [KMSCTL_OPT_AFTER] = {KMSCTL_OPT_AFTER, "after", "SEQ", KMSCTL_KIND_UINT,
                          "Only records with a sequence number above SEQ (paging)."},
    [KMSCTL_OPT_AUDIT_KEY] =
        {KMSCTL_OPT_AUDIT_KEY, "key", "NAME", KMSCTL_KIND_STRING,
         "Only records about key NAME. Here --key shadows the global --key: give the "
         "client key file before the verb or through KMSCTL_KEY."},
    [KMSCTL_OPT_OUT_DIR] = {KMSCTL_OPT_OUT_DIR, "out", "DIR", KMSCTL_KIND_STRING,
                            "Directory to write the export into; created (mode 0700), or "
                            "must be empty."},
    [KMSCTL_OPT_PUBLIC_KEY] = {KMSCTL_OPT_PUBLIC_KEY, "public-key", "FILE", KMSCTL_KIND_STRING,
                               "The audit signing public key (PEM) obtained out of band; the "
                               "export must be signed by it."},
};

#define DATA_IN_OUT (B(IN) | B(CONTEXT) | B(OUT))

static const kmsctl_verb verbs[KMSCTL_VERB_COUNT] = {
    [KMSCTL_VERB_KEY_CREATE] =
        {KMSCTL_VERB_KEY_CREATE,
         "key create",
         {"NAME"},
         B(PURPOSE) | B(ROTATION_PERIOD) | B(WARNING_WINDOW) | B(DELETION_PROTECTION),
         0,
         "create a named key with its first version",
         "Creates key NAME (matching [a-z0-9][a-z0-9._-]{0,127}) and its version 1, generated "
         "inside the HSM, and prints the key. Requires the admin role.",
         NULL,
         "kmsctl key create billing-dek\n"
         "kmsctl key create webhook-secret --purpose mac --rotation-period 30d"},
    [KMSCTL_VERB_KEY_LIST] = {KMSCTL_VERB_KEY_LIST,
                              "key list",
                              {NULL},
                              B(LIMIT),
                              0,
                              "list keys",
                              "Lists every key the client may see, one line each, fetching all "
                              "pages. admin and auditor see all keys; app and migrator see the "
                              "keys their policy allows.",
                              NULL,
                              "kmsctl key list\nkmsctl key list --json"},
    [KMSCTL_VERB_KEY_SHOW] = {KMSCTL_VERB_KEY_SHOW,
                              "key show",
                              {"NAME"},
                              0,
                              0,
                              "show a key and its versions",
                              "Prints the key's settings and a table of its versions: state, "
                              "dates, encryption count, requests in the last 30 days (USES "
                              "30D, from the audit log: when it is 0, nothing has tried the "
                              "version for a month) and the master version that wraps each.",
                              NULL,
                              "kmsctl key show billing-dek"},
    [KMSCTL_VERB_KEY_UPDATE] =
        {KMSCTL_VERB_KEY_UPDATE,
         "key update",
         {"NAME"},
         B(ROTATION_PERIOD) | B(WARNING_WINDOW) | B(MIN_DECRYPTION_VERSION) |
             B(DELETION_PROTECTION) | B(NO_DELETION_PROTECTION),
         0,
         "change a key's rotation policy, minimum decryption version or guard",
         "Changes only the settings given (at least one). Requires the admin role.",
         NULL,
         "kmsctl key update billing-dek --rotation-period 30d\n"
         "kmsctl key update billing-dek --min-decryption-version 3"},
    [KMSCTL_VERB_KEY_ROTATE] =
        {KMSCTL_VERB_KEY_ROTATE,
         "key rotate",
         {"NAME"},
         B(EMERGENCY) | B(REASON) | B(LOOKBACK),
         0,
         "make a new primary version",
         "Generates a new version in the HSM and makes it primary; older versions keep "
         "decrypting. With --emergency the previous primary is marked compromised: "
         "applications can no longer read it, only the migrator role can rewrap it; and the "
         "answer carries a usage report of the compromised version from the audit log over "
         "--lookback (default 7 days): which identities used it, for which operations, how "
         "many times, first and last use, from which addresses. The rotation record's start "
         "and finish measure the time to contain.",
         NULL,
         "kmsctl key rotate billing-dek --reason \"quarterly\"\n"
         "kmsctl key rotate billing-dek --emergency --reason \"INC-1234 key exposure\"\n"
         "kmsctl key rotate billing-dek --emergency --reason INC-1234 --lookback 30d --json"},
    [KMSCTL_VERB_KEY_ROLLBACK] = {KMSCTL_VERB_KEY_ROLLBACK,
                                  "key rollback",
                                  {"NAME"},
                                  B(REASON),
                                  0,
                                  "make the previous version primary again",
                                  "Undoes a rotation that proved bad: the previous version "
                                  "becomes primary, the newer one stays decryptable.",
                                  NULL,
                                  "kmsctl key rollback billing-dek --reason \"bad rollout\""},
    [KMSCTL_VERB_KEY_SET_STATE] =
        {KMSCTL_VERB_KEY_SET_STATE,
         "key set-state",
         {"NAME", "VERSION", "ACTION"},
         B(GRACE_PERIOD) | B(WAITING_PERIOD) | B(REASON),
         0,
         "change the state of a key version",
         "ACTION is one of deprecate, compromise, disable, enable, schedule_destroy, "
         "cancel_destroy (hyphens may be used instead of underscores). deprecate takes "
         "--grace-period, schedule_destroy takes --waiting-period. Prints the version.",
         NULL,
         "kmsctl key set-state billing-dek 1 deprecate --grace-period 30d\n"
         "kmsctl key set-state billing-dek 1 schedule-destroy --waiting-period 7d"},
    [KMSCTL_VERB_MASTER_ROTATE] = {KMSCTL_VERB_MASTER_ROTATE,
                                   "master rotate",
                                   {NULL},
                                   B(REASON),
                                   0,
                                   "rotate the HSM master key",
                                   "Creates a new master key version in the HSM and rewraps "
                                   "every key version under it inside the HSM. Application "
                                   "ciphertexts are not touched.",
                                   NULL,
                                   "kmsctl master rotate --reason \"annual\""},
    [KMSCTL_VERB_MASTER_SHOW] = {KMSCTL_VERB_MASTER_SHOW,
                                 "master show",
                                 {NULL},
                                 0,
                                 0,
                                 "list master key versions",
                                 "Lists the master key versions, which one is current, and how "
                                 "many key versions each wraps.",
                                 NULL,
                                 "kmsctl master show"},
    [KMSCTL_VERB_ROTATIONS] = {KMSCTL_VERB_ROTATIONS,
                               "rotations",
                               {NULL},
                               B(FILTER_KEY) | B(TYPE) | B(STATUS) | B(SINCE) | B(UNTIL) | B(LIMIT),
                               0,
                               "list rotation records",
                               "Lists rotation records (in the order kmsd returns them), "
                               "filtered by key, type, status and start time. Requires "
                               "the admin or auditor role.",
                               NULL,
                               "kmsctl rotations --since 30d\n"
                               "kmsctl rotations --key billing-dek --type emergency"},
    [KMSCTL_VERB_CHECK] = {KMSCTL_VERB_CHECK,
                           "check",
                           {NULL},
                           B(REPAIR),
                           0,
                           "compare the store with the HSM token",
                           "Runs kmsd's consistency check (store records against the token's "
                           "objects) and prints its report; --repair also fixes what is safe to "
                           "fix.",
                           NULL,
                           "kmsctl check\nkmsctl check --repair --json"},
    [KMSCTL_VERB_WRAP] = {KMSCTL_VERB_WRAP,
                          "wrap",
                          {"NAME"},
                          DATA_IN_OUT,
                          0,
                          "wrap a data key (1..1024 bytes) under the key's primary version",
                          "Reads the plaintext data key from --in @FILE or stdin (never from the "
                          "command line) and prints the ciphertext token (kms1:...).",
                          NULL,
                          "kmsctl wrap billing-dek --in @dek.bin > dek.token\n"
                          "head -c 32 /dev/urandom | kmsctl wrap billing-dek --context "
                          "tenant=42"},
    [KMSCTL_VERB_UNWRAP] = {KMSCTL_VERB_UNWRAP,
                            "unwrap",
                            {"NAME"},
                            DATA_IN_OUT | B(BASE64),
                            0,
                            "unwrap a data key",
                            "Reads a ciphertext token from --in (literal, @FILE or stdin) and "
                            "writes the plaintext: raw bytes, or base64 with --base64.",
                            NULL,
                            "kmsctl unwrap billing-dek --in @dek.token --out dek.bin"},
    [KMSCTL_VERB_ENCRYPT] = {KMSCTL_VERB_ENCRYPT,
                             "encrypt",
                             {"NAME"},
                             DATA_IN_OUT,
                             0,
                             "encrypt a small field (up to 64 KiB)",
                             "As wrap, for field values of up to 64 KiB.",
                             NULL,
                             "kmsctl encrypt pii --in @ssn.txt --context row=17"},
    [KMSCTL_VERB_DECRYPT] = {KMSCTL_VERB_DECRYPT,
                             "decrypt",
                             {"NAME"},
                             DATA_IN_OUT | B(BASE64),
                             0,
                             "decrypt a field",
                             "As unwrap, for tokens made by encrypt.",
                             NULL,
                             "kmsctl decrypt pii --in \"$token\" --context row=17"},
    [KMSCTL_VERB_DATAKEY] = {KMSCTL_VERB_DATAKEY,
                             "datakey",
                             {"NAME"},
                             B(BYTES) | B(PLAINTEXT) | B(CONTEXT) | B(OUT) | B(BASE64),
                             0,
                             "generate a data key with the HSM's random generator",
                             "Prints the wrapped data key (kms1:...). With --plaintext the "
                             "plaintext key is also returned and written to --out FILE.",
                             NULL,
                             "kmsctl datakey billing-dek\n"
                             "kmsctl datakey billing-dek --plaintext --out dek.bin > dek.token"},
    [KMSCTL_VERB_REWRAP] = {KMSCTL_VERB_REWRAP,
                            "rewrap",
                            {"NAME"},
                            DATA_IN_OUT,
                            0,
                            "re-encrypt a token under the primary version",
                            "Reads a ciphertext token and prints it re-encrypted under the "
                            "key's primary version; the plaintext never leaves kmsd. A token "
                            "already under the primary comes back unchanged.",
                            NULL,
                            "kmsctl rewrap billing-dek --in @dek.token"},
    [KMSCTL_VERB_MAC] = {KMSCTL_VERB_MAC,
                         "mac",
                         {"NAME"},
                         B(IN) | B(OUT),
                         0,
                         "compute an HMAC-SHA-256 token of a message",
                         "Reads the message from --in (literal, @FILE or stdin) and prints the "
                         "MAC token (kms1:...).",
                         NULL,
                         "kmsctl mac webhook-secret --in @payload.json"},
    [KMSCTL_VERB_VERIFY] = {KMSCTL_VERB_VERIFY,
                            "verify",
                            {"NAME"},
                            B(IN) | B(MAC),
                            B(MAC),
                            "verify a MAC token",
                            "Reads the message from --in and checks it against --mac; prints "
                            "\"valid\" or \"invalid\".",
                            "1  the MAC does not match the message.",
                            "kmsctl verify webhook-secret --in @payload.json --mac @payload.mac"},
    [KMSCTL_VERB_HEALTH] = {KMSCTL_VERB_HEALTH,
                            "health",
                            {NULL},
                            0,
                            0,
                            "check that kmsd answers",
                            "GET /healthz: prints ok when kmsd answers (no HSM call).",
                            NULL,
                            "kmsctl health"},
    [KMSCTL_VERB_READY] = {KMSCTL_VERB_READY,
                           "ready",
                           {NULL},
                           0,
                           0,
                           "check that kmsd can serve (HSM and store usable)",
                           "GET /readyz: prints ready, or not ready and the reason.",
                           "69  kmsd answered that it is not ready.",
                           "kmsctl ready"},
    [KMSCTL_VERB_STATUS] = {KMSCTL_VERB_STATUS,
                            "status",
                            {NULL},
                            B(DUE_WITHIN) | B(OVERDUE),
                            0,
                            "show every key's rotation status",
                            "For every key: the primary version, when it was last rotated, when "
                            "rotation is due, the days until then (negative once overdue) and "
                            "whether it is due soon (inside its warning window) or overdue. "
                            "Requires the admin or auditor role.",
                            NULL,
                            "kmsctl status\nkmsctl status --due-within 7d\n"
                            "kmsctl status --overdue --json"},
    [KMSCTL_VERB_REPORT] = {KMSCTL_VERB_REPORT,
                            "report",
                            {NULL},
                            B(MONTH) | B(HTML),
                            B(MONTH),
                            "monthly rotation compliance report",
                            "For the month: rotations by type and status, success rate, mean "
                            "and median duration, emergency rotations against the 4-hour "
                            "objective, keys rotated within their policy and the ones that were "
                            "not, and the rotations due in the next 30 days. A table, --json, "
                            "and with --html FILE one self-contained page with charts. Requires "
                            "the admin or auditor role.",
                            NULL,
                            "kmsctl report --month 2026-10\n"
                            "kmsctl report --month 2026-10 --html report-2026-10.html\n"
                            "kmsctl report --month 2026-10 --json"},
    [KMSCTL_VERB_AUDIT] = {KMSCTL_VERB_AUDIT,
                           "audit",
                           {NULL},
                           B(FROM) | B(TO) | B(IDENTITY) | B(OPERATION) | B(AUDIT_KEY) | B(AFTER) |
                               B(LIMIT),
                           0,
                           "list audit records",
                           "Lists the audit trail's records (one per API request: time, "
                           "identity, source address, request id, operation, key, versions, "
                           "items, result), oldest first, filtered. Prints the --after value of "
                           "the next page when there is one. Requires the auditor or admin "
                           "role.",
                           NULL,
                           "kmsctl audit --from 1d --operation key.rotate\n"
                           "kmsctl audit --identity spiffe://kmsd.dev/app --key billing-dek "
                           "--json"},
    [KMSCTL_VERB_EXPORT] = {KMSCTL_VERB_EXPORT,
                            "export",
                            {NULL},
                            B(FROM) | B(TO) | B(OUT_DIR),
                            B(OUT_DIR),
                            "write a signed compliance export",
                            "Asks kmsd for a compliance export of the range and writes it to "
                            "--out DIR: inventory.csv and inventory.json (keys and versions, no "
                            "secrets), rotations.json, audit.jsonl (the audit records, one per "
                            "line, exactly as hashed), public-key.pem, manifest.json (each "
                            "file's SHA-256, the chain anchors, the signed head) and "
                            "manifest.sig (the HSM's signature of manifest.json). Check it with "
                            "verify-export. Requires the auditor or admin role.",
                            NULL,
                            "kmsctl export --from 2026-10-01 --to 2026-10-31T23:59:59Z --out "
                            "soc2-2026-10"},
    [KMSCTL_VERB_VERIFY_EXPORT] = {KMSCTL_VERB_VERIFY_EXPORT,
                                   "verify-export",
                                   {"DIR"},
                                   B(PUBLIC_KEY),
                                   0,
                                   "check a compliance export offline",
                                   "Checks an export without kmsd: the manifest's signature, "
                                   "every file's SHA-256, the signed chain positions, and the "
                                   "hash chain of audit.jsonl. Says exactly what is wrong: a "
                                   "changed record (its seq), a missing or reordered record, a "
                                   "chain gap or truncation, a changed or missing file, a bad "
                                   "signature. Give --public-key to pin the signing key.",
                                   "1   the export does not verify (each problem is printed "
                                   "as a FAIL line).",
                                   "kmsctl verify-export soc2-2026-10 --public-key "
                                   "kmsd-audit.pem"},
};

const kmsctl_verb *kmsctl_verbs(size_t *count)
{
    *count = KMSCTL_VERB_COUNT;
    return verbs;
}

const kmsctl_option *kmsctl_options(size_t *count)
{
    *count = KMSCTL_OPT_COUNT;
    return options;
}

const kmsctl_option *kmsctl_option_get(kmsctl_opt_id id)
{
    if ((unsigned)id >= KMSCTL_OPT_COUNT) {
        return NULL;
    }
    return &options[id];
}

/* ---- values ---- */

static KMS_RESULT parse_decimal(const char *s, size_t n, int64_t max, int64_t *out)
{
    KMS_ENSURE(n > 0 && n <= 19, KMS_ERR_INVALID_ARGUMENT);
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        KMS_ENSURE(s[i] >= '0' && s[i] <= '9', KMS_ERR_INVALID_ARGUMENT);
        KMS_ENSURE(v <= (max - (s[i] - '0')) / 10, KMS_ERR_INVALID_ARGUMENT);
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return KMS_OK_RESULT;
}

KMS_RESULT kmsctl_duration_parse(const char *text, int64_t *seconds)
{
    KMS_ENSURE(text != NULL && seconds != NULL, KMS_ERR_INVALID_ARGUMENT);
    size_t n = strlen(text);
    KMS_ENSURE(n > 0, KMS_ERR_INVALID_ARGUMENT);
    int64_t unit = 1;
    switch (text[n - 1]) {
    case 'd':
        unit = 86400;
        n--;
        break;
    case 'h':
        unit = 3600;
        n--;
        break;
    case 'm':
        unit = 60;
        n--;
        break;
    case 's':
        n--;
        break;
    default:
        break;
    }
    int64_t v = 0;
    KMS_GUARD(parse_decimal(text, n, KMSCTL_DURATION_MAX_S / unit, &v));
    *seconds = v * unit;
    return KMS_OK_RESULT;
}

void kmsctl_duration_format(int64_t s, char *out, size_t out_len)
{
    if (s != 0 && s % 86400 == 0) {
        snprintf(out, out_len, "%lldd", (long long)(s / 86400));
    } else if (s != 0 && s % 3600 == 0) {
        snprintf(out, out_len, "%lldh", (long long)(s / 3600));
    } else if (s != 0 && s % 60 == 0) {
        snprintf(out, out_len, "%lldm", (long long)(s / 60));
    } else {
        snprintf(out, out_len, "%llds", (long long)s);
    }
}

KMS_RESULT kmsctl_time_parse(const char *text, int64_t now, int64_t *out)
{
    KMS_ENSURE(text != NULL && out != NULL && *text != '\0', KMS_ERR_INVALID_ARGUMENT);
    size_t n = strlen(text);
    if (strspn(text, "0123456789") == n) {
        return parse_decimal(text, n, INT64_MAX / 2, out);
    }
    if (strchr("dhms", text[n - 1]) != NULL && strspn(text, "0123456789") == n - 1) {
        int64_t ago = 0;
        KMS_GUARD(kmsctl_duration_parse(text, &ago));
        KMS_ENSURE(ago <= now, KMS_ERR_INVALID_ARGUMENT);
        *out = now - ago;
        return KMS_OK_RESULT;
    }
    /* YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ, always UTC. */
    struct tm tm = {0};
    const char *rest = strptime(text, "%Y-%m-%d", &tm);
    KMS_ENSURE(rest != NULL && n >= 10 && isdigit((unsigned char)text[0]),
               KMS_ERR_INVALID_ARGUMENT);
    if (*rest != '\0') {
        rest = strptime(rest, "T%H:%M:%SZ", &tm);
        KMS_ENSURE(rest != NULL && *rest == '\0', KMS_ERR_INVALID_ARGUMENT);
    }
    time_t t = timegm(&tm);
    KMS_ENSURE(t != (time_t)-1 && t >= 0, KMS_ERR_INVALID_ARGUMENT);
    *out = (int64_t)t;
    return KMS_OK_RESULT;
}

static bool enum_allows(const char *choices, const char *v)
{
    size_t vn = strlen(v);
    const char *p = choices;
    while (*p != '\0') {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == vn && strncmp(p, v, n) == 0) {
            return true;
        }
        p += n + (bar ? 1 : 0);
    }
    return false;
}

static KMS_RESULT value_parse(const kmsctl_option *o, const char *v, int64_t now, kmsctl_value *out)
{
    out->set = true;
    out->str = v;
    out->num = 0;
    switch (o->kind) {
    case KMSCTL_KIND_FLAG:
        return KMS_OK_RESULT;
    case KMSCTL_KIND_STRING:
        KMS_ENSURE_MSG(*v != '\0', KMS_ERR_INVALID_ARGUMENT, "--%s: empty value", o->name);
        return KMS_OK_RESULT;
    case KMSCTL_KIND_DURATION:
        KMS_ENSURE_MSG(kms_is_ok(kmsctl_duration_parse(v, &out->num)), KMS_ERR_INVALID_ARGUMENT,
                       "--%s: \"%s\" is not a duration (90d, 12h, 30m, 3600s, 3600)", o->name, v);
        return KMS_OK_RESULT;
    case KMSCTL_KIND_UINT:
        KMS_ENSURE_MSG(kms_is_ok(parse_decimal(v, strlen(v), KMSCTL_UINT_MAX, &out->num)) &&
                           out->num > 0,
                       KMS_ERR_INVALID_ARGUMENT, "--%s: \"%s\" is not a number 1..%u", o->name, v,
                       (unsigned)KMSCTL_UINT_MAX);
        return KMS_OK_RESULT;
    case KMSCTL_KIND_TIME:
        KMS_ENSURE_MSG(kms_is_ok(kmsctl_time_parse(v, now, &out->num)), KMS_ERR_INVALID_ARGUMENT,
                       "--%s: \"%s\" is not a time (Unix seconds, YYYY-MM-DD, "
                       "YYYY-MM-DDTHH:MM:SSZ, or a duration ago such as 7d)",
                       o->name, v);
        return KMS_OK_RESULT;
    case KMSCTL_KIND_ENUM:
        KMS_ENSURE_MSG(enum_allows(o->metavar, v), KMS_ERR_INVALID_ARGUMENT,
                       "--%s: \"%s\" is not one of %s", o->name, v, o->metavar);
        return KMS_OK_RESULT;
    default:
        KMS_BAIL(KMS_ERR_INTERNAL);
    }
}

/* ---- argv ---- */

/* The option named `name` among those allowed (verb options shadow global
 * ones of the same name, which is how "rotations --key NAME" works). */
static const kmsctl_option *option_find(const char *name, size_t n, uint64_t allowed)
{
    const kmsctl_option *global = NULL;
    for (size_t i = 0; i < KMSCTL_OPT_COUNT; i++) {
        if ((allowed & KMSCTL_BIT(i)) == 0 || strlen(options[i].name) != n ||
            strncmp(options[i].name, name, n) != 0) {
            continue;
        }
        if ((KMSCTL_GLOBAL_OPTS & KMSCTL_BIT(i)) == 0) {
            return &options[i];
        }
        global = &options[i];
    }
    return global;
}

static const kmsctl_verb *verb_match(char *const *argv, int argc, int i, int *used)
{
    for (size_t v = 0; v < KMSCTL_VERB_COUNT; v++) {
        const char *name = verbs[v].name;
        const char *sp = strchr(name, ' ');
        if (sp == NULL) {
            if (strcmp(argv[i], name) == 0) {
                *used = 1;
                return &verbs[v];
            }
            continue;
        }
        size_t n1 = (size_t)(sp - name);
        if (strlen(argv[i]) == n1 && strncmp(argv[i], name, n1) == 0 && i + 1 < argc &&
            strcmp(argv[i + 1], sp + 1) == 0) {
            *used = 2;
            return &verbs[v];
        }
    }
    return NULL;
}

static bool is_group(const char *word)
{
    for (size_t v = 0; v < KMSCTL_VERB_COUNT; v++) {
        const char *sp = strchr(verbs[v].name, ' ');
        if (sp != NULL && strlen(word) == (size_t)(sp - verbs[v].name) &&
            strncmp(word, verbs[v].name, strlen(word)) == 0) {
            return true;
        }
    }
    return false;
}

KMS_RESULT kmsctl_args_parse(int argc, char *const *argv, int64_t now, kmsctl_args *out)
{
    memset(out, 0, sizeof(*out));
    bool options_end = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        uint64_t allowed = KMSCTL_GLOBAL_OPTS | (out->verb ? out->verb->options : 0);
        if (!options_end && strcmp(a, "--") == 0) {
            options_end = true;
            continue;
        }
        if (!options_end && a[0] == '-' && a[1] == '-') {
            const char *name = a + 2;
            const char *eq = strchr(name, '=');
            size_t n = eq ? (size_t)(eq - name) : strlen(name);
            const kmsctl_option *o = option_find(name, n, allowed);
            KMS_ENSURE_MSG(o != NULL, KMS_ERR_INVALID_ARGUMENT, "unknown option --%.*s%s%s", (int)n,
                           name, out->verb ? " for " : "", out->verb ? out->verb->name : "");
            const char *v = NULL;
            if (o->kind == KMSCTL_KIND_FLAG) {
                KMS_ENSURE_MSG(eq == NULL, KMS_ERR_INVALID_ARGUMENT, "--%s takes no value",
                               o->name);
            } else if (eq != NULL) {
                v = eq + 1;
            } else {
                KMS_ENSURE_MSG(i + 1 < argc, KMS_ERR_INVALID_ARGUMENT, "--%s needs a value (%s)",
                               o->name, o->metavar);
                v = argv[++i];
            }
            KMS_ENSURE_MSG(!out->opt[o->id].set, KMS_ERR_INVALID_ARGUMENT,
                           "--%s given more than once", o->name);
            KMS_GUARD(value_parse(o, v, now, &out->opt[o->id]));
            continue;
        }
        if (!options_end && a[0] == '-' && a[1] != '\0') {
            KMS_ENSURE_MSG(strcmp(a, "-h") == 0, KMS_ERR_INVALID_ARGUMENT,
                           "unknown option %s (options are long: --name)", a);
            out->opt[KMSCTL_OPT_HELP].set = true;
            continue;
        }
        if (out->verb == NULL) {
            int used = 0;
            out->verb = verb_match(argv, argc, i, &used);
            if (out->verb == NULL && strcmp(a, "help") == 0) {
                /* "kmsctl help [VERB...]" is "kmsctl [VERB...] --help". */
                out->opt[KMSCTL_OPT_HELP].set = true;
                continue;
            }
            KMS_ENSURE_MSG(out->verb != NULL, KMS_ERR_INVALID_ARGUMENT,
                           is_group(a) ? "unknown verb \"%s %s\" (see kmsctl --help)"
                                       : "unknown verb \"%s\"%s (see kmsctl --help)",
                           a, is_group(a) && i + 1 < argc ? argv[i + 1] : "");
            i += used - 1;
            continue;
        }
        KMS_ENSURE_MSG(out->npos < KMSCTL_POS_MAX && out->verb->pos[out->npos] != NULL,
                       KMS_ERR_INVALID_ARGUMENT, "%s: unexpected argument \"%s\"", out->verb->name,
                       a);
        out->pos[out->npos++] = a;
    }
    if (out->opt[KMSCTL_OPT_HELP].set) {
        return KMS_OK_RESULT; /* help needs nothing else */
    }
    KMS_ENSURE_MSG(out->verb != NULL, KMS_ERR_INVALID_ARGUMENT,
                   "no verb given (see kmsctl --help)");
    for (size_t p = 0; p < KMSCTL_POS_MAX; p++) {
        KMS_ENSURE_MSG(out->verb->pos[p] == NULL || p < out->npos, KMS_ERR_INVALID_ARGUMENT,
                       "%s: missing %s", out->verb->name, out->verb->pos[p]);
    }
    for (size_t o = 0; o < KMSCTL_OPT_COUNT; o++) {
        KMS_ENSURE_MSG((out->verb->required & KMSCTL_BIT(o)) == 0 || out->opt[o].set,
                       KMS_ERR_INVALID_ARGUMENT, "%s: --%s is required", out->verb->name,
                       options[o].name);
    }
    KMS_ENSURE_MSG(!(out->opt[KMSCTL_OPT_DELETION_PROTECTION].set &&
                     out->opt[KMSCTL_OPT_NO_DELETION_PROTECTION].set),
                   KMS_ERR_INVALID_ARGUMENT,
                   "--deletion-protection and --no-deletion-protection conflict");
    return KMS_OK_RESULT;
}

/* ---- help ---- */

/* Writes text wrapped at 80 columns with the given indent; "\n\n" starts a
 * new paragraph. */
static void wrap_text(FILE *f, const char *text, int indent)
{
    const int width = 80;
    int col = 0;
    const char *p = text;
    while (*p != '\0') {
        if (p[0] == '\n' && p[1] == '\n') {
            fputs("\n\n", f);
            col = 0;
            p += 2;
            continue;
        }
        if (*p == ' ' || *p == '\n') {
            p++;
            continue;
        }
        size_t n = strcspn(p, " \n");
        if (col > 0 && col + 1 + (int)n > width) {
            fputc('\n', f);
            col = 0;
        }
        if (col == 0) {
            fprintf(f, "%*s", indent, "");
            col = indent;
        } else {
            fputc(' ', f);
            col++;
        }
        fwrite(p, 1, n, f);
        col += (int)n;
        p += n;
    }
    if (col > 0) {
        fputc('\n', f);
    }
}

/* Synopsis pieces, wrapped at 80 columns, continuation lines indented. */
static void synopsis_piece(FILE *f, int *col, const char *piece)
{
    int n = (int)strlen(piece);
    if (*col + 1 + n > 80) {
        fprintf(f, "\n%8s", "");
        *col = 8;
    } else {
        fputc(' ', f);
        (*col)++;
    }
    fputs(piece, f);
    *col += n;
}

static void option_synopsis(FILE *f, int *col, const kmsctl_option *o, bool required)
{
    char piece[128];
    snprintf(piece, sizeof(piece), "%s--%s%s%s%s", required ? "" : "[", o->name,
             o->metavar ? " " : "", o->metavar ? o->metavar : "", required ? "" : "]");
    synopsis_piece(f, col, piece);
}

static void option_item(FILE *f, const kmsctl_option *o)
{
    fprintf(f, "    --%s%s%s\n", o->name, o->metavar ? " " : "", o->metavar ? o->metavar : "");
    wrap_text(f, o->help, 10);
}

static const char exit_status_common[] =
    "0   success\n"
    "64  usage: unknown verb or option, missing or malformed argument, invalid key name\n"
    "65  data: invalid base64, token, JSON or input, or a size limit exceeded\n"
    "66  not found: no such key, version or route\n"
    "69  kmsd cannot be reached (refused, timed out, name not resolved) or is unavailable\n"
    "70  internal error (in kmsctl or reported by kmsd)\n"
    "74  input/output error: --in or --out file, or the store on the server\n"
    "75  temporary failure (HSM busy or unavailable): retry later\n"
    "77  permission: TLS failure (server certificate not trusted, client certificate or key\n"
    "    unusable, handshake refused) or kmsd refused the client (unauthenticated,\n"
    "    forbidden)\n"
    "78  configuration: unreadable or invalid config file, server misconfigured\n"
    "79  conflict: key exists, state transition not allowed, guard\n"
    "80  refused by the version's state: disabled, compromised, destroyed, below minimum\n";

static void indent_lines(FILE *f, const char *text, int indent)
{
    const char *p = text;
    while (*p != '\0') {
        size_t n = strcspn(p, "\n");
        fprintf(f, "%*s%.*s\n", indent, "", (int)n, p);
        p += n + (p[n] == '\n' ? 1 : 0);
    }
}

void kmsctl_help_verb(const kmsctl_verb *v, FILE *f)
{
    fputs("NAME\n", f);
    fprintf(f, "    kmsctl %s - %s\n\n", v->name, v->summary);
    fputs("SYNOPSIS\n", f);
    int col = fprintf(f, "    kmsctl [GLOBAL OPTIONS] %s", v->name);
    for (size_t p = 0; p < KMSCTL_POS_MAX && v->pos[p] != NULL; p++) {
        synopsis_piece(f, &col, v->pos[p]);
    }
    for (size_t o = 0; o < KMSCTL_OPT_COUNT; o++) {
        if (v->options & KMSCTL_BIT(o)) {
            option_synopsis(f, &col, &options[o], (v->required & KMSCTL_BIT(o)) != 0);
        }
    }
    fputs("\n\nDESCRIPTION\n", f);
    wrap_text(f, v->description, 4);
    fputs("\nOPTIONS\n", f);
    if (v->options == 0) {
        fputs("    (none of its own)\n", f);
    }
    for (size_t o = 0; o < KMSCTL_OPT_COUNT; o++) {
        if (v->options & KMSCTL_BIT(o)) {
            option_item(f, &options[o]);
        }
    }
    fputs("\nGLOBAL OPTIONS\n", f);
    for (size_t o = 0; o < KMSCTL_OPT_COUNT; o++) {
        if (KMSCTL_GLOBAL_OPTS & KMSCTL_BIT(o)) {
            option_item(f, &options[o]);
        }
    }
    fputs("\nEXIT STATUS\n", f);
    indent_lines(f, exit_status_common, 4);
    if (v->exit_status != NULL) {
        indent_lines(f, v->exit_status, 4);
    }
    fputs("\nEXAMPLES\n", f);
    indent_lines(f, v->examples, 4);
}

void kmsctl_help_main(FILE *f)
{
    fputs("NAME\n    kmsctl - command-line client of kmsd, the key management service\n\n"
          "SYNOPSIS\n    kmsctl [GLOBAL OPTIONS] VERB [ARGUMENTS] [OPTIONS]\n"
          "    kmsctl VERB --help\n\nVERBS\n",
          f);
    for (size_t v = 0; v < KMSCTL_VERB_COUNT; v++) {
        fprintf(f, "    %-16s %s\n", verbs[v].name, verbs[v].summary);
    }
    fputs("\nGLOBAL OPTIONS\n", f);
    for (size_t o = 0; o < KMSCTL_OPT_COUNT; o++) {
        if (KMSCTL_GLOBAL_OPTS & KMSCTL_BIT(o)) {
            option_item(f, &options[o]);
        }
    }
    fputs("\nEXIT STATUS\n", f);
    indent_lines(f, exit_status_common, 4);
    fputs("\nSee docs/cli.md for the full reference.\n", f);
}

void kmsctl_help_markdown(FILE *f)
{
    fputs("## Verbs\n\n", f);
    for (size_t v = 0; v < KMSCTL_VERB_COUNT; v++) {
        fprintf(f, "### kmsctl %s\n\n```text\n", verbs[v].name);
        kmsctl_help_verb(&verbs[v], f);
        fputs("```\n\n", f);
    }
    fputs("## Exit status by server error code\n\n"
          "When kmsd answers with an error, kmsctl prints `kmsctl: <code>: <message> (request "
          "<id>)` on stderr and exits with the code's entry in the error table "
          "(`crypto/kms_error.c`):\n\n"
          "| error code | HTTP status | exit status |\n|---|---|---|\n",
          f);
    for (size_t e = 1; e < KMS_ERR_COUNT; e++) {
        const kms_error_info *info = kms_error_info_get((kms_err)e);
        fprintf(f, "| `%s` | %d | %d |\n", info->code, info->http_status, info->exit_code);
    }
}
