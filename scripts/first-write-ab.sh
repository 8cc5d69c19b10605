#!/usr/bin/env bash
# The first-write cost of two engines, interleaved so that both see the same host: K
# rounds of (a VM under engine A, a VM under engine B). In each VM one process writes N
# pages after a clear, R times (a clear before each); the best of the R fills, minus the
# best untracked fill of the same pages, is that VM's cost per page. Prints each VM's
# figure, then per engine the median over its K VMs and the median of B/A over rounds.
# usage: scripts/first-write-ab.sh VMM_BIN [A] [B] [N] [K] [R]
#   defaults: kvm-bitmap hybrid 8192 5 3
set -euo pipefail
BIN=$1; A=${2:-kvm-bitmap}; B=${3:-hybrid}; N=${4:-8192}; K=${5:-5}; R=${6:-3}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/results
one() {
  local engine=$1 d s p
  d=$(mktemp -d -p "$WORK"); s=$d/api.sock
  { echo "proc w"; echo "map 0x400000 $N"; echo "fill 0x400000 $N 0x11"
    for _ in $(seq "$R"); do echo "fill 0x400000 $N 0x22 timed"; done
    for i in $(seq "$R"); do echo "sync c$i"; echo "fill 0x400000 $N 0x33 timed"; done
    echo "exit 0"; } > "$d/w.wl"
  "$BIN" run --engine "$engine" --mem $((N / 256 + 64)) --workload "$d/w.wl" --api-sock "$s" --timeout 600 > "$d/out" 2>&1 &
  p=$!
  for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.1; done
  for i in $(seq "$R"); do
    "$BIN" wait --api-sock "$s" --label "c$i" >/dev/null
    "$BIN" clear-refs --api-sock "$s" --pid 1 4 >/dev/null
    [ "$i" = 1 ] && khz=$("$BIN" info --api-sock "$s" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tsc_khz"])')
    "$BIN" resume --api-sock "$s" >/dev/null
  done
  wait "$p" || { echo "$engine VM failed:" >&2; cat "$d/out" >&2; exit 1; }
  python3 - "$engine" "$N" "$R" "$khz" "$d/out" >> "$OUT" <<'PY'
import sys
engine, n, r, khz, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
cycles = [int(l.split(" took ")[1].split()[0]) for l in open(out) if " took " in l]
assert len(cycles) == 2 * r, f"{engine}: {len(cycles)} timed fills, wanted {2 * r}"
us = lambda c: c / khz * 1e3 / n
print(engine, f"{us(min(cycles[r:])) - us(min(cycles[:r])):.3f}")
PY
  tail -1 "$OUT"
  rm -rf "$d"
}
for _ in $(seq "$K"); do one "$A"; one "$B"; done
python3 - "$A" "$B" "$OUT" <<'PY'
import statistics, sys
a, b, out = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [l.split() for l in open(out)]
xs = {e: [float(v) for w, v in rows if w == e] for e in (a, b)}
for e in (a, b):
    print(f"{e}: median {statistics.median(xs[e]):.3f} us per first write (min {min(xs[e]):.3f}, max {max(xs[e]):.3f})")
ratios = [y / x for x, y in zip(xs[a], xs[b])]
print(f"{b} / {a}: median {statistics.median(ratios):.2f}x over {len(ratios)} rounds ({', '.join(f'{q:.2f}' for q in ratios)})")
PY
