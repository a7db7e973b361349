#!/usr/bin/env python3
"""PyTorch + HF PEFT baseline for `train_bench` (crates/peft-cli/examples/train_bench.rs).

Same shapes as the Rust benchmark: a LLaMA of a preset shape with random weights created on the
GPU in the given dtype, a batch of `batch x seq` token ids (the same id formula), AdamW
(betas 0.9/0.95, weight decay 0.02) on the adapter only, SDPA attention.

    python3 scripts/bench_peft_baseline.py --dtype bf16 --batch 4 --seq 512 --steps 10 \
        train adaption-prompt
    python3 scripts/bench_peft_baseline.py --dtype bf16 decode --new-tokens 128

Prints one JSON line per measurement, with the fields `train_bench` prints plus peak memory
(`torch.cuda.max_memory_allocated` and `max_memory_reserved`, GiB).
"""

import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000),
    "tiny": (64, 172, 5, 8, 4, 512),
}
DEVICE = "cuda"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def make_model(preset, dtype):
    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=preset == "tiny",
        attn_implementation="sdpa",
    )
    torch.set_default_dtype(dtype)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    return model


def token_batch(vocab, batch, seq):
    ids = [(i * 7919 % (vocab - 3) + 3) for i in range(batch * seq)]
    return torch.tensor(ids, device=DEVICE).view(batch, seq)


def peft_model(model, method, layers):
    import peft

    if method == "adaption-prompt":
        config = peft.AdaptionPromptConfig(
            adapter_len=10, adapter_layers=layers, task_type="CAUSAL_LM"
        )
    elif method == "lora":
        config = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    elif method == "prefix":
        config = peft.PrefixTuningConfig(num_virtual_tokens=10, task_type="CAUSAL_LM")
    else:
        raise ValueError(method)
    return peft.get_peft_model(model, config)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(step, warmup, steps):
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps


def memory():
    if DEVICE != "cuda":
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-7b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train")
    train.add_argument("method", choices=["adaption-prompt", "lora", "prefix"])
    sub.add_parser("forward")
    decode = sub.add_parser("decode")
    decode.add_argument("--prompt-tokens", type=int, default=32)
    decode.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to try the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device

    torch.manual_seed(0)
    model = make_model(args.preset, DTYPES[args.dtype])
    layers = max(1, min(30, model.config.num_hidden_layers - 2))
    common = {
        "preset": args.preset,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
    }
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if args.what == "train":
        import peft

        common["peft"] = peft.__version__
        model = peft_model(model, args.method, layers)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
        ids = token_batch(model.config.vocab_size, args.batch, args.seq)
        last = {}

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last["loss"] = loss.detach()

        seconds = timed(step, args.warmup, args.steps)
        tokens = args.batch * args.seq
        print(json.dumps({
            "bench": f"train/{args.method}", "impl": "pytorch+peft", **common,
            "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "trainable": sum(p.numel() for p in trainable),
            "trainable_dtype": str(trainable[0].dtype),
            "ms_per_step": seconds * 1e3, "tokens_per_second": tokens / seconds,
            "last_loss": float(last["loss"]), **memory(),
        }), flush=True)
    elif args.what == "forward":
        ids = token_batch(model.config.vocab_size, args.batch, args.seq)
        model.eval()

        def step():
            with torch.no_grad():
                model(input_ids=ids)

        seconds = timed(step, args.warmup, args.steps)
        print(json.dumps({
            "bench": "forward/base", "impl": "pytorch", **common,
            "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "ms_per_step": seconds * 1e3,
            "tokens_per_second": args.batch * args.seq / seconds, **memory(),
        }), flush=True)
    else:
        model.eval()
        ids = token_batch(model.config.vocab_size, 1, args.prompt_tokens)

        def step():
            with torch.no_grad():
                out = model.generate(
                    ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0,
                )
            assert out.shape[1] == args.prompt_tokens + args.new_tokens

        seconds = timed(step, 1, max(1, min(args.steps, 3)))
        print(json.dumps({
            "bench": "decode/base", "impl": "transformers generate", **common,
            "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "ms_per_token": seconds * 1e3 / args.new_tokens,
            "tokens_per_second": args.new_tokens / seconds, **memory(),
        }), flush=True)


if __name__ == "__main__":
    main()
