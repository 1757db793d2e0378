#!/usr/bin/env bash
# Builds virtman's test guest: a Debian cloud kernel, a busybox initramfs and a
# small ext4 disk holding a marker file.
#
#   crates/testkit/guest/build.sh OUT_DIR
#
# Writes OUT_DIR/vmlinuz, OUT_DIR/initrd.cpio, OUT_DIR/disk.raw, then copies this
# script to OUT_DIR/build.sh.stamp (callers rebuild when the stamp differs from
# the script). Needs Debian packages busybox-static, cpio and e2fsprogs, and apt
# to fetch the kernel .deb (`apt-get download`, no install; as root or not). A
# kernel .deb already in OUT_DIR/debs or in /var/cache/apt/archives is reused.
# KERNEL_PKG overrides the kernel package (default: what linux-image-cloud-amd64
# depends on, e.g. linux-image-6.1.0-56-cloud-amd64).
#
# The guest's /init (PID 1, busybox sh):
#   mount proc, sys, devtmpfs -> insmod the virtio block modules and their
#   dependencies -> mount /dev/vda (ext4) -> print "VIRTMAN-MARKER: <marker.txt>"
#   -> append "boot <virtman.id=...>" to /boots.txt -> sync, umount ->
#   print "VIRTMAN-DONE" -> poweroff -f.
# Any failure prints "VIRTMAN-ERROR: ..." and powers off.
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

need() { # need COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ||
    { echo "build.sh: $1 not found: install the Debian package $2" >&2; exit 1; }
}
need busybox busybox-static
need cpio cpio
need mkfs.ext4 e2fsprogs
need dpkg-deb dpkg
PATH=$PATH:/usr/sbin:/sbin

# --- kernel ---------------------------------------------------------------
resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
pkg=${KERNEL_PKG:-}
[ -n "$pkg" ] || pkg=$(resolve_kernel)
if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
  # A fresh machine may have no package lists yet.
  apt-get update -q >&2 || true
  pkg=$(resolve_kernel)
fi
[ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
deb=$(ls "$out"/debs/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$deb" ]; then
  cached=$(ls /var/cache/apt/archives/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$cached" ]; then
    cp "$cached" "$out/debs/"
  else
    (cd "$out/debs" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed as root' || true)
  fi
  deb=$(ls "$out"/debs/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
fi
[ -n "$deb" ] || { echo "build.sh: could not download $pkg" >&2; exit 1; }

work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/kernel"
kver=$(ls "$work/kernel/lib/modules" | head -1)
moddir="$work/kernel/lib/modules/$kver/kernel"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

# --- initramfs --------------------------------------------------------------
root="$work/initrd"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$(command -v busybox)" "$root/bin/busybox"

# Modules in load order: each after its dependencies (read from the module's
# .modinfo "depends=" string; the .deb ships no modules.dep).
order=()
add_module() {
  local name=$1 f deps d
  for d in "${order[@]}"; do [ "$d" = "$name" ] && return 0; done
  f=$(find "$moddir" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" | head -1)
  if [ -z "$f" ]; then
    # Built into the kernel: nothing to load.
    grep -q "/$name.ko" "$work/kernel/lib/modules/$kver/modules.builtin" 2>/dev/null && return 0
    echo "build.sh: module $name is neither in $pkg nor built in" >&2; exit 1
  fi
  case $f in
    *.xz) xz -dc "$f" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$f" >"$root/lib/modules/$name.ko" ;;
    *) cp "$f" "$root/lib/modules/$name.ko" ;;
  esac
  deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "$root/lib/modules/$name.ko" | head -1 | cut -d= -f2 | tr ',-' ' _')
  for d in $deps; do add_module "$d"; done
  order+=("$name")
}
# virtio_pci finds the device, virtio_blk makes /dev/vda. ext4 is built into
# the cloud kernel; if a kernel has it as a module, it is loaded too.
for m in virtio_pci virtio_blk; do add_module "$m"; done
if ! grep -q '^CONFIG_EXT4_FS=y' "$work/kernel/boot/config-$kver"; then add_module ext4; fi
printf '%s\n' "${order[@]}" >"$root/modules.order"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "VIRTMAN-ERROR: $*"; poweroff -f; sleep 5; exit 1; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -le 400 ] || fail "no /dev/vda after 20 s"
  usleep 50000
done
mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
echo "VIRTMAN-MARKER: $(cat /mnt/marker.txt)"
id=none
for w in $(cat /proc/cmdline); do
  case $w in virtman.id=*) id=${w#virtman.id=} ;; esac
done
echo "boot $id" >>/mnt/boots.txt || fail "write /mnt/boots.txt"
sync
umount /mnt || fail "umount /mnt"
echo "VIRTMAN-DONE"
poweroff -f
INIT
chmod 755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --owner 0:0) >"$work/initrd.cpio"

# --- disk -------------------------------------------------------------------
disk="$work/disk"
mkdir -p "$disk"
echo "virtman test guest disk" >"$disk/marker.txt"
: >"$disk/boots.txt"
mkfs.ext4 -q -F -L virtman-guest -d "$disk" "$work/disk.raw" 16M >/dev/null

for f in vmlinuz initrd.cpio disk.raw; do mv -f "$work/$f" "$out/$f"; done
cp "$script" "$out/build.sh.stamp.tmp" && mv -f "$out/build.sh.stamp.tmp" "$out/build.sh.stamp"
echo "build.sh: guest in $out (kernel $pkg, modules: ${order[*]})"
