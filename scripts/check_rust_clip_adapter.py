#!/usr/bin/env python3
"""Check that a LoRA written by the Rust crate for the CLIP vision tower loads in Hugging Face PEFT
onto `transformers`' `CLIPVisionModel` and gives the Rust outputs.

Run from the repository root:

    /opt/pyref/bin/python scripts/check_rust_clip_adapter.py [--out DIR]

It runs `cargo run -p peft-vision --example write_clip_adapter -- DIR` (a temporary directory unless
`--out` is given), which saves a LoRA made in Rust with random non-zero values on the attention
projections and both MLP layers of `fixtures/clip/model`, and the outputs Rust computes with it. Then:
`PeftModel.from_pretrained` on the float32 model; the adapter PEFT ends up with
(`get_peft_model_state_dict`) must be exactly the file's tensors (PEFT only warns about missing or
unexpected keys); PEFT's `last_hidden_state` and `pooler_output` must match Rust's within rtol 1e-4,
atol 1e-5. Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPVisionModel

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rust-clip-lora-"))
    subprocess.run(
        ["cargo", "run", "-q", "-p", "peft-vision", "--example", "write_clip_adapter", "--", str(out)],
        cwd=ROOT,
        check=True,
    )
    base = CLIPVisionModel.from_pretrained(ROOT / "fixtures" / "clip" / "model").eval()
    model = PeftModel.from_pretrained(base, out).eval()
    saved = load_file(out / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    failures = []
    if sorted(saved) != sorted(loaded):
        failures.append(f"keys differ: file {sorted(saved)[:4]}..., PEFT {sorted(loaded)[:4]}...")
    else:
        for key, value in saved.items():
            if not torch.equal(value, loaded[key]):
                failures.append(f"tensor {key} differs after loading")
    rust = load_file(out / "outputs.safetensors")
    with torch.no_grad():
        ours = model.base_model.model(rust["pixel_values"])
    for name in ("last_hidden_state", "pooler_output"):
        got, want = getattr(ours, name).double(), rust[name].double()
        excess = ((got - want).abs() - (1e-5 + 1e-4 * got.abs())).max().item()
        diff = (got - want).abs().max().item()
        status = "ok" if excess <= 0 else "FAIL"
        print(f"{status:4} {name}: max abs diff {diff:.3g} ({len(saved)} LoRA tensors)")
        if excess > 0:
            failures.append(f"{name} differs by {diff:.3g}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
