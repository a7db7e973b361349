#!/usr/bin/env python3
"""Reference fixtures for quantized frozen bases: NF4 (bitsandbytes) and Q8_0 (gguf-py).

Run from the repository root, in the fixture environment (scripts/requirements-fixtures.txt) plus
bitsandbytes, whose CPU path quantizes without a GPU:

    /opt/pyref/bin/pip install --no-deps bitsandbytes==0.50.2
    /opt/pyref/bin/python scripts/make_quant_fixtures.py

It writes ``fixtures/quant/``:

* ``blocks.safetensors``: a seeded ``weight`` [192, 128] (N(0, 0.02²) with a few outliers, float32)
  and what the references make of it:
  - ``nf4_codes`` (uint8, one 4-bit code per value, unpacked), ``nf4_absmax`` (float32, the block
    maxima after double quantization, one per block of 64), ``nf4_dequantized`` [192, 128]:
    bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`` and
    ``dequantize_4bit``; ``dynamic_map`` (float32 [256]), bitsandbytes' ``create_dynamic_map()``;
  - ``q8_0_blocks`` (uint8, 34-byte blocks row by row) and ``q8_0_dequantized``: gguf-py's
    ``quants.quantize``/``dequantize`` for ``Q8_0``.
* ``tiny-gqa-nf4.safetensors``: ``fixtures/tiny-gqa/model`` loaded by transformers with
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=float32)`` on the CPU (every decoder linear in NF4; embeddings, norms and
  the tied head dense), and its logits [2, 7, 128] on ``fixtures/tiny-gqa/inputs.safetensors``
  (each NF4 weight dequantized by bitsandbytes' flattened reference kernel and multiplied in f32:
  see ``flat_dequantize_4bit`` for its CPU kernels' error on narrow rows):
  ``base_logits``, and with PEFT loading ``fixtures/tiny-gqa/adapters/lora`` (``lora_logits``) and
  ``.../adaption_prompt`` (``adaption_prompt_logits``) over the quantized model.

Every random value comes from a seeded generator; a rerun writes the same tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as bnbf
import gguf
import peft
import transformers
from gguf import quants
from peft import PeftModel
from safetensors.numpy import save_file
from bitsandbytes.backends.default import ops as default_ops
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "quant"
VERSIONS = {"bitsandbytes": "0.50.2", "transformers": "5.24.0", "peft": "0.21.2", "torch": "2.15.0"}


def check_versions() -> None:
    found = {
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    for name, version in VERSIONS.items():
        if found[name] != version:
            print(f"warning: {name} {found[name]}, the fixtures were made with {version}", file=sys.stderr)


def blocks() -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(2024)
    weight = torch.randn(192, 128, generator=generator) * 0.02
    outliers = torch.randint(0, weight.numel(), (40,), generator=generator)
    weight.view(-1)[outliers] *= 12.0
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    flat = packed.view(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: weight.numel()]
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    dequantized = bnbf.dequantize_4bit(packed, state)
    # Rows of 128 are whole blocks: the C++ CPU kernel and the flattened reference agree here.
    assert torch.equal(dequantized, flat_dequantize_4bit(packed, state))
    q8 = quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    q8_back = quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    return {
        "weight": weight.numpy(),
        "nf4_codes": codes.numpy().astype(np.uint8),
        "nf4_absmax": absmax.float().numpy(),
        "nf4_dequantized": dequantized.float().numpy(),
        "dynamic_map": bnbf.create_dynamic_map().numpy(),
        "q8_0_blocks": np.ascontiguousarray(q8).reshape(-1),
        "q8_0_dequantized": q8_back.astype(np.float32),
    }


def flat_dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="nf4"):
    """bitsandbytes' own pure-PyTorch NF4 dequantization (its "default" backend kernel): blocks over
    the flattened matrix, as quantize_4bit makes them.

    bitsandbytes 0.50.2's C++ CPU kernel (``cdequantize_blockwise_cpu_nf4_fp32``) takes the matrix as
    ``[rows, cols]`` and finds a value's block from its row and column; for rows narrower than a block
    (tiny-gqa's 48- and 80-wide projections) it reads the wrong block maxima (every value of the first
    64 columns of each row scaled by block 0's). Its CUDA kernel and its default kernel work on the
    flattened matrix; this reference uses the default one. ``blocks()`` checks that both CPU paths
    agree where rows are whole blocks.
    """
    qs = quant_state
    maxima = qs.absmax
    if qs.nested:
        maxima = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = _get_4bit_code(qs.quant_type, A.device)
    flat = A.view(torch.uint8).reshape(-1)
    return default_ops._dequantize_4bit_compute(flat, maxima.float(), code, qs.blocksize, qs.shape, qs.dtype)


def tiny_gqa() -> dict[str, np.ndarray]:
    base = ROOT / "fixtures" / "tiny-gqa"
    inputs = load_file(str(base / "inputs.safetensors"))
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def quantized():
        model = AutoModelForCausalLM.from_pretrained(
            base / "model", quantization_config=config, device_map="cpu", attn_implementation="eager"
        )
        model.eval()
        linears = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert len(linears) == 7 * model.config.num_hidden_layers
        # bitsandbytes' CPU product kernels are wrong for rows narrower than a block (see
        # flat_dequantize_4bit), so each NF4 linear is replaced by a dense linear holding what
        # bitsandbytes' reference kernel dequantizes from its NF4 weight: bitsandbytes' quantization,
        # multiplied in f32 as its compute dtype says.
        for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]:
            dense = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(flat_dequantize_4bit(linear.weight.data, linear.weight.quant_state))
                if linear.bias is not None:
                    dense.bias.copy_(linear.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        return model

    def logits(model) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return out.float().numpy()

    result = {"base_logits": logits(quantized())}
    for name in ["lora", "adaption_prompt"]:
        model = PeftModel.from_pretrained(quantized(), base / "adapters" / name)
        result[f"{name}_logits"] = logits(model)
    return result


def main() -> None:
    check_versions()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(blocks(), str(OUT / "blocks.safetensors"))
    save_file(tiny_gqa(), str(OUT / "tiny-gqa-nf4.safetensors"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
