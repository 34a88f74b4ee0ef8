"""Throughput, step time, peak memory and MFU of one M2D-X further-pre-training step.

Runs the library's own step (`pretrain.m2dx_losses` + `pretrain.optimizer_step`, with log-domain
noise mixing on the device) on synthetic log-mel, and prints ONE JSON line.

    python benchmarks/pretrain_step.py --dim 192 --depth 4 --heads 3 --batch 16 --device cpu --threads 2
    python benchmarks/pretrain_step.py --batch 64 --device cuda --amp bf16          # ViT-B, ICBHI setting
    python benchmarks/pretrain_step.py --batch 64 --device cuda --amp bf16 --compile

MFU = model FLOPs per second (analytic count of the matrix products, see `step_flops`) / peak dense
bf16 FLOP/s of the GPU (--peak-tflops, default 989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2dx_clinic.data.crops import mix_in_log_domain  # noqa: E402
from m2dx_clinic.models.m2d import M2D, PredictorConfig  # noqa: E402
from m2dx_clinic.models.cpu_kernels import use_fast_cpu_kernels  # noqa: E402
from m2dx_clinic.models.vit import AudioViT, ViTConfig, param_groups  # noqa: E402
from m2dx_clinic.objectives import TeacherTask  # noqa: E402
from m2dx_clinic.pretrain import compile_for_training, m2dx_losses, optimizer_step  # noqa: E402
from m2dx_clinic.runtime import fused_optimizer, keep_freed_cpu_memory, pick_amp  # noqa: E402


def encoder_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` pre-norm blocks on `tokens` tokens: projections, MLP and attention products."""
    hidden = dim * mlp_ratio
    per_token = 2 * (4 * dim * dim + 2 * dim * hidden)  # qkv + proj + fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV
    return depth * (tokens * per_token + attention)


def step_flops(vit: ViTConfig, pred: PredictorConfig, mask_ratio: float, teacher: bool) -> float:
    """Training FLOPs per sample: 3x forward for trained parts, 1x for the EMA target and the teacher."""
    n = vit.num_patches
    keep = int(n * (1 - mask_ratio))
    online = encoder_flops(keep + 1, vit.embed_dim, vit.depth, vit.mlp_ratio)
    predictor = encoder_flops(n + 1, pred.dim, pred.depth, pred.mlp_ratio) + 2 * 2 * (n + 1) * vit.embed_dim * pred.dim
    target = encoder_flops(n - keep + 1, vit.embed_dim, vit.depth, vit.mlp_ratio)
    total = 3 * (online + predictor) + target
    if teacher:
        total += encoder_flops(n + 1, vit.embed_dim, vit.depth, vit.mlp_ratio)
        total += 3 * 2 * vit.grid_size[1] * (vit.grid_size[0] * vit.embed_dim) ** 2  # offline predictor
    return float(total)


SDPA_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def parse_pair(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--input", type=parse_pair, default=(80, 200))
    ap.add_argument("--patch", type=parse_pair, default=(16, 4))
    ap.add_argument("--predictor-dim", type=int, default=512)
    ap.add_argument("--predictor-depth", type=int, default=8)
    ap.add_argument("--predictor-heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mask-ratio", type=float, default=0.7)
    ap.add_argument("--offline", choices=["teacher", "none"], default="teacher")
    ap.add_argument("--noise-ratio", type=float, default=0.3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                    help="as run.amp: auto = bf16 (fp16 on older GPUs) on CUDA, fp32 on CPU; bf16 on a bf16 CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU for MFU")
    ap.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table of 5 steps to this file")
    ap.add_argument("--cpu-kernels", choices=["fast", "default"], default="fast",
                    help="fast: the training loop's CPU kernels (oneDNN linear in fp32, matmul attention in bf16)")
    ap.add_argument("--cpu-memory", choices=["keep", "default"], default="keep",
                    help="keep: the training loop's glibc setting that keeps freed step memory (runtime.keep_freed_cpu_memory)")
    ap.add_argument("--sdpa", choices=sorted(SDPA_BACKENDS), default="auto",
                    help="force one scaled-dot-product-attention kernel (auto: PyTorch's choice)")
    args = ap.parse_args()
    # the kernel choice holds for the whole measurement, so torch.compile traces with it too
    with sdpa_kernel(SDPA_BACKENDS[args.sdpa]) if args.sdpa != "auto" else contextlib.nullcontext():
        result = measure(args)
    print(json.dumps(result), flush=True)


def measure(args: argparse.Namespace) -> dict:
    """Build the model, warm up, time `args.steps` steps (and profile when asked): the JSON fields."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    vit = ViTConfig(args.input, args.patch, args.dim, args.depth, args.heads)
    pred = PredictorConfig(args.predictor_dim, args.predictor_depth, args.predictor_heads)
    teacher_task = None
    if args.offline == "teacher":
        teacher_task = TeacherTask(AudioViT(vit).to(device))
    model = M2D(vit, pred, offline_dim=teacher_task.out_dim if teacher_task else None).to(device)
    amp = pick_amp(args.amp, device)  # the training loop's own choice for this device
    kernel_notes = keep_freed_cpu_memory(device) if args.cpu_memory == "keep" else []  # as the training loop does
    if args.cpu_kernels == "fast":
        kernel_notes += use_fast_cpu_kernels([model, teacher_task.teacher if teacher_task else None], device, amp)
    if teacher_task is not None and amp == torch.bfloat16:
        teacher_task.teacher.to(torch.bfloat16)  # as the training loop does: frozen, cast once
    forward_model = compile_for_training(model, teacher_task, args.compile_mode) if args.compile else model
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused_optimizer(device))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    lms = torch.randn(args.batch, 1, *args.input, device=device) * 4.2 - 7.1
    noise = torch.randn(args.batch, 1, *args.input, device=device) * 4.0 - 8.0

    def step() -> torch.Tensor:
        clean, mixed = mix_in_log_domain(lms, noise, args.noise_ratio, -7.1, -8.0, 4.2)
        losses = m2dx_losses(model, forward_model, teacher_task, mixed, clean, {}, mask_ratio=args.mask_ratio,
                             lambda_m2d=1.0, lambda_off=1.0, amp_dtype=amp)
        (scaler.scale(losses["loss"]) if scaler else losses["loss"]).backward()
        optimizer_step(model, optimizer, scaler, 3.0, 0.99995)
        return losses["loss"].detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = None
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    step_s = elapsed / args.steps
    samples_per_s = args.batch / step_s
    flops = step_flops(vit, pred, args.mask_ratio, teacher_task is not None)
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        args.profile.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "config": f"ViT d{args.dim} L{args.depth} h{args.heads}, {args.input[0]}x{args.input[1]} p{args.patch[0]}x{args.patch[1]}, "
                  f"predictor d{args.predictor_dim} L{args.predictor_depth}, offline={args.offline}, mask {args.mask_ratio}",
        "batch": args.batch,
        "amp": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
        "compile": args.compile and args.compile_mode,
        "sdpa": args.sdpa,
        "cpu_kernels": kernel_notes,
        "steps": args.steps,
        "samples_per_s": round(samples_per_s, 2),
        "step_ms": round(step_s * 1000, 2),
        "warmup_s": round(warmup_s, 1),
        "gflop_per_sample": round(flops / 1e9, 2),
        "achieved_tflops": round(flops * samples_per_s / 1e12, 2),
        "final_loss": round(float(loss), 4) if loss is not None else None,
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["mfu"] = round(flops * samples_per_s / (args.peak_tflops * 1e12), 4)
    return result


if __name__ == "__main__":
    main()
