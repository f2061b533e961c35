#!/usr/bin/env bash
# Entrypoint of the registry-free PostgreSQL image built by scripts/build-postgres-image.sh.
# Installed in the image as /usr/local/bin/docker-entrypoint.sh.
#
# Follows the contract of the official `postgres` image closely enough for testcontainers:
#   POSTGRES_PASSWORD          password of POSTGRES_USER (required unless auth method is trust)
#   POSTGRES_USER              superuser name            (default: postgres)
#   POSTGRES_DB                database created at init  (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS       extra initdb arguments (word-split)
#   POSTGRES_HOST_AUTH_METHOD  auth for TCP connections  (default: scram-sha-256)
#   PGDATA                     cluster directory         (default: /var/lib/postgresql/data)
#   /docker-entrypoint-initdb.d/*.sql, *.sh   run once after the first initdb
# The first start runs initdb; postgres always runs as the `postgres` OS user, never root.
# `docker run IMAGE -c fsync=off` and `docker run IMAGE postgres -c fsync=off` both work;
# any other command (sh, psql, ...) is executed as given.
set -euo pipefail

export PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
POSTGRES_HOST_AUTH_METHOD=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
readonly SOCKET_DIR=/var/run/postgresql

log() { printf 'entrypoint: %s\n' "$*" >&2; }

# Run a command as the postgres OS user (full drop: uid, gid and supplementary groups).
as_postgres() {
    if [[ $(id -u) -eq 0 ]]; then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}

prepare_dirs() {
    mkdir -p "$PGDATA" "$SOCKET_DIR"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres:postgres "$PGDATA" "$SOCKET_DIR"
        chmod 3777 "$SOCKET_DIR"   # as in the official image: any user may create sockets
    fi
    chmod 0700 "$PGDATA"           # postgres refuses a group/world-accessible data dir
}

init_cluster() {
    if [[ -z ${POSTGRES_PASSWORD:-} && $POSTGRES_HOST_AUTH_METHOD != trust ]]; then
        log "error: POSTGRES_PASSWORD is not set (set it, or POSTGRES_HOST_AUTH_METHOD=trust)"
        exit 1
    fi
    log "initialising cluster in $PGDATA for user $POSTGRES_USER"

    local pwfile
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres "$pwfile"
    fi
    # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is deliberately word-split
    as_postgres initdb --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD" \
        --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} >&2
    rm -f "$pwfile"

    # Accept TCP from anywhere (the container's published port is what limits exposure);
    # the local socket stays `trust` as set by --auth-local above.
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"
    sed -ri "s/^#?(listen_addresses)\s*=\s*\S+.*/\1 = '*'/" "$PGDATA/postgresql.conf"

    # A temporary server on the Unix socket only: clients polling TCP (testcontainers) must
    # not see the database until it is fully set up.
    as_postgres pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -p 5432" start >&2
    local psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc --host="$SOCKET_DIR" --port=5432
        --username="$POSTGRES_USER")
    if [[ $POSTGRES_DB != postgres ]]; then
        # psql interpolates :"db" (quoted identifier) only in script input, not in -c.
        printf 'CREATE DATABASE :"db";\n' \
            | as_postgres "${psql[@]}" --dbname=postgres --set=db="$POSTGRES_DB" >&2
    fi
    local f
    for f in /docker-entrypoint-initdb.d/*; do
        [[ -e $f ]] || continue   # unmatched glob
        case $f in
            *.sql) log "running $f"; as_postgres "${psql[@]}" --dbname="$POSTGRES_DB" -f "$f" >&2 ;;
            *.sh)
                log "sourcing $f"
                # shellcheck source=/dev/null
                . "$f"
                ;;
            *) log "ignoring $f" ;;
        esac
    done
    as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >&2
    log "init done"
}

# `docker run IMAGE -c x=y` means `postgres -c x=y`.
if [[ $# -eq 0 || ${1:0:1} == - ]]; then
    set -- postgres "$@"
fi

if [[ $1 == postgres ]]; then
    prepare_dirs
    if [[ ! -s $PGDATA/PG_VERSION ]]; then
        init_cluster
    fi
    # exec: postgres becomes PID 1 and receives docker's stop signal directly.
    if [[ $(id -u) -eq 0 ]]; then
        exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    fi
fi
exec "$@"
