#!/usr/bin/env bash
# Tunnel benchmark: two network namespaces joined by a veth, and between them (1) the raw
# veth, (2) watchalong, (3) wireguard-go, (4) boringtun-cli and (5) gotatun-cli, all in
# one run on the same machine, so that every figure is a ratio against a peer measured
# under the same load. Root needed.
#
#   sudo bench/tunnel.sh [SECONDS]      # default 10 s per iperf3 run, at least 4
#
# Per path: iperf3 TCP, one stream B -> A, one stream A -> B (-R) and four streams (-P 4);
# ping RTT idle and under load (pings B -> A while one iperf3 stream B -> A runs, so they
# wait in the queue the data fills); and the CPU seconds per GB moved: utime + stime of
# every process in both namespaces (the tunnel's, on both ends) read from /proc/PID/stat
# around the single-stream B -> A run, divided by the bytes iperf3 received. The raw veth
# has no tunnel process, hence "–".
#
# Installs iperf3, wireguard-tools and wireguard-go from Debian, and boringtun-cli and
# gotatun-cli 0.10 from crates.io (niced: the machine may be shared) when they are
# missing. Prints the date, commit, tool versions, load and a Markdown table for
# docs/benchmarks.md on stdout; progress and logs of a failed path go to stderr.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."
SECS=${1:-10}
case $SECS in
  '' | *[!0-9]*) echo "usage: sudo $0 [SECONDS]: SECONDS is a whole number of seconds per iperf3 run" >&2; exit 2 ;;
esac
# The loaded pings skip the first and the last second of their iperf3 run.
[ "$SECS" -ge 4 ] || { echo "SECONDS must be at least 4 (the loaded pings need 2 s of a run)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0): it creates network namespaces and TUN devices" >&2; exit 2; }

ID=$$
A=wab-a-$ID B=wab-b-$ID
TMP=$(mktemp -d /tmp/watchalong-bench.XXXXXX)

cleanup() {
  for ns in $A $B; do
    for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 $pid 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  # Left behind only if the veth never reached its namespace.
  ip link del wabv$ID 2>/dev/null || true
  # The userspace WireGuards' control sockets are global, not per namespace; a process
  # killed with -9 above leaves its socket behind.
  rm -f /var/run/wireguard/wga$ID.sock /var/run/wireguard/wgb$ID.sock
  rm -rf "$TMP"
}
trap cleanup EXIT

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
BORINGTUN=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
[ -x "$BORINGTUN" ] || nice -n 19 cargo install boringtun-cli --locked
GOTATUN=$(command -v gotatun || echo "$HOME/.cargo/bin/gotatun")
[ -x "$GOTATUN" ] || nice -n 19 cargo install gotatun-cli --version '^0.10' --locked
cargo build --release --quiet
WA=$PWD/target/release/watchalong
HZ=$(getconf CLK_TCK)

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo dev)
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+changes"
WGGO_V=$(wireguard-go --version 2>/dev/null | head -1 | awk '{print $2}')
BORINGTUN_V=$("$BORINGTUN" --version 2>/dev/null | awk '{print $2}')
GOTATUN_V=$("$GOTATUN" --version 2>/dev/null | awk '{print $2}')
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT"
echo "- Machine: $(nproc) CPUs, $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
echo "- Tools: $(iperf3 --version | head -1 | awk '{print "iperf3", $2}'), wireguard-go $WGGO_V, boringtun-cli $BORINGTUN_V, gotatun $GOTATUN_V"
echo "- Load before (uptime):$(uptime | sed 's/.*load average/ load average/')"
echo

ip netns add $A; ip netns add $B
ip link add wabv$ID type veth peer name eth0 netns $B
ip link set wabv$ID netns $A
ip -n $A link set wabv$ID name eth0
for ns in $A $B; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
ip -n $A addr add 10.123.0.1/24 dev eth0
ip -n $B addr add 10.123.0.2/24 dev eth0

wait_for() { for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

# utime + stime, in clock ticks, summed over the given processes (each one's figure
# includes all its threads). Prints nothing when one of them is gone.
cpu_ticks() {
  local pid stat rest fields sum=0
  for pid in "$@"; do
    stat=$(cat /proc/$pid/stat 2>/dev/null) || return 0
    # The command name (field 2) may hold spaces and parentheses: cut after its last ')'.
    rest=${stat##*) }
    read -r -a fields <<<"$rest"
    # fields[0] is field 3 (state), so utime (14) and stime (15) are fields[11] and [12].
    sum=$((sum + fields[11] + fields[12]))
  done
  echo $sum
}

# One iperf3 client run from B against the server at $1; the rest are iperf3 options.
# Prints "Mbit/s bytes-received". A server still finishing the previous test answers
# "busy", so a failed run is tried again twice before the path is given up.
iperf() {
  local ip=$1; shift
  local try out
  for try in 1 2 3; do
    ip netns exec $B iperf3 -c "$ip" -t "$SECS" -J "$@" >$TMP/iperf3.json 2>$TMP/iperf3.err || true
    if out=$(python3 -c '
import json, sys
r = json.load(sys.stdin)
if "error" in r:
    sys.exit("iperf3: " + r["error"])
s = r["end"]["sum_received"]
if s["bytes"] <= 0:
    sys.exit("iperf3 moved no bytes")
print(round(s["bits_per_second"] / 1e6), s["bytes"])' <$TMP/iperf3.json 2>&1); then
      echo "$out"; return 0
    fi
    echo "iperf3 $* to $ip, try $try: $out $(cat $TMP/iperf3.err)" >&2
    sleep 0.5
  done
  return 1
}

# "avg" or "avg (N% lost)" from ping -q's summary on stdin.
ping_summary() {
  awk -F'[/ ,%]+' '/packet loss/ {for (i = 1; i <= NF; i++) if ($(i+1) == "packet") loss = $i}
    /^rtt/ {avg = $8} END {if (avg == "") print "all lost"; else if (loss + 0 > 0) printf "%s (%.1f%% lost)\n", avg, loss; else print avg}'
}

show_logs() { # the path's name: its first word is its logs' prefix
  local f
  for f in "$TMP/${1%% *}"-*.log; do [ -e "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
  return 0
}

# Ends every process in A and B: TERM first, so that each tunnel removes its interface
# and control socket itself, then KILL what is still there after 10 s, so that no path
# runs beside the next one's.
stop_all() {
  local pid
  for pid in $(ip netns pids $A) $(ip netns pids $B); do kill $pid 2>/dev/null || true; done
  wait_for bash -c "[ -z \"\$(ip netns pids $A)\$(ip netns pids $B)\" ]" && return 0
  for pid in $(ip netns pids $A) $(ip netns pids $B); do
    echo "$(cat /proc/$pid/comm 2>/dev/null) ($pid) did not stop on TERM within 10 s: killed" >&2
    kill -9 $pid 2>/dev/null || true
  done
  wait_for bash -c "[ -z \"\$(ip netns pids $A)\$(ip netns pids $B)\" ]"
}

measure() { # name server-ip: the tunnel's processes are whatever runs in A and B now
  local name=$1 ip=$2
  local pids=() pid
  for pid in $(ip netns pids $A) $(ip netns pids $B); do pids+=("$pid"); done
  for pid in "${pids[@]}"; do echo "$name: tunnel process $pid $(cat /proc/$pid/comm 2>/dev/null)" >&2; done
  if ! wait_for ip netns exec $B ping -c1 -W1 "$ip"; then
    echo "| $name | unreachable | | | | | |"; show_logs "$name"; return 0
  fi
  ip netns exec $A iperf3 -s -D -B "$ip" --pidfile $TMP/iperf3.pid >/dev/null
  if ! wait_for bash -c "ip netns exec $A ss -ltn | grep -q '$ip:5201 '"; then
    echo "| $name | iperf3 server did not start | | | | | |"; return 0
  fi
  local idle one rev four loaded cpu t0 t1 mbit bytes
  # ping exits 1 when a reply is missing: the summary says so, the run goes on.
  idle=$({ ip netns exec $B ping -c 50 -i 0.02 -q "$ip" || true; } | ping_summary)

  t0=$(cpu_ticks "${pids[@]}")
  if ! one=$(iperf "$ip"); then echo "| $name | iperf3 failed | | | | | |"; show_logs "$name"; return 0; fi
  t1=$(cpu_ticks "${pids[@]}")
  read -r mbit bytes <<<"$one"
  one=$mbit
  if [ ${#pids[@]} -eq 0 ]; then
    cpu="–"
  elif [ -z "$t0" ] || [ -z "$t1" ]; then
    cpu="? (a tunnel process died)"
  else
    cpu=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v b="$bytes" 'BEGIN {printf "%.2f", t / hz / (b / 1e9)}')
  fi

  rev=$(iperf "$ip" -R) && rev=${rev%% *} || rev="failed"
  four=$(iperf "$ip" -P 4) && four=${four%% *} || four="failed"

  # Under load: one stream B -> A, pings from the second second to one before its end.
  ip netns exec $B iperf3 -c "$ip" -t "$SECS" -J >$TMP/load.json 2>&1 &
  local load=$!
  sleep 1
  loaded=$({ ip netns exec $B ping -w $((SECS - 2)) -i 0.02 -q "$ip" || true; } | ping_summary)
  if ! wait $load; then loaded="? (its iperf3 failed)"; fi

  kill "$(cat $TMP/iperf3.pid)" 2>/dev/null || true
  wait_for bash -c "! ip netns exec $A ss -ltn | grep -q '$ip:5201 '" || true
  echo "| $name | $one | $rev | $four | $idle | $loaded | $cpu |"
}

echo "| path | TCP 1 stream, Mbit/s | TCP 1 stream -R, Mbit/s | TCP 4 streams, Mbit/s | ping idle, avg ms | ping under load, avg ms | CPU s per GB (both ends) |"
echo "|---|---|---|---|---|---|---|"
measure "raw veth" 10.123.0.1
# A server left by a failed measure would count as the next path's tunnel process.
stop_all

# watchalong: host in A, joiner in B.
for n in a b; do
  ns=$([ $n = a ] && echo $A || echo $B)
  cat > $TMP/$n.toml <<CFG
[node]
name = "bench-$n"
state_dir = "$TMP/$n/state"
[tunnel]
interface = "wabt0"
[control]
socket = "$TMP/$n/control.sock"
[log]
level = "warn"
CFG
  ip netns exec $ns $WA --config $TMP/$n.toml daemon >$TMP/watchalong-$n.log 2>&1 &
done
wait_for $WA --config $TMP/a.toml status
wait_for $WA --config $TMP/b.toml status
LINK=$($WA --config $TMP/a.toml link 2>/dev/null | head -1)
$WA --config $TMP/b.toml join "$LINK" >/dev/null
measure "watchalong $COMMIT" 100.77.0.1
stop_all

# A standard WireGuard pair, set up the same way for wireguard-go, boringtun-cli and
# gotatun: each runs in the foreground and is configured with `wg` through its control
# socket, /var/run/wireguard/IFACE.sock, which every namespace shares, so each side gets
# its own interface name. Each logs errors only (wireguard-go's and boringtun-cli's
# default, asked of gotatun, whose default is "info"; watchalong runs at "warn").
wg_pair() { # name command...
  local name=$1; shift
  ip netns exec $A env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" wga$ID >"$TMP/${name%% *}-a.log" 2>&1 &
  ip netns exec $B env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" wgb$ID >"$TMP/${name%% *}-b.log" 2>&1 &
  if ! wait_for ip netns exec $A wg show wga$ID || ! wait_for ip netns exec $B wg show wgb$ID; then
    echo "| $name | did not start | | | | | |"; show_logs "$name"
  else
    wg genkey > $TMP/ka; wg genkey > $TMP/kb
    ip netns exec $A wg set wga$ID listen-port 51900 private-key $TMP/ka peer "$(wg pubkey < $TMP/kb)" endpoint 10.123.0.2:51900 allowed-ips 100.99.0.2/32
    ip netns exec $B wg set wgb$ID listen-port 51900 private-key $TMP/kb peer "$(wg pubkey < $TMP/ka)" endpoint 10.123.0.1:51900 allowed-ips 100.99.0.1/32
    ip -n $A addr add 100.99.0.1/24 dev wga$ID; ip -n $B addr add 100.99.0.2/24 dev wgb$ID
    ip -n $A link set wga$ID mtu 1420 up; ip -n $B link set wgb$ID mtu 1420 up
    measure "$name" 100.99.0.1
  fi
  stop_all
  # The next pair reuses the interface names.
  wait_for bash -c "! ip -n $A link show wga$ID && ! ip -n $B link show wgb$ID"
}
wg_pair "wireguard-go $WGGO_V" wireguard-go -f
wg_pair "boringtun-cli $BORINGTUN_V" "$BORINGTUN" --foreground --disable-drop-privileges
wg_pair "gotatun-cli $GOTATUN_V" "$GOTATUN" --foreground --disable-drop-privileges --verbosity error

echo
echo "- Load after (uptime):$(uptime | sed 's/.*load average/ load average/')"
