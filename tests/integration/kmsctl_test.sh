#!/usr/bin/env bash
# kmsctl against a real kmsd: a throwaway SoftHSM token (kms-token init), a
# fresh LMDB store and the development PKI in a temp dir, kmsd on a free
# loopback port. Exercises every verb and the documented exit codes: unknown
# key (66), forbidden (77), bad input (64/65), refused version state (80),
# wrong client certificates and untrusted server (77), server down (69).
set -euo pipefail
src=${KMS_SOURCE_DIR:?}
bld=${KMS_BUILD_DIR:?}
kmsctl=${KMSCTL:-$bld/tools/kmsctl}
kmsd=${KMSD:-$bld/tools/kmsd}
kms_token=${KMS_TOKEN:-$bld/tools/kms-token}
module=${KMS_SOFTHSM_MODULE:?}
# shellcheck source=../lib/kms-fixture.sh
. "$src/tests/lib/kms-fixture.sh"

kms_fixture_tempdir

fails=0
checks=0
# expect RC DESCRIPTION COMMAND... : stdout in $tmp/out, stderr in $tmp/err.
expect() {
    local want=$1 what=$2 rc=0
    shift 2
    "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
    checks=$((checks + 1))
    if [ "$rc" != "$want" ]; then
        fails=$((fails + 1))
        echo "FAIL: $what: exit $rc, expected $want: $*" >&2
        sed 's/^/  stderr: /' "$tmp/err" >&2
        head -c 2000 "$tmp/out" | sed 's/^/  stdout: /' >&2
        return 0
    fi
}
check() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    checks=$((checks + 1))
    if ! "$@" >/dev/null 2>&1; then
        fails=$((fails + 1))
        echo "FAIL: $what" >&2
    fi
}
out_has() { grep -qF -- "$1" "$tmp/out"; }
err_has() { grep -qF -- "$1" "$tmp/err"; }

# ---- fixture: PKI, token, store, policy, config ----
pki=$tmp/pki
"$src/certs/make-dev-pki" "$pki" >/dev/null
mkdir -p "$tmp/store"
kms_fixture_token "$tmp" kmsctl-test "$kms_token" "$module"
# app may use t-* keys only, so "forbidden" on another key is testable.
kms_fixture_policy "$tmp/policy.json" 't-*'

conf() { # PORT
    kms_fixture_conf "$tmp" "$1" kmsctl-test "$module"
    echo "workers = threads:4"
    echo "log_level = warn"
    if [ -n "${KMSD_EXTRA:-}" ]; then printf '%s\n' "$KMSD_EXTRA"; fi
}

export KMSCTL_CACERT=$pki/ca.crt
as() { # ROLE kmsctl-args...
    local role=$1
    shift
    "$kmsctl" --cert "$pki/$role.crt" --key "$pki/$role.key" "$@"
}

probe() { as auditor --url "https://127.0.0.1:$1" health; }
kms_fixture_serve "$tmp" "$kmsd" conf probe
port=$kms_fixture_port
export KMSCTL_URL=https://127.0.0.1:$port

# ---- health ----
expect 0 "health" as auditor health
check "health says ok" out_has ok
expect 0 "ready" as auditor ready
check "ready says ready" out_has ready
expect 0 "health --json" as app health --json
check "health JSON" out_has '"status"'

# ---- key management (admin) ----
expect 0 "key create" as admin key create t-enc --rotation-period 90d --warning-window 7d
check "key create prints the key" out_has "t-enc"
expect 0 "key create mac" as admin key create t-mac --purpose mac
expect 0 "key create other" as admin key create other-key --deletion-protection
expect 79 "key create again: key_exists" as admin key create t-enc
check "error line names the code and request" err_has "kmsctl: key_exists:"
check "error line carries the request id" err_has "(request "
expect 0 "key list" as admin key list
check "key list has t-enc" out_has "t-enc"
check "key list has a header" out_has "NAME"
expect 0 "key list paged by one" as admin key list --limit 1 --json
check "all pages joined" test "$(grep -o '"name"' "$tmp/out" | wc -l)" = 3
expect 0 "key show" as admin key show t-enc
check "key show has versions" out_has "VERSION"
expect 0 "key update" as admin key update t-enc --rotation-period 30d --json
check "update applied" out_has '"rotation_period":2592000'
expect 64 "key update with nothing" as admin key update t-enc
expect 0 "master show" as admin master show
check "master table" out_has "CURRENT"
expect 0 "auditor may read keys" as auditor key show t-enc

# ---- data operations (app) ----
head -c 32 /dev/urandom >"$tmp/dek"
expect 0 "wrap from file" as app wrap t-enc --in @"$tmp/dek" --context tenant=1
cp "$tmp/out" "$tmp/dek.token"
check "wrap prints a token" grep -q '^kms1:' "$tmp/dek.token"
expect 0 "unwrap to file" as app unwrap t-enc --in @"$tmp/dek.token" --context tenant=1 \
    --out "$tmp/dek.back"
check "unwrap gives the plaintext back" cmp "$tmp/dek" "$tmp/dek.back"
check "plaintext file is 0600" test "$(stat -c %a "$tmp/dek.back")" = 600
expect 0 "unwrap --base64 from literal token" as app unwrap t-enc --in "$(cat "$tmp/dek.token")" \
    --context tenant=1 --base64
check "base64 output" test "$(cat "$tmp/out")" = "$(base64 -w0 <"$tmp/dek")"
expect 65 "unwrap with another context: invalid_token" as app unwrap t-enc \
    --in @"$tmp/dek.token" --context tenant=2
check "invalid_token named" err_has "invalid_token"
expect 0 "wrap from stdin" as app wrap t-enc --in - <"$tmp/dek"
printf 'field value' >"$tmp/field"
expect 0 "encrypt" as app encrypt t-enc --in @"$tmp/field"
cp "$tmp/out" "$tmp/field.token"
expect 0 "decrypt" as app decrypt t-enc --in @"$tmp/field.token"
check "decrypt round trip" test "$(cat "$tmp/out")" = "field value"
expect 0 "datakey" as app datakey t-enc
check "datakey prints a token" grep -q '^kms1:' "$tmp/out"
expect 0 "datakey --plaintext" as app datakey t-enc --bytes 16 --plaintext --out "$tmp/dk"
cp "$tmp/out" "$tmp/dk.token"
check "datakey plaintext is 16 bytes" test "$(stat -c %s "$tmp/dk")" = 16
check "datakey plaintext file is 0600" test "$(stat -c %a "$tmp/dk")" = 600
expect 0 "unwrap the datakey" as app unwrap t-enc --in @"$tmp/dk.token" --out "$tmp/dk.back"
check "datakey unwraps to its plaintext" cmp "$tmp/dk" "$tmp/dk.back"
expect 64 "datakey --plaintext without --out" as app datakey t-enc --plaintext
expect 0 "mac" as app mac t-mac --in "hello"
cp "$tmp/out" "$tmp/mac.token"
expect 0 "verify" as app verify t-mac --in "hello" --mac @"$tmp/mac.token"
check "verify says valid" out_has valid
expect 1 "verify another message: invalid" as app verify t-mac --in "hellO" \
    --mac @"$tmp/mac.token"
check "verify says invalid" out_has invalid

# ---- rotation, rewrap, states ----
expect 0 "key rotate" as admin key rotate t-enc --reason "kmsctl test"
check "rotation shown" out_has "manual"
expect 0 "rewrap under v2" as app rewrap t-enc --in @"$tmp/dek.token" --context tenant=1 --json
check "rewrap changed" out_has '"changed":true'
expect 0 "rewrap plain" as app rewrap t-enc --in @"$tmp/dek.token" --context tenant=1
cp "$tmp/out" "$tmp/dek2.token"
expect 0 "unwrap rewrapped" as app unwrap t-enc --in @"$tmp/dek2.token" --context tenant=1 \
    --out "$tmp/dek.back2"
check "rewrapped round trip" cmp "$tmp/dek" "$tmp/dek.back2"
expect 0 "disable v1" as admin key set-state t-enc 1 disable --reason test
check "version row" out_has "disabled"
expect 80 "unwrap under a disabled version" as app unwrap t-enc --in @"$tmp/dek.token" \
    --context tenant=1
check "version_disabled named" err_has "version_disabled"
expect 0 "enable v1" as admin key set-state t-enc 1 enable
expect 0 "unwrap after enable" as app unwrap t-enc --in @"$tmp/dek.token" --context tenant=1 \
    --out "$tmp/dek.back3"
expect 66 "set-state of a missing version" as admin key set-state t-enc 99 disable
expect 64 "set-state with an unknown action" as admin key set-state t-enc 1 frobnicate
expect 0 "key rollback" as admin key rollback t-enc --reason "undo"
expect 0 "key rotate --emergency" as admin key rotate t-enc --emergency --reason "exposed"
check "emergency rotation shown" out_has "emergency"
expect 0 "rotations" as auditor rotations --key t-enc --since 1d
check "rotations list the manual one" out_has "manual"
expect 0 "rotations --json" as auditor rotations --type emergency --json
check "rotations JSON" out_has '"rotations"'
# dk.token was made under v1, primary again after the rollback and now
# compromised by the emergency rotation: refused to the app, rewrapped by the
# migrator.
expect 80 "unwrap under a compromised version" as app unwrap t-enc --in @"$tmp/dk.token"
check "version_compromised named" err_has "version_compromised"
expect 0 "migrator rewraps a compromised version" as migrator rewrap t-enc --in @"$tmp/dk.token"
cp "$tmp/out" "$tmp/dk3.token"
expect 0 "master rotate" as admin master rotate --reason "kmsctl test"
expect 0 "unwrap after master rotation" as app unwrap t-enc --in @"$tmp/dk3.token" \
    --out "$tmp/dk.back4"
check "rewrapped datakey unwraps after master rotation" cmp "$tmp/dk" "$tmp/dk.back4"
expect 0 "check" as admin check
expect 0 "check --repair --json" as admin check --repair --json

# ---- documented failures ----
expect 66 "unknown key: key_not_found" as admin key show t-nokey
check "key_not_found named" err_has "key_not_found"
expect 66 "unknown key for app" as app wrap t-nokey --in @"$tmp/dek"
expect 77 "forbidden: app creates a key" as app key create t-x
check "forbidden named" err_has "forbidden"
expect 77 "forbidden: app on a key outside its pattern" as app wrap other-key --in @"$tmp/dek"
expect 77 "forbidden: auditor wraps" as auditor wrap t-enc --in @"$tmp/dek"
expect 77 "forbidden: admin has no data operations" as admin wrap t-enc --in @"$tmp/dek"
expect 64 "plaintext on argv refused" as app wrap t-enc --in "secret"
expect 64 "invalid key name" as app wrap 'T-Enc' --in @"$tmp/dek"
expect 64 "unknown option" as app wrap t-enc --frob
expect 64 "bad duration" as admin key update t-enc --rotation-period 3w
expect 65 "not a token" as app unwrap t-enc --in "garbage"
expect 65 "a tampered token" as app unwrap t-enc --in "kms1:AAAA"
expect 74 "unreadable --in file" as app wrap t-enc --in @"$tmp/does-not-exist"
for c in foreign expired revoked; do
    expect 77 "client certificate: $c" as "$c" health
done
expect 77 "no client certificate" "$kmsctl" health
expect 77 "server not trusted" as app --cacert "$pki/foreign-ca/ca.crt" health
check "TLS failure says which" err_has "server certificate not trusted"
printf 'url = %s\nfrob = 1\n' "$KMSCTL_URL" >"$tmp/bad.conf"
expect 78 "config with an unknown key" as app --config "$tmp/bad.conf" health

# ---- a new application (docs/pki.md): issue-client, policy rule, SIGHUP;
# then revocation: revoke-client, SIGHUP ----
"$src/certs/issue-client" billing app "$pki" >/dev/null
bill=(--cert "$pki/clients/billing.crt" --key "$pki/clients/billing.key")
expect 0 "admin creates billing-dek" as admin key create billing-dek
expect 77 "a new identity without a rule is refused" "$kmsctl" "${bill[@]}" wrap billing-dek \
    --in @"$tmp/dek"
sed 's|^]}|,{"identity": "spiffe://kmsd.dev/app/billing", "role": "app", "keys": ["billing-*"]}\n]}|' \
    "$tmp/policy.json" >"$tmp/policy.new"
mv "$tmp/policy.new" "$tmp/policy.json"
# until_rc RC COMMAND...: retries (bounded, 5 s) until COMMAND exits RC.
until_rc() {
    local want=$1 rc
    shift
    for _ in $(seq 1 50); do
        rc=0
        "$@" >/dev/null 2>&1 || rc=$?
        [ "$rc" = "$want" ] && return 0
        sleep 0.1
    done
    return 1
}
kill -HUP "$kms_fixture_pid"
check "SIGHUP applies the new rule" until_rc 0 "$kmsctl" "${bill[@]}" wrap billing-dek \
    --in @"$tmp/dek"
expect 0 "billing wraps its key" "$kmsctl" "${bill[@]}" wrap billing-dek --in @"$tmp/dek"
expect 77 "billing is limited to billing-*" "$kmsctl" "${bill[@]}" wrap t-enc --in @"$tmp/dek"
"$src/certs/revoke-client" billing "$pki" >/dev/null
kill -HUP "$kms_fixture_pid"
check "SIGHUP applies the new CRL" until_rc 77 "$kmsctl" "${bill[@]}" health
expect 77 "a revoked application is refused" "$kmsctl" "${bill[@]}" wrap billing-dek \
    --in @"$tmp/dek"
expect 0 "other clients still served" as app wrap t-enc --in @"$tmp/dek"

# ---- a server at its connection limit ----
# kmsd closes a connection over per_ip_connection_limit as soon as it is
# accepted: the client's handshake is cut. That is "not available now"
# (69, try again), not a TLS failure (77).
kms_fixture_stop
KMSD_EXTRA="per_ip_connection_limit = 1" kms_fixture_serve "$tmp" "$kmsd" conf probe "$port"
check "kmsd back with a limit of one connection" until_rc 0 as auditor health
# Hold one connection open. kmsd may not yet have closed the last client's
# connection when it accepts this one, and then refuses it: open it again
# until kmsd keeps it (a read that times out; end of file means refused).
held=0
for _ in $(seq 1 20); do
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    rc=0
    read -r -t 0.3 -u 3 _ || rc=$?
    if [ "$rc" -gt 128 ]; then
        held=1
        break
    fi
    exec 3>&-
    sleep 0.1
done
check "kmsd keeps one connection open" test "$held" = 1
expect 69 "over the connection limit" as auditor health
check "a cut handshake says so" err_has "closed the connection during the TLS handshake"
exec 3>&-
check "served again once the connection is closed" until_rc 0 as auditor health

# ---- server down ----
kms_fixture_stop
expect 69 "server down" as app health
check "connection failure says so" err_has "cannot reach kmsd"
expect 69 "server down: data verb" as app wrap t-enc --in @"$tmp/dek"

echo "kmsctl_test: $((checks - fails))/$checks checks passed"
[ "$fails" -eq 0 ]
