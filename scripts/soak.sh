#!/usr/bin/env bash
# Issue 11's soak: five members of a read-write share in the lab, churned at random for
# MINUTES (default 2) while a 1 GiB file syncs and a video plays; then every tree must be
# the same, nothing lost, no daemon crashed, memory and descriptors within bounds (see
# benches/soak.rs). Installs what the lab needs (namespaces, NAT, mpv, ffmpeg), then runs
# the benchmark in a release build.
#
#   sudo scripts/soak.sh [MINUTES] [--json]
#
# SOAK_SEED=N replays a run's random choices (every run prints its seed);
# SOAK_CONVERGE_SECS (default 900) is how long the trees get to become one at the end.
# What every run did is kept in target/soak/SEED-actions.log, its summary in
# target/soak/SEED-summary.md, and on failure every daemon's log beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=2
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  minutes=$1
  shift
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "the soak builds network namespaces: run it as root (sudo $0 $minutes)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v mpv >/dev/null || need+=(mpv)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /dev/net/tun ]; then
  mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
fi

exec cargo bench --locked --bench soak -- "$minutes" "$@"
