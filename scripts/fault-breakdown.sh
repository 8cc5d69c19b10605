#!/usr/bin/env bash
# Where a first write after a clear goes, per engine (issue #14, point 1): one process
# writes N pages after a clear; for that fill alone this prints, per page written,
#  - the guest's own cost (its `fill ... timed` TSC cycles, minus the same fill untracked),
#  - the host kernel's KVM events counted by `perf stat` on the VMM (exits, page faults,
#    emulated instructions, injected exceptions, shadow-MMU work),
#  - the VMM's share from `vmm info` (pte: the trap's read/decide/resume stages).
# usage: scripts/fault-breakdown.sh VMM_BIN [N] [ENGINES...]   (run as root; needs perf)
set -euo pipefail
BIN=$1; N=${2:-2048}; shift 2 || shift $#
ENGINES=${*:-pte hybrid kvm-bitmap}
EVENTS=kvm:kvm_exit,kvm:kvm_entry,kvm:kvm_page_fault,kvm:kvm_emulate_insn,kvm:kvm_inj_exception,kvm:kvm_userspace_exit,kvmmmu:kvm_mmu_pagetable_walk,kvmmmu:kvm_mmu_set_dirty_bit,kvmmmu:kvm_mmu_set_spte,kvmmmu:kvm_mmu_prepare_zap_page,kvmmmu:kvm_mmu_sync_page
for ENGINE in $ENGINES; do
  D=$(mktemp -d); S=$D/api.sock
  cat > $D/w.wl <<WL
proc w
map 0x400000 $N
fill 0x400000 $N 0x11
fill 0x400000 $N 0x22 timed
sync a
fill 0x400000 $N 0x33 timed
sync b
exit 0
WL
  $BIN run --engine $ENGINE --mem 256 --workload $D/w.wl --api-sock $S --timeout 300 > $D/out 2>&1 &
  P=$!
  for i in $(seq 100); do [ -S $S ] && break; sleep 0.1; done
  $BIN wait --api-sock $S --label a >/dev/null
  $BIN clear-refs --api-sock $S --pid 1 4 >/dev/null
  $BIN info --api-sock $S > $D/info0
  perf stat -x, -e $EVENTS -p $P -o $D/perf 2>/dev/null &
  PERF=$!
  sleep 0.5
  $BIN resume --api-sock $S >/dev/null
  $BIN wait --api-sock $S --label b >/dev/null
  kill -INT $PERF; wait $PERF || true
  $BIN info --api-sock $S > $D/info1
  $BIN resume --api-sock $S >/dev/null
  wait $P || true
  python3 - "$ENGINE" "$N" $D <<'PY'
import json, sys
engine, n, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
i0, i1 = (json.load(open(f"{d}/info{k}")) for k in (0, 1))
khz = i1["tsc_khz"]
cycles = [int(l.split(" took ")[1].split()[0]) for l in open(f"{d}/out") if " took " in l]
untracked, tracked = (c / khz * 1e3 / n for c in cycles[:2])
print(f"== {engine}: {n} first writes after a clear")
print(f"guest: {tracked:.2f} us per page written, of which {tracked - untracked:.2f} us the tracking (untracked fill {untracked:.3f} us/page)")
for line in open(f"{d}/perf"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        print(f"  {f[2]:<34} {int(float(f[0])) / n:8.2f} per page")
t0, t1 = i0["tracker"], i1["tracker"]
caught = t1["faults_caught"] - t0["faults_caught"]
if caught:
    st = {k: (t1[k] - t0[k]) / caught / 1000 for k in ("trap_read_ns", "trap_decide_ns", "trap_resume_ns")}
    print(f"vmm: {caught} faults caught; per fault read {st['trap_read_ns']:.2f} us, decide {st['trap_decide_ns']:.2f} us, resume {st['trap_resume_ns']:.2f} us")
PY
  rm -rf $D
done
