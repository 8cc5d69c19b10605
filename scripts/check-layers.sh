#!/usr/bin/env bash
# Checks that no folder of the vmm library uses one above it. The layers, bottom first
# (docs/architecture.md):
#   machine < guest_os < tracking < storage < vcpu < migration < api < run
# A module may use its own folder and any folder below it; `exit_code` is a leaf every
# layer may use. Prints each offending import and exits 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/../vmm/src"
layers=(machine guest_os tracking storage vcpu migration api run)
rank() { local i; for i in "${!layers[@]}"; do [ "${layers[$i]}" = "$1" ] && { echo "$i"; return; }; done; echo -1; }
bad=0
for dir in "${layers[@]}"; do
  mine=$(rank "$dir")
  while IFS= read -r hit; do
    file=${hit%%:*}
    for used in $(grep -o 'crate::[a-z_]*' <<<"${hit#*:}" | sed 's/crate:://' | sort -u); do
      r=$(rank "$used")
      if [ "$r" -gt "$mine" ]; then
        echo "layering: $file ($dir) uses crate::$used, a layer above it" >&2
        bad=1
      fi
    done
  done < <(grep -rn 'crate::[a-z_]*' "$dir" --include=*.rs || true)
done
[ "$bad" = 0 ] && echo "layers ok: ${layers[*]}"
exit "$bad"
