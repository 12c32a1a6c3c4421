#!/bin/sh
# Initialises the data directory on first start from POSTGRES_USER / _PASSWORD / _DB, then runs
# the server as the postgres user.
#
# TLS: POSTGRES_TLS_CERT and POSTGRES_TLS_KEY (paths of PEM files in the container) turn SSL
# on. POSTGRES_TLS_CA names the CA client certificates must chain to; with
# POSTGRES_TLS_REQUIRE_CLIENT_CERT=true every connection over TCP must show one (and still
# give its password). POSTGRES_PLAINTEXT=off refuses TCP connections without SSL.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

if [ "${1:-}" = postgres ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -z "${POSTGRES_PASSWORD:-}" ]; then
            echo "error: POSTGRES_PASSWORD is not set; the database would accept no one" >&2
            exit 1
        fi
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
        chown postgres "$pwfile"
        as_postgres initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
            --encoding=UTF8 --locale=C --auth-local=trust --auth-host=scram-sha-256 >/dev/null
        rm -f "$pwfile"
        if [ "${POSTGRES_PLAINTEXT:-on}" = off ]; then kind=hostssl; else kind=host; fi
        if [ "${POSTGRES_TLS_REQUIRE_CLIENT_CERT:-false}" = true ]; then
            echo "hostssl all all all scram-sha-256 clientcert=verify-ca" >> "$PGDATA/pg_hba.conf"
        else
            echo "$kind all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
        fi
        echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
        if [ "$POSTGRES_DB" != postgres ]; then
            # A server on the Unix socket only, so that nobody connects before setup is done.
            as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
            as_postgres psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname postgres \
                -c "CREATE DATABASE \"$POSTGRES_DB\""
            as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
        fi
        echo "database initialised: user $POSTGRES_USER, database $POSTGRES_DB"
    fi
    if [ -n "${POSTGRES_TLS_CERT:-}" ]; then
        : "${POSTGRES_TLS_KEY:?POSTGRES_TLS_CERT is set: POSTGRES_TLS_KEY must name its key}"
        # Copies the server may read as its own user (it refuses a key others can read).
        tls=/var/lib/postgresql/tls
        mkdir -p "$tls"
        cp "$POSTGRES_TLS_CERT" "$tls/cert.pem"
        cp "$POSTGRES_TLS_KEY" "$tls/key.pem"
        set -- "$@" -c ssl=on -c "ssl_cert_file=$tls/cert.pem" -c "ssl_key_file=$tls/key.pem"
        if [ -n "${POSTGRES_TLS_CA:-}" ]; then
            cp "$POSTGRES_TLS_CA" "$tls/ca.pem"
            set -- "$@" -c "ssl_ca_file=$tls/ca.pem"
        fi
        chown -R postgres:postgres "$tls"
        chmod 600 "$tls/key.pem"
    fi
    exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
fi
exec "$@"
