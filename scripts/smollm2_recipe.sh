#!/usr/bin/env bash
# Instruction-tunes SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantised to f32) on the short Alpaca records
# in its own chat template, with LLaMA-Adapter's adaption prompt (PEFT's form: one scalar gate per layer,
# no tanh) and with LoRA; prints the held-out loss before/after and a completion before/after (from
# `peft train`), then three generations with each adapter. The same recipe in HF PEFT:
# scripts/smollm2_peft_recipe.py. Results: docs/real-models.md.
#   scripts/smollm2_recipe.sh [OUTPUT_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$("$root/scripts/get_smollm2.sh")
out=${1:-runs/smollm2}
peft="$root/target/release/peft"
[ -x "$peft" ] || cargo build --release -p peft-cli --manifest-path "$root/Cargo.toml"
common=(--model "$model" --data "$root/data/alpaca_demo_small.json" --template chat
        --max-seq-len 128 --batch-size 2 --grad-accum 2 --max-steps 12 --warmup-epochs 0.2
        --val-size 24 --sample-tokens 32 --quiet)
"$peft" train "${common[@]}" --method adaption-prompt --adapter-layers 30 --gate-shape scalar \
  --gate-activation identity --lr 5e-3 --output "$out/adaption-prompt"
"$peft" train "${common[@]}" --method lora --target-modules q_proj,v_proj --lr 1e-3 --output "$out/lora"
prompts=(--prompt "Explain what a black hole is in one sentence."
         --prompt "Give three tips for staying healthy."
         --prompt "Write a haiku about the sea.")
for adapter in none adaption-prompt lora; do
  echo "== $adapter"
  if [ "$adapter" = none ]; then extra=(); else extra=(--adapter "$out/$adapter"); fi
  "$peft" generate --model "$model" "${extra[@]}" --template chat --max-new-tokens 40 "${prompts[@]}"
done
# Decoding speed (tokens/s on stderr), the prompt scripts/smollm2_peft_recipe.py times in transformers.
"$peft" generate --model "$model" --template chat --max-new-tokens 128 \
  --prompt "Write a long story about a dragon who learns to cook." > /dev/null
