#!/usr/bin/env python3
"""Per-kernel time of one training step from CubeCL's own profiler log.

Run a CUDA binary with CubeCL's profiling on, e.g.

    CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG=/tmp/cubecl.log \
        .gpu/train_bench --preset llama-7b --dtype bf16 --steps 2 --warmup 1 train adaption-prompt
    python3 scripts/cubecl_profile.py /tmp/cubecl.log --top 40

CubeCL writes `| <duration> | <kernel name>` for every kernel it times and a summary table at
every device sync; `train_bench` syncs once per step, so the kernels between the last two
summaries are the last step's. Prints JSON: the step's total kernel time and the `--top` kernel
names by total time (names cut to 160 characters), grouped by name.
"""
import argparse
import json
import re
import sys
from collections import defaultdict

LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
SCALE = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def segments(path):
    """Lists of (name, ms) between summary tables."""
    current, done = [], []
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if "Num Computed" in line:
                if current:
                    done.append(current)
                current = []
                continue
            match = LINE.match(line)
            if match:
                value, unit, name = match.groups()
                current.append((name, float(value) * SCALE[unit]))
    if current:
        done.append(current)
    return done


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    parts = segments(args.log)
    if not parts:
        print(json.dumps({"error": "no profiled kernels in the log"}))
        return 1
    # The last segment can be a tail after the final sync; take the largest of the last two.
    step = max(parts[-2:], key=len)
    totals, counts = defaultdict(float), defaultdict(int)
    for name, ms in step:
        key = name[:160]
        totals[key] += ms
        counts[key] += 1
    total = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
    print(json.dumps({
        "segments": len(parts),
        "kernels_in_step": len(step),
        "step_kernel_ms": round(total, 3),
        "top": [
            {"ms": round(ms, 3), "share": round(ms / total, 4), "count": counts[name], "name": name}
            for name, ms in rows
        ],
    }, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
