#!/usr/bin/env bash
# Data-plane throughput of nexodus against stock userspace WireGuard (wireguard-go,
# boringtun-cli and gotatun-cli), between two network namespaces joined by a veth pair.
#
#   sudo benches/throughput.sh [--rounds 3] [--seconds 10] [--relay] [--userspace]
#                              [--underlay6] [--cc cubic] [--no-install] [--skip-main]
#
# Per round, in alternation (bare veth, nexodus, nexodus-wg, boringtun-cli,
# gotatun-cli, wireguard-go), each tunnel set up fresh and torn down after its run: ping RTT A->B
# (20 pings 50 ms apart, an idle tunnel; then 200 pings 2 ms apart) and one TCP stream
# of iperf3 A->B for --seconds over the inner IPv4 and the inner IPv6 address, with
# congestion control --cc (default cubic, the kernel's default, whatever the host's
# sysctl says), and the machine's busy CPU time per Gbit/s carried. Prints the medians
# over the rounds and the ratio of nexodus (and of nexodus-wg: `nexodus wg IFNAME`
# configured by `wg set` exactly as the stock peers are) to each stock peer. --relay adds a third
# namespace running `nexodus join --relay` and compares nexodus relayed (A
# --relay-only) with nexodus direct on that topology.
# --userspace compares rootless mode (A `join --userspace`, iperf3 through an --egress
# listener on A's loopback to B's TUN address) with TUN mode, in alternation.
# --underlay6 measures nexodus over an IPv6 underlay (coordinator on [::], nodes join
# [2001:db8:5100::1]:4443, peers on v6 endpoints) against the v4-underlay row of the
# same run (measured in this phase too, in alternation, under --skip-main).
# Installs what is missing (apt: iperf3 wireguard-go wireguard-tools iproute2
# iputils-ping jq; cargo: boringtun-cli 0.7, gotatun-cli 0.10.2) and builds nexodus
# in release mode. Everything it creates (namespaces nxb-*, processes, UAPI sockets,
# temp dir) goes on every exit path, Ctrl-C included. See benches/README.md.
set -euo pipefail

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "Options:"
    echo "  --rounds N      rounds of the alternation (default 3)"
    echo "  --seconds N     iperf3 duration per stream, after 1 s of warm-up (default 10)"
    echo "  --relay         also measure nexodus through a relay node"
    echo "  --userspace     also measure rootless mode (--userspace) against TUN mode"
    echo "  --underlay6     also measure nexodus over an IPv6 underlay against the IPv4 one"
    echo "  --metrics       also measure TUN mode while /metrics is scraped 100 times per stream"
    echo "  --cc NAME       TCP congestion control of the iperf3 sender (default cubic)"
    echo "  --no-install    do not install packages, boringtun-cli or gotatun-cli, do not build"
    echo "  --skip-main     skip the comparison with the stock peers (only the phases asked for)"
    echo "  --keep-logs     keep the logs directory (its path is printed)"
    echo "Environment: NEXODUS_BIN (default target/release/nexodus),"
    echo "  BORINGTUN_CLI (default: PATH, then ~/.cargo/bin/boringtun-cli),"
    echo "  GOTATUN_CLI (default: PATH, then ~/.cargo/bin/gotatun, the crate gotatun-cli's executable)"
}

ROUNDS=3
DUR=10
RELAY=0
USERSPACE=0
UNDERLAY6=0
METRICS=0
INSTALL=1
MAIN=1
KEEP_LOGS=0
CC=cubic
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift 2 ;;
    --seconds) DUR="${2:?--seconds needs a number}"; shift 2 ;;
    --relay) RELAY=1; shift ;;
    --userspace) USERSPACE=1; shift ;;
    --underlay6) UNDERLAY6=1; shift ;;
    --metrics) METRICS=1; shift ;;
    --cc) CC="${2:?--cc needs a name}"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --skip-main) MAIN=0; shift ;;
    --keep-logs) KEEP_LOGS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds: positive integer" >&2; exit 2; }
[[ "$DUR" =~ ^[1-9][0-9]*$ ]] || { echo "--seconds: positive integer" >&2; exit 2; }
[[ "$CC" =~ ^[a-z0-9_]+$ ]] || { echo "--cc: a congestion control name, e.g. cubic" >&2; exit 2; }
if [ "$(id -u)" -ne 0 ]; then
    echo "needs root (network namespaces, TUN): sudo $0 $*" >&2
    exit 1
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------- names and addresses
NS_A=nxb-a
NS_B=nxb-b
NS_R=nxb-r
VETH_A=nxb-va          # in A, peer of VETH_B
VETH_B=nxb-vb          # in B
VETH_RA=nxb-vra        # in A (relay phase), peer of VETH_R
VETH_R=nxb-vr          # in R
BRIDGE=nxb-br          # in A (relay phase)
UNDER_A=198.51.100.1
UNDER_B=198.51.100.2
UNDER_R=198.51.100.3
UNDER6_A=2001:db8:5100::1
UNDER6_B=2001:db8:5100::2
IN_A=100.64.0.1
IN_B=100.64.0.2
IN6_A=200::1
IN6_B=200::2
TUN_MTU=1420
WG_PORT=51820
IPERF_PORT=5201
EGRESS4=15201          # userspace phase: A's egress listeners (loopback) to B's iperf3
EGRESS6=15202
# Interface names are per namespace, but the UAPI sockets (/var/run/wireguard/IF.sock)
# are not: every tunnel interface gets a name of its own.
declare -A IFNAME=(
    [nexodus.a]=nxbna [nexodus.b]=nxbnb [nexodus.r]=nxbnr
    [boringtun-cli.a]=nxbta [boringtun-cli.b]=nxbtb
    [gotatun-cli.a]=nxbga [gotatun-cli.b]=nxbgb
    [wireguard-go.a]=nxbwa [wireguard-go.b]=nxbwb
    [nexodus-wg.a]=nxbxa [nexodus-wg.b]=nxbxb
)
ALL_NS=("$NS_A" "$NS_B" "$NS_R")
A_DEV=$VETH_A          # A's underlay interface (the bridge once the relay phase made it)

WORK=""
PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local pid ns ifn i
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 30); do # up to 3 s for a clean exit
        any_alive "${PIDS[@]}" || break
        sleep 0.1
    done
    for ns in "${ALL_NS[@]}"; do
        if ip netns list 2>/dev/null | grep -qw "^$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null
            done
            ip netns del "$ns" 2>/dev/null
        fi
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for ifn in "${IFNAME[@]}"; do
        rm -f "/var/run/wireguard/$ifn.sock" "/var/run/wireguard/$ifn.name"
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP_LOGS" = 1 ] || [ "$rc" -ne 0 ]; then
            log "logs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- helpers
# wait_until SECONDS WHAT CMD...: polls CMD every 100 ms until it succeeds.
wait_until() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# spawn NS LOG CMD...: starts CMD in NS in the background; sets SPAWNED to its pid
# (`ip netns exec` execs, so that is the pid of CMD itself).
spawn() {
    local ns=$1 logf=$2
    shift 2
    ip netns exec "$ns" "$@" </dev/null >"$logf" 2>&1 &
    SPAWNED=$!
    PIDS+=("$SPAWNED")
}

alive() { kill -0 "$1" 2>/dev/null; }
any_alive() { local p; for p in "$@"; do alive "$p" && return 0; done; return 1; }

# stop PID: SIGTERM, bounded wait, then SIGKILL.
stop() {
    local pid=$1 i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "pid $pid ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    local keep=()
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

show_log() {
    local f
    for f in "$@"; do
        [ -f "$f" ] || continue
        echo "===== $f (last 40 lines) =====" >&2
        tail -n 40 "$f" >&2
    done
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---------------------------------------------------------------- install and build
# Cargo of the user who ran sudo if they have one (so target/ stays theirs), else root's.
find_cargo() {
    local home
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        if [ -x "$home/.cargo/bin/cargo" ]; then
            CARGO=(sudo -u "$SUDO_USER" -H env "PATH=$home/.cargo/bin:$PATH" cargo)
            CARGO_BIN_DIR="$home/.cargo/bin"
            return
        fi
    fi
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
    CARGO=(cargo)
    CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
}

# stock_cli CRATE EXE OVERRIDE VERSION_RE CARGO_VERSION: sets STOCK_BIN to a working
# EXE whose --version matches VERSION_RE (OVERRIDE, else PATH, else cargo's bin dir),
# installing CARGO_VERSION of CRATE with cargo when there is none.
stock_cli() {
    local name=$1 exe=$2 bin=$3 re=$4 version=$5
    if [ -z "$bin" ]; then
        bin="$(command -v "$exe" || true)"
        [ -n "$bin" ] || bin="${CARGO_BIN_DIR:-${CARGO_HOME:-$HOME/.cargo}/bin}/$exe"
    fi
    if ! "$bin" --version 2>/dev/null | grep -q "$re"; then
        [ "$INSTALL" = 1 ] || die "$name $version not found at $bin"
        log "cargo install $name --locked --version $version"
        "${CARGO[@]}" install "$name" --locked --version "$version" --quiet
        bin="$CARGO_BIN_DIR/$exe"
    fi
    "$bin" --version >/dev/null || die "no working $name"
    STOCK_BIN=$bin
}

install_deps() {
    local need=()
    command -v ip >/dev/null || need+=(iproute2)
    command -v ping >/dev/null || need+=(iputils-ping)
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v wg >/dev/null || need+=(wireguard-tools)
    command -v wireguard-go >/dev/null || need+=(wireguard-go)
    command -v jq >/dev/null || need+=(jq)
    if [ "${#need[@]}" -gt 0 ]; then
        [ "$INSTALL" = 1 ] || die "missing ${need[*]} (run without --no-install)"
        log "apt-get install ${need[*]}"
        apt-get update -qq
        # iperf3's postinst asks whether to start a daemon: no.
        echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    [ "$INSTALL" = 1 ] && find_cargo
    STOCK_VERSIONS=""
    if [ "$MAIN" = 1 ]; then # the stock peers run in the main comparison only
        stock_cli boringtun-cli boringtun-cli "${BORINGTUN_CLI:-}" ' 0\.7\.' '^0.7'
        BTCLI=$STOCK_BIN
        stock_cli gotatun-cli gotatun "${GOTATUN_CLI:-}" ' 0\.10\.2' '0.10.2'
        GTCLI=$STOCK_BIN
        STOCK_VERSIONS="; $("$BTCLI" --version); $("$GTCLI" --version); wireguard-go $(wireguard-go --version 2>/dev/null | awk '{print $2; exit}')"
    fi
    NX="${NEXODUS_BIN:-$REPO/target/release/nexodus}"
    if [ "$INSTALL" = 1 ] && [ -z "${NEXODUS_BIN:-}" ]; then
        log "cargo build --release"
        (cd "$REPO" && "${CARGO[@]}" build --release --quiet --bin nexodus)
    fi
    [ -x "$NX" ] || die "no nexodus binary at $NX"
}

# ---------------------------------------------------------------- topology
del_ns() {
    local ns=$1 pid
    ip netns list | grep -qw "^$ns" || return 0
    for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
}

make_ns() {
    del_ns "$1" # left over by a crashed run
    ip netns add "$1"
    nsx "$1" ip link set lo up
    nsx "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0
}

setup_topology() {
    make_ns "$NS_A"
    make_ns "$NS_B"
    ip link add "$VETH_A" mtu 1500 netns "$NS_A" type veth peer name "$VETH_B" mtu 1500 netns "$NS_B"
    nsx "$NS_A" ip addr add "$UNDER_A/24" dev "$VETH_A"
    nsx "$NS_B" ip addr add "$UNDER_B/24" dev "$VETH_B"
    nsx "$NS_A" ip -6 addr add "$UNDER6_A/64" dev "$VETH_A" nodad
    nsx "$NS_B" ip -6 addr add "$UNDER6_B/64" dev "$VETH_B" nodad
    nsx "$NS_A" ip link set "$VETH_A" up
    nsx "$NS_B" ip link set "$VETH_B" up
    wait_until 10 "the veth pair" nsx "$NS_A" ping -c 1 -W 1 "$UNDER_B"
    wait_until 10 "the veth pair (IPv6)" nsx "$NS_A" ping -6 -c 1 -W 1 "$UNDER6_B"
    # One iperf3 server in B for the whole run (wildcard: every tunnel address).
    spawn "$NS_B" "$WORK/iperf3-server.log" iperf3 -s -p "$IPERF_PORT"
    wait_until 10 "the iperf3 server" \
        bash -c "ip netns exec $NS_B ss -Hltn 'sport = :$IPERF_PORT' | grep -q LISTEN"
}

# Relay phase: A's veth and a new veth to R on a bridge in A; all on 198.51.100.0/24.
setup_relay_topology() {
    make_ns "$NS_R"
    ip link add "$VETH_RA" mtu 1500 netns "$NS_A" type veth peer name "$VETH_R" mtu 1500 netns "$NS_R"
    nsx "$NS_A" ip link add "$BRIDGE" mtu 1500 type bridge
    nsx "$NS_A" ip addr flush dev "$VETH_A"
    nsx "$NS_A" ip link set "$VETH_A" master "$BRIDGE"
    nsx "$NS_A" ip link set "$VETH_RA" master "$BRIDGE"
    nsx "$NS_A" ip addr add "$UNDER_A/24" dev "$BRIDGE"
    A_DEV=$BRIDGE
    nsx "$NS_A" ip link set "$VETH_RA" up
    nsx "$NS_A" ip link set "$BRIDGE" up
    nsx "$NS_R" ip addr add "$UNDER_R/24" dev "$VETH_R"
    nsx "$NS_R" ip link set "$VETH_R" up
    wait_until 15 "the bridge (A to B)" nsx "$NS_A" ping -c 1 -W 1 "$UNDER_B"
    wait_until 15 "the bridge (R to B)" nsx "$NS_R" ping -c 1 -W 1 "$UNDER_B"
    wait_until 15 "the bridge (R to A)" nsx "$NS_R" ping -c 1 -W 1 "$UNDER_A"
}

# underlay6 on|off: A's and B's IPv6 underlay addresses there or not. A node reports
# every global underlay address it has and a peer prefers v6 when both sides have one,
# so the v4-underlay nexodus runs go without them (as the stock peers, which are given
# v4 endpoints); bare's v6 row and the v6-underlay phase need them.
underlay6() {
    if [ "$1" = on ]; then
        nsx "$NS_A" ip -6 addr replace "$UNDER6_A/64" dev "$A_DEV" nodad
        nsx "$NS_B" ip -6 addr replace "$UNDER6_B/64" dev "$VETH_B" nodad
        wait_until 10 "the IPv6 underlay" nsx "$NS_A" ping -6 -c 1 -W 1 "$UNDER6_B" ||
            die "no IPv6 underlay between $NS_A and $NS_B"
    else
        nsx "$NS_A" ip -6 addr del "$UNDER6_A/64" dev "$A_DEV" 2>/dev/null || true
        nsx "$NS_B" ip -6 addr del "$UNDER6_B/64" dev "$VETH_B" 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------- measurements
RESULTS=""  # file: "IMPL METRIC ROUND VALUE" lines

record() { echo "$*" >>"$RESULTS"; }

CLK_TCK=$(getconf CLK_TCK)
# Jiffies all CPUs spent busy (user, nice, system, irq, softirq; not idle, iowait, steal).
busy_jiffies() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
# Jiffies the tunnel's own processes (TPIDS: nodes, daemons) spent, user and system:
# unlike busy_jiffies, not skewed by other load on a shared machine.
tunnel_jiffies() {
    local pid sum=0 t
    for pid in "${TPIDS[@]}"; do
        # Fields 14 and 15 (utime, stime), counted after the ") " that ends the name.
        t=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat" 2>/dev/null) || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}

# measure IMPL ROUND ADDR4 ADDR6: ping RTT then iperf3 over v4 and v6.
measure() {
    local impl=$1 round=$2 a4=$3 a6=$4 out rtt="-" rtt500="-" fam addr port json bps cpu0 cpu1 t0 t1 own0 own1
    if [ "$impl" != nexodus-userspace ]; then
        out=$(nsx "$NS_A" ping -q -c 20 -i 0.05 -W 1 "$a4") || { echo "$out" >&2; die "$impl: ping $a4 failed"; }
        rtt=$(echo "$out" | awk -F'/' '/^rtt|^round-trip/ {print $5}')
        record "$impl rtt_ms $round $rtt"
        # 500 pings/s: the CPUs stay awake between pings, so this is the path's own
        # latency without the cost of waking idle CPUs (large on VMs).
        out=$(nsx "$NS_A" ping -q -c 200 -i 0.002 -W 1 "$a4") || { echo "$out" >&2; die "$impl: ping $a4 failed"; }
        rtt500=$(echo "$out" | awk -F'/' '/^rtt|^round-trip/ {print $5}')
        record "$impl rtt500_ms $round $rtt500"
    fi
    for fam in v4 v6; do
        if [ "$fam" = v4 ]; then addr=$a4; else addr=$a6; fi
        port=$IPERF_PORT
        if [ "$impl" = nexodus-userspace ]; then
            # Through A's egress listeners (loopback), which carry it to B's iperf3.
            if [ "$fam" = v4 ]; then port=$EGRESS4; else port=$EGRESS6; fi
            addr=127.0.0.1
        fi
        json="$WORK/iperf.$impl.$fam.$round.json"
        local scraper=""
        if [ "$impl" = nexodus-scraped ]; then
            scrape_metrics "$WORK/scrapes.$fam.$round" &
            scraper=$!
        fi
        cpu0=$(busy_jiffies) t0=$(date +%s.%N) own0=$(tunnel_jiffies)
        # --foreground: Ctrl-C reaches iperf3 at once.
        if ! timeout --foreground $((DUR + 30)) ip netns exec "$NS_A" \
            iperf3 -c "$addr" -p "$port" -t "$DUR" -O 1 -C "$CC" -J --connect-timeout 5000 >"$json" 2>&1; then
            log "$impl $fam round $round: iperf3 failed: $(jq -r '.error // empty' "$json" 2>/dev/null || tail -n 3 "$json")"
            record "$impl $fam $round nan"
            continue
        fi
        cpu1=$(busy_jiffies) t1=$(date +%s.%N) own1=$(tunnel_jiffies)
        if [ -n "$scraper" ]; then
            wait "$scraper" || true
            record "$impl scrapes_$fam $round $(grep -c '^nexodus_peer_rx_bytes_total' "$WORK/scrapes.$fam.$round" || true)"
        fi
        bps=$(jq -r '.end.sum_received.bits_per_second' "$json")
        record "$impl $fam $round $(awk -v b="$bps" 'BEGIN {printf "%.3f", b / 1e9}')"
        # Whole machine (both ends, iperf3, softirq): CPUs busy per Gbit/s carried.
        record "$impl cpu_$fam $round $(awk -v c0="$cpu0" -v c1="$cpu1" -v t0="$t0" -v t1="$t1" \
            -v hz="$CLK_TCK" -v b="$bps" 'BEGIN {printf "%.3f", (c1 - c0) / hz / (t1 - t0) / (b / 1e9)}')"
        [ "${#TPIDS[@]}" -eq 0 ] ||
            record "$impl own_cpu_$fam $round $(awk -v c0="$own0" -v c1="$own1" -v t0="$t0" -v t1="$t1" \
                -v hz="$CLK_TCK" -v b="$bps" 'BEGIN {printf "%.3f", (c1 - c0) / hz / (t1 - t0) / (b / 1e9)}')"
        log "  $impl $fam: $(awk -v b="$bps" 'BEGIN {printf "%.2f", b / 1e9}') Gbit/s"
    done
    [ "$rtt" = "-" ] || log "  $impl rtt: $rtt ms (idle), $rtt500 ms (500 pings/s)"
}

# scrape_metrics FILE: 100 scrapes of A's /metrics spread over one iperf3 stream (the
# 1 s warm-up plus DUR seconds), as a Prometheus with a short interval would; each
# answer is appended to FILE.
scrape_metrics() {
    local gap
    gap=$(awk -v d="$DUR" 'BEGIN {printf "%.3f", (d + 1) / 100}')
    # One bash process, builtins only (no fork per scrape), so the figure is the
    # node's cost of answering, not the scraper's own process churn.
    nsx "$NS_A" bash -c '
        exec 4<> <(:)
        for _ in $(seq 100); do
            exec 3<>/dev/tcp/127.0.0.1/9102 || exit 1
            printf "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" >&3
            while IFS= read -r line <&3; do printf "%s\n" "$line"; done
            exec 3<&-
            read -r -t "$1" <&4 || true
        done' scrape "$gap" >>"$1" 2>/dev/null
}

# ---------------------------------------------------------------- implementations
# Each start_X sets TUN_A4/TUN_A6 (addresses of B to target), TPIDS (pids to stop)
# and MEM_PID (the process in A whose RSS is recorded).

start_bare() {
    underlay6 on
    TUN_A4=$UNDER_B TUN_A6=$UNDER6_B TPIDS=() MEM_PID=""
}

# Stock WireGuard daemons: KIND is wireguard-go, boringtun-cli or gotatun-cli (whose
# command line and UAPI are boringtun-cli's), or nexodus-wg (`nexodus wg`, our data
# plane as a userspace WireGuard, set up the same way).
start_stock() {
    local kind=$1 round=$2 side ns ifn pid
    local d="$WORK/$kind.$round"
    mkdir -p "$d"
    TPIDS=()
    for side in a b; do
        ns=nxb-$side
        ifn=${IFNAME[$kind.$side]}
        rm -f "/var/run/wireguard/$ifn.sock"
        if [ "$kind" = wireguard-go ]; then
            spawn "$ns" "$d/$side.log" wireguard-go -f "$ifn"
        elif [ "$kind" = nexodus-wg ]; then
            spawn "$ns" "$d/$side.log" "$NX" wg --foreground "$ifn"
        else
            local cli=$BTCLI
            [ "$kind" = gotatun-cli ] && cli=$GTCLI
            spawn "$ns" "$d/$side.log" env WG_LOG_FILE="$d/$side.bt.log" \
                "$cli" --foreground --disable-drop-privileges "$ifn"
        fi
        pid=$SPAWNED
        TPIDS+=("$pid")
        [ "$side" = a ] && MEM_PID=$pid
        wait_until 10 "$kind to create $ifn" \
            bash -c "[ -S /var/run/wireguard/$ifn.sock ] && ip -n $ns link show $ifn" ||
            { show_log "$d/$side.log"; die "$kind did not start"; }
        (umask 077 && wg genkey >"$d/$side.key")
        wg pubkey <"$d/$side.key" >"$d/$side.pub"
    done
    local ifa=${IFNAME[$kind.a]} ifb=${IFNAME[$kind.b]}
    nsx "$NS_A" wg set "$ifa" private-key "$d/a.key" listen-port "$WG_PORT" \
        peer "$(cat "$d/b.pub")" endpoint "$UNDER_B:$WG_PORT" allowed-ips "$IN_B/32,$IN6_B/128"
    nsx "$NS_B" wg set "$ifb" private-key "$d/b.key" listen-port "$WG_PORT" \
        peer "$(cat "$d/a.pub")" endpoint "$UNDER_A:$WG_PORT" allowed-ips "$IN_A/32,$IN6_A/128"
    nsx "$NS_A" ip addr add "$IN_A/24" dev "$ifa"
    nsx "$NS_A" ip -6 addr add "$IN6_A/64" dev "$ifa" nodad
    nsx "$NS_B" ip addr add "$IN_B/24" dev "$ifb"
    nsx "$NS_B" ip -6 addr add "$IN6_B/64" dev "$ifb" nodad
    nsx "$NS_A" ip link set "$ifa" mtu "$TUN_MTU" up
    nsx "$NS_B" ip link set "$ifb" mtu "$TUN_MTU" up
    TUN_A4=$IN_B TUN_A6=$IN6_B
    if ! { wait_until 20 "$kind tunnel (v4)" nsx "$NS_A" ping -c 1 -W 1 "$IN_B" &&
        wait_until 20 "$kind tunnel (v6)" nsx "$NS_A" ping -6 -c 1 -W 1 "$IN6_B"; }; then
        show_log "$d"/*.log
        die "$kind tunnel did not come up"
    fi
}

# status_of DIR: the node's status JSON (empty if not up yet).
status_of() { "$NX" status --json --state-dir "$1" 2>/dev/null; }

# peer_ready DIR HOSTNAME PATH: the node lists HOSTNAME on PATH with a handshake.
peer_ready() {
    status_of "$1" | jq -e --arg h "$2" --arg p "$3" \
        '.peers[] | select(.hostname == $h and .path == $p and .last_handshake_secs != null)' >/dev/null
}

peer_listed() {
    status_of "$1" | jq -e --arg h "$2" '.peers[] | select(.hostname == $h)' >/dev/null
}

# endpoint_of DIR HOSTNAME: the underlay endpoint the node uses for HOSTNAME ("null" if none).
endpoint_of() {
    status_of "$1" | jq -r --arg h "$2" 'first(.peers[] | select(.hostname == $h) | .endpoint)'
}

# endpoint_is FAMILY DIR HOSTNAME: that endpoint is a v4 (a.b.c.d:port) or v6 ([…]:port) one.
endpoint_is() {
    local ep
    ep=$(endpoint_of "$2" "$3")
    case "$1" in
    v4) [[ "$ep" =~ ^[0-9.]+:[0-9]+$ ]] ;;
    v6) [[ "$ep" =~ ^\[[0-9a-fA-F:]+\]:[0-9]+$ ]] ;;
    esac
}

# start_nexodus ROUND MODE: MODE is direct (A, B), mesh3 (A, B and relay R, A and B
# direct), relayed (A --relay-only through R) or userspace (A rootless: --userspace
# with egress listeners on its loopback to B's iperf3, as an unprivileged user) or
# v6under (A and B direct over the IPv6 underlay: coordinator on [::], joined at A's v6
# address). Every other mode runs without v6 underlay addresses, so over IPv4.
start_nexodus() {
    local round=$1 mode=$2 token
    local d="$WORK/nexodus.$mode.$round"
    mkdir -p "$d"/{coord,a,b,r}
    TPIDS=()
    local listen=("$UNDER_A:4443" "$UNDER_A:3478") coord="$UNDER_A:4443" under=v4
    if [ "$mode" = v6under ]; then
        listen=("[::]:4443" "[::]:3478") coord="[$UNDER6_A]:4443" under=v6
        underlay6 on
    else
        underlay6 off
    fi
    spawn "$NS_A" "$d/coord.log" env RUST_LOG=info "$NX" serve \
        --listen "${listen[0]}" --stun-listen "${listen[1]}" --state-dir "$d/coord"
    TPIDS+=("$SPAWNED")
    wait_until 20 "the coordinator" grep -q "coordinator running" "$d/coord.log" ||
        { show_log "$d/coord.log"; die "coordinator did not start"; }
    token=$("$NX" token create --reusable --state-dir "$d/coord" | tr -d '[:space:]')
    local common=(--token "$token")
    if [ "$mode" = mesh3 ] || [ "$mode" = relayed ]; then
        spawn "$NS_R" "$d/r.log" env RUST_LOG=info "$NX" join "$coord" "${common[@]}" \
            --hostname nxb-r --state-dir "$d/r" --interface "${IFNAME[nexodus.r]}" \
            --listen-port "$WG_PORT" --request-ip 100.64.0.3,200::3 --relay
        RELAY_PID=$SPAWNED
        TPIDS+=("$SPAWNED")
        wait_until 30 "relay node to run" status_of "$d/r" ||
            { show_log "$d"/*.log; die "relay node did not start"; }
        # The relay role takes effect once an admin approved it.
        local rid
        rid=$(status_of "$d/r" | jq -r '.device.id')
        "$NX" devices approve "$rid" --relay --state-dir "$d/coord" >/dev/null ||
            die "approving the relay failed"
    fi
    local aflags=()
    local arun=()
    local bflags=()
    [ "$mode" = relayed ] && aflags=(--relay-only)
    if [ "$mode" = scraped ]; then
        aflags=(--metrics-listen 127.0.0.1:9102)
        bflags=(--metrics-listen 127.0.0.1:9102)
    fi
    if [ "$mode" = userspace ]; then
        aflags=(--userspace --egress "tcp:$EGRESS4:$IN_B:$IPERF_PORT"
            --egress "tcp:$EGRESS6:[$IN6_B]:$IPERF_PORT")
        # As nobody with no capabilities, the way a rootless container runs it.
        chmod 755 "$WORK" "$d"
        chown nobody "$d/a"
        arun=(setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all)
    fi
    spawn "$NS_A" "$d/a.log" env RUST_LOG=info "${arun[@]}" "$NX" join "$coord" "${common[@]}" \
        --hostname nxb-a --state-dir "$d/a" --interface "${IFNAME[nexodus.a]}" \
        --listen-port "$WG_PORT" --request-ip "$IN_A,$IN6_A" "${aflags[@]}"
    MEM_PID=$SPAWNED
    TPIDS+=("$SPAWNED")
    spawn "$NS_B" "$d/b.log" env RUST_LOG=info "$NX" join "$coord" "${common[@]}" \
        --hostname nxb-b --state-dir "$d/b" --interface "${IFNAME[nexodus.b]}" \
        --listen-port "$WG_PORT" --request-ip "$IN_B,$IN6_B" "${bflags[@]}"
    TPIDS+=("$SPAWNED")
    TUN_A4=$IN_B TUN_A6=$IN6_B
    # Ping first: the first packet starts the handshake. Direct: A and B list each
    # other on the direct path. Relayed: A and B list only the relay (which carries the
    # other's addresses).
    local pa=(nxb-b direct) pb=(nxb-a direct)
    [ "$mode" = relayed ] && pa=(nxb-r direct) pb=(nxb-r direct)
    if [ "$mode" = userspace ]; then
        # No ICMP from the host into the userspace stack: B pings A's stack instead.
        if ! { wait_until 45 "nexodus tunnel (v4, from B)" nsx "$NS_B" ping -c 1 -W 1 "$IN_A" &&
            wait_until 20 "nexodus tunnel (v6, from B)" nsx "$NS_B" ping -6 -c 1 -W 1 "$IN6_A" &&
            wait_until 20 "A to list nxb-b with a handshake" peer_ready "$d/a" nxb-b direct; }; then
            show_log "$d"/*.log
            die "nexodus userspace tunnel did not come up"
        fi
        NX_DIR=$d
        return
    fi
    if ! { wait_until 45 "nexodus tunnel (v4)" nsx "$NS_A" ping -c 1 -W 1 "$IN_B" &&
        wait_until 20 "nexodus tunnel (v6)" nsx "$NS_A" ping -6 -c 1 -W 1 "$IN6_B" &&
        wait_until 20 "A to list ${pa[0]} with a handshake" peer_ready "$d/a" "${pa[@]}" &&
        wait_until 20 "B to list ${pb[0]} with a handshake" peer_ready "$d/b" "${pb[@]}" &&
        { [ "$mode" != relayed ] || ! peer_listed "$d/a" nxb-b; }; }; then
        show_log "$d"/*.log
        status_of "$d/a" >&2 || true
        die "nexodus tunnel did not come up"
    fi
    NX_DIR=$d
    # Direct modes: A and B reach each other over the underlay family the row is named
    # after (a v6 endpoint in status), or the row would measure the other one.
    if [ "$mode" = direct ] || [ "$mode" = scraped ] || [ "$mode" = v6under ]; then
        if ! { wait_until 10 "A's endpoint for nxb-b to be $under" endpoint_is "$under" "$d/a" nxb-b &&
            wait_until 10 "B's endpoint for nxb-a to be $under" endpoint_is "$under" "$d/b" nxb-a; }; then
            status_of "$d/a" >&2 || true
            die "nexodus $mode: peers are not on $under underlay endpoints" \
                "(A uses $(endpoint_of "$d/a" nxb-b) for nxb-b, B uses $(endpoint_of "$d/b" nxb-a) for nxb-a)"
        fi
        log "  underlay endpoints: A->B $(endpoint_of "$d/a" nxb-b), B->A $(endpoint_of "$d/b" nxb-a)"
    fi
    if [ "$mode" = v6under ]; then
        # A full-MTU inner packet must fit the v6 underlay's 1500 bytes unfragmented:
        # TUN_MTU + 40 (IPv6) + 8 (UDP) + 32 (WireGuard).
        if ! { nsx "$NS_A" ping -c 1 -W 2 -M do -s $((TUN_MTU - 28)) "$IN_B" >/dev/null &&
            nsx "$NS_A" ping -6 -c 1 -W 2 -M do -s $((TUN_MTU - 48)) "$IN6_B" >/dev/null; }; then
            die "nexodus v6under: a full $TUN_MTU-byte inner packet does not cross the v6 underlay"
        fi
    fi
    local mtu
    mtu=$(ip -n "$NS_A" -j link show "${IFNAME[nexodus.a]}" | jq '.[0].mtu')
    [ "$mtu" = "$TUN_MTU" ] || log "WARNING: nexodus interface MTU is $mtu, not $TUN_MTU"
    if [ "$mode" = relayed ]; then
        RELAYED_BEFORE=$(status_of "$d/r" | jq '.relayed_bytes')
    fi
}

stop_tunnel() {
    local pid i
    # Nodes before the coordinator: stop in reverse start order.
    for ((i = ${#TPIDS[@]} - 1; i >= 0; i--)); do
        stop "${TPIDS[$i]}"
    done
    TPIDS=()
}

# run_one IMPL ROUND
run_one() {
    local impl=$1 round=$2 rss
    log "round $round: $impl"
    case "$impl" in
    bare) start_bare ;;
    nexodus) start_nexodus "$round" direct ;;
    nexodus-mesh3) start_nexodus "$round" mesh3 ;;
    nexodus-relayed) start_nexodus "$round" relayed ;;
    nexodus-tun) start_nexodus "$round" direct ;;
    nexodus-userspace) start_nexodus "$round" userspace ;;
    nexodus-scraped) start_nexodus "$round" scraped ;;
    nexodus-v6under) start_nexodus "$round" v6under ;;
    boringtun-cli | gotatun-cli | wireguard-go | nexodus-wg) start_stock "$impl" "$round" ;;
    esac
    measure "$impl" "$round" "$TUN_A4" "$TUN_A6"
    if [ -n "$MEM_PID" ]; then
        rss=$(rss_kb "$MEM_PID")
        record "$impl rss_kb $round $rss"
        log "  $impl RSS of the A side after the run: $((rss / 1024)) MiB"
    fi
    if [ "$impl" = nexodus-relayed ]; then
        local after
        after=$(status_of "$NX_DIR/r" | jq '.relayed_bytes')
        record "$impl relayed_mb $round $(((after - RELAYED_BEFORE) / 1000000))"
        log "  relay forwarded $(((after - RELAYED_BEFORE) / 1000000)) MB"
        record "$impl relay_rss_kb $round $(rss_kb "$RELAY_PID")"
    fi
    stop_tunnel
}

# run_rounds IMPL...: each round runs every IMPL once, in this order (alternation).
run_rounds() {
    local round impl
    for round in $(seq "$ROUNDS"); do
        for impl in "$@"; do
            run_one "$impl" "$round"
        done
    done
}

# ---------------------------------------------------------------- report
median() { # IMPL METRIC -> median of the numeric values, or "-"
    awk -v i="$1" -v m="$2" '$1 == i && $2 == m && $4 != "nan" {print $4}' "$RESULTS" |
        sort -g | awk '{v[NR] = $1} END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) printf "%.3f\n", v[(NR + 1) / 2];
            else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f\n", a / b }'; }

# Row names in the tables where an implementation's id says too little.
declare -A LABEL=([nexodus-v6under]="nexodus (v6 underlay)")

report() {
    local impl v4 v6 rtt rtt500 cpu rss w=16 label
    for impl in "$@"; do
        label=${LABEL[$impl]:-$impl}
        [ "${#label}" -le "$w" ] || w=${#label}
    done
    echo
    echo "Throughput A->B, 1 TCP stream ($CC), ${DUR} s (+1 s warm-up), median of $ROUNDS round(s); veth MTU 1500, tunnel MTU $TUN_MTU; $(nproc) CPUs"
    printf '%-*s %10s %10s %9s %11s %11s %11s\n' "$w" implementation "v4 Gbit/s" "v6 Gbit/s" \
        "RTT ms" "RTT@500/s" "CPU/Gbit v4" "RSS(A) MiB"
    for impl in "$@"; do
        v4=$(median "$impl" v4) v6=$(median "$impl" v6) rtt=$(median "$impl" rtt_ms)
        rtt500=$(median "$impl" rtt500_ms) cpu=$(median "$impl" cpu_v4) rss=$(median "$impl" rss_kb)
        [ "$rss" = - ] || rss=$(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}')
        printf '%-*s %10s %10s %9s %11s %11s %11s\n' "$w" "${LABEL[$impl]:-$impl}" "$v4" "$v6" "$rtt" "$rtt500" "$cpu" "$rss"
    done
    echo "(CPU/Gbit: CPUs busy across the whole machine, both ends and iperf3 included, per Gbit/s carried)"
}

# added_rtt IMPL: RTT over bare veth, idle and at 500 pings/s.
added_rtt() {
    local metric out=""
    for metric in rtt_ms rtt500_ms; do
        out+=$(awk -v a="$(median "$1" "$metric")" -v b="$(median bare "$metric")" \
            'BEGIN { if (a == "-" || b == "-") printf "-"; else printf "%+.3f", a - b }')
        [ "$metric" = rtt_ms ] && out+=" / "
    done
    echo "$out"
}

# ---------------------------------------------------------------- main
install_deps
CC_AVAIL=/proc/sys/net/ipv4/tcp_available_congestion_control
if ! grep -qw "$CC" "$CC_AVAIL"; then
    modprobe "tcp_$CC" 2>/dev/null || true
    grep -qw "$CC" "$CC_AVAIL" || die "congestion control $CC not available (have: $(cat "$CC_AVAIL"))"
fi
WORK=$(mktemp -d /tmp/nxb-bench.XXXXXX)
RESULTS="$WORK/results.txt"
: >"$RESULTS"
log "nexodus: $NX ($("$NX" --version))$STOCK_VERSIONS"
log "iperf3 congestion control: $CC (host default: $(sysctl -n net.ipv4.tcp_congestion_control))"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
setup_topology

STOCK=(boringtun-cli gotatun-cli wireguard-go)
if [ "$MAIN" = 1 ]; then
    IMPLS=(bare nexodus nexodus-wg "${STOCK[@]}")
    run_rounds "${IMPLS[@]}"

    report "${IMPLS[@]}"
    echo "load average before: $LOAD_START, after: $(cut -d' ' -f1-3 /proc/loadavg) (other load skews the figures)"
    echo
    for ours in nexodus nexodus-wg; do
        for fam in v4 v6; do
            line=""
            for impl in "${STOCK[@]}"; do
                line+="$ours/$impl $fam: $(ratio "$(median "$ours" "$fam")" "$(median "$impl" "$fam")")    "
            done
            echo "${line%    }"
        done
    done
    line=""
    for impl in nexodus nexodus-wg "${STOCK[@]}"; do line+=", $impl $(added_rtt "$impl")"; done
    echo "added RTT over bare veth, ms (idle / 500 pings/s): ${line#, }"
fi

if [ "$UNDERLAY6" = 1 ]; then
    log "v6-underlay phase: coordinator on [::]:4443, A and B join [$UNDER6_A]:4443, peers on v6 endpoints"
    if [ "$MAIN" = 1 ]; then
        run_rounds nexodus-v6under # against the main comparison's nexodus row
        v4from="the main comparison's nexodus row, same run"
    else
        run_rounds nexodus nexodus-v6under
        v4from="measured in this phase, in alternation"
    fi
    LABEL[nexodus]="nexodus (v4 underlay)"
    report nexodus nexodus-v6under
    echo "(v4 underlay: $v4from; the same veth, A and B without their v6 addresses. Tunnel MTU $TUN_MTU in"
    echo " both: nexodus's fixed MTU is 1500 - 40 (IPv6) - 8 (UDP) - 32 (WireGuard), so it fits a v6"
    echo " underlay unfragmented and leaves 20 bytes of each frame unused over v4)"
    for fam in v4 v6; do
        echo "v6 underlay/v4 underlay $fam: $(ratio "$(median nexodus-v6under "$fam")" "$(median nexodus "$fam")")" \
            "   CPU of the nexodus processes per Gbit/s: v4 underlay $(median nexodus "own_cpu_$fam")," \
            "v6 underlay $(median nexodus-v6under "own_cpu_$fam")"
    done
    echo "load average before: $LOAD_START, after: $(cut -d' ' -f1-3 /proc/loadavg) (other load skews the figures)"
fi
if [ "$RELAY" = 1 ]; then
    log "relay phase: third namespace $NS_R, underlay on a bridge in $NS_A"
    setup_relay_topology
    run_rounds nexodus-mesh3 nexodus-relayed
    report nexodus-mesh3 nexodus-relayed
    echo "(nexodus-mesh3: A and B direct with a relay node present; nexodus-relayed: A --relay-only, through the relay in $NS_R;"
    echo " relay forwarded $(median nexodus-relayed relayed_mb | cut -d. -f1) MB per round and had an RSS of" \
        "$(awk -v k="$(median nexodus-relayed relay_rss_kb)" 'BEGIN {printf "%.1f", k / 1024}') MiB, medians)"
    for fam in v4 v6; do
        echo "relayed/direct $fam: $(ratio "$(median nexodus-relayed "$fam")" "$(median nexodus-mesh3 "$fam")")"
    done
    echo "CPU per Gbit/s, relayed/direct: v4 $(ratio "$(median nexodus-relayed cpu_v4)" "$(median nexodus-mesh3 cpu_v4)")," \
        "v6 $(ratio "$(median nexodus-relayed cpu_v6)" "$(median nexodus-mesh3 cpu_v6)")" \
        "(when the shared CPUs are the limit, relayed/direct throughput tends to its inverse)"
    echo "CPU of the nexodus processes alone per Gbit/s (v4 / v6): direct $(median nexodus-mesh3 own_cpu_v4) /" \
        "$(median nexodus-mesh3 own_cpu_v6), relayed $(median nexodus-relayed own_cpu_v4) /" \
        "$(median nexodus-relayed own_cpu_v6); relayed/direct v4 $(ratio "$(median nexodus-relayed own_cpu_v4)" "$(median nexodus-mesh3 own_cpu_v4)")," \
        "v6 $(ratio "$(median nexodus-relayed own_cpu_v6)" "$(median nexodus-mesh3 own_cpu_v6)") (other load on the machine does not count here)"
fi
if [ "$USERSPACE" = 1 ]; then
    log "userspace phase: A rootless (--userspace, as nobody), B on TUN"
    run_rounds nexodus-tun nexodus-userspace
    report nexodus-tun nexodus-userspace
    echo "(nexodus-userspace: iperf3 in A connects to A's --egress listener on 127.0.0.1, which A's"
    echo " userspace stack carries through the tunnel to iperf3 on B's TUN address; no ping there)"
    for fam in v4 v6; do
        echo "userspace/TUN $fam: $(ratio "$(median nexodus-userspace "$fam")" "$(median nexodus-tun "$fam")")" \
            "   CPU of the nexodus processes per Gbit/s: TUN $(median nexodus-tun "own_cpu_$fam")," \
            "userspace $(median nexodus-userspace "own_cpu_$fam")"
    done
fi
if [ "$METRICS" = 1 ]; then
    log "metrics phase: TUN mode, A's /metrics scraped 100 times during each stream"
    run_rounds nexodus-tun nexodus-scraped
    report nexodus-tun nexodus-scraped
    for fam in v4 v6; do
        echo "scraped/unscraped $fam: $(ratio "$(median nexodus-scraped "$fam")" "$(median nexodus-tun "$fam")")" \
            "($(median nexodus-scraped "scrapes_$fam" | cut -d. -f1) scrapes answered per stream, median)"
    done
fi
echo
echo "raw results (implementation metric round value):"
cat "$RESULTS"
