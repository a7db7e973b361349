#!/usr/bin/env python3
"""Checks a `peft` binary's logits against the committed fixtures (base model and every adapter).

Used on the GPU machine to show that the CUDA build computes what the CPU build and the Python
reference compute:

    python3 scripts/check_logits.py --peft .gpu/peft --out /tmp/logits [--dtype f32]

Prints one JSON line per case (max absolute and relative error against the fixture) and exits
non-zero if any case exceeds the tolerance (rtol 1e-4 / atol 1e-5 for f32, as the CPU tests; 5e-2
absolute for f16/bf16 weights, which round every weight to 8 or 11 significant bits).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

MODELS = ["tiny-mha", "tiny-gqa", "tiny-headdim"]
ADAPTERS = ["adaption_prompt", "lora", "lora_all", "prefix", "prefix_projection", "official_adapter"]


def cases(root, models):
    for model in models:
        base = os.path.join(root, model)
        if not os.path.isdir(base):
            continue
        yield model, None, os.path.join(base, "base_logits.safetensors")
        for adapter in ADAPTERS:
            folder = os.path.join(base, "adapters", adapter)
            if not os.path.isdir(folder):
                continue
            path = folder
            if adapter == "official_adapter":
                path = os.path.join(folder, "adapter.pth")
            yield model, path, os.path.join(folder, "expected.safetensors")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peft", required=True)
    parser.add_argument("--fixtures", default="fixtures")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rtol, atol = (1e-4, 1e-5) if args.dtype == "f32" else (0.0, 5e-2)
    failures = 0
    for model, adapter, expected_path in cases(args.fixtures, args.models):
        model_dir = os.path.join(args.fixtures, model, "model")
        name = f"{model}-{os.path.basename(adapter.rstrip('/')) if adapter else 'base'}"
        output = os.path.join(args.out, f"{name}.safetensors")
        command = [args.peft, "logits", "--model", model_dir, "--dtype", args.dtype,
                   "--input", os.path.join(args.fixtures, model, "inputs.safetensors"),
                   "--output", output]
        if adapter:
            command += ["--adapter", adapter]
        if adapter and adapter.endswith(".pth"):
            # The official checkpoint does not record K; the fixture script uses K=4.
            command += ["--adapter-len", "4"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            print(json.dumps({"case": name, "error": run.stderr.strip()[-500:]}))
            failures += 1
            continue
        got = load_file(output)["logits"].astype(np.float64)
        want = load_file(expected_path)["logits"].astype(np.float64)
        mask = load_file(os.path.join(args.fixtures, model, "inputs.safetensors")).get(
            "attention_mask")
        if mask is not None:
            keep = mask.astype(bool)
            got, want = got[keep], want[keep]
        error = np.abs(got - want)
        ok = bool(np.all(error <= atol + rtol * np.abs(want)))
        failures += not ok
        print(json.dumps({"case": name, "dtype": args.dtype, "ok": ok,
                          "max_abs_error": float(error.max()),
                          "max_rel_error": float((error / (np.abs(want) + 1e-12)).max())}),
              flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
