#!/usr/bin/env python3
"""GGUF fixtures written by the Python `gguf` package (llama.cpp's own writer), with references.

Run from the repository root with the fixture environment plus `gguf` and `sentencepiece`:

    /opt/pyref/bin/pip install gguf==0.19.0 sentencepiece==0.2.3
    /opt/pyref/bin/python scripts/make_gguf_fixtures.py

Writes ``fixtures/gguf/`` (see its README): every random value is seeded, so a rerun is byte-identical
(``manifest.json`` records the sha256 of every file).

* ``blocks.gguf`` + ``blocks_expected.safetensors``: one [2, 512] tensor per supported type (F32, F16, BF16,
  Q8_0, Q4_0, Q4_1 quantised by gguf-py from normal values; Q4_K, Q5_K, Q6_K as random blocks with bounded
  scales, since gguf-py only dequantises K-quants), a data alignment of 64, and gguf-py's dequantisation
  of each as the reference.
* ``stories-spm.gguf``: the pretrained stories260k (../shared/models/stories260k) in llama.cpp's layout: Q/K
  rows permuted for llama.cpp's RoPE, token_embd Q8_0, attn_q Q4_0, attn_k Q4_1, attn_v Q8_0, attn_output
  F16, ffn_gate BF16, ffn_up Q8_0, ffn_down and norms F32, tied head; its SentencePiece tokenizer as
  tokens, scores and types (``tokenizer.ggml.model = llama``, no merges).
* ``tiny-bpe.gguf``: a random 2-layer LLaMA with K-quant weights (attn_q Q4_K, attn_k Q5_K, attn_v Q6_K,
  ffn_down Q4_K, output Q6_K, attn_output Q8_0, ffn_gate Q4_0, ffn_up Q4_1, token_embd F16) and a byte-level
  BPE tokenizer (``tokenizer.ggml.model = gpt2``) trained here on the Alpaca instructions, with ChatML
  special tokens and a chat template.
* ``expected.safetensors``: for both models, logits of transformers loading the GGUF file itself
  (``from_pretrained(..., gguf_file=...)``, which dequantises and undoes the permutation) on a fixed batch,
  computed in float64 and stored as float32, plus greedy continuations.
* ``tokenizer_cases.json``: strings and the ids the reference tokenizers give them (stories260k's
  ``tokenizer.json``; the trained BPE's own ``tokenizer.json``), checked here to equal transformers' GGUF
  tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "gguf"
STORIES = (ROOT / ".." / "shared" / "models" / "stories260k").resolve()
ALPACA = (ROOT / ".." / "shared" / "data").resolve()
F64 = torch.float64

CASES = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world, 2024!",
    "  two leading spaces and trailing  ",
    "Tabs\tand\nnew lines\n\nand émigré café ☕ 東京",
    "<s> literal specials </s> inside text",
    "<|im_start|>user\nGive three tips.<|im_end|>\n<|im_start|>assistant\n",
    "x" * 40,
    "",
]

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def log(*a):
    print(*a, flush=True)


def k_quant_blocks(rng, kind: Q, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks whose f16 scales are small and finite."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    n = cols // block_values
    raw = rng.integers(0, 256, (rows, n, block_bytes), dtype=np.uint8)
    # [rows, n, 2] f16 → [rows, n, 4] bytes: (d, dmin) for Q4_K/Q5_K at the block's start, d at its end for Q6_K.
    d = rng.uniform(1e-4, 3e-4, (rows, n, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:
        raw[..., 208:210] = d[..., 0:2]
    else:
        raw[..., 0:4] = d
    return raw.reshape(rows, n * block_bytes)


def quantized(rng, kind: Q, values: np.ndarray) -> np.ndarray:
    """The stored form of `values` [rows, cols] in `kind` (random blocks for K-quants)."""
    if kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return k_quant_blocks(rng, kind, *values.shape)
    if kind == Q.F32:
        return values.astype(np.float32)
    if kind == Q.F16:
        return values.astype(np.float16)
    return quants.quantize(values.astype(np.float32), kind)


def add(writer, name: str, kind: Q, stored: np.ndarray):
    if kind in (Q.F32, Q.F16):
        writer.add_tensor(name, stored)
    else:
        writer.add_tensor(name, stored, raw_dtype=kind)


def blocks_file():
    rng = np.random.default_rng(3001)
    writer = gguf.GGUFWriter(str(OUT / "blocks.gguf"), arch="blocks-test")
    writer.add_custom_alignment(64)
    writer.add_string("test.note", "one tensor per block type")
    writer.add_array("test.nested", [[1, 2], [3]])
    expected = {}
    for kind in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        stored = quantized(rng, kind, rng.standard_normal((2, 512)).astype(np.float32))
        add(writer, kind.name.lower(), kind, stored)
        values = quants.dequantize(stored, kind) if kind not in (Q.F32, Q.F16) else stored.astype(np.float32)
        assert values.shape == (2, 512) and np.isfinite(values).all(), kind
        expected[kind.name.lower()] = torch.from_numpy(values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(expected, str(OUT / "blocks_expected.safetensors"))


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half → interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama(path: Path, cfg: dict, weights: dict, types: dict, tokenizer: dict, rng, arch: str = "llama"):
    """A GGUF file of `arch` as llama.cpp's converter writes it: Q/K rows permuted for `llama` only."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(cfg["name"])
    writer.add_block_count(cfg["layers"])
    writer.add_context_length(cfg["ctx"])
    writer.add_embedding_length(cfg["hidden"])
    writer.add_feed_forward_length(cfg["inter"])
    writer.add_head_count(cfg["heads"])
    writer.add_head_count_kv(cfg["kv_heads"])
    writer.add_rope_freq_base(cfg["theta"])
    writer.add_layer_norm_rms_eps(cfg["eps"])
    writer.add_vocab_size(cfg["vocab"])
    head_dim = cfg.get("head_dim", cfg["hidden"] // cfg["heads"])
    writer.add_rope_dimension_count(head_dim)
    if "head_dim" in cfg:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    if "scores" in tokenizer:
        writer.add_token_scores(tokenizer["scores"])
    writer.add_token_types(tokenizer["types"])
    if "merges" in tokenizer:
        writer.add_token_merges(tokenizer["merges"])
    writer.add_bos_token_id(tokenizer["bos"])
    writer.add_eos_token_id(tokenizer["eos"])
    if "unk" in tokenizer:
        writer.add_unk_token_id(tokenizer["unk"])
    writer.add_add_bos_token(tokenizer["add_bos"])
    writer.add_add_eos_token(False)
    if "chat_template" in tokenizer:
        writer.add_chat_template(tokenizer["chat_template"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "rope_freqs.weight": "rope_freqs.weight",
    }
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
    }
    for key, value in weights.items():
        value = value.astype(np.float32)
        if key.startswith("model.layers."):
            _, _, layer, rest = key.split(".", 3)
            name = f"blk.{layer}.{per_layer[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                value = permute(value, cfg["heads"])
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                value = permute(value, cfg["kv_heads"])
            kind = types.get(rest, Q.F32)
        else:
            name = names[key]
            kind = types.get(key, Q.F32)
        if value.ndim == 1:
            writer.add_tensor(name, value)
        else:
            add(writer, name, kind, quantized(rng, kind, value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stories_model(rng):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "original" / "tok512.model"))
    types = []
    for i in range(sp.vocab_size()):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    tokenizer = dict(
        model="llama",
        tokens=[sp.id_to_piece(i) for i in range(sp.vocab_size())],
        scores=[sp.get_score(i) for i in range(sp.vocab_size())],
        types=types,
        bos=1,
        eos=2,
        unk=0,
        add_bos=True,
    )
    hf = json.loads((STORIES / "config.json").read_text())
    cfg = dict(
        name="stories260k",
        layers=hf["num_hidden_layers"],
        ctx=hf["max_position_embeddings"],
        hidden=hf["hidden_size"],
        inter=hf["intermediate_size"],
        heads=hf["num_attention_heads"],
        kv_heads=hf["num_key_value_heads"],
        theta=10000.0,
        eps=hf["rms_norm_eps"],
        vocab=hf["vocab_size"],
    )
    weights = {k: v.numpy() for k, v in load_file(str(STORIES / "model.safetensors")).items()}
    types = {
        "model.embed_tokens.weight": Q.Q8_0,
        "self_attn.q_proj.weight": Q.Q4_0,
        "self_attn.k_proj.weight": Q.Q4_1,
        "self_attn.v_proj.weight": Q.Q8_0,
        "self_attn.o_proj.weight": Q.F16,
        "mlp.gate_proj.weight": Q.BF16,
        "mlp.up_proj.weight": Q.Q8_0,
    }
    write_llama(OUT / "stories-spm.gguf", cfg, weights, types, tokenizer, rng)


def bpe_model(rng):
    records = json.loads(next(ALPACA.glob("*.json")).read_text())
    texts = [r["instruction"] + "\n" + r.get("output", "") for r in records]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.save(str(OUT / "tiny-bpe.tokenizer.json"))
    vocab = bpe.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = dict(
        model="gpt2",
        pre="default",
        tokens=tokens,
        types=[3 if t in specials else 1 for t in tokens],
        merges=merges,
        bos=vocab["<|im_start|>"],
        eos=vocab["<|im_end|>"],
        add_bos=False,
        chat_template=CHATML,
    )
    cfg = dict(name="tiny-bpe", layers=2, ctx=64, hidden=256, inter=512, heads=4, kv_heads=2, theta=10000.0, eps=1e-5, vocab=len(tokens))
    g = np.random.default_rng(3003)
    d, f, v, kv = 256, 512, len(tokens), 2 * 64
    weights = {"model.embed_tokens.weight": g.standard_normal((v, d)) * 0.2, "model.norm.weight": 1 + 0.1 * g.standard_normal(d), "lm_head.weight": None}
    for i in range(2):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "self_attn.q_proj.weight": g.standard_normal((d, d)),
                p + "self_attn.k_proj.weight": g.standard_normal((kv, d)),
                p + "self_attn.v_proj.weight": g.standard_normal((kv, d)),
                p + "self_attn.o_proj.weight": g.standard_normal((d, d)) * 0.05,
                p + "mlp.gate_proj.weight": g.standard_normal((f, d)) * 0.05,
                p + "mlp.up_proj.weight": g.standard_normal((f, d)) * 0.05,
                p + "mlp.down_proj.weight": g.standard_normal((d, f)),
                p + "input_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
                p + "post_attention_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
            }
        )
    weights["lm_head.weight"] = g.standard_normal((v, d))
    types = {
        "model.embed_tokens.weight": Q.F16,
        "lm_head.weight": Q.Q6_K,
        "self_attn.q_proj.weight": Q.Q4_K,
        "self_attn.k_proj.weight": Q.Q5_K,
        "self_attn.v_proj.weight": Q.Q6_K,
        "self_attn.o_proj.weight": Q.Q8_0,
        "mlp.gate_proj.weight": Q.Q4_0,
        "mlp.up_proj.weight": Q.Q4_1,
        "mlp.down_proj.weight": Q.Q4_K,
    }
    write_llama(OUT / "tiny-bpe.gguf", cfg, weights, types, tokenizer, rng)
    return bpe, tokenizer


# Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's `qwen2`): Llama-3's, digits one by one.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def qwen_models(bpe, bpe_tokenizer):
    """Random 2-layer Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms, head width 128 apart from
    hidden / heads, own head) in llama.cpp's layout (no Q/K permutation), with the trained BPE under
    Qwen2's pre-tokenizer (`tokenizer.ggml.pre = qwen2`). transformers 5.24 reads no head width from a
    Qwen3 GGUF (`attention.key_length` is not mapped) and takes Qwen3's default, 128: so does this one."""
    own = Tokenizer.from_str(bpe.to_str())
    own.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    own.save(str(OUT / "qwen-bpe.tokenizer.json"))
    tokenizer = dict(bpe_tokenizer, pre="qwen2")
    v, d, f, heads, kv_heads = len(tokenizer["tokens"]), 64, 128, 4, 2
    for arch, seed, head_dim in (("qwen2", 3005, 16), ("qwen3", 3006, 128)):
        g = np.random.default_rng(seed)
        q, kv = heads * head_dim, kv_heads * head_dim
        weights = {"model.embed_tokens.weight": g.standard_normal((v, d)) * 0.2, "model.norm.weight": 1 + 0.1 * g.standard_normal(d)}
        for i in range(2):
            p = f"model.layers.{i}."
            weights.update(
                {
                    p + "self_attn.q_proj.weight": g.standard_normal((q, d)) * 0.3,
                    p + "self_attn.k_proj.weight": g.standard_normal((kv, d)) * 0.3,
                    p + "self_attn.v_proj.weight": g.standard_normal((kv, d)),
                    p + "self_attn.o_proj.weight": g.standard_normal((d, q)) * 0.1,
                    p + "mlp.gate_proj.weight": g.standard_normal((f, d)) * 0.1,
                    p + "mlp.up_proj.weight": g.standard_normal((f, d)) * 0.1,
                    p + "mlp.down_proj.weight": g.standard_normal((d, f)) * 0.3,
                    p + "input_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
                    p + "post_attention_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
                }
            )
            if arch == "qwen2":
                for name, width in (("q", q), ("k", kv), ("v", kv)):
                    weights[p + f"self_attn.{name}_proj.bias"] = 0.5 * g.standard_normal(width)
            else:
                for name in ("q", "k"):
                    weights[p + f"self_attn.{name}_norm.weight"] = 1 + 0.2 * g.standard_normal(head_dim)
        if arch == "qwen3":
            weights["lm_head.weight"] = g.standard_normal((v, d))
        cfg = dict(name=f"tiny-{arch}", layers=2, ctx=64, hidden=d, inter=f, heads=heads, kv_heads=kv_heads, theta=1000000.0, eps=1e-6, vocab=v, head_dim=head_dim)
        types = {
            "model.embed_tokens.weight": Q.F16,
            "lm_head.weight": Q.Q8_0,
            "self_attn.q_proj.weight": Q.Q8_0,
            "self_attn.k_proj.weight": Q.Q4_0,
            "self_attn.v_proj.weight": Q.Q4_1,
            "self_attn.o_proj.weight": Q.F16,
            "mlp.gate_proj.weight": Q.Q8_0,
            "mlp.up_proj.weight": Q.Q4_0,
            "mlp.down_proj.weight": Q.Q8_0,
        }
        write_llama(OUT / f"tiny-{arch}.gguf", cfg, weights, types, tokenizer, np.random.default_rng(seed + 100), arch=arch)


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama-3 scaling: the divisor of each inverse frequency."""
    factors = []
    for i in range(head_dim // 2):
        wavelen = 2 * np.pi * theta ** (2 * i / head_dim)
        low = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
        high = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def llama3_model(bpe_tokenizer):
    """A random 2-layer Llama-3-style model whose RoPE is scaled as Llama-3.1 scales it, written as
    llama.cpp writes such files: no scaling metadata, the per-frequency divisors as `rope_freqs.weight`.
    transformers ignores that tensor when it loads a GGUF, so the reference is transformers' LlamaForCausalLM
    built from the same float32 weights with `rope_scaling = llama3` in its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    v, d, f, heads, kv_heads, head_dim, theta = len(bpe_tokenizer["tokens"]), 64, 128, 4, 2, 16, 10000.0
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    g = np.random.default_rng(3007)
    weights = {"model.embed_tokens.weight": g.standard_normal((v, d)) * 0.2, "model.norm.weight": 1 + 0.1 * g.standard_normal(d)}
    for i in range(2):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "self_attn.q_proj.weight": g.standard_normal((heads * head_dim, d)) * 0.4,
                p + "self_attn.k_proj.weight": g.standard_normal((kv_heads * head_dim, d)) * 0.4,
                p + "self_attn.v_proj.weight": g.standard_normal((kv_heads * head_dim, d)),
                p + "self_attn.o_proj.weight": g.standard_normal((d, heads * head_dim)) * 0.1,
                p + "mlp.gate_proj.weight": g.standard_normal((f, d)) * 0.1,
                p + "mlp.up_proj.weight": g.standard_normal((f, d)) * 0.1,
                p + "mlp.down_proj.weight": g.standard_normal((d, f)) * 0.3,
                p + "input_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
                p + "post_attention_layernorm.weight": 1 + 0.1 * g.standard_normal(d),
            }
        )
    weights["lm_head.weight"] = g.standard_normal((v, d))
    weights = {k: val.astype(np.float32) for k, val in weights.items()}
    cfg = dict(name="tiny-llama3", layers=2, ctx=128, hidden=d, inter=f, heads=heads, kv_heads=kv_heads, theta=theta, eps=1e-5, vocab=v)
    stored = dict(weights, **{"rope_freqs.weight": llama3_rope_factors(head_dim, theta, scaling)})
    write_llama(OUT / "tiny-llama3.gguf", cfg, stored, {}, bpe_tokenizer, np.random.default_rng(3008))
    config = LlamaConfig(
        vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(F64).eval()
    model.load_state_dict({k: torch.from_numpy(val).to(F64) for k, val in weights.items()}, strict=True)
    batch = torch.from_numpy(np.random.default_rng(3009).integers(3, v, (2, 24)))
    expected = {"tiny-llama3.input_ids": batch}
    with torch.no_grad():
        expected["tiny-llama3.logits"] = model(input_ids=batch).logits.float()
        # The same weights without the scaling, to show the fixture depends on it.
        unscaled = {"rope_type": "default", "rope_theta": theta}
        plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_parameters": unscaled})).to(F64).eval()
        plain.load_state_dict(model.state_dict(), strict=True)
        moved = float((plain(input_ids=batch).logits.float() - expected["tiny-llama3.logits"]).abs().max())
    assert moved > 1e-2, moved
    log(f"  tiny-llama3: scaling moves logits by up to {moved:.3f}")
    return expected


def references(extra=None):
    expected, cases = {}, {}
    models = (
        ("stories-spm", STORIES / "tokenizer.json"),
        ("tiny-bpe", OUT / "tiny-bpe.tokenizer.json"),
        ("tiny-qwen2", OUT / "qwen-bpe.tokenizer.json"),
        ("tiny-qwen3", OUT / "qwen-bpe.tokenizer.json"),
    )
    for name, own in models:
        model = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=f"{name}.gguf", dtype=F64, attn_implementation="eager").eval()
        hf_tok = AutoTokenizer.from_pretrained(OUT, gguf_file=f"{name}.gguf")
        reference = Tokenizer.from_file(str(own))
        ids = {}
        for text in CASES:
            want = reference.encode(text, add_special_tokens=False).ids
            got = hf_tok.encode(text, add_special_tokens=False)
            assert got == want, (name, text, got, want)
            ids[text] = want
        with_bos = hf_tok.encode(CASES[0])
        cases[name] = {"add_special_tokens_prefix": with_bos[: len(with_bos) - len(ids[CASES[0]])], "ids": ids}
        batch = torch.tensor([ids[CASES[0]][:8], ids[CASES[5]][:8]])
        with torch.no_grad():
            expected[f"{name}.input_ids"] = batch
            expected[f"{name}.logits"] = model(input_ids=batch).logits.float()
            prompt = batch[:1]
            for _ in range(8):
                nxt = model(input_ids=prompt).logits[0, -1]
                top = torch.topk(nxt, 2).values
                assert float(top[0] - top[1]) > 1e-3, (name, "greedy margin")
                prompt = torch.cat([prompt, nxt.argmax().view(1, 1)], dim=1)
            expected[f"{name}.greedy"] = prompt[0, 8:].clone()
        log(f"  {name}: greedy {expected[f'{name}.greedy'].tolist()}")
    expected.update(extra or {})
    save_file(expected, str(OUT / "expected.safetensors"))
    (OUT / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    torch.manual_seed(0)
    blocks_file()
    stories_model(np.random.default_rng(3002))
    bpe, bpe_tokenizer = bpe_model(np.random.default_rng(3004))
    qwen_models(bpe, bpe_tokenizer)
    references(llama3_model(bpe_tokenizer))
    files = {str(p.relative_to(OUT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(OUT.iterdir()) if p.is_file()}
    versions = {"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "torch": torch.__version__}
    (OUT / "manifest.json").write_text(json.dumps({"versions": versions, "files": files}, indent=1, sort_keys=True) + "\n")
    log(f"wrote {len(files)} files under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
