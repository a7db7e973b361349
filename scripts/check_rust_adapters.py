#!/usr/bin/env python3
"""Check that adapter files written by the Rust crate load in Python and give the Rust logits.

Run from the repository root:

    /opt/pyref/bin/python scripts/check_rust_adapters.py [--out DIR]

It runs ``cargo run -p peft-core --example write_test_adapters -- DIR`` (a temporary directory unless
``--out`` is given), which writes adapters created in Rust with random non-zero values for
``fixtures/tiny-mha/model`` and ``fixtures/tiny-gqa/model``, each with the logits Rust computes for the
fixture's ``inputs.safetensors``. Then, for every case:

* PEFT directories: ``PeftModel.from_pretrained`` on the float32 Hugging Face base model; the adapter
  PEFT ends up with (``get_peft_model_state_dict``) must be exactly the file's tensors (PEFT only warns
  about missing or unexpected keys, so this is checked here); PEFT's logits must match the Rust logits
  (rtol 1e-4, atol 1e-5, every position, padded ones included). The float64 functional forward of
  ``make_fixtures.py`` is run on the same tensors as a second, independent reference.
* The official ``adapter.pth``: ``torch.load(weights_only=True)`` (and with ``mmap=True``); the keys,
  shapes, dtypes and contiguity must be the official layout, gates below the adapted layers zero; the
  ``data.pkl`` must be byte for byte what ``torch.save`` writes for the loaded dict; the float64
  functional forward of the official LLaMA-Adapter form must match the Rust logits.

It prints a table and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as mf  # noqa: E402  (reference forward, model specs, HF loading)

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# transformers 5.24 / peft 0.21.2 announce API changes (past_key_values -> cache) on every call.
warnings.filterwarnings("ignore", category=FutureWarning)

RTOL, ATOL = 1e-4, 1e-5
F32, F64 = torch.float32, torch.float64


def tolerance_ratio(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (atol + rtol |want|): <= 1 passes."""
    got, want = got.double(), want.double()
    return ((got - want).abs() / (ATOL + RTOL * want.abs())).max().item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def inputs(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(path)
    return t["input_ids"], t["attention_mask"]


def check_peft(entry: dict, rust: torch.Tensor, problems: list[str]) -> dict:
    name = f"{entry['model']}/{entry['case']}"
    ids, mask = inputs(entry["inputs"])
    spec = mf.MODELS[entry["model"]]
    base = mf.load_hf(Path(entry["model_dir"]), F32)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    pm = PeftModel.from_pretrained(base, entry["dir"])
    pm.eval()

    saved = load_file(str(Path(entry["dir"]) / "adapter_model.safetensors"))
    used = get_peft_model_state_dict(pm)
    keys_ok = set(saved) == set(used) and all(torch.equal(saved[k], used[k].cpu()) for k in saved)
    if not keys_ok:
        problems.append(
            f"{name}: PEFT's adapter differs from the file: missing {sorted(set(saved) - set(used))}, "
            f"extra {sorted(set(used) - set(saved))}"
        )
    for k, v in saved.items():
        if v.dtype != F32 or not bool((v != 0).any()):
            problems.append(f"{name}: tensor {k} is {v.dtype} or all zero")

    with torch.no_grad():
        peft_logits = pm(input_ids=ids, attention_mask=mask).logits
        acfg = json.loads((Path(entry["dir"]) / "adapter_config.json").read_text())
        args = mf.functional_adapter_args(entry["case"], spec, {k: v.to(F64) for k, v in saved.items()}, acfg)
        ref64 = mf.ref_forward(mf.state_dict64(Path(entry["model_dir"])), spec, ids, mask, **args)
    ratio = tolerance_ratio(rust, peft_logits)
    if ratio > 1:
        problems.append(f"{name}: Rust vs PEFT logits off by {ratio:.2f}x the tolerance")
    ratio64 = tolerance_ratio(rust, ref64)
    if ratio64 > 1:
        problems.append(f"{name}: Rust vs float64 reference off by {ratio64:.2f}x the tolerance")
    effect = max_abs(peft_logits, base_logits)
    if effect < 1e-2:
        problems.append(f"{name}: the adapter hardly changes the logits ({effect:.1e}): not a useful test")
    return {
        "loaded by": "PeftModel.from_pretrained",
        "keys": f"{len(saved)} {'ok' if keys_ok else 'MISMATCH'}",
        "max|rust-ref|": max_abs(rust, peft_logits),
        "err/tol": ratio,
        "f64 err/tol": ratio64,
        "adapter effect": effect,
    }


def check_official(entry: dict, rust: torch.Tensor, problems: list[str]) -> dict:
    name = f"{entry['model']}/{entry['case']}"
    path = Path(entry["dir"]) / "adapter.pth"
    spec = mf.MODELS[entry["model"]]
    H, layers, hidden = spec["heads"], spec["layers"], spec["hidden"]
    K, L = 4, 2
    tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    mapped = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)

    expected = {"adapter_query.weight": (L * K, hidden)}
    expected.update({f"layers.{i}.attention.gate": (1, H, 1, 1) for i in range(layers)})
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    keys_ok = type(tensors) is dict and found == expected and list(tensors) == list(expected)
    if not keys_ok:
        problems.append(f"{name}: keys/shapes {found}, expected {expected}")
    for k, v in tensors.items():
        if v.dtype != F32 or not v.is_contiguous() or v.storage_offset() != 0 or v.requires_grad:
            problems.append(f"{name}: {k} is {v.dtype}, contiguous {v.is_contiguous()}")
        if not torch.equal(v, mapped[k]):
            problems.append(f"{name}: {k} differs when loaded with mmap=True")
    for i in range(layers - L):
        if bool(tensors[f"layers.{i}.attention.gate"].ne(0).any()):
            problems.append(f"{name}: gate of layer {i} (below the adapted layers) is non-zero")

    # data.pkl must be what torch.save writes for the same dict; the tensor bytes must agree too.
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    ours, torchs = zipfile.ZipFile(path), zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    prefix_ours = ours.namelist()[0].split("/")[0] + "/"
    prefix_torch = torchs.namelist()[0].split("/")[0] + "/"
    pickle_same = ours.read(prefix_ours + "data.pkl") == torchs.read(prefix_torch + "data.pkl")
    data_same = all(
        ours.read(prefix_ours + f"data/{i}") == torchs.read(prefix_torch + f"data/{i}") for i in range(len(tensors))
    )
    if not (pickle_same and data_same):
        problems.append(f"{name}: data.pkl same as torch.save: {pickle_same}; data same: {data_same}")

    ids, mask = inputs(entry["inputs"])
    official = {
        "query": tensors["adapter_query.weight"].to(F64),
        "gates": {i: tensors[f"layers.{i}.attention.gate"].to(F64) for i in range(layers)},
        "K": K,
        "L": L,
    }
    sd = mf.state_dict64(Path(entry["model_dir"]))
    with torch.no_grad():
        ref64 = mf.ref_forward(sd, spec, ids, mask, official=official)
        base64 = mf.ref_forward(sd, spec, ids, mask)
    ratio = tolerance_ratio(rust, ref64)
    if ratio > 1:
        problems.append(f"{name}: Rust vs float64 official reference off by {ratio:.2f}x the tolerance")
    effect = max_abs(ref64, base64)
    return {
        "loaded by": "torch.load(weights_only)",
        "keys": f"{len(tensors)} {'ok' if keys_ok else 'MISMATCH'}, pkl {'==' if pickle_same else '!='} torch",
        "max|rust-ref|": max_abs(rust, ref64),
        "err/tol": ratio,
        "f64 err/tol": ratio,
        "adapter effect": effect,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep the adapters in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        out = args.out or Path(temporary)
        command = ["cargo", "run", "-q", "-p", "peft-core", "--example", "write_test_adapters", "--", str(out)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        manifest = json.loads((out / "manifest.json").read_text())
        problems: list[str] = []
        rows = []
        for entry in manifest:
            rust = load_file(str(Path(entry["dir"]) / "logits.safetensors"))["logits"]
            check = check_official if entry["format"] == "Official" else check_peft
            before = len(problems)
            row = check(entry, rust, problems)
            row.update(model=entry["model"], case=entry["case"], format=entry["format"], params=entry["parameters"])
            row["result"] = "ok" if len(problems) == before else "FAIL"
            rows.append(row)

    print(f"\ntorch {torch.__version__}, transformers {mf.transformers.__version__}, peft {mf.peft.__version__}")
    print(f"logits compared at every position of the [2, 7] batch; tolerance rtol {RTOL:g}, atol {ATOL:g}")
    print("reference: PEFT float32 for PEFT directories, float64 functional forward for the official .pth\n")
    columns = ["model", "case", "format", "params", "loaded by", "keys", "max|rust-ref|", "err/tol", "f64 err/tol",
               "adapter effect", "result"]
    cells = [[f"{r[c]:.2e}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    for problem in problems:
        print("FAIL:", problem)
    print(f"{len(rows) - sum(r['result'] != 'ok' for r in rows)}/{len(rows)} cases pass")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
