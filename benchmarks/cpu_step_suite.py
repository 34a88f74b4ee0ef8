"""The CPU M2D-X step, measured as the performance issue asks: idle machine, runs alternating between
settings, 10 timed steps each, the median of `--rounds` rounds, every configuration printed.

    python benchmarks/cpu_step_suite.py --rounds 3 --out benchmarks/results/2026-12-02-cpu-step.jsonl

Each run is a fresh `benchmarks/pretrain_step.py` process (2 threads), so one setting cannot warm
caches for the next. Prints one JSON line per run and a summary table (median samples/s, and the
ratio to the reference implementation's figures measured on a machine like this one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL = ["--dim", "192", "--depth", "4", "--heads", "3", "--predictor-dim", "128", "--predictor-depth", "2",
         "--predictor-heads", "4", "--batch", "16"]
BASE = ["--dim", "768", "--depth", "12", "--heads", "12", "--batch", "4"]
# the reference implementation's own step at the same sizes (median of 33.1 / 31.8 / 32.6; and 0.86)
REFERENCE = {"small": 32.6, "base": 0.86}
# "fp32 plain": PyTorch's default CPU kernels and allocator behaviour, to show what the two CPU switches buy
PLAIN = ["--cpu-kernels", "default", "--cpu-memory", "default"]
SETTINGS = [("small", "fp32", SMALL + ["--amp", "off"]), ("small", "fp32 plain", SMALL + ["--amp", "off"] + PLAIN),
            ("small", "bf16", SMALL + ["--amp", "bf16"]),
            ("base", "fp32", BASE + ["--amp", "off"]), ("base", "fp32 plain", BASE + ["--amp", "off"] + PLAIN),
            ("base", "bf16", BASE + ["--amp", "bf16"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", choices=["small", "base"], default=None)
    ap.add_argument("--out", type=Path, default=None, help="append the raw JSON lines to this file")
    args = ap.parse_args()
    runs: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for size, precision, extra in SETTINGS:
            if args.only and size != args.only:
                continue
            cmd = [sys.executable, str(HERE / "pretrain_step.py"), "--device", "cpu", "--threads", "2",
                   "--steps", str(args.steps), "--warmup", "2", *extra]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result = {**json.loads(line), "size": size, "round": round_}
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
            runs.setdefault((size, precision), []).append(result["samples_per_s"])
    print(f"{'config':<8} {'precision':<11} {'runs (samples/s)':<28} {'median':>8} {'vs reference':>13}")
    for (size, precision), values in runs.items():
        median = statistics.median(values)
        print(f"{size:<8} {precision:<11} {' / '.join(f'{v:.2f}' for v in values):<28} {median:>8.2f} "
              f"{median / REFERENCE[size]:>12.2f}x")


if __name__ == "__main__":
    main()
