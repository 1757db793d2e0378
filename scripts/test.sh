#!/usr/bin/env bash
# Runs virtman's tests on a Debian 12 (bookworm) machine that has only Rust:
# installs the Debian packages and cargo tools the tests drive, then runs
# `cargo nextest run --workspace` with any arguments given passed through.
#
#   scripts/test.sh                      # install what is missing, run every test
#   scripts/test.sh -E 'test(deb)'       # ... a subset (nextest's arguments)
#   scripts/test.sh --install-only       # install only
#
# Installs with apt-get (as root, or through sudo) only what is missing, so a
# second run goes straight to the tests. .ci/run calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# ---------------------------------------------------------------------------
# What the tests need. Add a package here, with a line saying which test
# needs it, and it is installed in CI and on a developer's machine alike.
# ---------------------------------------------------------------------------
packages=(
  # Rust's own prerequisites on a bare Debian: the C toolchain rustc links
  # with (ring and blake3 compile C too), and the CA certificates cargo
  # fetches crates with.
  gcc libc6-dev ca-certificates
  # NBD peers the interop tests drive: nbdkit, nbdinfo and nbdcopy
  # (libnbd-bin), nbdsh (python3-libnbd); fio for the benchmarks.
  nbdkit libnbd-bin python3-libnbd fio
  # The test guest (crates/testkit/guest/build.sh, which also fetches the
  # Debian cloud kernel .deb with `apt-get download`).
  busybox-static cpio e2fsprogs
  # The replicated coordinator's tests.
  etcd-server
  # Network namespaces and shaped links (`storm --netns`, the netns tests);
  # pgrep, ps and kill in the process tests; xz and zstd unpack the guest
  # kernel's modules.
  iproute2 procps xz-utils zstd
  # The packaging tests (crates/cli/tests/dist_units.rs, deb_package.rs):
  # systemd-analyze, man -w, and strip for cargo-deb.
  # dpkg-shlibdeps (dpkg-dev) fills the .deb's $auto dependencies (libc6).
  systemd man-db binutils dpkg-dev
  # The libvirt test (crates/cli/tests/libvirt.rs): libvirtd with its qemu
  # driver and the libvirt-qemu user, and virsh.
  libvirt-daemon-system libvirt-clients
  # --- more packages for the tests go here ---
)
# From bookworm-backports: qemu 10, with qemu-utils at the same version.
backports=(qemu-system-x86 qemu-utils)
# Cargo tools: the test runner, and cargo-deb for the .deb test.
cargo_tools=(cargo-nextest cargo-deb)
# ---------------------------------------------------------------------------

install_only=0
if [ "${1:-}" = "--install-only" ]; then
  install_only=1
  shift
fi

missing=()
missing_backports=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
for p in "${backports[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_backports+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_backports[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} ${missing_backports[*]}" >&2
  if [ ${#missing_backports[@]} -gt 0 ]; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
  fi
  $SUDO apt-get update -q
  if [ ${#missing_backports[@]} -gt 0 ]; then
    $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_backports[@]}"
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

for t in "${cargo_tools[@]}"; do
  command -v "$t" >/dev/null || cargo install "$t" --locked
done

if [ "$install_only" = 1 ]; then
  exit 0
fi
exec cargo nextest run --workspace "$@"
