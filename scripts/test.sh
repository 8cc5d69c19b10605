#!/usr/bin/env bash
# Runs every test of the project: unit tests (no KVM) and integration tests that boot
# real guests under KVM through the real `vmm` binary. Installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /dev/kvm ]; then
  echo "error: /dev/kvm is missing: the integration tests boot real guests under KVM" >&2
  exit 1
fi
if ! command -v objdump >/dev/null; then
  # The guest-kernel ELF check disassembles the kernel.
  apt-get update -qq && apt-get install -y -qq binutils >/dev/null
fi

if ! command -v musl-gcc >/dev/null; then
  # The Linux-program tests build their C programs with musl as well as glibc.
  { apt-get install -y -qq musl-tools || { apt-get update -qq && apt-get install -y -qq musl-tools; }; } >/dev/null
fi

if ! command -v cpio >/dev/null; then
  # The --initrd tests pack their archives with GNU cpio, as users do.
  { apt-get install -y -qq cpio || { apt-get update -qq && apt-get install -y -qq cpio; }; } >/dev/null
fi

# No folder of the library may use one above it (docs/architecture.md).
./scripts/check-layers.sh

cargo test --workspace --locked "$@"
