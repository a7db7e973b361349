#!/usr/bin/env python3
"""scripts/smollm2_recipe.sh's recipe in PyTorch + HF PEFT, for comparison on the same machine.

    /opt/pyref/bin/python scripts/smollm2_peft_recipe.py GGUF RUN_DIR

GGUF is the SmolLM2-135M-Instruct Q4_1 file (scripts/get_smollm2.sh); transformers dequantises it to float32.
RUN_DIR is the output of scripts/smollm2_recipe.sh: its `<method>/validation.json` gives the same held-out
records; the training records are the rest of data/alpaca_demo_small.json. Same chat-template formatting
(loss on the assistant turn only), max length 128, batch 2 x 2 accumulation, 12 AdamW steps (betas 0.9/0.95,
weight decay 0.02), linear warm-up over the first step then cosine to 0, same learning rates; adaption prompt
K=10 on 30 layers (PEFT's form), LoRA r=8 alpha 16 on q_proj,v_proj. The order of the records differs (each
side draws its own). Prints the held-out loss before and after, and training tokens per second; then
greedy decoding speed (transformers' generate, KV cache, 128 new tokens for DECODE_PROMPT, the prompt
scripts/smollm2_recipe.sh times with `peft generate`).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from peft import AdaptionPromptConfig, LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
GGUF, RUN = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(2)
torch.manual_seed(0)
random.seed(0)


def user(r):
    return r["instruction"] if not r.get("input") else r["instruction"] + "\n\n" + r["input"]


def example(tok, r):
    msgs = [{"role": "user", "content": user(r)}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(
        msgs + [{"role": "assistant", "content": r["output"]}], tokenize=True, return_dict=False
    )
    labels = [-100] * len(prompt) + full[len(prompt):]
    return full[:128], labels[:128]


def batches(examples, size):
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        yield ids, labels, mask


def loss_sum(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=-100), int((target != -100).sum())


def held_out(model, examples):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask in batches(examples, 8):
            s, n = loss_sum(model, ids, labels, mask)
            total, count = total + float(s), count + n
    return total / count


def run(method: str, lr: float):
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    records = json.loads((ROOT / "data" / "alpaca_demo_small.json").read_text())
    held = json.loads((RUN / method / "validation.json").read_text())
    keys = {(r["instruction"], r["input"], r["output"]) for r in held}
    train = [r for r in records if (r["instruction"], r.get("input", ""), r["output"]) not in keys]
    val = [example(tok, r) for r in held]
    random.shuffle(train)
    started = time.time()
    before = held_out(model, val)
    eval_seconds = time.time() - started
    eval_tokens = sum(len(ids) for ids, _ in val)
    config = (
        AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=10, adapter_layers=30)
        if method == "adaption-prompt"
        else LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    steps, accum, size = 12, 2, 2
    schedule = lambda s: (s + 1) / 1 if s < 1 else 0.5 * (1 + math.cos(math.pi * (s - 1) / (steps - 1)))
    examples = [example(tok, r) for r in train]
    stream = batches(examples, size)
    tokens, start = 0, time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, schedule(step))
        opt.zero_grad()
        for _ in range(accum):
            ids, labels, mask = next(stream)
            s, n = loss_sum(model, ids, labels, mask)
            (s / n / accum).backward()
            tokens += int(mask.sum())
        opt.step()
    seconds = time.time() - start
    model.eval()
    after = held_out(model, val)
    print(json.dumps({"method": method, "lr": lr, "held_out_before": round(before, 4), "held_out_after": round(after, 4), "train_tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 1), "eval_tokens_per_s": round(eval_tokens / eval_seconds, 1)}))


DECODE_PROMPT = "Write a long story about a dragon who learns to cook."


def decode():
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": DECODE_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    for _ in range(2):
        start = time.time()
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        seconds = time.time() - start
        new = out.shape[1] - prompt["input_ids"].shape[1]
        print(json.dumps({"decode_tokens": new, "seconds": round(seconds, 2), "decode_tokens_per_s": round(new / seconds, 1)}))


if __name__ == "__main__":
    run("adaption-prompt", 5e-3)
    run("lora", 1e-3)
    decode()
