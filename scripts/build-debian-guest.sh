#!/usr/bin/env bash
# Builds the Debian 12 test guest with Debian's own cloud-init: a debootstrap root filesystem in a
# qcow2 image, booted with the host's cloud kernel and initrd (its modules are copied in, so the
# guest can load the CD-ROM and ISO9660 drivers that NoCloud needs); cloud-init renders its
# network-config for systemd-networkd, which is enabled, and qemu-guest-agent reports its addresses. Cached: rebuilt only when missing or
# when the host kernel or this script changes. Output: $OUT/debian.qcow2, vmlinuz, initrd.img.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/target/guests/debian}"
kernel="$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)"
[ -n "$kernel" ] || { echo "error: no Debian cloud kernel in /boot (linux-image-cloud-amd64)" >&2; exit 1; }
kver="${kernel#/boot/vmlinuz-}"
stamp="$kver $(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/debian.qcow2" ] && [ "$(cat "$out/kernel-version" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
# The mirror this machine's apt uses (never a hard-coded host).
mirror="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
if [ -z "$mirror" ]; then
  mirror="$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
fi
[ -n "$mirror" ] || { echo "error: cannot find a Debian mirror in the apt sources" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
echo "building the Debian guest from $mirror (a few minutes)"
cache="$PWD/target/guests/debian-packages"
mkdir -p "$cache"
debootstrap --variant=minbase --cache-dir="$cache" --include=systemd-sysv,udev,kmod,netbase,iproute2 \
  bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" "$root/debootstrap/debootstrap.log" >&2; exit 1; }
# cloud-init and friends through apt inside the guest: apt orders their configuration properly,
# which debootstrap's --include does not. Services must not start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
trap 'umount "$root/dev" "$root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
cp -a "$cache"/*.deb "$root/var/cache/apt/archives/" 2>/dev/null || true
chroot "$root" apt-get update -qq > "$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
  cloud-init openssh-server sudo qemu-guest-agent > "$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; exit 1; }
cp -n "$root"/var/cache/apt/archives/*.deb "$cache/" 2>/dev/null || true
umount "$root/dev" "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
mkdir -p "$root/lib/modules"
cp -a "/lib/modules/$kver" "$root/lib/modules/"
echo "/dev/vda / ext4 defaults 0 1" > "$root/etc/fstab"
# NoCloud (the seed disk), and OpenStack for VMs without one (cloud-init's ds-identify enables
# it only when the SMBIOS product says OpenStack Nova, so seeded VMs never wait for it).
cat > "$root/etc/cloud/cloud.cfg.d/90-flotilla-tests.cfg" <<'CFG'
datasource_list: [NoCloud, OpenStack, None]
CFG
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
rm -f "$root/etc/hostname" "$root/etc/machine-id" && touch "$root/etc/machine-id"
apt_cache="$root/var/cache/apt/archives"
rm -rf "$apt_cache"/*.deb "$root/var/lib/apt/lists"/*
mkdir -p "$out"
truncate -s 3G "$work/root.img"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.img"
qemu-img convert -f raw -O qcow2 "$work/root.img" "$out/debian.qcow2.tmp"
mv "$out/debian.qcow2.tmp" "$out/debian.qcow2"
cp "$kernel" "$out/vmlinuz"
cp "/boot/initrd.img-$kver" "$out/initrd.img"
echo "$stamp" > "$out/kernel-version"
echo "built the Debian guest in $out"
