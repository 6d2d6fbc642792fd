#!/usr/bin/env bash
# Builds the tiny test guest: the host's Debian cloud kernel and a busybox initramfs whose init
# loads the CD-ROM drivers, mounts the cloud-init seed (volume label cidata) and prints what the
# end-to-end tests look for on the serial console:
#   FLOTILLA-HOSTNAME <local-hostname from meta-data>
#   FLOTILLA-MARKER <value of the "flotilla_test_marker:" line of user-data>
# or, when the disk is an OpenStack config drive holding BOSH agent settings (JSON) in
# ec2/latest/user-data, the files it holds and what a BOSH agent would read from the settings:
#   FLOTILLA-CONFIG-DRIVE <files of ec2/latest and openstack/latest>
#   FLOTILLA-BOSH agent_id=<agent_id> ip=<ip> netmask=<netmask> mac=<mac> eth0=<eth0's MAC>
# and, with a NIC: configures it from the seed's network-config (its first address and MTU), or
# over DHCP (busybox udhcpc) when the kernel command line has flotilla.dhcp (with the default
# route either gives), then prints
#   FLOTILLA-IP <address/prefix> MTU <mtu> VIA static|dhcp
# and pings the address of user-data's "flotilla_test_ping:" line every half second for as long
# as it runs (in the background, beside the shell), printing each change (the first answer, a loss after 2 misses, an answer again):
#   FLOTILLA-PING <address> ok|lost
# (busybox 1.35's wget crashes on -T: timeout(1) bounds it.) With a "flotilla_test_metadata" line in user-data it first prints what the metadata service
# at 169.254.169.254 answers (OpenStack's meta_data.json on one line, EC2's instance-id):
#   FLOTILLA-METADATA <json>
#   FLOTILLA-EC2 <instance-id>
# In the background it watches its disks (vd*: virtio-blk; the seed is sr0) every half second and
# prints each one that appears or changes size, with its serial, size in 512-byte sectors and
# the printable start of its first 64 bytes (serial "-" when it has none), and writes "guest-wrote-<name>" at byte 4096 of
# each writable one it has not seen before; and each one that goes:
#   FLOTILLA-DISK <name> serial=<serial> sectors=<n> head=<text>
#   FLOTILLA-DISK-GONE <name>
# Output: $OUT/vmlinuz and $OUT/initramfs.gz (OUT defaults to target/guests/tiny). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/target/guests/tiny}"
kernel="$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)"
if [ -z "$kernel" ]; then
  echo "error: no Debian cloud kernel in /boot (package linux-image-cloud-amd64)" >&2
  exit 1
fi
kver="${kernel#/boot/vmlinuz-}"
# Rebuilt when the kernel or this script changes.
stamp="$kver $(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/initramfs.gz" ] && [ -f "$out/kernel-version" ] && [ "$(cat "$out/kernel-version")" = "$stamp" ]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp /bin/busybox "$work/bin/busybox"
for module in virtio_pci virtio_scsi sr_mod isofs virtio_net virtio_blk; do
  modprobe -S "$kver" --show-depends "$module" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' > "$work/modules.order"
while read -r ko; do
  cp "$ko" "$work/lib/modules/"
  echo "/lib/modules/$(basename "$ko")" >> "$work/load-order"
done < "$work/modules.order"
rm "$work/modules.order"
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "FLOTILLA-BOOTED"
while read -r ko; do insmod "$ko" 2>/dev/null; done < /load-order
for i in $(seq 1 100); do
  [ -b /dev/sr0 ] && break
  sleep 0.1
done
if mount -t iso9660 -o ro /dev/sr0 /mnt && [ -f /mnt/ec2/latest/user-data ]; then
  # An OpenStack config drive with BOSH agent settings (one JSON document) in EC2's user-data.
  settings="$(tr -d '\n' < /mnt/ec2/latest/user-data)"
  field() { echo "$settings" | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }
  echo "FLOTILLA-CONFIG-DRIVE $(ls /mnt/ec2/latest/* /mnt/openstack/latest/* | sed 's|^/mnt/||' | tr '\n' ' ')"
  echo "FLOTILLA-BOSH agent_id=$(field agent_id) ip=$(field ip) netmask=$(field netmask) mac=$(field mac) eth0=$(cat /sys/class/net/eth0/address 2>/dev/null)"
elif mount | grep -q ' /mnt '; then
  echo "FLOTILLA-HOSTNAME $(sed -n 's/^local-hostname: *//p' /mnt/meta-data)"
  echo "FLOTILLA-MARKER $(sed -n 's/^.*flotilla_test_marker: *//p' /mnt/user-data | head -n1)"
  ls /mnt | tr '\n' ' ' | sed 's/^/FLOTILLA-SEED-FILES /'
  echo
else
  echo "FLOTILLA-NO-SEED"
fi
(
  : > /tmp/disks.old
  while true; do
    : > /tmp/disks.new
    for d in /sys/block/vd*; do
      [ -e "$d" ] || continue
      serial="$(cat "$d/serial" 2>/dev/null)"
      echo "${d##*/} ${serial:--} $(cat "$d/size")" >> /tmp/disks.new
    done
    while read -r name serial sectors; do
      grep -qx "$name $serial $sectors" /tmp/disks.old && continue
      head="$(dd if="/dev/$name" bs=64 count=1 2>/dev/null | tr -cd 'a-zA-Z0-9._-')"
      echo "FLOTILLA-DISK $name serial=$serial sectors=$sectors head=$head"
      if ! grep -q "^$name " /tmp/disks.old && [ "$(cat "/sys/block/$name/ro")" = 0 ]; then
        printf 'guest-wrote-%s' "$name" | dd of="/dev/$name" bs=512 seek=8 conv=notrunc,fsync 2>/dev/null
      fi
    done < /tmp/disks.new
    while read -r name serial sectors; do
      grep -q "^$name " /tmp/disks.new || echo "FLOTILLA-DISK-GONE $name"
    done < /tmp/disks.old
    mv /tmp/disks.new /tmp/disks.old
    sleep 0.5
  done
) &
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  if grep -q flotilla.dhcp /proc/cmdline; then
    cat > /bin/dhcp-bound <<'SCRIPT'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip link set "$interface" mtu "${mtu:-1500}"
ip addr add "$ip/$mask" dev "$interface"
[ -n "$router" ] && ip route add default via "${router%% *}"
echo "$ip/$mask ${mtu:-none}" > /tmp/lease
SCRIPT
    chmod +x /bin/dhcp-bound
    ip link set eth0 up
    udhcpc -i eth0 -n -q -t 20 -T 2 -O mtu -s /bin/dhcp-bound >/dev/null 2>&1
    [ -f /tmp/lease ] && set -- $(cat /tmp/lease) && echo "FLOTILLA-IP $1 MTU $2 VIA dhcp"
  elif [ -f /mnt/network-config ]; then
    address="$(sed -n 's/^ *- \([0-9.]*\/[0-9]*\)$/\1/p' /mnt/network-config | head -n1)"
    mtu="$(sed -n 's/^ *mtu: *//p' /mnt/network-config | head -n1)"
    ip link set eth0 mtu "$mtu" up
    ip addr add "$address" dev eth0
    grep -E '(^| |-)(to|via): ' /mnt/network-config | sed 's/^[ -]*//' | while read -r key value; do
      case "$key" in
        to:) to="$value" ;;
        via:) if [ "$to" = 0.0.0.0/0 ]; then ip route add default via "$value"; else ip route add "$to" via "$value"; fi ;;
      esac
    done
    echo "FLOTILLA-IP $address MTU $(cat /sys/class/net/eth0/mtu) VIA static"
  fi
  if grep -q flotilla_test_metadata /mnt/user-data 2>/dev/null; then
    for i in $(seq 1 20); do
      m="$(timeout 3 wget -q -O - http://169.254.169.254/openstack/latest/meta_data.json 2>/dev/null)" && break
      sleep 0.5
    done
    echo "FLOTILLA-METADATA $(echo "$m" | tr -d '\n')"
    echo "FLOTILLA-EC2 $(timeout 3 wget -q -O - http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null)"
  fi
  peer="$(sed -n 's/^.*flotilla_test_ping: *//p' /mnt/user-data 2>/dev/null | head -n1)"
  if [ -n "$peer" ]; then
    # In the background: the interactive shell below comes up beside it.
    state=none; misses=0
    while true; do
      if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then
        misses=0
        [ "$state" = ok ] || { state=ok; echo "FLOTILLA-PING $peer ok"; }
      else
        misses=$((misses + 1))
        [ "$state" = ok ] && [ "$misses" -ge 2 ] && { state=lost; echo "FLOTILLA-PING $peer lost"; }
      fi
      sleep 0.5
    done &
  fi
fi
# An interactive shell on the serial console (the console tests type into it).
while true; do setsid cttyhack sh -i; sleep 1; done
INIT
chmod +x "$work/init"
mkdir -p "$out"
(cd "$work" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
cp "$kernel" "$out/vmlinuz"
echo "$stamp" > "$out/kernel-version"
echo "built the tiny guest in $out (kernel $kver)"
