"""Where and how a loop runs: device, mixed precision, distributed ranks, seeds and random state.

Every training, tuning and reporting entry point asks this module the same questions (which device,
which autocast dtype, which rank am I, how do I seed this stream) so the answers never drift apart
between commands. Nothing here knows about models or data.

Seed streams. A run has one user seed; each independent random stream derives its own seed from it
with `stream_seed(seed, name, rank)`. The numbers below are the ones every run so far was trained
with, kept so that old runs resume exactly; they are spread out (a prime stride per rank) so that
rank r of seed s never replays rank 0 of a nearby seed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError, M2DXError

RANK_STRIDE = 7919  # a prime: per-rank streams of seed s stay apart from those of s+1, s+2, ...
STREAM_OFFSETS = {
    "model": 0,  # initial weights (identical on every rank: rank is ignored)
    "masks": 0,  # the global RNG of the loop after set-up: masking in pre-training
    "noise": 17,  # background-noise cycle and crops
    "noise_stats": 17,  # the sample that gives the noise set's mean (identical on every rank)
}
T = TypeVar("T")
R = TypeVar("R")
SUBSET_SEED = 12345  # fixed subset of a split for smoke runs (data.max_items_per_split): same for every seed


class TrainingDiverged(M2DXError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def stream_seed(seed: int, stream: str, rank: int = 0) -> int:
    """The seed of one named random stream of a run (see the module docstring)."""
    if stream not in STREAM_OFFSETS:
        raise KeyError(f"unknown seed stream {stream!r}; known: {', '.join(STREAM_OFFSETS)}")
    shared = stream in ("model", "noise_stats")
    return int(seed) + STREAM_OFFSETS[stream] + (0 if shared else RANK_STRIDE * int(rank))


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    """Seed of the single-process shuffle of one epoch: the order depends only on (seed, epoch)."""
    return int(seed) * 100003 + int(epoch) * 1009


# ---------------------------------------------------------------------------- distributed
@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str) -> Distributed:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Distributed(rank, world, local)


# ---------------------------------------------------------------------------- device and precision
def pick_device(choice: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """`auto` (or None) = CUDA when present, else CPU; an explicit `cuda` without a GPU is a ConfigError."""
    choice = "auto" if choice is None else str(choice)
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank) if choice == "cuda" else torch.device(choice)
    try:
        return torch.device(choice)
    except RuntimeError:
        raise ConfigError(f"--device {choice!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def cpu_has_bf16_matmul() -> bool:
    """True where oneDNN runs bf16 matrix products natively (AVX512-BF16 or AMX), ~2x fp32 speed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_amp(choice: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where supported, fp16 (with a grad scaler) on older GPUs, fp32 on CPU.

    On a CPU, an explicit `bf16` is honoured when the CPU has bf16 matrix units (1.6x faster for
    ViT-B here, see BENCHMARKS.md); fp16 is never used on a CPU.
    """
    if device.type != "cuda":
        if choice == "bf16" and cpu_has_bf16_matmul():
            return torch.bfloat16
        if choice in ("bf16", "fp16"):
            from .progress import console

            console.print(f"[yellow]amp={choice} ignored on this {device.type}; training in fp32[/]")
        return None
    if choice == "off":
        return None
    if choice == "fp16":
        return torch.float16
    if choice == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def fused_optimizer(device: torch.device) -> bool:
    """Adam(W)'s fused kernel: one pass over each tensor on CUDA and on the CPU (3x the CPU for-loop here)."""
    return device.type in ("cuda", "cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_cpu_memory(device: torch.device) -> list[str]:
    """On a CPU, ask glibc to keep freed activation memory for the next step instead of returning it
    to the OS. Returns the note for the run's log (none off the CPU or where it does not apply).

    Why: a CPU training step frees and re-allocates the same tens of MB of activations every step.
    By default glibc serves such blocks with mmap and trims the heap top, so each step page-faults them
    in again (about 500,000 faults and a fifth of the step at the small recipe, BENCHMARKS.md). Blocks
    up to 32 MiB now come from the heap and the heap keeps up to 1 GiB of free top. The process holds
    its peak step memory between steps. A no-op where the C library is not glibc.
    """
    if device.type != "cpu" or not _glibc_keeps_freed_memory():
        return []
    return ["CPU: freed step memory is kept for the next step (fewer page faults)"]


@functools.cache
def _glibc_keeps_freed_memory() -> bool:
    """The two mallopt calls, once per process; False where there is no glibc."""
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype`, or a no-op context for fp32 (dtype None)."""
    from contextlib import nullcontext

    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def use_deterministic_kernels(enabled: bool) -> None:
    """Ask PyTorch for deterministic kernels (slower on GPUs; CPU training is deterministic without it)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------- reading device values late
class LateReader:
    """Device values (the loss means of a log window) read on the host one window later, without a sync.

    `push` starts a copy of the values to host memory (pinned and non-blocking on a GPU, behind the
    window's own kernels) and hands back the entries pushed before it, whose copies finished while the
    next window ran: waiting on their events costs nothing, where `.tolist()` on the newest values would
    drain the whole queue of launched kernels. `drain` returns every entry now (one sync): before a
    checkpoint is saved, which must never hold a diverged state, and at the end of the run.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, Any]] = []

    def push(self, values: torch.Tensor, info: Any) -> list[tuple[list[float], Any]]:
        """Queue `values` (a small 1-d device tensor) with `info`; return the older entries, read."""
        values = values.detach()
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = values.clone(), None
        ready, self._pending = self._pending, [(host, copied, info)]
        return [self._read(entry) for entry in ready]

    def drain(self) -> list[tuple[list[float], Any]]:
        """Every queued entry, read now (waits for its copy)."""
        ready, self._pending = self._pending, []
        return [self._read(entry) for entry in ready]

    @staticmethod
    def _read(entry: tuple[torch.Tensor, torch.cuda.Event | None, Any]) -> tuple[list[float], Any]:
        host, copied, info = entry
        if copied is not None:
            copied.synchronize()
        return host.tolist(), info


# ---------------------------------------------------------------------------- random state
def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global random state as tensors and plain values (loadable with weights_only)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"]), None))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_ahead(work: Callable[[T], R], items: Iterable[T], *, workers: int,
               ahead: int | None = None) -> Iterator[tuple[T, Future]]:
    """(item, future of `work(item)`) in the items' order, with up to `ahead` items (default 2 x workers) being
    worked on by `workers` threads while the caller uses the earlier ones.

    Why: `m2dx predict` spends most of its time decoding and computing log-mels on the host, which release
    the GIL (soundfile, torch ops), while the model waits; reading the next recordings during the current
    one's forward pass keeps the device fed. The caller calls `future.result()` inside its own error
    handling, so a failing item is reported where it would have been without read-ahead. `workers` 0:
    each item is worked on when its result is asked for, in the caller's thread (no thread at all).
    Memory is bounded: at most `ahead` results wait in memory."""
    if workers <= 0:
        for item in items:
            yield item, _Deferred(work, item)
        return
    depth = max(1, ahead if ahead is not None else 2 * workers)
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m2dx-read") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(work, item)))
                if len(pending) >= depth:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:  # the caller stopped early (an error, Ctrl-C): nothing more starts, running work finishes
            for _, future in pending:
                future.cancel()


class _Deferred(Future):
    """A future whose work runs in the caller's thread when `result()` is first asked for."""

    def __init__(self, work: Callable[[Any], Any], item: Any):
        super().__init__()
        self._work, self._item = work, item

    def _run(self) -> None:
        if not self.done():
            try:
                self.set_result(self._work(self._item))
            except BaseException as exc:  # kept, then raised like a thread's future raises it
                self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)
