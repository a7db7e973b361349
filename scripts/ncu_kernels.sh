#!/usr/bin/env bash
# GPU kernel time of one command, per kernel, with Nsight Compute (`ncu`, in the CUDA toolkit of
# the device machine): every kernel's `gpu__time_duration`, summed by kernel name, against the
# command's wall time. Usage: scripts/ncu_kernels.sh NAME COMMAND...; writes $OUT/ncu-NAME.txt
# (the 40 largest kernel groups and the total) and $OUT/ncu-NAME.csv.xz (every kernel).
set -uo pipefail
name=$1
shift
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
csv=/tmp/ncu-$name.csv
started=$SECONDS
/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv --print-units base \
    --cache-control none --clock-control none --log-file "$csv" "$@" > /tmp/ncu-$name.out 2>&1
echo "ncu $name: rc=$? wall $((SECONDS - started)) s"
python3 - "$csv" > "$OUT/ncu-$name.txt" <<'PY'
import csv, collections, re, sys
rows = list(csv.DictReader(line for line in open(sys.argv[1]) if line.startswith('"')))
total = collections.Counter()
count = collections.Counter()
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    # Group template instances: the name up to its first '<' or '('.
    key = re.split(r"[<(]", r["Kernel Name"], maxsplit=1)[0][:90]
    ns = float(r["Metric Value"].replace(",", ""))
    total[key] += ns
    count[key] += 1
all_ns = sum(total.values())
print(f"kernels {sum(count.values())}  gpu time {all_ns / 1e6:.1f} ms")
for key, ns in total.most_common(40):
    print(f"{ns / 1e6:10.2f} ms {100 * ns / all_ns:5.1f} % {count[key]:7d}  {key}")
PY
xz -T4 -c "$csv" > "$OUT/ncu-$name.csv.xz"
head -3 "$OUT/ncu-$name.txt"
tail -3 /tmp/ncu-$name.out
