#!/usr/bin/env bash
# Builds Linux's own soft-dirty self-test (tools/testing/selftests/mm/soft-dirty.c,
# with vm_util.c and thp_settings.c, from Debian's linux-source-6.12 package) as a
# static glibc program, to run unmodified in our guest:
#
#   vmm run --exec "$(scripts/soft-dirty-selftest.sh)" --engine pte
#
# Usage: soft-dirty-selftest.sh [CACHE_DIR]   (default: target/linux-selftest)
# Prints the program's path. The .deb (153 MB) and the program are kept in CACHE_DIR;
# only the few source files the test needs are extracted.
set -euo pipefail
cache=${1:-"$(dirname "$0")/../target/linux-selftest"}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
out=$cache/soft-dirty
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
cd "$cache"
if ! ls linux-source-6.12_*.deb >/dev/null 2>&1; then
  # A fresh machine's package lists may not know the package yet.
  apt-get download linux-source-6.12 >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get download linux-source-6.12 >/dev/null 2>&1; }
fi
deb=$(ls linux-source-6.12_*.deb | head -1)
rm -rf src
mkdir src
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.12.tar.xz \
  | tar -xJ -C src --strip-components=1 \
      linux-source-6.12/tools/testing/selftests/mm/soft-dirty.c \
      linux-source-6.12/tools/testing/selftests/mm/vm_util.c \
      linux-source-6.12/tools/testing/selftests/mm/vm_util.h \
      linux-source-6.12/tools/testing/selftests/mm/thp_settings.c \
      linux-source-6.12/tools/testing/selftests/mm/thp_settings.h \
      linux-source-6.12/tools/testing/selftests/kselftest.h \
      linux-source-6.12/include/uapi/linux/fs.h
# Debian 12's uapi headers are 6.1's, without PAGEMAP_SCAN: take 6.12's fs.h.
mkdir -p compat/linux
cp src/include/uapi/linux/fs.h compat/linux/fs.h
(cd src/tools/testing/selftests/mm \
  && gcc -O2 -static -I"$cache/compat" -I.. -o "$out.tmp" soft-dirty.c vm_util.c thp_settings.c)
mv "$out.tmp" "$out"
echo "$out"
