"""Throughput of `m2dx predict`: recordings per second and real-time factor on generated recordings.

Builds a classifier file of the chosen size (random weights; the speed does not depend on them),
writes `--files` noise recordings of `--seconds` seconds, runs the library's `predict` (decode,
fixed-length windows, log-mel, model) once to warm up and `--runs` times measured, and prints ONE
JSON line with the median per `--read-workers` value (threads decoding the next recordings while the
model runs), each measured in the same process on the same files, alternating between the values run by
run so that a change in the machine's load reaches all of them alike.

    python benchmarks/predict_throughput.py --size tiny --threads 2
    python benchmarks/predict_throughput.py --size base --threads 2 --amp off
    python benchmarks/predict_throughput.py --size base --threads 2 --amp bf16     # CPUs with bf16 units
    python benchmarks/predict_throughput.py --size base --device cuda --amp bf16 --files 200
    python benchmarks/predict_throughput.py --size tiny --threads 2 --files 24 --read-workers 0,1,2
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

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2dx_clinic.audio import FrontEndConfig  # noqa: E402
from m2dx_clinic.checkpoint.classifier import save_classifier  # noqa: E402
from m2dx_clinic.config import to_dict  # noqa: E402
from m2dx_clinic.models.classifier import Classifier  # noqa: E402
from m2dx_clinic.models.vit import AudioViT, ViTConfig  # noqa: E402
from m2dx_clinic.predict import predict  # noqa: E402

SIZES = {"tiny": ViTConfig(embed_dim=64, depth=2, num_heads=4), "base": ViTConfig()}


def classifier_file(folder: Path, config: ViTConfig) -> Path:
    model = Classifier(AudioViT(config), 4)
    meta = {"classes": ["normal", "crackle", "wheeze", "both"], "normal_class": "normal", "normal_class_index": 0,
            "norm_stats": [-7.1, 4.2], "frontend": FrontEndConfig().__dict__,
            "segment": {"seconds": 8.0, "pad": "circular", "positions": "chunked"}, "vit_config": to_dict(config),
            "operating_point": {"threshold": 0.5}}
    return save_classifier(model, meta, folder / "classifier.pt", epoch=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=32.0, help="length of each recording (8-s windows)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default="off")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--read-workers", default="default",
                    help="comma-separated values to compare, e.g. 0,1,2 ('default': predict's own choice)")
    args = ap.parse_args()
    choices = [None if v == "default" else int(v) for v in args.read_workers.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="m2dx-predict-bench-"))
    try:
        torch.manual_seed(0)
        model = classifier_file(work, SIZES[args.size])
        rng = np.random.default_rng(0)
        (work / "in").mkdir()
        for i in range(args.files):
            sf.write(str(work / "in" / f"r{i:03d}.wav"), 0.1 * rng.standard_normal(int(args.seconds * 16000)),
                     16000, subtype="PCM_16")
        kwargs = dict(segments="window", batch_size=args.batch_size, device=args.device, amp=args.amp, progress=False)
        predict(model, [work / "in"], work / "warm", **kwargs)
        times: dict[int | None, list[float]] = {w: [] for w in choices}
        used: dict[int | None, int] = {}
        for run in range(args.runs):
            for workers in choices:
                t0 = time.perf_counter()
                result = predict(model, [work / "in"], work / f"out{run}-{workers}", read_workers=workers, **kwargs)
                times[workers].append(time.perf_counter() - t0)
                used[workers] = result.summary["read_workers"]
        audio = args.files * args.seconds
        for workers in choices:
            seconds = statistics.median(times[workers])
            print(json.dumps({
                "size": args.size, "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
                "amp": result.summary.get("amp"), "torch": torch.__version__, "files": args.files,
                "seconds_per_file": args.seconds, "segments": len(result.segments), "runs": args.runs,
                "read_workers": used[workers], "asked": args.read_workers,
                "median_s": round(seconds, 3), "all_s": [round(t, 3) for t in times[workers]],
                "recordings_per_s": round(args.files / seconds, 2), "real_time_factor": round(audio / seconds, 1),
            }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
