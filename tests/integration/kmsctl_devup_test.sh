#!/usr/bin/env bash
# scripts/dev-up (the README's first command) in a temp data dir with the
# binaries of this build: it sets up PKI, token, PINs, store, policy and
# config; a second run reuses all of it; the kmsd it configured serves the
# curl command it prints and kmsctl with the dev certificates.
set -euo pipefail
src=${KMS_SOURCE_DIR:?}
bld=${KMS_BUILD_DIR:?}
tmp=$(mktemp -d)
data=$tmp/data
kmsd_pid=""
cleanup() {
    if [ -n "$kmsd_pid" ] && kill -0 "$kmsd_pid" 2>/dev/null; then
        kill -TERM "$kmsd_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$kmsd_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$kmsd_pid" 2>/dev/null || true
        wait "$kmsd_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
fails=0
checks=0
check() {
    local what=$1
    shift
    checks=$((checks + 1))
    if ! "$@" >/dev/null 2>&1; then
        fails=$((fails + 1))
        echo "FAIL: $what" >&2
    fi
}

port=""
for attempt in 1 2 3 4 5; do
    candidate=$((20000 + (RANDOM * 7 + attempt * 991) % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
        port=$candidate
        break
    fi
done
[ -n "$port" ] || { echo "no free port" >&2; exit 1; }

run_devup() {
    "$src/scripts/dev-up" --no-deps --no-build --no-start --build-dir "$bld" --data "$data" \
        --port "$port" >"$tmp/devup.out" 2>&1 || {
        echo "dev-up failed:" >&2
        cat "$tmp/devup.out" >&2
        exit 1
    }
}

run_devup
check "data dir is 0700" test "$(stat -c %a "$data")" = 700
for f in pin so-pin kmsd.conf pki/server.key pki/app.key; do
    check "$f is 0600" test "$(stat -c %a "$data/$f")" = 600
done
for f in pki/ca.crt pki/crl.pem policy.json softhsm/softhsm2.conf; do
    check "$f exists" test -s "$data/$f"
done
check "lmdb dir exists" test -d "$data/lmdb"
check "a token was made" test -n "$(ls -A "$data/softhsm/tokens")"
check "PIN not in dev-up's output" test "$(grep -cF -- "$(cat "$data/pin")" "$tmp/devup.out")" = 0
check "output shows a curl command" grep -q "curl --cacert" "$tmp/devup.out"
check "output shows kmsctl settings" grep -q "KMSCTL_CERT=" "$tmp/devup.out"

before=$(cat "$data/pin" "$data/so-pin" "$data/kmsd.conf" "$data/pki/ca.crt" | sha256sum)
tokens_before=$(ls "$data/softhsm/tokens")
run_devup
check "second run reuses the token" grep -q "reusing token" "$tmp/devup.out"
check "second run keeps PINs, config and PKI" test "$before" = \
    "$(cat "$data/pin" "$data/so-pin" "$data/kmsd.conf" "$data/pki/ca.crt" | sha256sum)"
check "second run keeps the token directory" test "$tokens_before" = \
    "$(ls "$data/softhsm/tokens")"

# The kmsd dev-up configured, as dev-up would start it.
SOFTHSM2_CONF=$data/softhsm/softhsm2.conf "$bld/tools/kmsd" --config "$data/kmsd.conf" \
    2>"$tmp/kmsd.log" &
kmsd_pid=$!
export KMSCTL_URL=https://127.0.0.1:$port KMSCTL_CACERT=$data/pki/ca.crt
up=0
for _ in $(seq 1 100); do
    kill -0 "$kmsd_pid" 2>/dev/null || break
    if "$bld/tools/kmsctl" --cert "$data/pki/auditor.crt" --key "$data/pki/auditor.key" health \
        >/dev/null 2>&1; then
        up=1
        break
    fi
    sleep 0.1
done
if [ "$up" -eq 0 ]; then
    echo "kmsd (dev-up config) did not come up:" >&2
    cat "$tmp/kmsd.log" >&2
    exit 1
fi
# The curl command dev-up prints, as printed.
cmd=$(grep -m1 "curl --cacert" "$tmp/devup.out")
check "the printed curl command works" bash -c "$cmd | grep -q ok"
check "admin creates a key" "$bld/tools/kmsctl" --cert "$data/pki/admin.crt" \
    --key "$data/pki/admin.key" key create demo
head -c 32 /dev/urandom >"$tmp/dek"
app=(--cert "$data/pki/app.crt" --key "$data/pki/app.key")
check "app wraps" bash -c "'$bld/tools/kmsctl' ${app[*]} wrap demo --in @'$tmp/dek' >'$tmp/tok'"
check "app unwraps" "$bld/tools/kmsctl" "${app[@]}" unwrap demo --in @"$tmp/tok" \
    --out "$tmp/dek2"
check "round trip" cmp "$tmp/dek" "$tmp/dek2"

echo "kmsctl_devup_test: $((checks - fails))/$checks checks passed"
[ "$fails" -eq 0 ]
