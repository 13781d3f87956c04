#!/usr/bin/env bash
# kms-token against a throwaway SoftHSM token: init with generated PINs,
# list, check, and the exact exit codes of the failures.
#   hsm_token_tool_test.sh PATH-TO-kms-token
set -euo pipefail
tool=$1
module=${KMS_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
dir=$(mktemp -d "${TMPDIR:-/tmp}/kmstoken.XXXXXX")
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir" \
  >"$dir/softhsm2.conf"
export SOFTHSM2_CONF=$dir/softhsm2.conf
fail() { echo "FAIL: $*" >&2; exit 1; }
# expect CODE cmd...: runs cmd, checks its exit status.
expect() {
  local want=$1; shift
  local rc=0
  "$@" >"$dir/out" 2>"$dir/err" || rc=$?
  [ "$rc" -eq "$want" ] || { cat "$dir/out" "$dir/err" >&2; fail "exit $rc, want $want: $*"; }
}

expect 0 "$tool" --help
grep -q '^EXIT STATUS' "$dir/out" || fail "--help lacks EXIT STATUS"

label="kms test $$"
expect 0 "$tool" init --module "$module" --label "$label" --pin-file "$dir/pin" \
  --so-pin-file "$dir/so-pin" --generate
[ "$(stat -c %a "$dir/pin")" = 600 ] || fail "pin file mode"
[ "$(stat -c %a "$dir/so-pin")" = 600 ] || fail "so-pin file mode"
[ "$(wc -c <"$dir/pin")" -eq 33 ] || fail "pin length"
grep -q "pkcs11:token=kms%20test%20$$" "$dir/out" || fail "init does not print the URI"
# No PIN on the command line: the PIN appears in no output.
! grep -q -F "$(cat "$dir/pin")" "$dir/out" "$dir/err" || fail "PIN printed"

expect 0 "$tool" list --module "$module"
grep -q "$label .*ready" "$dir/out" || fail "list does not show the token"

uri="pkcs11:token=kms%20test%20$$"
expect 0 "$tool" check --module "$module" --uri "$uri" --pin-file "$dir/pin"
grep -q "0 kmsd master keys" "$dir/out" || fail "check output"

# Failures: usage 64 (invalid_argument), and the error table's codes.
expect 64 "$tool" frobnicate
expect 64 "$tool" init --module "$module"
echo 00000000 >"$dir/bad"; chmod 600 "$dir/bad"
expect 78 "$tool" check --module "$module" --uri "$uri" --pin-file "$dir/bad"
grep -q hsm_pin "$dir/err" || fail "wrong PIN not reported as hsm_pin"
chmod 644 "$dir/bad"
expect 78 "$tool" check --module "$module" --uri "$uri" --pin-file "$dir/bad"
grep -q config_invalid "$dir/err" || fail "readable PIN file accepted"
expect 78 "$tool" check --module "$module" --uri "pkcs11:token=absent" --pin-file "$dir/pin"
grep -q hsm_token_not_found "$dir/err" || fail "absent token"
expect 78 "$tool" check --module "$module" --uri "$uri?pin-value=1234" --pin-file "$dir/pin"
grep -q config_invalid "$dir/err" || fail "pin-value accepted"
# Without --generate a missing PIN file is an error, and nothing is created.
expect 78 "$tool" init --module "$module" --label other --pin-file "$dir/nopin" \
  --so-pin-file "$dir/so-pin"
[ ! -e "$dir/nopin" ] || fail "PIN file created without --generate"
echo "kms-token: all checks passed"
