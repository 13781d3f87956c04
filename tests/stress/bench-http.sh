#!/usr/bin/env bash
# tests/stress/bench-http.sh BUILD_DIR [kms-bench http options...]
#
# Runs `kms-bench http` against a throwaway kmsd: a fresh SoftHSM token
# (kms-token init, PINs in 0600 files), a fresh LMDB store and a development
# PKI (certs/make-dev-pki) in a temporary directory; kmsd listens on a random
# loopback port and is stopped (SIGTERM) and everything removed at the end.
#
#   WORKERS=processes:2 tests/stress/bench-http.sh build --seconds 3
#
# Environment: WORKERS (kmsd's workers option; default: kmsd's default),
# KMSD_CONF_EXTRA (lines appended to kmsd's config, e.g.
# "process_threads = 32"),
# AUDIT (kmsd's audit option, on or off; default on),
# KMS_SOFTHSM_MODULE (default /usr/lib/softhsm/libsofthsm2.so),
# PERF_DATA=FILE (record a CPU profile of kmsd with `perf record -g`; the
# CPU figures of that run then include perf's own overhead; PERF_CALLGRAPH
# replaces -g, e.g. "--call-graph dwarf,16384" to see through the
# libraries' frames, and PERF_FREQ the sampling rate, default 499),
# STRACE_OUT=FILE (trace kmsd's writes and syncs with strace instead:
# which pages an audit commit writes; throughput then means nothing),
# KMSD_LOG_KEEP=FILE (keep kmsd's log, e.g. the audit committer's
# records-per-commit line written at stop).
# The raw PKCS#11 baseline is measured on the same token, so the comparison
# columns are filled in.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:?usage: $0 BUILD_DIR [kms-bench http options]}" && pwd)
shift
module=${KMS_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
# shellcheck source=../lib/kms-fixture.sh
. "$here/tests/lib/kms-fixture.sh"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kms-bench-http-XXXXXX")
cleanup() {
    # kmsd runs in a process group of its own (setsid below): the whole
    # group is stopped, worker processes included.
    kms_fixture_stop
    [ -n "${KMSD_LOG_KEEP:-}" ] && cp "$tmp/kmsd.log" "$KMSD_LOG_KEEP" 2>/dev/null; rm -rf "$tmp"
}
trap cleanup EXIT

"$here/certs/make-dev-pki" "$tmp/pki" >/dev/null
mkdir -p "$tmp/store"
label="kmsd-bench-$$"
kms_fixture_token "$tmp" "$label" "$build/tools/kms-token" "$module"
kms_fixture_policy "$tmp/policy.json"

write_conf() { # PORT
    kms_fixture_conf "$tmp" "$1" "$label" "$module"
    if [ -n "${WORKERS:-}" ]; then echo "workers = $WORKERS"; fi
    if [ -n "${KMSD_CONF_EXTRA:-}" ]; then printf '%s\n' "$KMSD_CONF_EXTRA"; fi
    # AUDIT=off: kmsd's benchmark-only switch (docs/audit.md), to measure
    # what the durable audit trail costs.
    if [ -n "${AUDIT:-}" ]; then echo "audit = $AUDIT"; fi
}
probe() {
    curl -fsS --cacert "$pki/ca.crt" --cert "$pki/app.crt" --key "$pki/app.key" \
        "https://127.0.0.1:$1/healthz"
}

# Its own process group, so kms-bench sums the CPU of every worker process.
perf_cmd=()
if [ -n "${PERF_DATA:-}" ]; then perf_cmd=(perf record -q ${PERF_CALLGRAPH:--g} -F "${PERF_FREQ:-499}" -o "$PERF_DATA" --); fi
if [ -n "${STRACE_OUT:-}" ]; then perf_cmd=(strace -f -qq -e trace=pwrite64,pwritev,write,writev,fdatasync -o "$STRACE_OUT" --); fi
pki=$tmp/pki
kms_fixture_launch=(setsid "${perf_cmd[@]}")
kms_fixture_serve "$tmp" "$build/tools/kmsd" write_conf probe
port=$kms_fixture_port

"$build/tools/kms-bench" http --url "https://127.0.0.1:$port" \
    --cert "$pki/app.crt" --key "$pki/app.key" --cacert "$pki/ca.crt" \
    --admin-cert "$pki/admin.crt" --admin-key "$pki/admin.key" \
    --server-pid "$kms_fixture_pid" \
    --module "$module" --token-uri "pkcs11:token=$label" --pin-file "$tmp/pin" "$@"
