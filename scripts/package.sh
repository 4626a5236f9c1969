#!/usr/bin/env bash
# Builds the Debian package into target/debian/: the binary (built with the profile in
# $PROFILE, `release` by default, `router` for the size-optimised build, or `dev` for the
# one the tests already built), the unit with
# /usr/bin in ExecStart, /etc/watchalong.toml as a conffile, man pages and completions
# made by the binary itself. Installs cargo-deb (pinned) when it is missing. Prints the
# package's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
PROFILE=${PROFILE:-release}
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  echo "installing: cargo-deb $CARGO_DEB_VERSION (cargo install)" >&2
  cargo install --locked --version "$CARGO_DEB_VERSION" cargo-deb >&2
fi

echo "building: watchalong ($PROFILE profile)" >&2
cargo build --locked --profile "$PROFILE" --bin watchalong >&2
# Cargo keeps the dev profile's build in target/debug.
if [ "$PROFILE" = dev ]; then bin=target/debug/watchalong; else bin="target/$PROFILE/watchalong"; fi

out=target/package
rm -rf "$out"
mkdir -p "$out/man" "$out/completions" "$out/systemd"
"$bin" generate man "$out/man" >/dev/null
# Debian ships man pages compressed, reproducibly (-n: no name or time inside).
gzip -9n "$out"/man/*.1
"$bin" generate completions "$out/completions" >/dev/null
sed 's#^ExecStart=/usr/local/bin/watchalong #ExecStart=/usr/bin/watchalong #' \
  systemd/watchalong.service > "$out/systemd/watchalong.service"
grep -q '^ExecStart=/usr/bin/watchalong ' "$out/systemd/watchalong.service" || {
  echo "error: systemd/watchalong.service has no ExecStart=/usr/local/bin/watchalong line to point at /usr/bin" >&2
  exit 1
}
cp systemd/watchalong.socket "$out/systemd/watchalong.socket"

cargo deb --no-build --profile "$PROFILE" --strip --output target/debian/ >&2
deb=$(ls -t target/debian/watchalong_*.deb | head -1)
echo "$deb"
