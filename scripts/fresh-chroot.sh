#!/usr/bin/env bash
# Runs a command in a fresh Debian 12 chroot that has only Rust: the check
# that the README's two commands set everything up on a bare machine.
#
#   scripts/fresh-chroot.sh DIR COMMAND...      (as root; needs debootstrap)
#
# DIR is made with `debootstrap --variant=minbase bookworm` if it does not
# exist yet. Rust comes from this machine: ~/.rustup and the cargo registry
# are bind-mounted, ~/.cargo/bin is copied without cargo-nextest and
# cargo-deb (scripts/test.sh installs those), and this repository is
# bind-mounted at the same path. CARGO_TARGET_DIR, if set, is bind-mounted too.
# Everything is unmounted when the command ends.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR COMMAND..." >&2; exit 2; }
root=$(realpath -m "$1"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
home=${HOME:-/root}

if [ ! -e "$root/etc/debian_version" ]; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}"
fi

mounts=()
bind() { # bind SRC DEST-IN-CHROOT
  mkdir -p "$root$2"
  mount --bind "$1" "$root$2"
  mounts=("$root$2" "${mounts[@]}")
}
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

mkdir -p "$root/proc" "$root/sys" "$root/dev"
mount -t proc proc "$root/proc"; mounts=("$root/proc" "${mounts[@]}")
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
bind "$home/.rustup" /root/.rustup
bind "$home/.cargo/registry" /root/.cargo/registry
bind "$repo" "$repo"
[ -z "${CARGO_TARGET_DIR:-}" ] || bind "$CARGO_TARGET_DIR" "$CARGO_TARGET_DIR"
if [ ! -d "$root/root/.cargo/bin" ]; then
  cp -a "$home/.cargo/bin" "$root/root/.cargo/bin"
  rm -f "$root/root/.cargo/bin/cargo-nextest" "$root/root/.cargo/bin/cargo-deb"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" \
  PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR="$CARGO_TARGET_DIR"} \
  bash -c 'cd "$0" && exec "$@"' "$repo" "$@"
