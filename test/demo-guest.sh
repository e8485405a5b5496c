#!/usr/bin/env bash
# The part of `make demo` that needs the kernel nbd driver (see test/demo.sh).
set -euo pipefail
ploopctl=$1
root=$(mktemp -d /tmp/ploop-demo.XXXXXX)
img=$root/volume.hds
step() { printf '\n== %s\n' "$*"; }

step "create a 1 GiB thin ploop image"
"$ploopctl" create --size 1G "$img"
"$ploopctl" info "$img"
du -h --apparent-size "$img"; du -h "$img"

attach() {
  coproc ATTACH { exec "$ploopctl" attach "$@" "$img"; }
  # bash unsets ATTACH_PID once the coprocess exits, so keep our own copy.
  attach_pid=$ATTACH_PID
  read -r dev <&"${ATTACH[0]}"
  echo "attached $img as $dev (server pid $attach_pid)"
}
detach() {
  "$ploopctl" detach "$dev"
  wait "$attach_pid"
}

step "attach through our NBD server and the kernel nbd driver, mkfs.ext4, write"
attach
cat "/sys/block/${dev#/dev/}/backend"; echo
mkfs.ext4 -q "$dev"
mkdir -p "$root/mnt"
mount "$dev" "$root/mnt"
dd if=/dev/urandom of="$root/mnt/data" bs=1M count=64 status=none
sha256sum "$root/mnt/data" | tee "$root/sum" | sed "s|$root/mnt/||"
sync
umount "$root/mnt"
detach

step "check the image and see that only what ext4 and the 64 MiB of data touched is allocated"
"$ploopctl" check "$img"
qemu-img check -f parallels "$img"
"$ploopctl" info "$img"

step "re-attach with --mount and verify the data"
attach --mount "$root/mnt"
(cd "$root/mnt" && sed "s|$root/mnt/||" "$root/sum" | sha256sum -c -)
detach

step "export to raw with ploopctl and compare with qemu-img's reading of the same image"
"$ploopctl" convert -O raw "$img" "$root/volume.raw"
qemu-img compare -f parallels -F raw "$img" "$root/volume.raw"
rm -rf "$root"
step "demo finished"
