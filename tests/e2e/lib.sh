# shellcheck shell=bash
# The e2e fixture of kms-reencrypt: a throwaway PostgreSQL cluster (initdb,
# pg_ctl, Unix socket in the temp dir, no TCP) and a real kmsd (throwaway
# SoftHSM token, LMDB store, development PKI) on a free loopback port.
# Sourced by tests/e2e/reencrypt_test.sh and scripts/bench-reencrypt.
#
# Needs: KMS_SOURCE_DIR, KMS_BUILD_DIR, KMS_SOFTHSM_MODULE. Must run as a
# non-root user (PostgreSQL refuses root).
set -euo pipefail
src=${KMS_SOURCE_DIR:?}
bld=${KMS_BUILD_DIR:?}
kmsd=${KMSD:-$bld/tools/kmsd}
kms_token=${KMS_TOKEN:-$bld/tools/kms-token}
reencrypt=${KMS_REENCRYPT:-$bld/tools/kms-reencrypt}
module=${KMS_SOFTHSM_MODULE:?}
# shellcheck source=../lib/kms-fixture.sh
. "$src/tests/lib/kms-fixture.sh"
pgbin=${PG_BIN:-/usr/lib/postgresql/15/bin}

tmp=$(mktemp -d)
kmsd_pid=""
kmsd_port=""
pg_up=0
bg_pids=()

e2e_stop_kmsd() {
    kms_fixture_stop
    kmsd_pid=""
}

e2e_cleanup() {
    local p
    for p in "${bg_pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    e2e_stop_kmsd
    if [ "$pg_up" = 1 ]; then
        "$pgbin/pg_ctl" -D "$tmp/pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap e2e_cleanup EXIT

fails=0
checks=0
check() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    checks=$((checks + 1))
    if ! "$@"; then
        fails=$((fails + 1))
        echo "FAIL: $what" >&2
    fi
}
eq() { [ "$1" = "$2" ] || { echo "  expected '$2', got '$1'" >&2; return 1; }; }

# ---- PostgreSQL ----
e2e_start_pg() {
    if [ "$(id -u)" = 0 ]; then
        # ctest reports this code as "skipped" (SKIP_RETURN_CODE), never as
        # a pass: scripts/test and CI run the suite as the user kmstest.
        echo "e2e: PostgreSQL refuses to run as root; run as an unprivileged user" >&2
        exit 98
    fi
    "$pgbin/initdb" -D "$tmp/pg" -A trust -U rx --no-sync -E UTF8 >"$tmp/initdb.log" 2>&1
    mkdir -p "$tmp/sock"
    cat >>"$tmp/pg/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$tmp/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
max_wal_size = 2GB
max_connections = 50
CONF
    "$pgbin/pg_ctl" -D "$tmp/pg" -l "$tmp/pg.log" -w start >/dev/null
    pg_up=1
    export PGHOST=$tmp/sock PGUSER=rx PGDATABASE=postgres
    export PGOPTIONS="-c client_min_messages=warning"
    unset PGPASSWORD PGSERVICE || true
    psql -qX -c "CREATE DATABASE rx" >/dev/null
    export PGDATABASE=rx
}

q() { psql -qX -v ON_ERROR_STOP=1 "$@"; }
q1() { psql -qAtX -v ON_ERROR_STOP=1 -c "$1"; }

# Token inspection in SQL, independent of the C code: the binary header
# (docs/ciphertext-format.md): 'K' 0x01 kind L name[L] version(4, BE).
e2e_sql_helpers() {
    q >/dev/null <<'SQL'
CREATE FUNCTION tok_bin(v bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF v IS NOT NULL AND length(v) > 5 AND substring(v FROM 1 FOR 5) = '\x6b6d73313a'::bytea THEN
    RETURN decode(convert_from(substring(v FROM 6), 'UTF8'), 'base64');
  END IF;
  RETURN v;
EXCEPTION WHEN OTHERS THEN RETURN NULL;
END $$;
CREATE FUNCTION tok_key(v bytea) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE b bytea := tok_bin(v);
BEGIN
  IF b IS NULL OR length(b) < 9 OR get_byte(b, 0) <> 75 OR get_byte(b, 1) <> 1
     OR length(b) < 8 + get_byte(b, 3) THEN RETURN NULL; END IF;
  RETURN convert_from(substring(b FROM 5 FOR get_byte(b, 3)), 'UTF8');
END $$;
CREATE FUNCTION tok_ver(v bytea) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE b bytea := tok_bin(v); l int;
BEGIN
  IF b IS NULL OR length(b) < 9 OR get_byte(b, 0) <> 75 OR get_byte(b, 1) <> 1
     OR length(b) < 8 + get_byte(b, 3) THEN RETURN NULL; END IF;
  l := get_byte(b, 3);
  RETURN (get_byte(b, 4 + l)::bigint << 24) | (get_byte(b, 5 + l) << 16)
         | (get_byte(b, 6 + l) << 8) | get_byte(b, 7 + l);
END $$;
CREATE FUNCTION tok_text(v bytea) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT 'kms1:' || replace(encode(tok_bin(v), 'base64'), E'\n', '') $$;
CREATE FUNCTION b64(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT replace(encode(convert_to(t, 'UTF8'), 'base64'), E'\n', '') $$;
SQL
}

# ---- kmsd ----
e2e_start_kmsd() { # [PORT]: a fixed port to restart on
    local want=${1:-}
    if [ ! -d "$tmp/pki" ]; then
        "$src/certs/make-dev-pki" "$tmp/pki" >/dev/null
        mkdir -p "$tmp/store"
        kms_fixture_token "$tmp" rx-e2e "$kms_token" "$module"
        kms_fixture_policy "$tmp/policy.json"
    fi
    kms_fixture_serve "$tmp" "$kmsd" e2e_kmsd_conf e2e_kmsd_probe "$want" || exit 1
    kmsd_pid=$kms_fixture_pid
    kmsd_port=$kms_fixture_port
    export KMSCTL_URL=https://127.0.0.1:$kmsd_port
}

e2e_kmsd_conf() { # PORT
    kms_fixture_conf "$tmp" "$1" rx-e2e "$module"
    echo "workers = ${E2E_KMSD_WORKERS:-processes:2}"
    echo "scheduler_interval = 0"
    echo "log_level = warn"
}

e2e_kmsd_probe() { # PORT
    api GET auditor /healthz "" "https://127.0.0.1:$1"
}

# api METHOD ROLE PATH [BODY|@FILE|-] [URL]: curl against kmsd; body on stdout.
api() {
    local method=$1 role=$2 path=$3 body=${4:-} url=${5:-${KMSCTL_URL:-}}
    local args=(-sS --fail-with-body --max-time 120 --cacert "$tmp/pki/ca.crt"
        --cert "$tmp/pki/$role.crt" --key "$tmp/pki/$role.key"
        -H 'Content-Type: application/json' -X "$method")
    if [ -n "$body" ]; then args+=(--data-binary "$body"); fi
    curl "${args[@]}" "$url$path"
}

# The migrator's connection settings for kms-reencrypt.
e2e_tool_env() {
    export KMSCTL_CACERT=$tmp/pki/ca.crt KMSCTL_CERT=$tmp/pki/migrator.crt \
        KMSCTL_KEY=$tmp/pki/migrator.key
}

# batches OP ROLE KEY SRC DST: sends the items of table SRC(n, item json)
# in batches of 1000 to /v1/keys/KEY/batch/OP; DST(batch, doc) gets the
# answers, then table DST_items(n, e) pairs each item with its result.
batches() {
    local op=$1 role=$2 key=$3 srcq=$4 dst=$5 total b=0
    q -c "DROP TABLE IF EXISTS $dst, ${dst}_items; CREATE TABLE $dst (batch serial, doc text)"
    total=$(q1 "SELECT coalesce(max(n), 0) FROM $srcq")
    while [ $((b * 1000)) -lt "$total" ]; do
        q1 "SELECT json_build_object('items', json_agg(item ORDER BY n))::text FROM $srcq
            WHERE n > $((b * 1000)) AND n <= $((b * 1000 + 1000))" |
            api POST "$role" "/v1/keys/$key/batch/$op" @- |
            q -c "\\copy $dst(doc) FROM pstdin"
        b=$((b + 1))
    done
    q -c "CREATE TABLE ${dst}_items AS SELECT (d.batch - 1) * 1000 + r.ord AS n, r.e
          FROM $dst d, json_array_elements(d.doc::json->'results') WITH ORDINALITY AS r(e, ord);
          ALTER TABLE ${dst}_items ADD PRIMARY KEY (n); ANALYZE ${dst}_items"
}
