#!/usr/bin/env bash
# A PostgreSQL server for the storage tests, on 127.0.0.1 only (Debian; run as root).
#
#   eval "$(.ci/postgres.sh start)"   # starts it, prints: export AUTONORM_TEST_POSTGRES_URL=...
#   .ci/postgres.sh stop              # stops it (the cluster and its data stay for the next start)
#   .ci/postgres.sh drop              # stops it and deletes the cluster
#
# A dedicated cluster "autonorm" (port $AUTONORM_PG_PORT, default 55432) so that a server already
# on the machine is left alone. User `autonorm` with a random password (kept, root-only, in the
# cluster's folder) owns the database `autonorm_test`. Installs the `postgresql` package with
# apt-get when `pg_ctlcluster` is missing. Only the export line goes to stdout.
set -euo pipefail

CLUSTER=autonorm
PORT="${AUTONORM_PG_PORT:-55432}"
DB_USER=autonorm
DB_NAME=autonorm_test

say() { echo "postgres.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it creates a cluster owned by the postgres user)"

ensure_installed() {
    if ! command -v pg_ctlcluster >/dev/null; then
        say "installing postgresql with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql >&2
    fi
}

pg_version() {
    # the newest server installed
    ls /usr/lib/postgresql | sort -V | tail -n 1
}

as_postgres() { runuser -u postgres -- "$@"; }

psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"; }

start() {
    ensure_installed
    local version data password_file password
    version="$(pg_version)"
    [ -n "$version" ] || die "no PostgreSQL server found under /usr/lib/postgresql"
    data="/var/lib/postgresql/$version/$CLUSTER"
    if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version $CLUSTER"; then
        say "creating cluster $version/$CLUSTER on port $PORT"
        pg_createcluster "$version" "$CLUSTER" -p "$PORT" >&2 -- --auth-local=peer --auth-host=scram-sha-256
    fi
    local conf="/etc/postgresql/$version/$CLUSTER/postgresql.conf"
    # loopback only, the chosen port (also when the cluster was created with another one)
    sed -i -E "s/^#?listen_addresses\s*=.*/listen_addresses = '127.0.0.1'/" "$conf"
    sed -i -E "s/^#?port\s*=.*/port = $PORT/" "$conf"
    if ! pg_lsclusters -h | awk '{print $1, $2, $4}' | grep -qx "$version $CLUSTER online"; then
        pg_ctlcluster "$version" "$CLUSTER" start >&2
    fi
    for _ in $(seq 1 60); do
        as_postgres pg_isready -q -h 127.0.0.1 -p "$PORT" && break
        sleep 0.5
    done
    as_postgres pg_isready -q -h 127.0.0.1 -p "$PORT" || die "server on 127.0.0.1:$PORT did not come up"

    password_file="$data/autonorm-test.password"
    if [ ! -s "$password_file" ]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$password_file")
    fi
    password="$(cat "$password_file")"
    if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]; then
        psql_admin -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$password'"
    else
        psql_admin -c "ALTER ROLE $DB_USER LOGIN PASSWORD '$password'"
    fi
    if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
        psql_admin -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
    fi
    say "server $version/$CLUSTER listening on 127.0.0.1:$PORT, database $DB_NAME"
    echo "export AUTONORM_TEST_POSTGRES_URL=postgresql+psycopg://$DB_USER:$password@127.0.0.1:$PORT/$DB_NAME"
}

stop() {
    command -v pg_ctlcluster >/dev/null || return 0
    local version
    version="$(pg_version)"
    if pg_lsclusters -h | awk '{print $1, $2, $4}' | grep -qx "$version $CLUSTER online"; then
        pg_ctlcluster "$version" "$CLUSTER" stop >&2
        say "stopped $version/$CLUSTER"
    fi
    if [ "${1:-}" = drop ] && pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version $CLUSTER"; then
        pg_dropcluster "$version" "$CLUSTER" >&2
        say "dropped $version/$CLUSTER"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    drop) stop drop ;;
    *) die "usage: $0 start|stop|drop" ;;
esac
