#!/usr/bin/env bash
# Records virtman's shipped boot trace: a Debian 12 (bookworm) minbase root file
# system with systemd, booted under qemu (TCG) from `virtman trace record`'s
# recording NBD export, until it powers itself off after multi-user.target.
#
#   traces/build-debian-trace.sh OUT_DIR
#
# Writes OUT_DIR/debian12-boot.trace (text form), OUT_DIR/debian12-boot.console
# (the guest's serial console) and OUT_DIR/debian12-boot.summary (the figures).
# Run as root on Debian (debootstrap, chroot, mkfs.ext4 -d with root-owned
# files). Needs: debootstrap, busybox-static, cpio, e2fsprogs, qemu-system-x86,
# and target/release/virtman (`cargo build --release -p virtman`).
#
# Environment:
#   WORK        work directory (default: a new /tmp/virtman-debian-trace.XXXXXX,
#               removed at the end unless KEEP_WORK=1). A finished rootfs in
#               WORK/rootfs (marked WORK/rootfs.done) is reused.
#   MIRROR      Debian mirror (default: the first URI of
#               /etc/apt/sources.list.d/debian.sources, else deb.debian.org)
#   IMAGE_SIZE  size of the sparse raw disk (default: 1G)
#   MEMORY      guest memory in MiB (default: 512)
#   TIMEOUT     how long the boot may take (default: 600s)
#
# Steps:
#   1. debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod
#   2. configure: fstab (/dev/vda ext4 root), hostname, no getty on the serial
#      console, no first-boot prompts, and poweroff-after-boot.service (after
#      multi-user.target: prints "VIRTMAN-BOOTED uptime=S" on the console,
#      syncs, then `systemctl --force --force poweroff`: off at once, so the
#      trace ends with the boot and holds no shutdown reads; the disk is
#      virtman's copy, thrown away); the cloud kernel's modules go into /lib/modules
#      (depmod in the chroot), as a distribution kernel would install them
#   3. mkfs.ext4 -d ROOTFS disk.raw IMAGE_SIZE (sparse)
#   4. the kernel: target/guest-assets/vmlinuz (built by the test guest's
#      crates/testkit/guest/build.sh, run here when missing) and its .deb for
#      the modules; an initramfs built here: busybox, the virtio block modules,
#      an /init that mounts /dev/vda read-only on /newroot and switch_roots to
#      /sbin/init (systemd)
#   5. virtman trace record ... -o OUT_DIR/debian12-boot.trace
set -euo pipefail

out=${1:?usage: build-debian-trace.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
PATH=$PATH:/usr/sbin:/sbin

die() { echo "build-debian-trace.sh: $*" >&2; exit 1; }
need() { # need COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "$1 not found: install the Debian package $2"
}
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot)"
need debootstrap debootstrap
need busybox busybox-static
need cpio cpio
need mkfs.ext4 e2fsprogs
need dpkg-deb dpkg
need qemu-system-x86_64 qemu-system-x86
virtman=$repo/target/release/virtman
[ -x "$virtman" ] || die "$virtman missing: cargo build --release -p virtman"

if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
IMAGE_SIZE=${IMAGE_SIZE:-1G}
MEMORY=${MEMORY:-512}
TIMEOUT=${TIMEOUT:-600s}

if [ -n "${WORK:-}" ]; then
  mkdir -p "$WORK"
  work=$(cd "$WORK" && pwd)
else
  work=$(mktemp -d /tmp/virtman-debian-trace.XXXXXX)
fi
cleanup() {
  # Never leave the chroot's mounts behind.
  for m in proc sys dev; do umount "$work/rootfs/$m" 2>/dev/null || true; done
  if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

# --- kernel (the test guest's) ------------------------------------------------
assets=$repo/target/guest-assets
if [ ! -f "$assets/vmlinuz" ] || ! ls "$assets"/debs/linux-image-*.deb >/dev/null 2>&1; then
  log "building the test guest's assets (kernel) in $assets"
  "$repo/crates/testkit/guest/build.sh" "$assets"
fi
kernel_deb=$(ls "$assets"/debs/linux-image-*.deb | sort -V | tail -1)
rm -rf "$work/kernel"
dpkg-deb -x "$kernel_deb" "$work/kernel"
kver=$(ls "$work/kernel/lib/modules" | head -1)
cmp -s "$work/kernel/boot/vmlinuz-$kver" "$assets/vmlinuz" ||
  die "$assets/vmlinuz is not the kernel of $kernel_deb: rebuild the test guest"
log "kernel $kver ($(basename "$kernel_deb"))"

# --- 1. root file system --------------------------------------------------------
rootfs=$work/rootfs
if [ ! -f "$work/rootfs.done" ]; then
  rm -rf "$rootfs"
  log "debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod \
    bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  touch "$work/rootfs.done"
else
  log "reusing $rootfs"
fi

# --- 2. configuration ---------------------------------------------------------
log "configuring"
echo "virtman-debian" >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvirtman-debian\n' >"$rootfs/etc/hosts"
cat >"$rootfs/etc/fstab" <<'EOF'
# <file system> <mount point> <type> <options>          <dump> <pass>
/dev/vda        /             ext4   errors=remount-ro  0      1
EOF
# A fixed machine id: the boot is not a "first boot" (no systemd-firstboot
# prompt on the console), and every rebuild boots the same way.
echo "b0075ce5b0075ce5b0075ce5b0075ce5" >"$rootfs/etc/machine-id"
sysd=$rootfs/etc/systemd/system
mkdir -p "$sysd/multi-user.target.wants"
# No login prompts: nobody logs in, the guest powers off.
for u in serial-getty@ttyS0.service getty@tty1.service systemd-firstboot.service; do
  ln -sfn /dev/null "$sysd/$u"
done
cat >"$sysd/poweroff-after-boot.service" <<'EOF'
[Unit]
Description=Power off once the boot reached multi-user.target (virtman boot trace)
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/console
ExecStart=/bin/sh -c 'echo "VIRTMAN-BOOTED uptime=$(cut -d" " -f1 /proc/uptime)"; sync'
ExecStart=/bin/systemctl --force --force poweroff

[Install]
WantedBy=multi-user.target
EOF
ln -sfn ../poweroff-after-boot.service "$sysd/multi-user.target.wants/poweroff-after-boot.service"
# The kernel's modules, as installing the kernel package would leave them
# (udev loads what the virtual hardware needs during the boot).
rm -rf "$rootfs/usr/lib/modules/$kver"
mkdir -p "$rootfs/usr/lib/modules"
cp -a "$work/kernel/lib/modules/$kver" "$rootfs/usr/lib/modules/"
cp "$work/kernel/boot/config-$kver" "$work/kernel/boot/System.map-$kver" "$rootfs/boot/"
chroot "$rootfs" /sbin/depmod -a "$kver"
# No package caches in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

# --- 3. disk --------------------------------------------------------------------
log "mkfs.ext4 -d rootfs disk.raw $IMAGE_SIZE"
rm -f "$work/disk.raw"
mkfs.ext4 -q -F -L debian12 -d "$rootfs" "$work/disk.raw" "$IMAGE_SIZE" >/dev/null
used_kib=$(du -sk "$rootfs" | cut -f1)

# --- 4. initramfs ---------------------------------------------------------------
log "initramfs"
ird=$work/initrd
rm -rf "$ird"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$(command -v busybox)" "$ird/bin/busybox"
moddir=$work/kernel/lib/modules/$kver
order=()
add_module() { # each module after its dependencies (modules.dep from depmod)
  local name=$1 rel d
  for d in "${order[@]}"; do [ "$d" = "$name" ] && return 0; done
  rel=$(awk -F: -v n="/$name.ko" 'length($1) > length(n) && substr($1, length($1) - length(n) + 1) == n {print $1; exit}' \
    "$rootfs/usr/lib/modules/$kver/modules.dep")
  if [ -z "$rel" ]; then
    grep -q "/$name.ko" "$moddir/modules.builtin" && return 0
    die "module $name is neither in the kernel package nor built in"
  fi
  for d in $(awk -F: -v f="$rel" '$1 == f {print $2}' "$rootfs/usr/lib/modules/$kver/modules.dep"); do
    d=$(basename "$d"); add_module "${d%%.ko*}"
  done
  case $rel in
    *.xz) xz -dc "$moddir/$rel" >"$ird/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$moddir/$rel" >"$ird/lib/modules/$name.ko" ;;
    *) cp "$moddir/$rel" "$ird/lib/modules/$name.ko" ;;
  esac
  order+=("$name")
}
for m in virtio_pci virtio_blk; do add_module "$m"; done
grep -q '^CONFIG_EXT4_FS=y' "$work/kernel/boot/config-$kver" || add_module ext4
printf '%s\n' "${order[@]}" >"$ird/modules.order"
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "INITRD-ERROR: $*"; poweroff -f; sleep 5; exit 1; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m.ko" || fail "insmod $m"; done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ "$i" -le 400 ] || fail "no /dev/vda after 20 s"; usleep 50000
done
# Read-only, as a distribution initramfs does: systemd checks it and remounts rw.
mount -t ext4 -o ro /dev/vda /newroot || fail "mount /dev/vda"
for d in dev proc sys; do mount --move /$d /newroot/$d || fail "move /$d"; done
exec switch_root /newroot /sbin/init
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --owner 0:0) >"$work/initrd.cpio"

# --- 5. record ------------------------------------------------------------------
log "booting under qemu (TCG) and recording (timeout $TIMEOUT)"
start=$(date +%s.%N)
"$virtman" trace record --kernel "$assets/vmlinuz" --initrd "$work/initrd.cpio" \
  --disk "$work/disk.raw" --memory "$MEMORY" --timeout "$TIMEOUT" \
  --append 'root=/dev/vda ro' \
  --console "$out/debian12-boot.console" -o "$out/debian12-boot.trace"
end=$(date +%s.%N)
grep -q VIRTMAN-BOOTED "$out/debian12-boot.console" ||
  die "the guest powered off without reaching multi-user.target; see $out/debian12-boot.console"

# --- figures --------------------------------------------------------------------
booted=$(sed -n 's/.*VIRTMAN-BOOTED uptime=\([0-9.]*\).*/\1/p' "$out/debian12-boot.console" | head -1)
awk -v used_kib="$used_kib" -v kver="$kver" -v start="$start" -v end="$end" -v booted="$booted" '
  /^image-size / {size = $2}
  /^[0-9]/ {
    n++; bytes += $3; last = $1
    for (c = int($2 / 262144); c <= int(($2 + $3 - 1) / 262144); c++) seen[c] = 1
  }
  END {
    ws = 0; for (c in seen) ws++
    printf "image: Debian 12 minbase + systemd, kernel %s; rootfs %.0f MiB in a %d MiB ext4 disk\n", kver, used_kib / 1024, size / 1048576
    printf "image-size %d\nreads %d\nbytes-read %d (%.1f MiB)\n", size, n, bytes, bytes / 1048576
    printf "working-set %d chunks of 256 KiB (%.1f MiB)\n", ws, ws * 0.25
    printf "trace-duration %.2f s (first to last read)\n", last / 1e6
    printf "guest-uptime-at-multi-user %s s\nrecord-wall-time %.1f s\n", booted, end - start
  }' "$out/debian12-boot.trace" | tee "$out/debian12-boot.summary"
