# Shell fixtures shared by the shell tests and benchmarks (source this file).
# Each works inside a directory of the caller's, made with mktemp.

# kms_fixture_token DIR LABEL KMS_TOKEN MODULE
# A fresh SoftHSM token that only this run sees: DIR/softhsm2.conf (exported
# as SOFTHSM2_CONF) with its token directory DIR/tokens, initialised with
# `kms-token init --generate`, which writes fresh PINs to DIR/pin and
# DIR/so-pin (0600): no PIN ever appears on a command line.
kms_fixture_token() {
    local dir=$1 label=$2 kms_token=$3 module=$4
    mkdir -p "$dir/tokens"
    cat >"$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
    export SOFTHSM2_CONF=$dir/softhsm2.conf
    "$kms_token" init --module "$module" --label "$label" --pin-file "$dir/pin" \
        --so-pin-file "$dir/so-pin" --generate >/dev/null
}

# kms_fixture_policy FILE [APP_KEYS]
# The development PKI's four identities (certs/make-dev-pki) on their roles:
# the app role on APP_KEYS (a key-name glob, default *), the others on *.
kms_fixture_policy() {
    local file=$1 app_keys=${2:-*}
    cat >"$file" <<POLICY
{"rules": [
  {"identity": "spiffe://kmsd.dev/app", "role": "app", "keys": ["$app_keys"]},
  {"identity": "spiffe://kmsd.dev/migrator", "role": "migrator", "keys": ["*"]},
  {"identity": "spiffe://kmsd.dev/admin", "role": "admin", "keys": ["*"]},
  {"identity": "spiffe://kmsd.dev/auditor", "role": "auditor", "keys": ["*"]}
]}
POLICY
}
