#!/usr/bin/env bash
# Build a PostgreSQL Docker image without any image registry.
#
#   scripts/build-postgres-image.sh TAG [SUITE] [CACHE_DIR]
#
#   TAG        image tag to produce, e.g. uuidmig-postgres:15
#   SUITE      Debian suite for the root filesystem (default bookworm):
#              bullseye -> PostgreSQL 13, bookworm -> 15, trixie -> 17 (override: PG_MAJOR=NN)
#   CACHE_DIR  optional; holds <TAG with / and : replaced by _>.tar.zst (docker save | zstd)
#
# Order: 1. TAG already present in the engine -> nothing to do.
#        2. CACHE_DIR has the saved tarball -> docker load it.
#        3. mmdebstrap a minbase rootfs with postgresql-<major> from the Debian mirrors this
#           machine is configured with, docker import it, and save it to CACHE_DIR if given.
# Talks to the engine in DOCKER_HOST (see scripts/docker-engine.sh).  Needs root for step 3.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly ENTRYPOINT_SRC=$SCRIPT_DIR/postgres-image-entrypoint.sh
readonly ENTRYPOINT_DST=/usr/local/bin/docker-entrypoint.sh

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -ge 1 && $# -le 3 && -n $1 ]] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
TAG=$1
SUITE=${2:-bookworm}
CACHE_DIR=${3:-}
CACHE_FILE=${CACHE_DIR:+$CACHE_DIR/${TAG//[\/:]/_}.tar.zst}

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker engine at ${DOCKER_HOST:-the default socket} (eval \"\$(scripts/docker-engine.sh start DIR)\")"

# --- 1. already there --------------------------------------------------------------------
if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "image $TAG already present"
    exit 0
fi

# --- 2. cached tarball -------------------------------------------------------------------
if [[ -n $CACHE_FILE && -s $CACHE_FILE ]]; then
    log "loading $TAG from $CACHE_FILE"
    zstd -dc -- "$CACHE_FILE" | docker load >&2
    docker image inspect "$TAG" >/dev/null 2>&1 \
        || die "$CACHE_FILE did not contain $TAG (remove it to rebuild)"
    exit 0
fi

# --- 3. build ----------------------------------------------------------------------------
if [[ -n ${PG_MAJOR:-} ]]; then
    major=$PG_MAJOR
else
    case $SUITE in
        bullseye) major=13 ;;
        bookworm) major=15 ;;
        trixie) major=17 ;;
        *) die "unknown PostgreSQL major for suite '$SUITE'; set PG_MAJOR" ;;
    esac
fi
[[ $(id -u) -eq 0 ]] || die "building needs root (mmdebstrap --mode=root)"
command -v mmdebstrap >/dev/null || die "mmdebstrap missing (scripts/docker-engine.sh install)"
[[ -r $ENTRYPOINT_SRC ]] || die "missing $ENTRYPOINT_SRC"
[[ $ENTRYPOINT_SRC != *[[:space:]]* ]] || die "mmdebstrap's upload hook cannot take a path with spaces"

# Debian mirrors, as this machine's apt uses them.  Prints "URI SUITE" for every enabled
# `deb` entry with component main, from one-line (*.list) and deb822 (*.sources) files.
configured_sources() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [opt=val ...] URI SUITE COMPONENT...
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
            | awk '$1 == "deb" { for (i = 4; i <= NF; i++) if ($i == "main") { print $2, $3; break } }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        # Stanzas separated by blank lines; multi-valued fields are whitespace-separated.
        awk '
            function flush(   nu, ns, u, s, i, ok) {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no" && comps ~ /(^| )main( |$)/) {
                    nu = split(uris, u, " "); ns = split(suites, s, " ")
                    for (i = 1; i <= nu; i++) for (ok = 1; ok <= ns; ok++) print u[i], s[ok]
                }
                types = uris = suites = comps = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[A-Za-z-]+:/ {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "components") comps = val
                else if (key == "enabled") enabled = val
            }
            END { flush() }
        ' "$f"
    done
}

# Map the host suite's archive/updates/security entries onto SUITE, so the image comes from
# the same mirrors the host uses (possibly a different release on them).
# shellcheck source=/dev/null
host_codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
[[ -n $host_codename ]] || die "cannot read VERSION_CODENAME from /etc/os-release"
mirrors=()
while read -r uri suite; do
    case $suite in
        "$host_codename") mirrors+=("deb $uri $SUITE main") ;;
        "$host_codename"-updates) mirrors+=("deb $uri $SUITE-updates main") ;;
        "$host_codename"-security) mirrors+=("deb $uri $SUITE-security main") ;;
    esac
done < <(configured_sources | sort -u)
((${#mirrors[@]} > 0)) || die "no Debian '$host_codename' main entries in /etc/apt/sources.list.d"

# Carry over the host's apt date checks (set off here, e.g. for snapshot mirrors).
aptopts=()
for opt in Acquire::Check-Valid-Until Acquire::Check-Date; do
    val=$(apt-config dump "$opt" | sed -n "s/^$opt \"\(.*\)\";$/\1/p")
    if [[ -n $val ]]; then
        aptopts+=("--aptopt=$opt \"$val\"")
    fi
done

workdir=$(mktemp -d "${TMPDIR:-/tmp}/pg-image.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
rootfs=$workdir/rootfs.tar

log "building $TAG: Debian $SUITE, postgresql-$major"
printf '  %s\n' "${mirrors[@]}" >&2
SECONDS=0
# Excluded: man pages, docs, info, translations (not /usr/share/postgresql/*/man: the
# client's update-alternatives needs those files).  Debian's postinst creates a "main"
# cluster; the entrypoint initialises its own in PGDATA, so that one is deleted.
mmdebstrap --mode=root --variant=minbase --format=tar \
    --include="postgresql-$major" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "${aptopts[@]}" \
    --customize-hook="upload $ENTRYPOINT_SRC $ENTRYPOINT_DST" \
    --customize-hook="chmod 0755 \"\$1$ENTRYPOINT_DST\"" \
    --customize-hook="rm -rf \"\$1/etc/postgresql/$major\" \"\$1/var/lib/postgresql/$major\"" \
    "$SUITE" "$rootfs" "${mirrors[@]}" >&2
log "rootfs: $(du -h "$rootfs" | cut -f1) in ${SECONDS}s"

SECONDS=0
# `docker import` of engine 20.10 rejects STOPSIGNAL, so `docker stop` sends SIGTERM
# (postgres "smart" shutdown); testcontainers removes containers with SIGKILL anyway.
docker import \
    --message "postgresql-$major on Debian $SUITE (scripts/build-postgres-image.sh)" \
    --change "ENTRYPOINT [\"$ENTRYPOINT_DST\"]" \
    --change 'CMD ["postgres"]' \
    --change "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV PG_MAJOR=$major" \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'EXPOSE 5432' \
    --change "LABEL org.opencontainers.image.description=\"postgresql-$major on Debian $SUITE\"" \
    "$rootfs" "$TAG" >&2
log "imported $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | numfmt --to=iec)) in ${SECONDS}s"

if [[ -n $CACHE_FILE ]]; then
    SECONDS=0
    mkdir -p -- "$CACHE_DIR"
    # Write under a temporary name so an interrupted save never looks like a valid cache.
    docker save "$TAG" | zstd -3 -T0 -q -o "$CACHE_FILE.partial"
    mv -f -- "$CACHE_FILE.partial" "$CACHE_FILE"
    log "saved $CACHE_FILE ($(du -h "$CACHE_FILE" | cut -f1)) in ${SECONDS}s"
fi
