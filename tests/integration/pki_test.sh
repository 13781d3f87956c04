#!/usr/bin/env bash
# Integration test of the development PKI (certs/make-dev-pki, certs/issue-client).
# Every check fails the test with a message naming what was wrong.
set -euo pipefail
src=${KMS_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pki=$tmp/pki
fails=0
checks=0
ok() { checks=$((checks + 1)); }
bad() { checks=$((checks + 1)); fails=$((fails + 1)); echo "FAIL: $*" >&2; }
check() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then ok; else bad "$what"; fi
}
check_not() {
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then bad "$what"; else ok; fi
}

start=$(date +%s%N)
"$src/certs/make-dev-pki" "$pki" >/dev/null
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "make-dev-pki took ${elapsed_ms} ms"
check "make-dev-pki under 10 s" test "$elapsed_ms" -lt 10000

roles=(app migrator admin auditor)
for f in ca server "${roles[@]}" revoked expired foreign; do
    check "$f.crt exists" test -s "$pki/$f.crt"
    check "$f.key exists" test -s "$pki/$f.key"
    check "$f.key is mode 0600" test "$(stat -c %a "$pki/$f.key")" = 600
    check "$f.key matches $f.crt" test "$(openssl x509 -in "$pki/$f.crt" -noout -pubkey)" = \
        "$(openssl pkey -in "$pki/$f.key" -pubout)"
done
check "crl.pem exists" test -s "$pki/crl.pem"

# Chains and purposes.
check "server verifies for serverAuth" openssl verify -CAfile "$pki/ca.crt" -purpose sslserver \
    "$pki/server.crt"
check_not "server is not a client cert" openssl verify -CAfile "$pki/ca.crt" -purpose sslclient \
    "$pki/server.crt"
san=$(openssl x509 -in "$pki/server.crt" -noout -ext subjectAltName)
for want in "DNS:localhost" "IP Address:127.0.0.1" "IP Address:0:0:0:0:0:0:0:1"; do
    check "server SAN has $want" grep -qF "$want" <<<"$san"
done
for r in "${roles[@]}"; do
    check "$r verifies for clientAuth with the CRL" openssl verify -CAfile "$pki/ca.crt" \
        -CRLfile "$pki/crl.pem" -crl_check -purpose sslclient "$pki/$r.crt"
    check_not "$r is not a server cert" openssl verify -CAfile "$pki/ca.crt" -purpose sslserver \
        "$pki/$r.crt"
    check "$r SAN URI" grep -qF "URI:spiffe://kmsd.dev/$r" \
        <<<"$(openssl x509 -in "$pki/$r.crt" -noout -ext subjectAltName)"
    check "$r CN" grep -qE "CN ?= ?$r\$" <<<"$(openssl x509 -in "$pki/$r.crt" -noout -subject)"
done

# The CRL is signed by the CA and revokes revoked.crt (and nothing else).
check "CRL signature verifies" openssl crl -in "$pki/crl.pem" -CAfile "$pki/ca.crt" -noout
serial=$(openssl x509 -in "$pki/revoked.crt" -noout -serial | cut -d= -f2)
crl=$(openssl crl -in "$pki/crl.pem" -noout -text)
check "revoked serial in the CRL" grep -q "Serial Number: $serial" <<<"$crl"
check "CRL lists exactly one certificate" test "$(grep -c 'Serial Number:' <<<"$crl")" = 1
out=$(openssl verify -CAfile "$pki/ca.crt" -CRLfile "$pki/crl.pem" -crl_check \
    "$pki/revoked.crt" 2>&1 || true)
check "revoked is refused as revoked" grep -q "certificate revoked" <<<"$out"
check "revoked verifies without the CRL (only the CRL revokes it)" openssl verify \
    -CAfile "$pki/ca.crt" "$pki/revoked.crt"

out=$(openssl verify -CAfile "$pki/ca.crt" "$pki/expired.crt" 2>&1 || true)
check "expired is refused as expired" grep -q "certificate has expired" <<<"$out"
check_not "expired.crt is not valid now" openssl x509 -in "$pki/expired.crt" -noout -checkend 0

out=$(openssl verify -CAfile "$pki/ca.crt" "$pki/foreign.crt" 2>&1 || true)
check "foreign does not chain to the CA" grep -q "unable to get local issuer certificate" <<<"$out"
check "foreign verifies against its own CA" openssl verify -CAfile "$pki/foreign-ca/ca.crt" \
    "$pki/foreign.crt"

# Idempotent: a second run changes nothing; --force remakes the CA.
before=$(sha256sum "$pki"/*.crt "$pki"/*.key "$pki/crl.pem")
"$src/certs/make-dev-pki" "$pki" >/dev/null
check "second run changes nothing" test "$before" = \
    "$(sha256sum "$pki"/*.crt "$pki"/*.key "$pki/crl.pem")"
chmod 0644 "$pki/app.key"
"$src/certs/make-dev-pki" "$pki" >/dev/null
check "a world-readable key makes it remake the PKI" test "$(stat -c %a "$pki/app.key")" = 600
old_ca=$(sha256sum <"$pki/ca.crt")
"$src/certs/make-dev-pki" --force "$pki" >/dev/null
check "--force makes a new CA" test "$old_ca" != "$(sha256sum <"$pki/ca.crt")"
check "no staging directory left" test -z "$(find "$pki" -maxdepth 1 -name '.staging.*')"

# issue-client: a new application's certificate from the same CA.
"$src/certs/issue-client" billing app "$pki" >/dev/null
check "issued client verifies" openssl verify -CAfile "$pki/ca.crt" -CRLfile "$pki/crl.pem" \
    -crl_check -purpose sslclient "$pki/clients/billing.crt"
check "issued key is 0600" test "$(stat -c %a "$pki/clients/billing.key")" = 600
check "issued identity" grep -qF "URI:spiffe://kmsd.dev/app/billing" \
    <<<"$(openssl x509 -in "$pki/clients/billing.crt" -noout -ext subjectAltName)"
rc=0
"$src/certs/issue-client" billing app "$pki" >/dev/null 2>&1 || rc=$?
check "issuing over an existing cert is refused (73)" test "$rc" = 73
rc=0
"$src/certs/issue-client" billing root "$pki" >/dev/null 2>&1 || rc=$?
check "unknown role is a usage error (64)" test "$rc" = 64
rc=0
"$src/certs/issue-client" 'Bad/Name' app "$pki" >/dev/null 2>&1 || rc=$?
check "bad name is a usage error (64)" test "$rc" = 64
# A CSR asking for the admin identity still gets only the identity the CA decides.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/x.key" \
    -subj "/CN=x" -addext "subjectAltName=URI:spiffe://kmsd.dev/admin" -out "$tmp/x.csr" 2>/dev/null
"$src/certs/issue-client" --csr "$tmp/x.csr" reports app "$pki" >/dev/null
san=$(openssl x509 -in "$pki/clients/reports.crt" -noout -ext subjectAltName)
check "CSR extensions are not copied" test "$(grep -c URI: <<<"$san")" = 1
check "CSR identity replaced by the CA's" grep -qF "URI:spiffe://kmsd.dev/app/reports" <<<"$san"

# revoke-client: revoked in a rewritten CRL; the others still verify.
"$src/certs/revoke-client" billing "$pki" >/dev/null
out=$(openssl verify -CAfile "$pki/ca.crt" -CRLfile "$pki/crl.pem" -crl_check \
    "$pki/clients/billing.crt" 2>&1 || true)
check "revoke-client revokes" grep -q "certificate revoked" <<<"$out"
check "app still verifies with the new CRL" openssl verify -CAfile "$pki/ca.crt" \
    -CRLfile "$pki/crl.pem" -crl_check "$pki/app.crt"
check "the new CRL still lists revoked.crt" grep -q "Serial Number: $(openssl x509 \
    -in "$pki/revoked.crt" -noout -serial | cut -d= -f2)" <<<"$(openssl crl -in "$pki/crl.pem" \
    -noout -text)"
check "revoking twice is fine" "$src/certs/revoke-client" billing "$pki"
rc=0
"$src/certs/revoke-client" nobody "$pki" >/dev/null 2>&1 || rc=$?
check "revoking an unknown name is not found (66)" test "$rc" = 66
ca_now=$(sha256sum <"$pki/ca.crt")
"$src/certs/make-dev-pki" "$pki" >/dev/null
check "make-dev-pki keeps a PKI with extra revocations" test "$ca_now" = \
    "$(sha256sum <"$pki/ca.crt")"

echo "pki_test: $((checks - fails))/$checks checks passed"
[ "$fails" -eq 0 ]
