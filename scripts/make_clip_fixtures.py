#!/usr/bin/env python3
"""Generate the CLIP vision-tower fixtures for `crates/peft-vision` (see fixtures/clip/README.md).

Run from the repository root:

    /opt/pyref/bin/python scripts/make_clip_fixtures.py

Needs, besides scripts/requirements-fixtures.txt, `pillow==13.0.0` and `torchvision==0.29.2`
(installed with `pip install --no-deps`, the torch pin stays): transformers 5.24's
`CLIPImageProcessor` is the torchvision backend and refuses to load without torchvision.

Everything goes to fixtures/clip/, which this script deletes and rewrites:

* `model/`                 a tiny random `CLIPVisionModel` (config.json + model.safetensors), float32.
* `test_image.png`         a 48x40 RGB image (smooth gradients plus seeded noise), made here.
* `preprocess.safetensors` `pixel_values` [1, 3, 32, 32]: `CLIPImageProcessor` (shortest edge 32,
                           centre crop 32x32, bicubic, CLIP mean/std) applied to test_image.png.
* `features.safetensors`   `pixel_values` [2, 3, 32, 32] (the test image, then seeded N(0, 1) values),
                           `class_tokens` [layers + 1, 2, hidden]: the class token of every entry of
                           `output_hidden_states` (entry 0 = embeddings after pre_layrnorm, entry i =
                           output of encoder layer i), `pooler_output` [2, hidden] (post_layernorm of
                           the last class token) and `last_hidden_state` [2, 17, hidden].

References are computed in float64 from the saved float32 weights (`model.double()`), stored as float32.
The script also checks that the same model in float32 meets the tolerances the Rust tests use
(rtol 1e-4, atol 1e-5), and that an independent integer re-implementation of the bicubic resize
gives exactly the processor's resized pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "clip"

FEATURE_TOL = dict(rtol=1e-4, atol=1e-5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()


def tiny_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=16,
    )


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Replaces every parameter with seeded values big enough that every op matters
    (transformers' own init is std 0.02 and would leave the layers nearly inert)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "layer_norm" in name or "layrnorm" in name:
                value = (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "class_embedding" in name or "position_embedding" in name:
                value = 0.5 * noise
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                value = noise / fan_in**0.5
            param.copy_(value)


def make_test_image(path: Path) -> None:
    height, width = 40, 48
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = 127.5 + 127.5 * np.sin((x + 2 * y) / 5.0)
    image = np.stack([red, green, blue], axis=-1) + rng.normal(0.0, 25.0, (height, width, 3))
    image[10:18, 20:30] = [250, 10, 10]  # a sharp-edged block: overshoot and clamping matter
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", optimize=False)


def cubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def integer_weights(in_size: int, out_size: int):
    """Separable antialiased bicubic taps (a = -0.5), normalised, then quantised to int16 with the
    largest precision that keeps the largest tap below 2^15: the scheme of torch's uint8 kernel."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    rows, wt_max = [], 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [cubic((j - center + 0.5) * inv) for j in range(lo, hi)]
        total = sum(w)
        w = [v / total for v in w]
        wt_max = max(wt_max, max(w))
        rows.append((lo, w))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    quantised = []
    for lo, w in rows:
        q = []
        for v in w:
            v = v * (1 << precision)
            q.append(int(-0.5 + v) if v < 0 else int(0.5 + v))
        quantised.append((lo, q))
    return quantised, precision


def resize_uint8(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[H, W, C] uint8 → [out_h, out_w, C] uint8, horizontal pass then vertical, each rounded."""

    def one_axis(src: np.ndarray, out_size: int) -> np.ndarray:
        # resamples axis 1 of [rows, n, C]
        taps, precision = integer_weights(src.shape[1], out_size)
        out = np.zeros((src.shape[0], out_size, src.shape[2]), dtype=np.uint8)
        for i, (lo, q) in enumerate(taps):
            acc = np.full((src.shape[0], src.shape[2]), 1 << (precision - 1), dtype=np.int64)
            for k, w in enumerate(q):
                acc += src[:, lo + k, :].astype(np.int64) * w
            out[:, i, :] = np.clip(acc >> precision, 0, 255)
        return out

    x = image
    if out_w != x.shape[1]:
        x = one_axis(x, out_w)
    if out_h != x.shape[0]:
        x = one_axis(x.transpose(1, 0, 2), out_h).transpose(1, 0, 2)
    return x


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    err = (got.double() - want.double()).abs() - (atol + rtol * want.double().abs())
    assert err.max() <= 0, f"{name}: worst excess {err.max().item():.3g}"


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    # The model, saved in float32 as Hugging Face writes it.
    torch.manual_seed(0)
    model = CLIPVisionModel(tiny_config()).eval()
    randomise(model, seed=7)
    model.save_pretrained(OUT / "model")

    # The test image and the processor's view of it.
    image_path = OUT / "test_image.png"
    make_test_image(image_path)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    assert processor.backend == "torchvision", processor.backend
    image = Image.open(image_path)
    pixel_values = processor(images=image, return_tensors="pt").pixel_values.float()
    assert pixel_values.shape == (1, 3, 32, 32), pixel_values.shape
    save_file({"pixel_values": pixel_values.contiguous()}, OUT / "preprocess.safetensors")

    # Independent check of the resize: integer taps, exactly the processor's bytes.
    rgb = np.asarray(image.convert("RGB"))
    resized = resize_uint8(rgb, 32, 38)  # shortest edge 40 → 32, width int(32 * 48 / 40) = 38
    cropped = resized[:, 3:35, :].astype(np.float64)  # left = int((38 - 32) / 2)
    mean = np.array(OPENAI_CLIP_MEAN) * 255.0
    std = np.array(OPENAI_CLIP_STD) * 255.0
    mine = torch.from_numpy(((cropped - mean) / std).transpose(2, 0, 1)[None].copy())
    check_close("independent preprocessing", mine, pixel_values, 0.0, 1e-5)

    # Features: float64 reference from the saved float32 weights.
    gen = torch.Generator().manual_seed(11)
    batch = torch.cat([pixel_values, torch.randn((1, 3, 32, 32), generator=gen)], dim=0)
    reloaded = CLIPVisionModel.from_pretrained(OUT / "model").eval()
    with torch.no_grad():
        out64 = reloaded.double()(batch.double(), output_hidden_states=True)
        reloaded32 = CLIPVisionModel.from_pretrained(OUT / "model").eval()
        out32 = reloaded32(batch, output_hidden_states=True)
    layers = tiny_config().num_hidden_layers
    assert len(out64.hidden_states) == layers + 1, len(out64.hidden_states)
    class_tokens = torch.stack([h[:, 0, :] for h in out64.hidden_states]).float()
    class_tokens32 = torch.stack([h[:, 0, :] for h in out32.hidden_states])
    check_close("f32 feasibility (class tokens)", class_tokens32, class_tokens, **FEATURE_TOL)
    check_close("f32 feasibility (pooled)", out32.pooler_output, out64.pooler_output, **FEATURE_TOL)
    save_file(
        {
            "pixel_values": batch.contiguous(),
            "class_tokens": class_tokens.contiguous(),
            "pooler_output": out64.pooler_output.float().contiguous(),
            "last_hidden_state": out64.last_hidden_state.float().contiguous(),
        },
        OUT / "features.safetensors",
    )
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchvision": __import__("torchvision").__version__,
        "pillow": Image.__version__,
        "image_processor_backend": processor.backend,
    }
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    keys = sorted(k for k, _ in reloaded.state_dict().items())
    print("weights:", keys[:3], "...", len(keys))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
