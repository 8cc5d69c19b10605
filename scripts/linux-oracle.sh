#!/usr/bin/env bash
# Runs scenario files under real Linux: boots Debian's cloud kernel (built with
# CONFIG_MEM_SOFT_DIRTY) into a busybox initramfs with QEMU's software emulator (KVM here
# cannot boot Linux), runs `sd-linux` on the scenarios there, and prints its output.
#
#   scripts/linux-oracle.sh SCENARIO.sd...  > linux.out
#
# Everything it needs is installed or fetched from Debian's package registry and cached
# under target/oracle/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/target/oracle
mkdir -p "$work/debs" "$work/pkg"

if [ $# -eq 0 ]; then
  echo "usage: $0 SCENARIO.sd..." >&2
  exit 64
fi
for f in "$@"; do
  [ -r "$f" ] || { echo "error: cannot read scenario $f" >&2; exit 64; }
done

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  echo "linux-oracle: installing ${need[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

fetch() { # package -> extracted under $work/pkg/$1
  if [ ! -e "$work/pkg/$1/.done" ]; then
    (cd "$work/debs" && rm -f "$1"_*.deb && apt-get download -q "$1" >&2) || {
      apt-get update -qq >&2
      (cd "$work/debs" && apt-get download -q "$1" >&2)
    }
    rm -rf "$work/pkg/$1" && mkdir -p "$work/pkg/$1"
    dpkg -x "$work/debs/$1"_*.deb "$work/pkg/$1"
    touch "$work/pkg/$1/.done"
  fi
}
fetch busybox-static
# The meta-package names the real kernel package; fetch that.
if [ ! -e "$work/kernel.pkg" ]; then
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' > "$work/kernel.pkg"
  if [ ! -s "$work/kernel.pkg" ]; then apt-get update -qq >&2; apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' > "$work/kernel.pkg"; fi
fi
kpkg=$(cat "$work/kernel.pkg")
fetch "$kpkg"
vmlinuz=$(ls "$work/pkg/$kpkg"/boot/vmlinuz-* | head -1)

# The executor: a static PIE, so it stays clear of the addresses scenarios map.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=pie" \
  cargo build -q --release -p linux-oracle --target-dir "$work/build" >&2
exe=$work/build/release/sd-linux

rd=$work/initramfs
rm -rf "$rd" && mkdir -p "$rd/bin" "$rd/proc" "$rd/sys" "$rd/dev" "$rd/scenarios"
cp "$work/pkg/busybox-static/bin/busybox" "$rd/bin/busybox"
for t in sh mount echo cat poweroff sync; do ln -s busybox "$rd/bin/$t"; done
cp "$exe" "$rd/sd-linux"
i=0
for f in "$@"; do
  cp "$f" "$rd/scenarios/$(printf %04d $i)-$(basename "$f")"
  i=$((i + 1))
done
cat > "$rd/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo always > /sys/kernel/mm/transparent_hugepage/enabled
echo always > /sys/kernel/mm/transparent_hugepage/defrag
echo "@@ORACLE-BEGIN@@"
/sd-linux /scenarios/*
echo "@@ORACLE-END@@"
sync
poweroff -f
INIT
chmod +x "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.gz"

console=$work/console.log
timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -nographic -no-reboot \
  -kernel "$vmlinuz" -initrd "$work/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 transparent_hugepage=always" > "$console" 2>&1 || true
if ! grep -q "@@ORACLE-END@@" "$console"; then
  echo "error: the Linux oracle did not finish; console log in $console" >&2
  tail -20 "$console" >&2
  exit 70
fi
# Between the markers; scenario names are printed relative to /scenarios/NNNN-.
sed -n '/@@ORACLE-BEGIN@@/,/@@ORACLE-END@@/p' "$console" | tr -d '\r' | grep -v '@@ORACLE-' \
  | sed -E 's#^== /scenarios/[0-9]{4}-#== #'
