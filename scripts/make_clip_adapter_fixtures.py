#!/usr/bin/env python3
"""Generate the adapter fixtures for the CLIP vision tower (see fixtures/clip-adapters/README.md).

Run from the repository root, after `scripts/make_clip_fixtures.py` (it reads `fixtures/clip/model`
and the pixel values of `fixtures/clip/features.safetensors`):

    /opt/pyref/bin/python scripts/make_clip_adapter_fixtures.py

Pinned versions: scripts/requirements-fixtures.txt. Everything goes to fixtures/clip-adapters/, which
this script deletes and rewrites except its README:

* `lora/`            a PEFT LoRA directory made by `peft` itself (`get_peft_model` on transformers'
                     `CLIPVisionModel`, r 4, alpha 8, q/k/v/out projections and fc1, seeded non-zero
                     A and B, `save_pretrained`).
* `prefix/`          a PEFT prefix-tuning directory made by `peft` (3 virtual tokens, seeded N(0, 1)
                     `prompt_embeddings`). PEFT can save it but not run it on CLIP (the encoder takes
                     no `past_key_values`), so its reference is the functional forward below.
* `adaption_prompt/` a PEFT-layout adaption-prompt directory (adapter_len 4, top 2 layers, scalar
                     gates 0.7 and -0.4), written here: PEFT's `AdaptionPromptConfig` only accepts
                     LLaMA-family models.
* `outputs.safetensors` for the pixel values of `fixtures/clip/features.safetensors` (`[2, 3, 32, 32]`):
  `{case}.last_hidden_state` `[2, 17, 32]` and `{case}.pooler_output` `[2, 32]` for
  case = base, lora, prefix, adaption_prompt.

References are float64 from the saved float32 tensors, stored as float32. The functional forward
(`functional_forward`) is checked against transformers (base) and transformers + PEFT (LoRA) in float64
before the prefix and adaption-prompt references are taken from it; PEFT's own LoRA in float32 is
checked to meet the Rust tolerance (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "clip" / "model"
FEATURES = ROOT / "fixtures" / "clip" / "features.safetensors"
OUT = ROOT / "fixtures" / "clip-adapters"

TOL = dict(rtol=1e-4, atol=1e-5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PREFIX_TOKENS = 3
PROMPT_LEN, PROMPT_LAYERS, GATES = 4, 2, (0.7, -0.4)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    err = (got.double() - want.double()).abs() - (atol + rtol * want.double().abs())
    assert err.max() <= 0, f"{name}: worst excess {err.max().item():.3g}"
    print(f"ok  {name}: max abs diff {(got.double() - want.double()).abs().max().item():.3g}")


def load_base(dtype: torch.dtype) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(MODEL).to(dtype).eval()


def lora_delta(layer_sd: dict, name: str, x: torch.Tensor, scaling: float) -> torch.Tensor:
    a = layer_sd.get(f"{name}.lora_A.weight")
    if a is None:
        return torch.zeros(())
    b = layer_sd[f"{name}.lora_B.weight"]
    return scaling * (x @ a.T @ b.T)


def functional_forward(model: CLIPVisionModel, pixels: torch.Tensor, lora=None, prefix=None, prompts=None):
    """CLIP's vision tower written out from its weights, with the three methods' insertion points:
    LoRA after each linear (`lora`: {layer: {site.lora_X.weight: tensor}}, scaling), prefix keys/values
    joined in front of the tokens' in one softmax (`prefix`: {layer: (keys, values)}, [heads, P, d]),
    and the adaption prompt's gated branch (`prompts`: {layer: (prompt [K, hidden], gate)})."""
    lora_weights, scaling = lora if lora is not None else ({}, 0.0)
    emb = model.embeddings
    hidden = model.pre_layrnorm(emb(pixels))
    batch, seq, width = hidden.shape
    for index, layer in enumerate(model.encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        heads = attn.num_heads
        head_dim = width // heads
        sd = lora_weights.get(index, {})

        def linear(module, name, x):
            return module(x) + lora_delta(sd, name, x, scaling)

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

        x = layer.layer_norm1(hidden)
        q = split(linear(attn.q_proj, "self_attn.q_proj", x))
        k = split(linear(attn.k_proj, "self_attn.k_proj", x))
        v = split(linear(attn.v_proj, "self_attn.v_proj", x))
        if prefix is not None:
            pk, pv = prefix[index]
            k = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
        scale = head_dim**-0.5
        context = torch.softmax(q @ k.transpose(2, 3) * scale, dim=-1) @ v
        if prompts is not None and index in prompts:
            prompt, gate = prompts[index]
            # Keys and values of the prompt by the frozen projections, biases included, no LoRA.
            pk = split(attn.k_proj(prompt.unsqueeze(0)))
            pv = split(attn.v_proj(prompt.unsqueeze(0)))
            context = context + gate * torch.softmax(q @ pk.transpose(2, 3) * scale, dim=-1) @ pv
        merged = context.transpose(1, 2).reshape(batch, seq, width)
        hidden = hidden + linear(attn.out_proj, "self_attn.out_proj", merged)
        x = layer.layer_norm2(hidden)
        h = linear(mlp.fc1, "mlp.fc1", x)
        h = mlp.activation_fn(h)
        hidden = hidden + linear(mlp.fc2, "mlp.fc2", h)
    pooled = model.post_layernorm(hidden[:, 0, :])
    return hidden, pooled


def seeded_(param: torch.nn.Parameter, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        param.copy_(std * torch.randn(param.shape, generator=gen, dtype=torch.float32))


def layer_lora(state: dict) -> dict:
    """PEFT's saved keys → {layer: {site.lora_X.weight: tensor}}."""
    out: dict = {}
    for key, value in state.items():
        rest = key.removeprefix("base_model.model.encoder.layers.")
        index, site = rest.split(".", 1)
        out.setdefault(int(index), {})[site] = value
    return out


def tidy(directory: Path) -> None:
    """PEFT's `save_pretrained` writes a model-card README and the base model's absolute path;
    keep the files reproducible on any checkout."""
    (directory / "README.md").unlink(missing_ok=True)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "fixtures/clip/model"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    readme = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if readme is not None:
        (OUT / "README.md").write_text(readme)
    pixels = load_file(FEATURES)["pixel_values"]
    outputs = {}

    # Base: the functional forward against transformers, float64.
    base64 = load_base(torch.float64)
    with torch.no_grad():
        want = base64(pixels.double())
        hidden, pooled = functional_forward(base64, pixels.double())
    check_close("functional base vs transformers (f64)", hidden, want.last_hidden_state, 1e-12, 1e-12)
    outputs["base.last_hidden_state"], outputs["base.pooler_output"] = hidden, pooled

    # LoRA, made and saved by PEFT itself.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        task_type="FEATURE_EXTRACTION")
    lora_model = get_peft_model(load_base(torch.float32), config)
    gen = torch.Generator().manual_seed(21)
    # A like fan-in scaled weights, B small: a visible change (see the assert below) that keeps the
    # activations at the base model's scale.
    for name, param in sorted(lora_model.named_parameters()):
        if "lora_A" in name:
            seeded_(param, gen, param.shape[1] ** -0.5)
        elif "lora_B" in name:
            seeded_(param, gen, 0.2)
    lora_model.save_pretrained(OUT / "lora")
    tidy(OUT / "lora")
    reloaded = peft.PeftModel.from_pretrained(load_base(torch.float64), OUT / "lora").eval()
    state = load_file(OUT / "lora" / "adapter_model.safetensors")
    assert len(state) == 2 * len(LORA_TARGETS) * base64.config.num_hidden_layers, sorted(state)
    with torch.no_grad():
        want = reloaded.base_model.model(pixels.double())
        hidden, pooled = functional_forward(
            base64, pixels.double(), lora=(layer_lora({k: v.double() for k, v in state.items()}), 8 / 4)
        )
        peft32 = peft.PeftModel.from_pretrained(load_base(torch.float32), OUT / "lora").eval()
        got32 = peft32.base_model.model(pixels)
    check_close("functional LoRA vs PEFT (f64)", hidden, want.last_hidden_state, 1e-10, 1e-10)
    check_close("functional LoRA pooled vs PEFT (f64)", pooled, want.pooler_output, 1e-10, 1e-10)
    print(f"    LoRA output max |value| {hidden.abs().max().item():.3g}, base {outputs['base.last_hidden_state'].abs().max().item():.3g}")
    check_close("PEFT LoRA f32 feasibility", got32.last_hidden_state, hidden, **TOL)
    diff = (hidden - outputs["base.last_hidden_state"]).abs().max().item()
    assert diff > 0.05, f"LoRA changes the output too little to test ({diff})"
    outputs["lora.last_hidden_state"], outputs["lora.pooler_output"] = hidden, pooled

    # Prefix tuning: PEFT makes and saves the file; the reference is the functional forward.
    layers = base64.config.num_hidden_layers
    heads = base64.config.num_attention_heads
    width = base64.config.hidden_size
    config = PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS, task_type="FEATURE_EXTRACTION",
                                num_layers=layers, token_dim=width, num_attention_heads=heads)
    prefix_base = load_base(torch.float32)
    # PEFT's prompt-learning setup looks for a text vocabulary (for its word embeddings) that a
    # vision tower does not have; a stand-in size lets it build and save the prefix.
    prefix_base.config.vocab_size = 1
    prefix_model = get_peft_model(prefix_base, config)
    encoder = prefix_model.prompt_encoder["default"]
    seeded_(encoder.embedding.weight, torch.Generator().manual_seed(22), 1.0)
    prefix_model.save_pretrained(OUT / "prefix", save_embedding_layers=False)
    tidy(OUT / "prefix")
    embeddings = load_file(OUT / "prefix" / "adapter_model.safetensors")["prompt_embeddings"].double()
    # PEFT's own layout: [P, layers·2·width] → [layers·2, heads, P, head_dim]; layer i's keys are
    # entry 2i, its values 2i + 1.
    kv = embeddings.view(PREFIX_TOKENS, layers * 2, heads, width // heads).permute(1, 2, 0, 3)
    prefix = {i: (kv[2 * i], kv[2 * i + 1]) for i in range(layers)}
    with torch.no_grad():
        hidden, pooled = functional_forward(base64, pixels.double(), prefix=prefix)
    outputs["prefix.last_hidden_state"], outputs["prefix.pooler_output"] = hidden, pooled

    # Adaption prompt, written in PEFT's layout.
    gen = torch.Generator().manual_seed(23)
    tensors, prompts = {}, {}
    for offset, gate in enumerate(GATES):
        index = layers - PROMPT_LAYERS + offset
        prompt = torch.randn((1, PROMPT_LEN, width), generator=gen, dtype=torch.float32)
        key = f"base_model.model.encoder.layers.{index}.self_attn"
        tensors[f"{key}.adaption_prompt"] = prompt
        tensors[f"{key}.adaption_gate"] = torch.tensor([gate], dtype=torch.float32)
        prompts[index] = (prompt[0].double(), torch.tensor(gate, dtype=torch.float32).double())
    (OUT / "adaption_prompt").mkdir()
    save_file(tensors, OUT / "adaption_prompt" / "adapter_model.safetensors")
    config = {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": "FEATURE_EXTRACTION",
        "adapter_len": PROMPT_LEN,
        "adapter_layers": PROMPT_LAYERS,
        "target_modules": "self_attn",
        "base_model_name_or_path": "fixtures/clip/model",
        "inference_mode": True,
    }
    (OUT / "adaption_prompt" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    with torch.no_grad():
        hidden, pooled = functional_forward(base64, pixels.double(), prompts=prompts)
    outputs["adaption_prompt.last_hidden_state"], outputs["adaption_prompt.pooler_output"] = hidden, pooled

    save_file({k: v.float().contiguous() for k, v in outputs.items()}, OUT / "outputs.safetensors")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
