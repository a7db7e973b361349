#!/usr/bin/env python3
"""Reference fixtures for the LLaMA-family decoders beside LLaMA: Mistral, Qwen2, Qwen3, LLaMA with biases.

Run from the repository root (same environment as make_fixtures.py, scripts/requirements-fixtures.txt):

    /opt/pyref/bin/python scripts/make_family_fixtures.py

It writes ``fixtures/families/<family>/`` and ``fixtures/families/manifest.json``; see
``fixtures/families/README.md`` for what each file holds. Every random value comes from a seeded
generator, so a rerun writes byte-identical files (the manifest records their sha256).

Per family:
* ``model/``: a tiny random checkpoint written by ``transformers`` ``save_pretrained`` (float32);
* ``inputs.safetensors``: ``input_ids``/``attention_mask`` [2, 10], row 1 right-padded after 8 tokens;
* ``expected.safetensors``: float64-computed references stored as float32: ``base_logits``,
  ``lora_logits``, ``prefix_logits``, ``adaption_prompt_logits`` [2, 10, vocab] (0 at the padded
  positions, which are not compared) and the greedy
  continuations ``greedy_row{0,1}`` (8 tokens after the first 6 tokens of row 0 and after the 8 real
  tokens of row 1);
* ``adapters/{lora,prefix,adaption_prompt}/``: PEFT adapter directories (``save_pretrained``).

References: transformers 5.24 (eager attention) for the base model and greedy decoding; PEFT 0.21.2 for
LoRA and prefix tuning. PEFT's adaption prompt supports only ``llama``/``mistral`` model types, so its
reference here is this script's own forward hook on each adapted attention module (the branch
``gate · softmax(q kᵀ/√d) v`` on the frozen k/v projections of the prompt, no RoPE on the prompt, added
before ``o_proj``); on Mistral it is cross-checked against PEFT's own AdaptedAttention. For Qwen3 the
prompt's keys also pass through the layer's ``k_norm`` (the Rust side does the same: adapter keys live
where the layer's keys live), and the queries through ``q_norm``, as the layer's own queries do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import peft
import transformers
from peft import AdaptionPromptConfig, LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from peft.tuners.adaption_prompt import config as ap_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "families"
F32, F64 = torch.float32, torch.float64
VERSIONS = {"transformers": "5.24.0", "peft": "0.21.2", "torch": "2.15.0"}

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
)

# seq 10 with windows of 4 and 5: the window masks keys on every row. Row 1 has 2 padding tokens, so
# that every padded query still has a real key in its window (transformers turns a query with none into
# NaN, which then reaches the real positions of that row through the masked keys' values).
FAMILIES = {
    "mistral": (MistralConfig, dict(sliding_window=4, tie_word_embeddings=False), 2001),
    "qwen2": (
        Qwen2Config,
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=True),
        2002,
    ),
    "qwen3": (Qwen3Config, dict(head_dim=16, tie_word_embeddings=False), 2003),
    "llama-bias": (LlamaConfig, dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False), 2004),
}

SEQ, REAL_ROW1, NEW_TOKENS = 10, 8, 8
ADAPTER_LEN, ADAPTER_LAYERS = 3, 2


def log(*a):
    print(*a, flush=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=F32) * std


def randomize(model, seed: int):
    """Weights N(0, 0.15²), biases N(0, 0.1²), norm scales 1 + N(0, 0.1²): logits large enough that
    greedy decoding has clear margins."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + randn(g, *p.shape, std=0.1))
            elif name.endswith(".bias"):
                p.copy_(randn(g, *p.shape, std=0.1))
            else:
                p.copy_(randn(g, *p.shape, std=0.15))


def load(model_dir: Path, dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def make_inputs(vocab: int, seed: int):
    g = gen(seed)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    mask[1, REAL_ROW1:] = 0
    ids[1, REAL_ROW1:] = 0
    return ids, mask


def greedy(model, prompt: torch.Tensor) -> tuple[list[int], float]:
    """Greedy continuation by full recomputation; returns the tokens and the smallest top-1/top-2 margin."""
    ids = prompt.clone()[None]
    out, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=ids).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def add_adaption_hooks(model, adapter: dict[str, torch.Tensor], family: str):
    """The adaption-prompt branch as forward hooks on the adapted layers' attention (float64)."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    handles = []
    for key, prompt in adapter.items():
        if not key.endswith("adaption_prompt"):
            continue
        layer = int(key.split(".")[key.split(".").index("layers") + 1])
        gate = adapter[key.replace("adaption_prompt", "adaption_gate")].to(F64)
        attn = model.model.layers[layer].self_attn
        prompt = prompt.to(F64)[0]  # [K, hidden]
        head_dim = attn.head_dim

        def hook(module, args, kwargs, output, prompt=prompt, gate=gate, head_dim=head_dim):
            h = kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            b, t, _ = h.shape
            q = module.q_proj(h).view(b, t, heads, head_dim)
            k = module.k_proj(prompt).view(1, ADAPTER_LEN, kv_heads, head_dim)
            v = module.v_proj(prompt).view(1, ADAPTER_LEN, kv_heads, head_dim)
            if family == "qwen3":
                q, k = module.q_norm(q), module.k_norm(k)
            q = q.transpose(1, 2)
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
            k = k.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
            v = v.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.softmax(q @ k.transpose(2, 3) / head_dim**0.5, dim=-1)
            branch = (gate * scores @ v).transpose(1, 2).reshape(b, t, heads * head_dim)
            # o_proj is linear: o(attn + branch) = o(attn) + W_o · branch (its bias counted once).
            return (output[0] + branch @ module.o_proj.weight.T,) + tuple(output[1:])

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    return handles


def peft_config_for(case: str):
    if case == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
        )
    if case == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    if case == "adaption_prompt":
        return AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS)
    raise ValueError(case)


def make_adapter(family: str, model_dir: Path, case: str, seed: int) -> Path:
    """Creates the adapter with PEFT in float32, randomises it and saves it."""
    out = OUT / family / "adapters" / case
    base = load(model_dir, F32)
    registered = False
    if case == "adaption_prompt" and base.config.model_type not in ap_config.TRANSFORMERS_MODEL_CONFIG:
        # Only for creating and saving PEFT's layout; the reference forward is the hook above.
        ap_config.TRANSFORMERS_MODEL_CONFIG[base.config.model_type] = ap_config.TRANSFORMERS_MODEL_CONFIG["llama"]
        registered = True
    torch.manual_seed(seed)
    pm = get_peft_model(base, peft_config_for(case))
    g = gen(seed)
    with torch.no_grad():
        gates = iter([0.7, -0.4])
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("adaption_gate"):
                p.fill_(next(gates))
            else:
                p.copy_(randn(g, *p.shape, std=0.3 if "lora" in name else 1.0))
    pm.save_pretrained(out)
    if registered:
        del ap_config.TRANSFORMERS_MODEL_CONFIG[base.config.model_type]
    return out


def adapter_logits(family: str, model_dir: Path, case: str, adapter_dir: Path, ids, mask) -> torch.Tensor:
    base = load(model_dir, F64)
    with torch.no_grad():
        if case == "adaption_prompt":
            tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
            handles = add_adaption_hooks(base, tensors, family)
            logits = base(input_ids=ids, attention_mask=mask).logits
            for h in handles:
                h.remove()
            if family == "mistral":
                pm = PeftModel.from_pretrained(load(model_dir, F64), adapter_dir).eval()
                peft_logits = pm(input_ids=ids, attention_mask=mask).logits
                diff = (peft_logits - logits).abs().max().item()
                log(f"    adaption prompt: hook reference vs PEFT AdaptedAttention max |diff| {diff:.2e}")
                # PEFT rounds the prompt's softmax to float32 (softmax(..., dtype=float32)), hence ~1e-7.
                assert diff < 2e-6, diff
            return logits
        pm = PeftModel.from_pretrained(base, adapter_dir).eval()
        return pm(input_ids=ids, attention_mask=mask).logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT writes target_modules from a set: fix the hash seed for byte-identical reruns.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    got = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    for k, want in VERSIONS.items():
        if not got[k].startswith(want):
            log(f"warning: {k} {got[k]} differs from the pinned {want}")
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT / "manifest.json", ignore_errors=True)
        for family in FAMILIES:
            shutil.rmtree(OUT / family, ignore_errors=True)
    manifest = {"versions": got, "files": {}}
    for family, (config_cls, extra, seed) in FAMILIES.items():
        log(f"== {family}")
        config = config_cls(**COMMON, **extra)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=F32)
        randomize(model, seed)
        model_dir = OUT / family / "model"
        model.save_pretrained(model_dir)
        ids, mask = make_inputs(config.vocab_size, seed + 100)
        save_file({"input_ids": ids, "attention_mask": mask}, str(OUT / family / "inputs.safetensors"))
        base = load(model_dir, F64)
        with torch.no_grad():
            expected = {"base_logits": base(input_ids=ids, attention_mask=mask).logits}
        min_margin = float("inf")
        for row, length in ((0, 6), (1, REAL_ROW1)):
            tokens, margin = greedy(base, ids[row, :length])
            expected[f"greedy_row{row}"] = torch.tensor(tokens, dtype=torch.int64)
            min_margin = min(min_margin, margin)
        log(f"    greedy {expected['greedy_row0'].tolist()} {expected['greedy_row1'].tolist()} margin {min_margin:.3g}")
        assert min_margin > 1e-3, f"greedy margin {min_margin} too small for a float32 comparison"
        for i, case in enumerate(("lora", "prefix", "adaption_prompt")):
            adapter_dir = make_adapter(family, model_dir, case, seed + 10 + i)
            logits = adapter_logits(family, model_dir, case, adapter_dir, ids, mask)
            real = mask.bool()
            moved = (logits[real] - expected["base_logits"][real]).abs().max().item()
            log(f"    {case}: moves logits by up to {moved:.3f}")
            assert moved > 1e-2, f"{case} has no visible effect"
            expected[f"{case}_logits"] = logits
        # The outputs at padded positions are never used; store 0 there (compare where attention_mask is 1).
        real = mask.bool()[..., None]
        expected = {
            k: (torch.where(real, v, 0.0).to(F32) if v.is_floating_point() else v).contiguous()
            for k, v in expected.items()
        }
        save_file(expected, str(OUT / family / "expected.safetensors"))
    for path in sorted(OUT.rglob("*")):
        if path.is_file() and path.name not in ("manifest.json", "README.md"):
            manifest["files"][str(path.relative_to(OUT))] = sha256(path)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log(f"wrote {len(manifest['files'])} files under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
