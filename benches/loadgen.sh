#!/usr/bin/env bash
# Coordinator load test, all backends in one run: `nexodus loadgen` (a hidden
# subcommand; see src/loadgen/) simulates N nodes over real QUIC connections against
#   1. `nexodus serve` on SQLite,
#   2. `nexodus serve --database-url` on PostgreSQL (one replica),
#   3. two replicas on one PostgreSQL database, nodes spread over both (a change then
#      crosses replicas through LISTEN/NOTIFY to reach every watcher),
# and prints, per run: registrations/s, endpoint updates/s, the time for one change to
# reach a watcher and all N watchers (p50/p99), and the coordinators' RSS per device.
# With --storm, the coordinator(s) are then restarted (SIGTERM, started again on the
# same state) and every node reconnects at once: the time until all have their
# snapshot, and the change fan-out afterwards (--storm-only: without the first watch
# and probe phases). Nodes resume from the revision they had, as `nexodus join` does
# (a small delta each); --no-resume: every node is sent the whole snapshot.
#
#   sudo benches/loadgen.sh [--nodes 1000] [--probes 20] [--concurrency 64] [--storm|--storm-only]
#                           [--only sqlite|postgres|replicas] [--no-resume] [--no-build] [--keep]
#
# PostgreSQL is Debian's (apt-get install postgresql), started here in a temp dir on
# 127.0.0.1 with its default (durable) settings, as the `postgres` user when run as
# root. Coordinators listen on 127.0.0.71-74. Everything started here is stopped and
# the temp dir removed on exit (--keep keeps the logs).
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1000 probes=20 concurrency=64 only="" build=1 keep=0 storm=0 storm_only=0 no_resume=0
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --probes) probes="$2"; shift 2 ;;
        --concurrency) concurrency="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        --storm) storm=1; shift ;;
        --storm-only) storm=1; storm_only=1; shift ;;
        --no-resume) no_resume=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

bin="${NEXODUS_BIN:-target/release/nexodus}"
[ "$build" = 1 ] && cargo build --release --quiet
pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"

tmp="$(mktemp -d /tmp/nexodus-loadgen.XXXXXX)"
chmod 755 "$tmp"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # Coordinators started again by a storm's restart command.
    for f in "$tmp"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    if [ -f "$tmp/pg/data/postmaster.pid" ]; then
        as_pg "$pgbin/pg_ctl" -D "$tmp/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "$keep" = 1 ]; then echo "logs kept in $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_log() { # file text
    for _ in $(seq 1 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    return 1
}

serve() { # name ip extra-args... ; sets $pid
    local name="$1" ip="$2"
    shift 2
    # Every simulated node connects from one address: lift the per-address cap.
    local cmd=("$bin" serve --listen "$ip:4443" --stun-listen "$ip:3478"
        --max-connections-per-ip 1000000 "$@")
    "${cmd[@]}" >"$tmp/$name.out" 2>"$tmp/$name.log" &
    pid=$!
    pids+=("$pid")
    echo "$pid" >"$tmp/$name.pid"
    # How the storm restarts it: stop (SIGTERM: connections closed with a reason),
    # wait for the exit, start again on the same state, print the new pid.
    {
        echo "old=\$(cat $tmp/$name.pid)"
        # Its CPU time (user + system, clock ticks) goes to the loadgen log.
        echo "echo \"$name pid \$old cpu ticks: \$(awk '{print \$14 + \$15}' /proc/\$old/stat)\" >&2"
        echo "kill \$old"
        echo "while [ -e /proc/\$old ] && ! grep -q ') Z' /proc/\$old/stat 2>/dev/null; do sleep 0.05; done"
        printf '%q ' "${cmd[@]}"
        echo ">>$tmp/$name.out 2>>$tmp/$name.log </dev/null &"
        echo "echo \$! >$tmp/$name.pid"
        echo "echo \$!"
    } >"$tmp/restart-$name.sh"
    wait_log "$tmp/$name.log" "coordinator running"
}

loadgen() { # label coordinators pids token [coordinator names, for --storm]
    local restart=()
    if [ "$storm" = 1 ]; then
        local script="$tmp/restart-all.sh" n
        : >"$script"
        for n in $5; do echo "sh $tmp/restart-$n.sh" >>"$script"; done
        restart=(--restart-cmd "sh $script | paste -sd,")
        [ "$storm_only" = 1 ] && restart+=(--storm-only)
        [ "$no_resume" = 1 ] && restart+=(--no-resume)
    fi
    "$bin" loadgen --coordinator "$2" --coordinator-pid "$3" --token "$4" \
        --nodes "$nodes" --probes "$probes" --concurrency "$concurrency" --label "$1" \
        "${restart[@]}" 2>>"$tmp/loadgen.log" | tee -a "$tmp/results.txt"
    echo
}

stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
    # Coordinators a storm started again (not our children: poll for their exit).
    local f p
    for f in "$tmp"/*.pid; do
        [ -f "$f" ] || continue
        p="$(cat "$f")"
        kill "$p" 2>/dev/null || true
        for _ in $(seq 1 100); do [ -e "/proc/$p" ] || break; sleep 0.1; done
        rm -f "$f"
    done
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "$(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -r); nodes=$nodes"
echo

if [ -z "$only" ] || [ "$only" = sqlite ]; then
    serve sqlite 127.0.0.71 --state-dir "$tmp/sqlite"
    token="$(head -1 "$tmp/sqlite.out")"
    loadgen sqlite 127.0.0.71:4443 "$pid" "$token" sqlite
    stop_all
fi

if [ -z "$only" ] || [ "$only" = postgres ] || [ "$only" = replicas ]; then
    [ -n "$pgbin" ] || { echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 1; }
    mkdir "$tmp/pg"
    [ "$(id -u)" = 0 ] && chown postgres "$tmp/pg"
    as_pg "$pgbin/initdb" -D "$tmp/pg/data" -A trust -U nexodus --no-sync >"$tmp/initdb.log"
    port=$((55000 + RANDOM % 5000))
    as_pg "$pgbin/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/postgres.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$tmp/pg -c max_connections=100" \
        start >/dev/null
    as_pg "$pgbin/createdb" -h "$tmp/pg" -p "$port" -U nexodus one
    as_pg "$pgbin/createdb" -h "$tmp/pg" -p "$port" -U nexodus two
    url="postgres://nexodus@127.0.0.1:$port"

    if [ -z "$only" ] || [ "$only" = postgres ]; then
        serve pg 127.0.0.72 --database-url "$url/one"
        token="$(head -1 "$tmp/pg.out")"
        loadgen postgres 127.0.0.72:4443 "$pid" "$token" pg
        stop_all
    fi
    if [ -z "$only" ] || [ "$only" = replicas ]; then
        serve r1 127.0.0.73 --database-url "$url/two"
        p1=$pid
        serve r2 127.0.0.74 --database-url "$url/two"
        p2=$pid
        token="$("$bin" token create --reusable --database-url "$url/two")"
        loadgen "postgres, 2 replicas" 127.0.0.73:4443,127.0.0.74:4443 "$p1,$p2" "$token" "r1 r2"
        stop_all
    fi
fi
