#!/usr/bin/env bash
# Writes the seed corpus of fuzz_export: real compliance exports, made by a
# throwaway kmsd (fresh SoftHSM token, LMDB store and development PKI in a
# temp dir, loopback only) and written by `kmsctl export`, each packed into
# one bundle in the format tests/fuzz/fuzz_export.c reads:
#
#     === NAME\n<content>\n=== NAME\n<content>...
#
# with the export's own public key also given as the pinned key ("@pin"),
# as `kmsctl verify-export DIR --public-key FILE` is used. An export holds no
# secret: audit records, key inventory, rotation records, the public key and
# signatures. Rewrites tests/fuzz/corpus/fuzz_export/.
#
# usage: tests/fuzz/make_export_seeds.sh BUILD_DIR [SOFTHSM_MODULE]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
bld=$(cd "${1:?usage: make_export_seeds.sh BUILD_DIR [SOFTHSM_MODULE]}" && pwd)
module=${2:-/usr/lib/softhsm/libsofthsm2.so}
kmsd=$bld/tools/kmsd
kmsctl=$bld/tools/kmsctl
# shellcheck source=../lib/kms-fixture.sh
. "$src/tests/lib/kms-fixture.sh"

kms_fixture_tempdir

label=export-seeds
"$src/certs/make-dev-pki" "$tmp/pki" >/dev/null
mkdir -p "$tmp/store"
kms_fixture_token "$tmp" "$label" "$bld/tools/kms-token" "$module"
kms_fixture_policy "$tmp/policy.json"
export KMSCTL_CACERT=$tmp/pki/ca.crt
as() { # ROLE kmsctl-args...
    local role=$1
    shift
    "$kmsctl" --cert "$tmp/pki/$role.crt" --key "$tmp/pki/$role.key" "$@"
}
conf() { # PORT; signed heads every 4 records, so that an export holds some
    kms_fixture_conf "$tmp" "$1" "$label" "$module"
    echo "audit_sign_every = 4"
    echo "log_level = warn"
}
probe() { as auditor --url "https://127.0.0.1:$1" health; }
kms_fixture_serve "$tmp" "$kmsd" conf probe
export KMSCTL_URL=https://127.0.0.1:$kms_fixture_port

# Some history: keys, data operations, a rotation, a denied request.
as admin key create orders --rotation-period 90d >/dev/null
as admin key create tags --purpose mac >/dev/null
for i in 1 2 3; do
    printf 'dek-%s' "$i" | as app wrap orders --in - >/dev/null
done
as admin key rotate orders --reason "seed rotation" >/dev/null
printf 'dek-4' | as app wrap orders --in - >/dev/null
printf 'message' | as app mac tags --in - >/dev/null
as app key create not-allowed >/dev/null 2>&1 || true

out=$here/corpus/fuzz_export
rm -rf "$out"
mkdir -p "$out"
bundle() { # EXPORT_DIR OUT_FILE
    local dir=$1 f
    {
        printf '=== @pin\n'
        cat "$dir/public-key.pem"
        for f in manifest.json manifest.sig inventory.csv inventory.json rotations.json \
            audit.jsonl public-key.pem; do
            printf '\n=== %s\n' "$f"
            cat "$dir/$f"
        done
    } >"$2"
}
as auditor export --out "$tmp/all" >/dev/null
bundle "$tmp/all" "$out/all.bundle"
# A range that starts after the first records: the export carries an anchor.
sleep 1.1
from=$(date -u +%Y-%m-%dT%H:%M:%SZ)
sleep 1.1
for i in 5 6 7; do
    printf 'dek-%s' "$i" | as app wrap orders --in - >/dev/null
done
as auditor export --from "$from" --out "$tmp/range" >/dev/null
bundle "$tmp/range" "$out/range.bundle"
ls -l "$out"
