#!/usr/bin/env bash
# Builds the C++ extension with another compiler into a copy of the source tree, leaving this tree's own
# build (ms_fused/_C*.so, build/) alone:  .ci/build_copy.sh CC CXX DEST [PYTHON]
# DEST then holds the tracked (and untracked, not ignored) files and its own ms_fused/_C*.so: run with
# PYTHONPATH=DEST from DEST. A rebuild of the same DEST only recompiles what changed (ninja).
set -euo pipefail
cc=$1 cxx=$2 dest=$3 python=${4:-.venv/bin/python}
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(cd "$root" && cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute, the venv's link kept
mkdir -p "$dest"
dest="$(realpath "$dest")"
cd "$root"
{ git ls-files; git ls-files --others --exclude-standard; } | while IFS= read -r f; do if [ -f "$f" ]; then printf "%s\n" "$f"; fi; done |
  tar -cf - -T - | tar -xf - -C "$dest"
cd "$dest"
rm -f ms_fused/_C*.so  # a failed build only warns (setup.py): never leave an older one to be tested
CC="$cc" CXX="$cxx" "$python" setup.py build_ext --inplace > build.log 2>&1 || { tail -30 build.log; exit 1; }
grep "WARNING: ms_fused" build.log || true
ls ms_fused/_C*.so > /dev/null 2>&1 || { tail -5 build.log; echo "no extension was built in $dest" >&2; exit 1; }
