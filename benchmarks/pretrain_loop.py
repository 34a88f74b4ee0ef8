"""Throughput of the real further-pretraining loop (loader, noise, step, EMA, checkpoint save).

`pretrain_step.py` times the step alone; this runs `pretrain.start_run` on generated ICBHI-layout
recordings with the bundled noise clips, with the recipe's own `run.log_every` (what users run), and
prints ONE JSON line:
- `steady_samples_per_s`: the median of the logged windows from the second epoch on (compiled, loader warm);
- `wall_samples_per_s`: the median, from the second epoch on, of each epoch's samples over the time from
  the previous epoch's end to its own (saves and loader start included): what a long run gets;
- `projected_hours`: the recipe's full schedule (its `optim.epochs` x `data.min_ds_size` items) at that
  wall figure.

    python benchmarks/pretrain_loop.py --recipe tiny_cpu --items 512 --epochs 3 --workers 2      # CPU
    python benchmarks/pretrain_loop.py --items 10240 --epochs 3 --workers 14 --compile         # GPU, ViT-B
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2dx_clinic.config import load_recipe  # noqa: E402
from m2dx_clinic.demo_data import demo_noise_dir, make_demo_icbhi  # noqa: E402
from m2dx_clinic.pretrain import start_run  # noqa: E402
from m2dx_clinic.recipes import PretrainRecipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="icbhi_m2dx")
    ap.add_argument("--items", type=int, default=3840, help="items per epoch (data.min_ds_size)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8, help="data.loader_workers")
    ap.add_argument("--compile", action="store_true", help="run.compile=true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more recipe overrides")
    ap.add_argument("--metrics-out", type=Path, default=None, help="copy the run's metrics.jsonl here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_demo_icbhi(root / "data", num_patients=20, recordings_per_patient=2)
        recipe = load_recipe(PretrainRecipe, args.recipe, [
            "base=", f"data.data={root}/data/ICBHI_final_database", f"data.noise={demo_noise_dir()}",
            f"data.cache_dir={root}/cache", f"data.min_ds_size={args.items}", f"data.loader_workers={args.workers}",
            "data.norm_stats_samples=2000", f"optim.epochs={args.epochs}", "optim.warmup_epochs=0",
            f"run.out={root}/run", f"run.save_every={args.epochs}", "run.report_on_save=false",
            f"run.compile={'true' if args.compile else 'false'}", *args.overrides])
        start = time.perf_counter()
        start_run(recipe, progress=False)
        elapsed = time.perf_counter() - start
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        if args.metrics_out:
            shutil.copyfile(root / "run" / "metrics.jsonl", args.metrics_out)
    steady = [r["samples_per_s"] for r in rows if r["epoch"] >= 2 and not r.get("epoch_end")]
    wall = [r["wall_samples_per_s"] for r in rows if r.get("epoch_end") and r["epoch"] >= 2]
    schedule = load_recipe(PretrainRecipe, args.recipe)  # the full schedule users run, before our overrides
    wall_rate = statistics.median(wall) if wall else None
    items = schedule.optim.epochs * schedule.data.min_ds_size
    result = {
        "recipe": args.recipe, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "items_per_epoch": args.items, "epochs": args.epochs, "workers": args.workers, "compile": args.compile,
        "batch": recipe.optim.batch_size, "accum": recipe.optim.accum_steps, "log_every": recipe.run.log_every,
        "wall_s": round(elapsed, 1),
        "steady_samples_per_s": round(statistics.median(steady), 1) if steady else None,
        "wall_samples_per_s": round(wall_rate, 1) if wall_rate else None,
        "epoch_samples_per_s": [round(r["samples_per_s"], 1) for r in rows if r.get("epoch_end")],
        "epoch_wall_samples_per_s": [round(r["wall_samples_per_s"], 1) for r in rows if r.get("epoch_end")],
        "schedule": f"{schedule.optim.epochs} epochs x {schedule.data.min_ds_size} items",
        "projected_hours": round(items / wall_rate / 3600, 2) if wall_rate else None,
    }
    if torch.cuda.is_available():
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
