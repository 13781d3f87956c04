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

# kms_fixture_tempdir
# Sets tmp to a new temporary directory, and arranges for the kmsd that
# kms_fixture_serve starts to be stopped and the directory removed at exit.
kms_fixture_tempdir() {
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/kms-fixture-XXXXXX")
    trap 'kms_fixture_stop; rm -rf "$tmp"' EXIT
}

# kms_fixture_conf DIR PORT LABEL MODULE
# The config lines every fixture's kmsd shares: 127.0.0.1:PORT, the
# development PKI in DIR/pki (its CRL included), the policy DIR/policy.json,
# the store DIR/store and the token LABEL with its PIN in DIR/pin (as
# kms_fixture_token made them). Callers print their own lines after these.
kms_fixture_conf() {
    local dir=$1 port=$2 label=$3 module=$4
    cat <<CONF
listen = 127.0.0.1:$port
tls_cert = $dir/pki/server.crt
tls_key = $dir/pki/server.key
tls_ca = $dir/pki/ca.crt
tls_crl = $dir/pki/crl.pem
policy = $dir/policy.json
store_path = $dir/store
hsm_module = $module
hsm_token_uri = pkcs11:token=$label
hsm_pin_file = $dir/pin
CONF
}

# kms_fixture_serve DIR KMSD CONF_FN PROBE_FN [PORT]
# Starts KMSD with the config that `CONF_FN PORT` prints (written to
# DIR/kmsd.conf; kmsd's stderr is appended to DIR/kmsd.log) on PORT, or on a
# random loopback port nothing answers on, and waits up to 15 s for
# `PROBE_FN PORT` to succeed. Eight tries: another random port each time,
# or the same PORT again a second later (a restart may find it briefly
# taken). The array kms_fixture_launch, when set, goes before KMSD (e.g.
# setsid, or a profiler). Sets kms_fixture_pid and kms_fixture_port; prints
# the log and returns 1 if kmsd never answered.
kms_fixture_serve() {
    local dir=$1 kmsd=$2 conf_fn=$3 probe_fn=$4 want=${5:-} attempt port
    kms_fixture_port=""
    for attempt in 1 2 3 4 5 6 7 8; do
        port=${want:-$((20000 + (RANDOM * 7 + attempt * 997) % 40000))}
        if [ -z "$want" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
        "$conf_fn" "$port" >"$dir/kmsd.conf"
        "${kms_fixture_launch[@]}" "$kmsd" --config "$dir/kmsd.conf" 2>>"$dir/kmsd.log" &
        kms_fixture_pid=$!
        for _ in $(seq 1 150); do
            kill -0 "$kms_fixture_pid" 2>/dev/null || break
            if "$probe_fn" "$port" >/dev/null 2>&1; then
                kms_fixture_port=$port
                return 0
            fi
            sleep 0.1
        done
        kms_fixture_stop
        if [ -n "$want" ]; then sleep 1; fi
    done
    echo "kmsd did not come up; its log:" >&2
    cat "$dir/kmsd.log" >&2
    return 1
}

# kms_fixture_stop
# Stops the kmsd kms_fixture_serve started: SIGTERM (to its process group
# when it leads one, as under setsid), SIGKILL if it has not exited 10 s
# later. Safe to call when nothing runs.
kms_fixture_stop() {
    local pid=${kms_fixture_pid:-}
    kms_fixture_pid=""
    if [ -z "$pid" ]; then return 0; fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "kmsd did not stop on SIGTERM within 10 s" >&2
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
