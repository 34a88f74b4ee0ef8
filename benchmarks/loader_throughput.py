"""How long the training thread waits for each pre-training batch, and how fast the loader delivers.

Builds memory-mapped log-mel arrays like the cache's (generated: N training clips of 5-20 s, M noise
clips of 5 s), then runs the library's pre-training loader (`PretrainItems` + `KeyedSampler`) over a
few epochs and prints ONE JSON line per configuration:

- `workers_persist`: what `Pretrainer` does: workers crop the audio and the noise, and persist;
- `workers_restart`: the same, but the workers restart every epoch (`persistent_workers=False`);
- `main_thread_noise`: the earlier design: workers restart every epoch and the training thread
  draws the noise crops per batch (`NoiseCropDataset.batch`).

`wait_ms_per_batch` is the mean time the training thread spends getting a batch (loader hand-off
plus, for `main_thread_noise`, the noise crops); the median and the first batch of each epoch
(worker start-up, empty prefetch queue) are printed apart. On a GPU this is time the step cannot overlap, so it
caps samples/s: the compiled ViT-B step takes ~34 ms at batch 64 on an H200 (BENCHMARKS.md).

    python benchmarks/loader_throughput.py --workers 2 --batch 64 --items 2560 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2dx_clinic.data.crops import (  # noqa: E402
    CropDataset,
    KeyedSampler,
    NoiseCropDataset,
    PretrainItems,
)


def memmapped_clips(folder: Path, count: int, min_frames: int, max_frames: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(count):
        path = folder / f"{seed}-{i}.npy"
        np.save(path, rng.standard_normal((80, int(rng.integers(min_frames, max_frames + 1)))).astype(np.float32))
        clips.append(np.load(path, mmap_mode="r"))
    return clips


def run(items: PretrainItems, noise: NoiseCropDataset, args: argparse.Namespace, mode: str) -> dict:
    gen = torch.Generator()
    sampler = KeyedSampler(torch.utils.data.RandomSampler(items, generator=gen))
    loader_items = items if mode != "main_thread_noise" else PretrainItems(items.crops, None, items.seed)
    loader = torch.utils.data.DataLoader(
        loader_items, batch_size=args.batch, sampler=sampler, drop_last=True, num_workers=args.workers,
        persistent_workers=(mode == "workers_persist" and args.workers > 0),
        generator=torch.Generator().manual_seed(0))
    waits: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        gen.manual_seed(epoch)
        sampler.set_epoch(epoch)
        it = iter(loader)
        position = epoch * len(sampler)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            if mode == "main_thread_noise":
                batch["noise"] = noise.batch(position, batch["lms"].shape[0])
                position += batch["lms"].shape[0]
            waits.append(time.perf_counter() - t0)
            if args.step_ms:
                time.sleep(args.step_ms / 1000)  # stands in for the GPU step the host would launch
    total = time.perf_counter() - start
    batches = len(waits)
    return {"mode": mode, "workers": args.workers, "batch": args.batch, "epochs": args.epochs, "batches": batches,
            "samples_per_s": round(batches * args.batch / total, 1),
            "wait_ms_per_batch": round(1000 * float(np.mean(waits)), 2),
            "median_wait_ms": round(1000 * float(np.median(waits)), 2),
            "first_batch_of_epoch_wait_ms": round(1000 * float(np.mean(waits[:: batches // args.epochs])), 1),
            "simulated_step_ms": args.step_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--items", type=int, default=2560, help="items per epoch (data.min_ds_size)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--clips", type=int, default=300)
    ap.add_argument("--noise-clips", type=int, default=400)
    ap.add_argument("--step-ms", type=float, default=0.0, help="sleep this long per batch, as a GPU step would take")
    ap.add_argument("--modes", default="workers_persist,workers_restart,main_thread_noise")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        clips = memmapped_clips(Path(tmp), args.clips, 500, 2000, seed=1)
        noise_clips = memmapped_clips(Path(tmp), args.noise_clips, 500, 500, seed=2)
        noise = NoiseCropDataset(noise_clips, 200, mean=0.0, seed=3)
        items = PretrainItems(CropDataset(clips, 200, min_ds_size=args.items), noise, seed=4)
        for mode in args.modes.split(","):
            print(json.dumps(run(items, noise, args, mode)), flush=True)


if __name__ == "__main__":
    main()
