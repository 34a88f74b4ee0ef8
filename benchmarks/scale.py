"""The journey at the size users have: N generated recordings, M noise clips, four steps, measured.

Generates N labelled recordings (4 s each by default, half of them with a tone: a learnable task)
and M short noise clips, then runs each step as its own process, through the CLI a user runs:

  prepare   the log-mel caches of the recordings and the noise (the start of `m2dx further-pretrain`)
  pretrain  one further-pretrain epoch over every recording, with the noise mixed in (tiny_cpu)
  finetune  one fine-tuning epoch (tiny_finetune) with the baseline, on a CSV manifest of the N recordings
  predict   `m2dx predict` of every recording with the fine-tuned classifier

and prints, per step: wall time, peak resident memory of the process tree (and of its largest
process), the most file descriptors open at once in the tree, and the bytes of the cache folders.

    python benchmarks/scale.py --recordings 1000 --noise-clips 1500 --out /tmp/m2dx_scale
    python benchmarks/scale.py --recordings 50000 --noise-clips 51000 --out /tmp/m2dx_scale_50k --json results.jsonl

Generated data is reused between runs of the same size (`--out` keeps it); `--steps` picks steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- data
def _write_if_missing(path: Path, samples: np.ndarray) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), samples, SR, subtype="PCM_16")


def generate(root: Path, recordings: int, noise_clips: int, seconds: float, noise_seconds: float) -> dict[str, Path]:
    """Recordings (breath-like noise, half with a 600-1200 Hz tone), a labels CSV, noise clips; idempotent."""
    rec_dir, noise_dir = root / "recordings", root / "noise"
    t = np.arange(int(seconds * SR)) / SR
    rows = ["path,label,subject,split"]
    for i in range(recordings):
        label = i % 2
        path = rec_dir / f"{i // 1000:03d}" / f"rec{i:06d}.wav"
        if not path.exists():
            rng = np.random.default_rng(i)
            x = 0.1 * rng.standard_normal(len(t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
            if label:
                x += 0.2 * np.sin(2 * np.pi * (600 + 600 * rng.random()) * t)
            _write_if_missing(path, x.astype(np.float32))
        subject = i // 4  # four recordings per patient
        split = "test" if subject % 5 == 0 else "train"
        rows.append(f"{path.relative_to(root)},{'tone' if label else 'normal'},p{subject},{split}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    recs = root / "recordings.csv"  # one row per recording, for further-pretrain
    recs.write_text("path\n" + "\n".join(r.split(",")[0] for r in rows[1:]) + "\n")
    n = int(noise_seconds * SR)
    for j in range(noise_clips):
        path = noise_dir / f"{j // 1000:03d}" / f"noise{j:06d}.wav"
        if not path.exists():
            rng = np.random.default_rng(10_000_000 + j)
            _write_if_missing(path, (0.05 * rng.standard_normal(n)).astype(np.float32))
    return {"labels": labels, "recordings_csv": recs, "recordings": rec_dir, "noise": noise_dir}


# ---------------------------------------------------------------------------- measuring a process tree
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _maps(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_step(name: str, cmd: list[str], log: Path) -> dict:
    """Run `cmd`, sampling the tree every 0.25 s; returns wall time, peak RSS, peak open files, exit code."""
    env = {**os.environ, "M2DX_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    peak = {"rss_tree_mb": 0.0, "rss_max_process_mb": 0.0, "open_files_max_process": 0, "open_files_tree": 0,
            "memory_maps_max_process": 0}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = _tree(proc.pid)
                rss = [_rss_kb(p) for p in pids]
                fds = [_fds(p) for p in pids]
                peak["rss_tree_mb"] = max(peak["rss_tree_mb"], sum(rss) / 1024)
                peak["rss_max_process_mb"] = max(peak["rss_max_process_mb"], max(rss, default=0) / 1024)
                peak["open_files_max_process"] = max(peak["open_files_max_process"], max(fds, default=0))
                peak["open_files_tree"] = max(peak["open_files_tree"], sum(fds))
                peak["memory_maps_max_process"] = max(peak["memory_maps_max_process"], _maps(proc.pid))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    return {"step": name, "seconds": round(time.perf_counter() - started, 1), "exit_code": code,
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in peak.items()}}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# ---------------------------------------------------------------------------- the steps
PREPARE = """
import sys
from pathlib import Path
from m2dx_clinic.audio import FrontEndConfig
from m2dx_clinic.data.logmel_cache import LogMelCache
from m2dx_clinic.data.segments import list_segments, read_manifest
cache = LogMelCache(Path(sys.argv[1]), FrontEndConfig(), dtype=sys.argv[4])
lms, _ = cache.build(read_manifest(Path(sys.argv[2])).segments, workers=2, progress=False)
noise, _ = cache.build(list_segments(Path(sys.argv[3])), workers=2, progress=False)
print(len(lms), "recordings,", len(noise), "noise clips, cached:", cache.last_stats)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recordings", type=int, default=1000)
    ap.add_argument("--noise-clips", type=int, default=1500)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each recording")
    ap.add_argument("--noise-seconds", type=float, default=1.0, help="length of each noise clip")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", default="prepare,pretrain,finetune,predict")
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--json", type=Path, help="append one JSON line per step here")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="stop the pre-training epoch after K optimiser steps (0 = the whole epoch): its time is linear")
    ap.add_argument("--predict-recordings", type=int, default=0,
                    help="predict only the first K recordings (whole folders of 1,000; 0 = all): its time is linear")
    args = ap.parse_args()

    root = args.out / f"data-{args.recordings}x{args.seconds:g}s-{args.noise_clips}x{args.noise_seconds:g}s"
    t0 = time.perf_counter()
    paths = generate(root, args.recordings, args.noise_clips, args.seconds, args.noise_seconds)
    print(f"data: {root} ({time.perf_counter() - t0:.0f} s to generate or find)", flush=True)
    work = args.out / f"work-{args.recordings}-{args.noise_clips}-{args.cache_dtype}"
    cache = work / "cache"
    m2dx = [sys.executable, "-m", "m2dx_clinic"]
    pre_run, ft_run, pred_out = work / "pretrain", work / "finetune", work / "predict"
    steps = {
        "prepare": [sys.executable, "-c", PREPARE, str(cache), str(paths["recordings_csv"]), str(paths["noise"]),
                    args.cache_dtype],
        "pretrain": [*m2dx, "further-pretrain", "--recipe", "tiny_cpu", "--data", str(paths["recordings_csv"]),
                     "--noise", str(paths["noise"]), "--out", str(pre_run), "--set", f"data.cache_dir='{cache}'",
                     "--set", f"data.cache_dtype='{args.cache_dtype}'", "--set", "optim.epochs=1",
                     "--set", "optim.warmup_epochs=0", "--set", "data.min_ds_size=0", "--set", "run.log_every=50",
                     "--set", "data.norm_stats_samples=2000", "--set", f"run.max_steps={args.pretrain_steps}"],
        "finetune": [*m2dx, "finetune", "--task", "csv", "--data", str(paths["labels"]), "--recipe", "tiny_finetune",
                     "--checkpoint", "PRETRAINED", "--out", str(ft_run), "--repeats", "1",
                     "--set", f"data.cache_dir='{cache}'", "--set", "optim.epochs=1",
                     "--set", f"data.cycle_seconds={args.seconds:g}"],
        "predict": [*m2dx, "predict", "--model", str(ft_run), "--out", str(pred_out),
                    *predict_inputs(paths["recordings"], args.predict_recordings)],
    }
    for name in args.steps.split(","):
        cmd = steps[name]
        if name == "finetune":
            ckpts = sorted(c for c in pre_run.rglob("checkpoint-*.pth") if "teacher" not in c.parts)
            if not ckpts:
                sys.exit("finetune needs the pretrain step's checkpoint; run --steps pretrain first")
            cmd = [str(ckpts[-1]) if c == "PRETRAINED" else c for c in cmd]
        for folder in {"pretrain": [pre_run], "finetune": [ft_run], "predict": [pred_out]}.get(name, []):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        work.mkdir(parents=True, exist_ok=True)
        result = run_step(name, cmd, work / f"{name}.log")
        result.update({
            "recordings": args.recordings, "noise_clips": args.noise_clips, "recording_seconds": args.seconds,
            "noise_seconds": args.noise_seconds, "cache_dtype": args.cache_dtype,
            "cache_bytes": folder_bytes(cache), "date": time.strftime("%Y-%m-%d"),
            "predicted_recordings": args.predict_recordings or args.recordings if name == "predict" else None,
            "pretrain_steps": args.pretrain_steps or "epoch" if name == "pretrain" else None,
            "open_files_limit": _nofile_limit(),
        })
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        if result["exit_code"] != 0:
            print((work / f"{name}.log").read_text()[-3000:], file=sys.stderr)
            sys.exit(f"step {name} failed (exit {result['exit_code']}); log: {work / f'{name}.log'}")


def predict_inputs(folder: Path, limit: int) -> list[str]:
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    if limit > 0:
        folders = folders[: max(1, -(-limit // 1000))]
    return [str(p) for p in folders]


def _nofile_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


if __name__ == "__main__":
    main()
