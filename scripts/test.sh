#!/usr/bin/env bash
# Runs every test from a fresh machine: installs the system packages the tests need
# (namespaces, NAT and IPv6 firewalls, ping, WireGuard tools and wireguard-go for the interop tests, with
# gotatun-cli from crates.io; systemd-analyze, mpv and ffmpeg for the watch-along tests;
# chromium, node and playwright-core (npm) for the browser tests;
# curl, tcpdump and setpriv for the attacker tests), then
# the whole cargo suite, then the transfer, sync and watch tests again across a 50 ms lab
# internet. Root is needed for the namespace tests; without root they print
# "SKIPPED (needs root)" past the harness's capture and each test binary ends with the
# count of its skips; under CI (any CI but empty, 0 or false) a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
# The IPv6 lab's home-router firewalls; Debian ships ip6tables in the iptables package.
command -v ip6tables >/dev/null || need+=(iptables)
command -v ping >/dev/null || need+=(iputils-ping)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v mpv >/dev/null || need+=(mpv)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v curl >/dev/null || need+=(curl)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v setpriv >/dev/null || need+=(util-linux)
# The mount tests run `watchalong mount` in a node's network namespace only (nsenter).
command -v nsenter >/dev/null || need+=(util-linux)
# A user other than root mounts through the setuid fusermount3.
command -v fusermount3 >/dev/null || need+=(fuse3)
# The package test: a Debian folder made by debootstrap, booted by systemd-nspawn, and
# the package checked by lintian.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v lintian >/dev/null || need+=(lintian)
# The browser tests (tests/browser.rs): Debian's chromium, driven from node by playwright-core.
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (run as root, or: sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# gotatun-cli (Mullvad's boringtun fork, binary `gotatun`), the interop tests' second peer,
# is not packaged by Debian. Pinned to the version the tests were checked against, which
# start it with flags of that version (see tests/interop.rs).
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v gotatun >/dev/null; then
  if [ ! -x "$cargo_bin/gotatun" ]; then
    echo "installing: gotatun-cli (cargo install)"
    cargo install --locked --version 0.10.2 gotatun-cli
  fi
  export PATH="$cargo_bin:$PATH"
fi
# playwright-core, pinned by tests/browser/package-lock.json, into tests/browser/node_modules.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "installing: playwright-core (npm ci in tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund)
fi
if [ "$(id -u)" -eq 0 ] && [ ! -e /dev/net/tun ]; then
  mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
fi

cargo test --all-targets --locked "$@"

# Distance: the transfer, sync and watch tests once more with a 50 ms round trip between
# any two nodes of the lab internet (each link holds frames 12.5 ms each way; see
# tests/common/delay.rs and `Lab::rtt`). tests/lab.rs, in the run above, checked that the
# delay element adds what it is told.
WATCHALONG_LAB_RTT_MS=50 cargo test --locked --test transfer --test sync --test watch "$@"
