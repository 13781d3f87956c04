#!/usr/bin/env bash
# kmsd over the curl CLI: each route once with its happy path and its main
# refusals, as an operator or an application's shell script would call it.
# Run by api_server_test (test_curl_cli) against its running kmsd:
#   KMSD_URL=https://127.0.0.1:PORT PKI=/path/to/pki bash api_curl.sh
set -euo pipefail
: "${KMSD_URL:?}" "${PKI:?}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0
n=0

# req ROLE METHOD PATH BODY STATUS [CODE]: ROLE "-" = no client certificate.
req() {
    local role=$1 method=$2 path=$3 body=$4 want=$5 code=${6:-}
    local args=(-sS -o "$work/body" -D "$work/headers" -w '%{http_code}' --cacert "$PKI/ca.crt"
        -X "$method" --max-time 20)
    if [ "$role" != "-" ]; then
        args+=(--cert "$PKI/$role.crt" --key "$PKI/$role.key")
    fi
    if [ -n "$body" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    n=$((n + 1))
    local got
    got=$(curl "${args[@]}" "$KMSD_URL$path" || true)
    if [ "$got" != "$want" ]; then
        echo "not ok $n - $method $path as $role: status $got, want $want: $(head -c 300 "$work/body")"
        fails=$((fails + 1))
        return 0
    fi
    if ! grep -qi '^x-request-id: [0-9a-f]\{32\}' "$work/headers"; then
        echo "not ok $n - $method $path: no X-Request-Id"
        fails=$((fails + 1))
        return 0
    fi
    if [ -n "$code" ] && ! grep -q "\"code\":\"$code\"" "$work/body"; then
        echo "not ok $n - $method $path: want code $code: $(head -c 300 "$work/body")"
        fails=$((fails + 1))
        return 0
    fi
    echo "ok $n - $method $path as $role -> $want $code"
}
field() { # field NAME: a top-level string field of the last body
    sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$work/body"
}

req app GET /healthz "" 200
req auditor GET /readyz "" 200
req auditor GET /metrics "" 200
grep -q '^kmsd_http_requests_total{' "$work/body" || { echo "not ok - metrics text"; fails=$((fails + 1)); }
req - GET /healthz "" 401 unauthenticated
req foreign GET /healthz "" 401 unauthenticated
req expired GET /healthz "" 401 unauthenticated
req revoked GET /healthz "" 401 unauthenticated

req admin POST /v1/keys '{"name":"app-curl","purpose":"encrypt"}' 201
req admin POST /v1/keys '{"name":"mac-curl","purpose":"mac","warning_window":3600}' 201
req admin POST /v1/keys '{"name":"app-curl","purpose":"encrypt"}' 409 key_exists
req app POST /v1/keys '{"name":"app-x","purpose":"encrypt"}' 403 forbidden
req admin GET '/v1/keys?limit=5' "" 200
req app GET /v1/keys/app-curl "" 200
req admin PATCH /v1/keys/app-curl '{"warning_window":7200}' 200
req admin GET /v1/keys/app-curl/versions/1 "" 200
req admin GET /v1/keys/app-curl/versions/2 "" 404 version_not_found
req admin GET /v1/keys/nope "" 404 key_not_found

req app POST /v1/keys/app-curl/wrap '{"plaintext":"AAECAwQFBgcICQoLDA0ODw==","context":"eA=="}' 200
tok=$(field ciphertext)
req app POST /v1/keys/app-curl/unwrap "{\"ciphertext\":\"$tok\",\"context\":\"eA==\"}" 200
[ "$(field plaintext)" = "AAECAwQFBgcICQoLDA0ODw==" ] || { echo "not ok - unwrap plaintext"; fails=$((fails + 1)); }
req app POST /v1/keys/app-curl/unwrap "{\"ciphertext\":\"$tok\",\"context\":\"eQ==\"}" 400 invalid_token
req app POST /v1/keys/app-curl/encrypt '{"plaintext":"aGk="}' 200
etok=$(field ciphertext)
req app POST /v1/keys/app-curl/decrypt "{\"ciphertext\":\"$etok\"}" 200
req app POST /v1/keys/app-curl/datakey '{"bytes":16,"include_plaintext":true}' 200
req admin POST /v1/keys/app-curl/rotate '{"type":"manual","reason":"curl"}' 200
req migrator POST /v1/keys/app-curl/rewrap "{\"ciphertext\":\"$tok\",\"context\":\"eA==\"}" 200
grep -q '"changed":true' "$work/body" || { echo "not ok - rewrap changed"; fails=$((fails + 1)); }
req app POST /v1/keys/app-curl/batch/rewrap "{\"items\":[{\"ciphertext\":\"$tok\",\"context\":\"eA==\"},{\"ciphertext\":\"kms1:AA==\"}]}" 200
grep -q '"succeeded":1,"failed":1\|"failed":1.*"succeeded":1' "$work/body" || { echo "not ok - batch counts: $(cat "$work/body")"; fails=$((fails + 1)); }
req admin POST /v1/keys/app-curl/rollback '{}' 200
req admin POST /v1/keys/app-curl/versions/2/state '{"action":"deprecate","grace_period":86400}' 200
req app POST /v1/keys/mac-curl/mac '{"message":"aGk="}' 200
mac=$(field mac)
req app POST /v1/keys/mac-curl/verify "{\"message\":\"aGk=\",\"mac\":\"$mac\"}" 200
grep -q '"valid":true' "$work/body" || { echo "not ok - verify valid"; fails=$((fails + 1)); }
req app POST /v1/keys/mac-curl/batch/mac '{"items":[{"message":"aGk="},{"message":"aGk"}]}' 200

req auditor GET /v1/master "" 200
req admin POST /v1/master/rotate '{}' 200
req auditor GET '/v1/rotations?key=app-curl&limit=10' "" 200
req admin POST /v1/admin/check '{"repair":false}' 200

req app POST /v1/keys/app-curl/wrap '{"plaintext":' 400 invalid_json
req app POST /v1/keys/app-curl/wrap '{"plaintext":"AAAA","x":1}' 400 invalid_json
req app POST /v1/keys/app-curl/wrap '{"plaintext":"A==="}' 400 invalid_base64
req app DELETE /v1/keys/app-curl "" 405 method_not_allowed
req app GET /v2/keys "" 404 not_found
# 415: a body that is not JSON.
n=$((n + 1))
got=$(curl -sS -o "$work/body" -w '%{http_code}' --cacert "$PKI/ca.crt" --cert "$PKI/app.crt" \
    --key "$PKI/app.key" -H 'Content-Type: application/x-www-form-urlencoded' \
    --data-binary 'plaintext=AAAA' "$KMSD_URL/v1/keys/app-curl/wrap" || true)
if [ "$got" = 415 ]; then echo "ok $n - 415"; else echo "not ok $n - 415: $got"; fails=$((fails + 1)); fi
# 413: announced oversize body.
head -c 1100000 /dev/zero | tr '\0' ' ' > "$work/big"
n=$((n + 1))
got=$(curl -sS -o "$work/body" -w '%{http_code}' --cacert "$PKI/ca.crt" --cert "$PKI/app.crt" \
    --key "$PKI/app.key" -H 'Content-Type: application/json' --data-binary @"$work/big" \
    "$KMSD_URL/v1/keys/app-curl/wrap" || true)
if [ "$got" = 413 ]; then echo "ok $n - 413"; else echo "not ok $n - 413: $got"; fails=$((fails + 1)); fi
req app GET /healthz "" 200

echo "# $n checks, $fails failed"
[ "$fails" -eq 0 ]
