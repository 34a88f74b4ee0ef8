"""Linear evaluation of a frozen encoder next to one full fine-tuning epoch, on the same segments and CPU threads.

Both through the library's own code: `inference.clip_embeddings` (the frozen encoder, one clip embedding
per segment) + `evaluation.linear.fit_linear` (standardise + logistic regression, C chosen on a
validation fifth over the 6-value grid) for linear evaluation; `finetune.train_epoch` (the paper's
Adam, batch 64, the whole encoder trained) for the fine-tune epoch. Random weights and random log-mel
of 8-s segments (the ICBHI cycle): the speed does not depend on them. The CPU kernels are the ones
the loops use (`use_fast_cpu_kernels`). Prints ONE JSON line; figures are seconds per 1,000 segments.

    python benchmarks/linear_eval.py --size base --threads 2 --segments 64
    python benchmarks/linear_eval.py --size tiny --threads 2 --segments 256
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2dx_clinic.config import load_recipe  # noqa: E402
from m2dx_clinic.evaluation.linear import fit_linear  # noqa: E402
from m2dx_clinic.finetune import build_classifier, make_optimizer, train_epoch  # noqa: E402
from m2dx_clinic.inference import clip_embeddings  # noqa: E402
from m2dx_clinic.models.cpu_kernels import use_fast_cpu_kernels  # noqa: E402
from m2dx_clinic.models.vit import AudioViT, ViTConfig  # noqa: E402
from m2dx_clinic.recipes import FinetuneRecipe  # noqa: E402

SIZES = {"tiny": ViTConfig(embed_dim=64, depth=2, num_heads=4), "base": ViTConfig()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--segments", type=int, default=64, help="8-s segments (4 classes, a fifth for validation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-finetune", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    encoder = AudioViT(SIZES[args.size], norm_stats=(-7.1, 4.2)).eval()
    notes = use_fast_cpu_kernels([encoder], device, None)
    n, frames = args.segments, 801  # 8 s at 100 frames per second + 1
    lms = torch.randn(n, 80, frames) * 4.2 - 7.1  # [N, n_mels, frames] raw log-mel
    labels = np.random.default_rng(0).integers(0, 4, size=n)
    labels[:4] = np.arange(4)  # every class in training
    cut = n - n // 5

    t0 = time.perf_counter()
    emb = clip_embeddings(encoder, lms, batch_size=32, device=device)  # [N, F*D]
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_linear({"train": emb[:cut], "val": emb[cut:]}, {"train": labels[:cut], "val": labels[cut:]}, num_classes=4,
               normal=0, balanced=False)
    t_fit = time.perf_counter() - t0
    out = {"size": args.size, "threads": args.threads, "segments": n, "segment_seconds": 8.0,
           "embed_s": round(t_embed, 2), "fit_s": round(t_fit, 2),
           "linear_eval_s_per_1000_segments": round(1000 * (t_embed + t_fit) / n, 1),
           "embed_s_per_1000_segments": round(1000 * t_embed / n, 1)}
    if not args.skip_finetune:
        recipe = load_recipe(FinetuneRecipe, "icbhi_finetune", ["run.device=cpu", "run.amp=off"])
        model = build_classifier(encoder, 4, recipe)
        optimizer = make_optimizer(model, recipe.optim, recipe.model.layer_decay)
        t0 = time.perf_counter()
        train_epoch(model, optimizer, lms, labels.tolist(), recipe, epoch=0, device=device)
        t_epoch = time.perf_counter() - t0
        out.update({"finetune_epoch_s": round(t_epoch, 2),
                    "finetune_epoch_s_per_1000_segments": round(1000 * t_epoch / n, 1),
                    "finetune_epoch_over_linear_eval": round(t_epoch / (t_embed + t_fit), 2)})
    out.update({"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "kernels": notes})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
