#!/usr/bin/env python3
"""Checks `peft` on the real SmolLM2-135M-Instruct GGUF (Q4_1) against transformers loading the same file.

    scripts/get_smollm2.sh                       # the GGUF into $PEFT_CACHE (default ~/.cache/peft-rs)
    cargo build --release -p peft-cli
    /opt/pyref/bin/python scripts/check_smollm2.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [ADAPTER_DIR ...]

transformers dequantises the GGUF with gguf-py (``from_pretrained(..., gguf_file=...)``) and is the reference
for logits (float32 here and there) and greedy generation. Its GGUF tokenizer converter does not know
llama.cpp's ``smollm`` pre-tokenizer and leaves out the digit split that SmolLM2's own tokenizer.json has
(``Digits(individual_digits=True)`` before byte-level BPE); the reference tokenizer here is transformers' with
that split restored, and the script also reports on which strings the unmodified converter differs.
Each ADAPTER_DIR (a PEFT directory `peft train` saved on the GGUF base, e.g. from scripts/smollm2_recipe.sh) is
loaded by HF PEFT onto the transformers model and its logits compared with `peft logits --adapter`.
Prints a JSON summary (what docs/real-models.md quotes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PEFT_CACHE", Path.home() / ".cache" / "peft-rs"))
GGUF = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = [Path(a) for a in sys.argv[2:]]
PEFT = ROOT / "target" / "release" / "peft"

TEXTS = [
    "Explain what a black hole is in one sentence.",
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "In 2024, 1,234 people paid $56.78 each.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\n\n",
    "Émigré café, naïve coöperation, 東京, ☕",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: I like apples.",
    "List the planets of the solar system.",
    "What's 12 * 7? It's 84.",
    "URL: https://example.com/a/b?c=1&d=2",
    "Email me at someone@example.org!!!",
    "Summarize: The mitochondria is the powerhouse of the cell.",
    "i don't know, you'd think they'll've",
    "Numbers: 3.14159, 2.71828, 1e-9, 100000",
    "   ",
    "Hello",
    "Why is the sky blue?",
]


def main():
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    plain = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    reference = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    summary = {"gguf": str(GGUF), "converter_differs_on": [t for t, a, b in zip(TEXTS, plain, reference) if a != b]}

    # Tokenizer and greedy generation: `peft generate --json` prints prompt_ids and generated_ids.
    prompts = TEXTS[:4]
    args = [str(PEFT), "generate", "--model", str(GGUF), "--max-new-tokens", "24", "--json"]
    for t in TEXTS:
        args += ["--prompt", t]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary["tokenizer_equal"] = sum(r["prompt_ids"] == want for r, want in zip(rows, reference))
    summary["tokenizer_cases"] = len(TEXTS)
    summary["tokenizer_mismatches"] = [t for t, r, w in zip(TEXTS, rows, reference) if r["prompt_ids"] != w]
    eos = tok.eos_token_id
    greedy_equal = 0
    for text, row in zip(prompts, rows):
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        want = gen[0, ids.shape[1]:].tolist()
        greedy_equal += row["generated_ids"] == want
    summary["greedy_equal"] = f"{greedy_equal}/{len(prompts)}"

    # Logits of every text (right-padded batch) through `peft logits`.
    batch = [r[:48] for r in reference]
    width = max(len(r) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    def peft_logits(extra):
        with tempfile.TemporaryDirectory() as tmp:
            inp, outp = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
            save_file({"input_ids": ids, "attention_mask": mask}, str(inp))
            args = [str(PEFT), "logits", "--model", str(GGUF), "--input", str(inp), "--output", str(outp)]
            subprocess.run(args + extra, check=True)
            return load_file(str(outp))["logits"]

    ours = peft_logits([])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    from peft import PeftModel

    for adapter in ADAPTERS:
        base = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            reference = adapted(input_ids=ids, attention_mask=mask).logits
        got = peft_logits(["--adapter", str(adapter)])
        moved = float((reference[real] - want[real]).abs().max())
        summary[f"adapter {adapter.parent.name}: HF PEFT vs peft max abs diff"] = float((got[real] - reference[real]).abs().max())
        summary[f"adapter {adapter.parent.name}: moves logits by"] = moved
    diff = (ours[real] - want[real]).abs()
    summary["logits_max_abs_diff"] = float(diff.max())
    summary["logits_max_abs_value"] = float(want[real].abs().max())
    summary["argmax_equal"] = f"{int((ours[real].argmax(-1) == want[real].argmax(-1)).sum())}/{int(real.sum())}"
    print(json.dumps(summary, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
