#!/usr/bin/env bash
# The VMM's share of one caught write fault under the pte engine: one process writes N
# pages twice after a clear each time; prints `vmm info`'s per-fault trap stages.
# usage: scripts/fault-cost.sh VMM_BIN [N]   (e.g. target/release/vmm 2048)
set -euo pipefail
BIN=$1; N=${2:-2048}
D=$(mktemp -d); S=$D/api.sock
cat > $D/w.wl <<WL
proc w
map 0x400000 $N
fill 0x400000 $N 0x11
sync a
fill 0x400000 $N 0x22
sync b
fill 0x400000 $N 0x33
sync c
exit 0
WL
$BIN run --engine pte --mem 256 --workload $D/w.wl --api-sock $S --timeout 300 > $D/out 2>&1 &
P=$!
for i in $(seq 100); do [ -S $S ] && break; sleep 0.1; done
$BIN wait --api-sock $S --label a >/dev/null
PID=$($BIN ps --api-sock $S --json | python3 -c "import json,sys; print([json.loads(l)[\"pid\"] for l in sys.stdin if json.loads(l)[\"name\"]==\"w\"][0])")
[ -n "$PID" ] || PID=$($BIN ps --api-sock $S | awk '$2=="w"{print $1}' | head -1)
for lab in b c; do
  $BIN clear-refs --api-sock $S --pid $PID 4 >/dev/null
  $BIN resume --api-sock $S >/dev/null
  $BIN wait --api-sock $S --label $lab >/dev/null
done
$BIN info --api-sock $S | python3 -c '
import json,sys; d=json.load(sys.stdin); t=d["tracker"]; n=t["faults_caught"]
print("table_reads", t.get("trap_table_reads", "n/a"), "faults_caught", n, "read_us %.2f decide_us %.2f resume_us %.2f total_us %.2f" % tuple(x/n/1000 for x in (t["trap_read_ns"], t["trap_decide_ns"], t["trap_resume_ns"], t["trap_read_ns"]+t["trap_decide_ns"]+t["trap_resume_ns"])))'
$BIN resume --api-sock $S >/dev/null
wait $P || true
rm -rf $D
