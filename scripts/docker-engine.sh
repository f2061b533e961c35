#!/usr/bin/env bash
# Run a private, loopback-confined Docker engine for the test suite.
#
#   scripts/docker-engine.sh install          # apt-get docker.io mmdebstrap zstd (idempotent)
#   eval "$(scripts/docker-engine.sh start WORKDIR)"   # start (or reuse) dockerd, export env
#   scripts/docker-engine.sh env WORKDIR      # print the export lines only
#   scripts/docker-engine.sh stop WORKDIR     # remove its containers, stop it, drop docker0
#
# Everything the engine owns (data-root, exec-root, socket, pidfile, log, daemon.json) lives
# under WORKDIR; nothing lands in /var/lib/docker or /etc/docker.  The bridge (docker0,
# 10.213.0.1/24) is host-wide, so run one such engine at a time.  stdout carries only
# `export ...` lines; diagnostics go to stderr.
#
# Workplace rule: containers may talk only to loopback or to each other.  Hence no iptables
# NAT/forwarding, a fixed private bridge subnet, published ports bound to 127.0.0.1, a DNS
# server that does not exist (127.0.0.1) and a dead proxy (127.0.0.1:9) so that an accidental
# `docker pull` fails at once instead of going out.
set -euo pipefail

readonly DEAD_PROXY=http://127.0.0.1:9
readonly BRIDGE_IP=10.213.0.1/24
readonly START_TIMEOUT=30   # seconds to wait for `docker info`
readonly STOP_TIMEOUT=20    # seconds to wait for dockerd to exit after SIGTERM

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Absolute, normalised WORKDIR (the socket path must be absolute; it need not exist yet).
workdir_arg() {
    [[ $# -ge 1 && -n $1 ]] || die "WORKDIR argument required"
    realpath -m -- "$1"
}

# Paths derived from WORKDIR.
set_paths() {
    WORKDIR=$1
    SOCK=$WORKDIR/docker.sock
    PIDFILE=$WORKDIR/dockerd.pid
    LOGFILE=$WORKDIR/dockerd.log
    CONFIG=$WORKDIR/daemon.json
    DATA_ROOT=$WORKDIR/data
    EXEC_ROOT=$WORKDIR/exec
    # dockerd 20.10 starts its own containerd and records its pid here.
    CONTAINERD_PIDFILE=$EXEC_ROOT/containerd/containerd.pid
}

# docker client bound to this engine's socket (whatever DOCKER_HOST the caller has); the
# timeout keeps a wedged engine from hanging start/stop.
dk() { timeout 30 docker --host "unix://$SOCK" "$@"; }

# True while process $1 exists and is not a zombie.  A killed dockerd is reparented to PID 1,
# which may reap it late; `kill -0` alone would report the zombie as running.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }          # fields after "(comm) "; the first one is the state
    [[ ${stat%% *} != Z ]]
}

# Print the pid from $1 if that process is alive and its command name is $2.
live_pid() {
    local file=$1 comm=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    alive "$pid" || return 1
    printf '%s\n' "$pid"
}

print_env() {
    # %q keeps the lines safe for eval even if WORKDIR contains odd characters.
    printf 'export DOCKER_HOST=%q\n' "unix://$SOCK"
    # The Ryuk reaper image cannot be pulled here; callers remove their containers.
    printf 'export TESTCONTAINERS_RYUK_DISABLED=true\n'
    # This machine has /.dockerenv, so testcontainers would assume it runs inside a container
    # and dial the bridge gateway; force it to use the published port on loopback instead.
    printf 'export TESTCONTAINERS_CONNECTION_MODE=docker_host\n'
    printf 'export TC_HOST=127.0.0.1\n'
}

cmd_install() {
    if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null \
        && command -v zstd >/dev/null; then
        log "dockerd, mmdebstrap and zstd already installed"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install needs root"

    # Keep the package scripts from starting a system-wide dockerd/containerd (there is no
    # systemd here, but sysv-rc's invoke-rc.d would try).  Only add a policy file if none
    # exists, and remove only the one we added.
    local policy=/usr/sbin/policy-rc.d added_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi

    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -qq >&2
    log "apt-get install docker.io mmdebstrap zstd"
    apt-get install -y -qq --no-install-recommends docker.io mmdebstrap zstd >&2
    if [[ -n $added_policy ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
    log "installed: $(dockerd --version)"
}

cmd_start() {
    set_paths "$(workdir_arg "$@")"
    command -v dockerd >/dev/null || die "dockerd not installed (run: $0 install)"
    [[ $(id -u) -eq 0 ]] || die "start needs root"

    local pid started=
    if pid=$(live_pid "$PIDFILE" dockerd); then
        log "reusing dockerd (pid $pid) of $WORKDIR"
    else
        mkdir -p "$WORKDIR" "$DATA_ROOT" "$EXEC_ROOT"
        rm -f "$PIDFILE"  # stale; dockerd refuses to start over a pidfile of a live process
        # Without "deprecated-key-path", dockerd 20.10 writes /etc/docker/key.json.
        printf '{\n  "deprecated-key-path": "%s"\n}\n' "$WORKDIR/key.json" >"$CONFIG"

        log "starting dockerd for $WORKDIR (log: $LOGFILE)"
        # setsid: own session, so the engine survives the calling shell and is not hit by its
        # job-control signals.  The pidfile is written by dockerd itself.
        HTTP_PROXY=$DEAD_PROXY HTTPS_PROXY=$DEAD_PROXY \
            http_proxy=$DEAD_PROXY https_proxy=$DEAD_PROXY \
            NO_PROXY='' no_proxy='' \
            setsid dockerd \
            --config-file="$CONFIG" \
            --host="unix://$SOCK" \
            --pidfile="$PIDFILE" \
            --data-root="$DATA_ROOT" \
            --exec-root="$EXEC_ROOT" \
            --iptables=false --ip6tables=false \
            --ip-masq=false --ip-forward=false \
            --bip="$BRIDGE_IP" \
            --ip=127.0.0.1 \
            --dns=127.0.0.1 \
            </dev/null >>"$LOGFILE" 2>&1 &
        started=$!   # setsid execs dockerd here (a background job is no group leader)
    fi

    local deadline=$((SECONDS + START_TIMEOUT))
    until dk info >/dev/null 2>&1; do
        if [[ -n $started ]] && ! alive "$started"; then
            log "dockerd exited during start-up; last log lines:"
            tail -n 30 "$LOGFILE" >&2 || true
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "dockerd did not answer within ${START_TIMEOUT}s; last log lines:"
            tail -n 30 "$LOGFILE" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
    log "dockerd ready: server $(dk version --format '{{.Server.Version}}' 2>/dev/null)," \
        "storage $(dk info --format '{{.Driver}}' 2>/dev/null)"
    print_env
}

# After a hard kill: containerd and container processes may survive dockerd.  Find them
# through the pidfiles under EXEC_ROOT (never by process name) and kill them.
kill_leftovers() {
    local cpid f ipid shim
    # dockerd normally takes its containerd down with it (parent-death signal).
    if cpid=$(live_pid "$CONTAINERD_PIDFILE" containerd); then
        log "stopping leftover containerd (pid $cpid)"
        kill -TERM "$cpid" 2>/dev/null || true
        sleep 2
        if alive "$cpid"; then kill -KILL "$cpid" 2>/dev/null || true; fi
    fi
    # Each running container has an init.pid in its task bundle; its parent is the shim.
    for f in "$EXEC_ROOT"/containerd/daemon/io.containerd.runtime.v2.task/*/*/init.pid; do
        [[ -s $f ]] || continue
        ipid=$(<"$f")
        if ! [[ $ipid =~ ^[0-9]+$ ]] || ! alive "$ipid"; then continue; fi
        shim=$(awk '/^PPid:/ { print $2 }' "/proc/$ipid/status" 2>/dev/null || true)
        log "killing leftover container process $ipid ($f)"
        kill -KILL "$ipid" 2>/dev/null || true
        if [[ -n $shim && $(cat "/proc/$shim/comm" 2>/dev/null) == containerd-shim* ]]; then
            log "killing its shim $shim"
            kill -KILL "$shim" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    set_paths "$(workdir_arg "$@")"
    local pid ids

    if pid=$(live_pid "$PIDFILE" dockerd); then
        # Containers first, so no shim or docker-proxy outlives the engine.
        if ids=$(dk ps -aq 2>/dev/null) && [[ -n $ids ]]; then
            log "removing containers: ${ids//$'\n'/ }"
            # shellcheck disable=SC2086  # one id per word
            dk rm -f -v $ids >/dev/null || log "warning: docker rm -f failed"
        fi

        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT))
        local killed=
        while alive "$pid"; do
            if ((SECONDS >= deadline)); then
                [[ -z $killed ]] || die "dockerd (pid $pid) survives SIGKILL"
                log "dockerd still running after ${STOP_TIMEOUT}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                killed=1
                deadline=$((SECONDS + 10))
            fi
            sleep 0.2
        done
        kill_leftovers
    else
        log "no dockerd running for $WORKDIR"
    fi
    rm -f "$PIDFILE"

    # Mounts left by an unclean exit would make the next start (or rm -rf WORKDIR) fail.
    local mnt
    while read -r mnt; do
        [[ -n $mnt ]] || continue
        log "unmounting leftover $mnt"
        umount -l "$mnt" || true
    done < <(findmnt -rn -o TARGET | grep -F -- "$WORKDIR/" | sort -r || true)

    if ip link show docker0 >/dev/null 2>&1; then
        log "deleting docker0"
        ip link delete docker0
    fi
}

cmd_env() {
    set_paths "$(workdir_arg "$@")"
    print_env
}

[[ $# -ge 1 ]] || usage
sub=$1
shift
case $sub in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    env) cmd_env "$@" ;;
    -h | --help | help) usage ;;
    *) log "unknown subcommand: $sub"; usage ;;
esac
