#!/usr/bin/env bash
# Tunnel benchmark: TCP throughput (iperf3) and ping RTT between two network namespaces
# joined by a veth, over (1) the raw veth, (2) watchalong, (3) wireguard-go, and
# (4) boringtun-cli, all in one run on the same machine. Root needed.
#
#   sudo bench/tunnel.sh [SECONDS]      # default 10 s per iperf3 run
#
# Installs iperf3, wireguard-tools and wireguard-go from Debian, and boringtun-cli from
# crates.io, when they are missing. Prints a Markdown table for docs/benchmarks.md.
set -euo pipefail
umask 077
cd "$(dirname "$0")/.."
SECS=${1:-10}
ID=$$
A=wab-a-$ID B=wab-b-$ID
TMP=$(mktemp -d /tmp/watchalong-bench.XXXXXX)

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v ping >/dev/null || need+=(iputils-ping)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
BORINGTUN=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
[ -x "$BORINGTUN" ] || cargo install boringtun-cli --locked
cargo build --release --quiet
WA=$PWD/target/release/watchalong

cleanup() {
  for ns in $A $B; do
    for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 $pid 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

ip netns add $A; ip netns add $B
ip link add wabv$ID type veth peer name eth0 netns $B
ip link set wabv$ID netns $A
ip -n $A link set wabv$ID name eth0
for ns in $A $B; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
ip -n $A addr add 10.123.0.1/24 dev eth0
ip -n $B addr add 10.123.0.2/24 dev eth0

wait_for() { for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

measure() { # name server-ip
  local name=$1 ip=$2
  wait_for ip netns exec $B ping -c1 -W1 "$ip" || { echo "| $name | unreachable | |"; return; }
  ip netns exec $A iperf3 -s -1 -D -B "$ip" >/dev/null
  sleep 0.3
  local mbit
  mbit=$(ip netns exec $B iperf3 -c "$ip" -t "$SECS" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  local rtt
  rtt=$(ip netns exec $B ping -c 50 -i 0.02 -q "$ip" | awk -F/ '/rtt/ {print $5}')
  echo "| $name | $mbit | $rtt |"
}

echo "| path | TCP Mbit/s (iperf3, ${SECS}s) | ping RTT avg ms (50 pings) |"
echo "|---|---|---|"
measure "raw veth" 10.123.0.1

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
  ip netns exec $ns $WA --config $TMP/$n.toml daemon >$TMP/$n.log 2>&1 &
done
wait_for $WA --config $TMP/a.toml status
wait_for $WA --config $TMP/b.toml status
LINK=$($WA --config $TMP/a.toml link 2>/dev/null | head -1)
$WA --config $TMP/b.toml join "$LINK" >/dev/null
measure "watchalong $(git rev-parse --short HEAD 2>/dev/null || echo dev)" 100.77.0.1
for pid in $(ip netns pids $A) $(ip netns pids $B); do kill $pid 2>/dev/null || true; done
wait_for bash -c "! ip -n $A link show wabt0 && ! ip -n $B link show wabt0"

# A standard WireGuard pair, set up the same way for wireguard-go and boringtun-cli.
# wireguard-go's control socket is /var/run/wireguard/IFACE.sock, shared by every
# namespace, so each side gets its own interface name.
wg_pair() { # name command...
  local name=$1; shift
  ip netns exec $A env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" wga$ID >"$TMP/${name%% *}-a.log" 2>&1 &
  ip netns exec $B env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" wgb$ID >"$TMP/${name%% *}-b.log" 2>&1 &
  wait_for ip netns exec $A wg show wga$ID; wait_for ip netns exec $B wg show wgb$ID
  wg genkey > $TMP/ka; wg genkey > $TMP/kb
  ip netns exec $A wg set wga$ID listen-port 51900 private-key $TMP/ka peer "$(wg pubkey < $TMP/kb)" endpoint 10.123.0.2:51900 allowed-ips 100.99.0.2/32
  ip netns exec $B wg set wgb$ID listen-port 51900 private-key $TMP/kb peer "$(wg pubkey < $TMP/ka)" endpoint 10.123.0.1:51900 allowed-ips 100.99.0.1/32
  ip -n $A addr add 100.99.0.1/24 dev wga$ID; ip -n $B addr add 100.99.0.2/24 dev wgb$ID
  ip -n $A link set wga$ID mtu 1420 up; ip -n $B link set wgb$ID mtu 1420 up
  measure "$name" 100.99.0.1
  for pid in $(ip netns pids $A) $(ip netns pids $B); do kill $pid 2>/dev/null || true; done
  wait_for bash -c "! ip -n $A link show wga$ID && ! ip -n $B link show wgb$ID"
}
wg_pair "wireguard-go $(wireguard-go --version 2>/dev/null | head -1 | awk '{print $2}')" wireguard-go -f
wg_pair "boringtun-cli $($BORINGTUN --version 2>/dev/null | awk '{print $2}')" "$BORINGTUN" --foreground --disable-drop-privileges
