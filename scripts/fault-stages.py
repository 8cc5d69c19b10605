#!/usr/bin/env python3
"""Per-stage times of the pte engine's caught faults from `perf script -F time,event`
(events kvm:kvm_inj_exception, kvm:kvm_userspace_exit, kvmmmu:kvm_mmu_set_spte,
kvm:kvm_emulate_insn, kvmmmu:kvm_mmu_pagetable_walk on the VMM; scripts/fault-breakdown.sh
records them). One caught fault, from the previous fault's completed write:
  A: the next write faults in KVM; its shadow walk; KVM decides to inject #PF
  B: #PF delivered into the (emulated) guest ring 0, up to the breakpoint's exit to the VMM
  C: the VMM decides and returns to user mode; the write re-executes, faults again, and
     KVM installs a writable shadow PTE (set_spte)"""
import statistics as st
import sys

stages, cur, counts = [], None, {"walk": 0, "emu": 0}
for line in sys.stdin:
    t, rest = line.split(":", 1)
    t, e = float(t) * 1e6, rest.split(":")[-2].strip() if rest.count(":") > 1 else rest.strip()
    e = e.split()[-1] if e else e
    if e == "kvm_inj_exception":
        cur = {"inj": t, "prev": cur["spte"] if cur and "spte" in cur else None, "wA": counts["walk"], "eA": counts["emu"]}
        counts = {"walk": 0, "emu": 0}
    elif e == "kvm_userspace_exit" and cur and "ux" not in cur:
        cur.update(ux=t, wB=counts["walk"], eB=counts["emu"])
        counts = {"walk": 0, "emu": 0}
    elif e == "kvm_mmu_set_spte" and cur and "ux" in cur and "spte" not in cur:
        cur.update(spte=t, wC=counts["walk"], eC=counts["emu"])
        counts = {"walk": 0, "emu": 0}
        if cur["prev"] is not None:
            stages.append(cur)
    elif e == "kvm_mmu_pagetable_walk":
        counts["walk"] += 1
    elif e == "kvm_emulate_insn":
        counts["emu"] += 1

if not stages:
    sys.exit("no complete fault cycles in the trace")
print(f"{len(stages)} caught faults")
for key, name, a, b, w, em in [("A", "refault in KVM, walk, inject #PF", "prev", "inj", "wA", "eA"),
                               ("B", "#PF into emulated ring 0, to the debug exit", "inj", "ux", "wB", "eB"),
                               ("C", "VMM, return to user, write faults again", "ux", "spte", "wC", "eC")]:
    v = sorted(s[b] - s[a] for s in stages)
    print(f"{key} {name:<44} median {st.median(v):6.1f} us  p90 {v[int(len(v) * 0.9)]:6.1f} us  "
          f"shadow walks {st.mean(s[w] for s in stages):5.2f}  emulated insns {st.mean(s[em] for s in stages):5.2f}")
total = sorted(s["spte"] - s["prev"] for s in stages)
print(f"whole cycle (write to write)                   median {st.median(total):6.1f} us")
