"""M2D / M2D-X pre-training: further pre-training on a team's recordings, or from scratch on AudioSet.

Features, each with the recipe key (or CLI flag) that controls it:
- base checkpoint initialises online encoder, target and predictor (`base`); empty = from scratch (`model.*`)
- offline task: frozen teacher (default: the base), labels from the manifest, or none (`objective.offline_task`)
- background noise mixed in the log-mel domain on the training device (`data.noise`, `data.noise_ratio`),
  routed to the M2D branch as in the paper or as in the reference code (`data.routing`)
- small-data inflation to a minimum epoch size (`data.min_ds_size`)
- AMP (bf16 / fp16 + scaler / fp32 on CPU) (`run.amp`), gradient accumulation (`optim.accum_steps`),
  AdamW with decay groups, warm-up + cosine LR per iteration, clipping, EMA of the target (`objective.ema_*`; docs/METHOD.md)
- checkpoints in the published layout every `run.save_every` epochs, and a resume state at the first epoch
  end after every `run.resume_every_minutes`; both written atomically by a background thread from a host
  snapshot, so the loop never waits on the disk; `resume_run(run_dir)` continues exactly (model, optimiser,
  scaler, RNG, epoch)
- no host sync between log lines: loss means are read one log window late (`runtime.LateReader`), and a
  non-finite loss still stops the run within one window; one loader iterator spans all epochs, so the
  next epoch's first batches are loaded while the current one ends
- throughput: each log line's `samples_per_s` (its window), and on each epoch-end row
  `wall_samples_per_s`, from the previous epoch's end to this one (saves and loader start included)
- DDP when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU

A run directory holds `recipe.toml` (resolved), `metrics.jsonl`, `environment.json`, the checkpoint
folder named by the published convention, `state/last.pth` and `report/` (progress report).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from .audio import FrontEndConfig
from .config import load_recipe, save_resolved, to_dict
from .data.crops import KeyedSampler, PretrainItems, mix_in_log_domain
from .errors import ConfigError
from .fileio import atomic_write_json
from .models.m2d import M2D
from .models.cpu_kernels import use_fast_cpu_kernels
from .models.vit import param_groups
from .objectives import (
    OfflineTask,
    TeacherTask,
    effective_lr,
    ema_decay_at,
    lr_at,
    norm_cosine_loss,
    random_masking,
)
from .progress import MetricLogger, console, environment_facts, make_progress
from .recipes import PretrainRecipe, pretrain_notes, validate_pretrain_recipe
from .rundir import RunLock, default_run_dir, hold, remove_stale_temp_files
from .runtime import (
    LateReader,
    TrainingDiverged,
    autocast,
    epoch_shuffle_seed,
    fused_optimizer,
    init_distributed,
    keep_freed_cpu_memory,
    pick_amp,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    stream_seed,
    use_deterministic_kernels,
)
from .pretrain_setup import (
    EpochBatches,
    build_offline_task,
    freeze_initial_encoder,
    load_teacher,
    prepare_data,
    record_geometry,
)
from .weights import open_checkpoint


# ---------------------------------------------------------------------------- the trainer
class Pretrainer:
    """Holds the parts of one run; `train()` is the loop. Built by `start_run` / `resume_run`."""

    def __init__(self, recipe: PretrainRecipe, run_dir: Path, resume_from: Path | None = None,
                 on_save: Callable[[Path], None] | None = None):
        validate_pretrain_recipe(recipe)
        self.recipe, self.run_dir, self.on_save = recipe, run_dir, on_save
        self.ddp = init_distributed(recipe.run.device)
        self.device = pick_device(recipe.run.device, self.ddp.local_rank)
        self.amp_dtype = pick_amp(recipe.run.amp, self.device)
        use_deterministic_kernels(recipe.run.deterministic)
        seed_everything(stream_seed(recipe.run.seed, "model"))  # the same initial model (and teacher) on every rank
        resume = ckpt_io.LoadedCheckpoint(resume_from) if resume_from else None
        base = open_checkpoint(recipe.base) if (recipe.base and resume is None) else None
        meta = resume.meta if resume else {}
        vit = (resume or base).vit_config if (resume or base) else recipe.model.vit_config()
        self.frontend = FrontEndConfig.for_sample_rate(vit.sample_rate)
        self.crop_frames = vit.input_size[1]
        stats = tuple(meta["norm_stats"]) if "norm_stats" in meta else None
        if self.ddp.enabled and not self.ddp.is_main:
            dist.barrier()  # rank 0 fills the log-mel cache first; the others then only read it
        self.data = prepare_data(recipe, self.frontend, self.crop_frames, stats, meta.get("noise_mean"),
                                 progress=self.ddp.is_main, rank=self.ddp.rank)
        if self.ddp.enabled and self.ddp.is_main:
            dist.barrier()
        teacher = load_teacher(recipe) if recipe.objective.offline_task == "teacher" else None
        offline_dim = {"teacher": vit.grid_size[0] * vit.embed_dim, "labels": len(self.data.label_names),
                       "none": None}[recipe.objective.offline_task]
        if teacher is not None:
            offline_dim = teacher.frame_feature_dim
        source = resume or base
        if source is not None:
            self.model, self.notes = ckpt_io.build_m2d_from(source, offline_dim)
        else:
            self.model = M2D(vit, recipe.model.predictor_config(), offline_dim=offline_dim)
            self.notes = ["trained from scratch (no base checkpoint)"]
        self.model.norm_stats.copy_(torch.tensor([self.data.mean, self.data.std]))
        self.notes += record_geometry(recipe.model, self.model)  # recipe.toml states what is trained, not what was asked
        if recipe.objective.offline_task == "teacher" and teacher is None:
            teacher, saved = freeze_initial_encoder(self.model, run_dir)
            recipe.objective.teacher = str(saved)
            self.notes.append(f"no base checkpoint: the teacher is the frozen initial encoder ({saved})")
        self.notes += use_fast_cpu_kernels([self.model, teacher], self.device, self.amp_dtype)
        self.notes += keep_freed_cpu_memory(self.device)
        self.notes += pretrain_notes(recipe)
        if teacher is not None and self.amp_dtype == torch.bfloat16:
            teacher.to(torch.bfloat16)  # frozen: cast once, not at every step (autocast would cast its weights anew)
        self.task = build_offline_task(recipe, self.data.label_names, teacher, self.device)
        if teacher is not None and (teacher.config.input_size[1] != vit.input_size[1]
                                    or teacher.config.patch_size[1] != vit.patch_size[1]):
            raise ConfigError("the teacher must have the same input width and patch width as the model")
        self.model.to(self.device)
        seed_everything(stream_seed(recipe.run.seed, "masks", self.ddp.rank))  # masks differ between ranks

        o = recipe.optim
        self.lr = effective_lr(o.blr, o.batch_size, o.accum_steps, self.ddp.world_size)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=self.lr, betas=tuple(o.betas),
                                           fused=fused_optimizer(self.device))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ddp_model = self.model
        if self.ddp.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if recipe.run.compile:
            self.ddp_model = compile_for_training(self.ddp_model, self.task)

        self.sampler = self._make_sampler()
        self.steps_per_epoch = len(self.sampler) // o.batch_size  # data iterations (whole batches)
        if self.steps_per_epoch < o.accum_steps:
            raise ConfigError(
                f"an epoch has {self.steps_per_epoch} batches, fewer than optim.accum_steps={o.accum_steps}; "
                "lower the batch size or raise data.min_ds_size"
            )
        self.total_iters = o.epochs * self.steps_per_epoch
        self.epoch, self.opt_step = 0, 0
        self.folder_name = meta.get("folder_name") or ckpt_io.checkpoint_folder_name(
            vit, offline=self.task is not None, tag=recipe.run.tag)
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------ data loader
    def _make_sampler(self) -> KeyedSampler:
        """The shuffle (per rank under DDP), its items numbered by epoch and stream position."""
        if self.ddp.enabled:
            base = torch.utils.data.distributed.DistributedSampler(
                self.data.dataset, num_replicas=self.ddp.world_size, rank=self.ddp.rank,
                shuffle=True, seed=self.recipe.run.seed, drop_last=True)
        else:
            self._sampler_gen = torch.Generator()
            base = torch.utils.data.RandomSampler(self.data.dataset, generator=self._sampler_gen)
        return KeyedSampler(base)

    def _make_loader(self, first_epoch: int, batches_per_epoch: int) -> torch.utils.data.DataLoader:
        """One loader for the epochs left: its workers crop the audio and noise, and its single iterator runs
        across epoch boundaries, so the next epoch's first batches are ready when the current one ends.

        Every item is keyed by (epoch, stream position, index) and seeded from that key, so the batches
        do not depend on the number of workers or on how far ahead they load, and a resumed run sees the
        same ones as an uninterrupted run.
        """
        d = self.recipe.data
        stream = EpochBatches(self.sampler, self._seed_epoch, self.recipe.optim.batch_size, batches_per_epoch,
                              first_epoch, self.recipe.optim.epochs)
        items = PretrainItems(self.data.dataset, self.data.noise, seed=self.recipe.run.seed, rank=self.ddp.rank)
        return torch.utils.data.DataLoader(
            items, batch_sampler=stream, num_workers=d.loader_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.recipe.run.seed),  # leaves the global RNG (masks) alone
        )

    def _seed_epoch(self, epoch: int) -> None:
        """The shuffle order of epoch e depends only on (seed, e, rank); crops and noise on the item keys."""
        if not self.ddp.enabled:
            self._sampler_gen.manual_seed(epoch_shuffle_seed(self.recipe.run.seed, epoch))
        self.sampler.set_epoch(epoch)

    # ------------------------------------------------------------ state
    def _restore(self, resume: ckpt_io.LoadedCheckpoint) -> None:
        meta = resume.meta
        self.epoch = int(resume.raw.get("epoch", 0))
        self.opt_step = int(meta.get("opt_step", 0))
        if resume.raw.get("optimizer"):
            self.optimizer.load_state_dict(resume.raw["optimizer"])
        if self.scaler is not None and resume.raw.get("scaler"):
            self.scaler.load_state_dict(resume.raw["scaler"])
        ranks = meta.get("per_rank") or []
        if self.ddp.rank < len(ranks):
            set_rng_state(ranks[self.ddp.rank]["rng"])  # crops and noise need nothing: they follow the item keys
        else:
            console.print("[yellow]warning: the checkpoint has no state for this rank; its random streams restart[/]")
        if int(meta.get("seed", self.recipe.run.seed)) != self.recipe.run.seed:
            console.print("[yellow]warning: the recipe seed differs from the checkpoint's: the masks continue from the "
                          "checkpoint, the crops and noise follow the new seed[/]")

    def _random_state(self) -> dict[str, Any]:
        """This rank's random streams (the masks); crops and noise are pure functions of the item keys."""
        return {"rng": rng_state()}

    def _gather_random_states(self) -> list[dict[str, Any]]:
        """Every rank's random streams (a collective: all ranks call it), so DDP resumes exactly too."""
        own = self._random_state()
        if not self.ddp.enabled:
            return [own]
        gathered: list[Any] = [None] * self.ddp.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def _checkpoint_dict(self, random_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The resume state with live tensors (the saver snapshots them to host memory)."""
        meta = {
            "recipe": to_dict(self.recipe),
            "norm_stats": [self.data.mean, self.data.std],
            "noise_mean": self.data.noise.mean if self.data.noise is not None else None,
            "opt_step": self.opt_step,
            "data_iter": self.epoch * self.steps_per_epoch,
            "offline_task": self.task.name if self.task is not None else "none",
            "label_names": self.data.label_names,
            "folder_name": self.folder_name,
            "seed": self.recipe.run.seed,
            "per_rank": random_states,  # the RNGs of every rank (one entry without DDP)
        }
        return ckpt_io.training_checkpoint(
            self.model, epoch=self.epoch, optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            args=to_dict(self.recipe), meta=meta, on_device=True)

    def save(self, saver: ckpt_io.BackgroundSaver, published: bool, random_states: list[dict[str, Any]]) -> Path:
        """Hand the state at this epoch end to the background writer: the published-layout checkpoint
        (every `save_every` epochs and the last), else `state/last.pth`. Returns the path it will have."""
        state = self._checkpoint_dict(random_states)
        path = (self.run_dir / self.folder_name / f"checkpoint-{self.epoch}.pth" if published
                else self.run_dir / ckpt_io.RESUME_STATE)

        def after(written: Path) -> None:  # in the writer thread, once `written` is whole on disk
            if published:
                (self.run_dir / ckpt_io.RESUME_STATE).unlink(missing_ok=True)  # the newer resume point
                if self.on_save is not None and self.recipe.run.report_on_save:
                    self.on_save(written)

        saver.submit(state, path, after)
        return path

    def _agreed(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (time-based decisions differ between ranks' clocks)."""
        if not self.ddp.enabled:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())  # an epoch-end collective under DDP only

    # ------------------------------------------------------------ one step
    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(M2D input, teacher input), normalised; noise (cropped by the loader) mixed on the device (docs/METHOD.md, "Background noise")."""
        lms = batch["lms"].to(self.device, non_blocking=True)
        mean, std = self.data.mean, self.data.std
        if self.data.noise is None:
            clean = (lms - mean) / std
            return clean, clean
        noise = batch["noise"].to(self.device, non_blocking=True)
        clean, mixed = mix_in_log_domain(lms, noise, self.recipe.data.noise_ratio, mean, self.data.noise.mean, std)
        return (mixed, clean) if self.recipe.data.routing == "paper" else (clean, mixed)

    def _losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m2d_input, teacher_input = self._inputs(batch)
        if "label" in batch:
            batch = {**batch, "label": batch["label"].to(self.device, non_blocking=True)}
        o = self.recipe.objective
        return m2dx_losses(self.model, self.ddp_model, self.task, m2d_input, teacher_input, batch,
                           mask_ratio=o.mask_ratio, lambda_m2d=o.lambda_m2d, lambda_off=o.lambda_off,
                           amp_dtype=self.amp_dtype)

    # ------------------------------------------------------------ the loop
    def train(self, progress: bool = True) -> Path:
        """The loop. The host never waits for the device between log lines, nor for the disk at saves."""
        o, r = self.recipe.optim, self.recipe.run
        accum = o.accum_steps
        # rows a killed process logged after the resume point are dropped: the log never repeats a step
        logger = MetricLogger(self.run_dir / "metrics.jsonl", keep_until_step=self.opt_step) if self.ddp.is_main else None
        saver = ckpt_io.BackgroundSaver()
        late = LateReader()  # loss means of a log window, read at the next log line
        show = progress and self.ddp.is_main
        stop = False
        usable = (self.steps_per_epoch // accum) * accum  # whole accumulation cycles only
        batches = iter(self._make_loader(self.epoch, usable))
        last_resume_save = time.monotonic()
        boundary = time.perf_counter()  # the previous epoch's end (or the start): wall figures count from here
        try:
            with make_progress() as bar:  # counts the data iterations that are trained: it ends at its total
                task_id = bar.add_task("pre-train", total=o.epochs * usable, completed=self.epoch * usable,
                                       status="", visible=show)

                def emit(ready: list[tuple[list[float], dict[str, Any]]]) -> None:
                    """Log rows whose values have reached the host; stop on a non-finite loss."""
                    for values, info in ready:
                        row = self._row(values, info)
                        if logger:
                            logger.log(row, row["opt_step"])
                        self._check_finite(row, saver)
                        if not row.get("epoch_end"):
                            bar.update(task_id, status=_status(row))

                while self.epoch < o.epochs and not stop:
                    self.ddp_model.train()
                    sums = torch.zeros(3, device=self.device)  # (loss, loss_m2d, loss_offline) summed over the epoch
                    count, t0, samples = 0, time.perf_counter(), 0
                    epoch_t0, epoch_samples = t0, 0
                    for i in range(usable):
                        batch = next(batches)
                        it = self.epoch * self.steps_per_epoch + i
                        if i % accum == 0:
                            lr = lr_at(it / self.steps_per_epoch, self.lr, o.warmup_epochs, o.epochs, o.min_lr)
                            for group in self.optimizer.param_groups:
                                group["lr"] = lr
                        last_micro = (i + 1) % accum == 0
                        sync = self.ddp_model.no_sync() if (self.ddp.enabled and not last_micro) else nullcontext()
                        with sync:
                            losses = self._losses(batch)
                            scaled = losses["loss"] / accum  # mean over micro-batches = one big batch
                            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                        sums += torch.stack([losses["loss"].detach().float(), losses["loss_m2d"].detach().float(),
                                             losses.get("loss_offline", torch.zeros((), device=self.device)).detach().float()])
                        count += 1
                        samples += batch["lms"].shape[0] * self.ddp.world_size
                        epoch_samples += batch["lms"].shape[0] * self.ddp.world_size
                        if not last_micro:
                            continue
                        decay = ema_decay_at(it, self.total_iters, self.recipe.objective.ema_start,
                                             self.recipe.objective.ema_end)
                        optimizer_step(self.model, self.optimizer, self.scaler, o.clip_grad, decay)
                        self.opt_step += 1
                        bar.update(task_id, completed=self.epoch * usable + i + 1)
                        if self.opt_step % r.log_every == 0 or (r.max_steps and self.opt_step >= r.max_steps):
                            info = self._row_info(lr, decay, samples / (time.perf_counter() - t0))
                            emit(late.push(sums / max(count, 1), info))
                            t0, samples = time.perf_counter(), 0  # throughput of the last window only
                        if r.max_steps and self.opt_step >= r.max_steps:
                            stop = True
                            break
                    now = time.perf_counter()
                    info = self._row_info(lr, decay, epoch_samples / (now - epoch_t0))
                    info.update(epoch_end=True, wall_samples_per_s=epoch_samples / (now - boundary))
                    boundary = now
                    self.epoch += 1
                    emit(late.push(sums / max(count, 1), info))
                    published = self.epoch % r.save_every == 0 or self.epoch >= o.epochs or stop
                    due = published or time.monotonic() - last_resume_save >= r.resume_every_minutes * 60
                    if self._agreed(due):
                        emit(late.drain())  # a saved state is never a diverged one
                        random_states = self._gather_random_states()
                        if self.ddp.is_main:
                            self.save(saver, published, random_states)
                        last_resume_save = time.monotonic()
                        if self.ddp.enabled:
                            dist.barrier()
                emit(late.drain())
                if stop:  # run.max_steps ended the run early: the bar says the run is done, at the step it stopped
                    done = int(next(t.completed for t in bar.tasks if t.id == task_id))
                    bar.update(task_id, total=done, completed=done)
        finally:
            saver.close()  # the last save (and its report refresh) is whole on disk before the run returns
            if logger:
                logger.close()
        if self.ddp.enabled:
            dist.destroy_process_group()
        return self.run_dir

    def _row_info(self, lr: float, decay: float, samples_per_s: float) -> dict[str, Any]:
        """What a log row knows on the host when its window ends; the losses follow one window late."""
        return {"epoch": self.epoch + 1, "opt_step": self.opt_step, "lr": lr, "ema_decay": decay,
                "samples_per_s": samples_per_s}

    def _row(self, means: list[float], info: dict[str, Any]) -> dict[str, Any]:
        extra = {k: v for k, v in info.items() if k not in ("epoch", "opt_step", "lr", "ema_decay", "samples_per_s")}
        row = {"epoch": info["epoch"], "opt_step": info["opt_step"], "loss": means[0], "loss_m2d": means[1],
               "lr": info["lr"], "ema_decay": info["ema_decay"], "samples_per_s": info["samples_per_s"]}
        if self.task is not None:
            row["loss_offline"] = means[2]
        return {**row, **extra}

    def _check_finite(self, row: dict[str, Any], saver: ckpt_io.BackgroundSaver) -> None:
        if not math.isfinite(row["loss"]):
            saver.wait()  # the save in flight holds a state from before the divergence: let it finish
            last = saver.last_complete
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"loss became {row['loss']} at epoch {row['epoch']} step {row['opt_step']}; {where}; "
                "lower optim.blr or run with --amp off"
            )


def compile_for_training(forward_model: torch.nn.Module, task: OfflineTask | None,
                         mode: str = "default") -> torch.nn.Module:
    """torch.compile the trained model and, with the teacher task, the frozen teacher's forward.

    The teacher is ~14% of an M2D-X ViT-B step's FLOPs; left eager it costs the loop what the
    compiled step gains. Returns the compiled forward model; the task is changed in place.
    """
    if isinstance(task, TeacherTask):
        task.teacher.encode_lms = torch.compile(task.teacher.encode_lms, mode=mode)
    return torch.compile(forward_model, mode=mode)


def m2dx_losses(model: M2D, forward_model: torch.nn.Module, task: OfflineTask | None, m2d_input: torch.Tensor,
                teacher_input: torch.Tensor, batch: dict[str, torch.Tensor], *, mask_ratio: float,
                lambda_m2d: float, lambda_off: float, amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One micro-batch of M2D(-X): mask, forward (through `forward_model`, e.g. the DDP wrapper), losses.

    Shared by the training loop and `benchmarks/pretrain_step.py` so the benchmark measures this code.
    """
    device = m2d_input.device
    ids_shuffle, len_keep = random_masking(m2d_input.shape[0], model.config.num_patches, mask_ratio, device)
    with autocast(device, amp_dtype):
        out = forward_model(m2d_input, ids_shuffle, len_keep)
        loss_m2d = norm_cosine_loss(out["predicted"], out["target"])
        losses = {"loss_m2d": loss_m2d}
        total = lambda_m2d * loss_m2d
        if task is not None:
            loss_off = task.loss(out["offline"], task.targets(batch, teacher_input))
            losses["loss_offline"] = loss_off
            total = total + lambda_off * loss_off
    losses["loss"] = total
    return losses


def optimizer_step(model: M2D, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   clip_grad: float, ema_decay: float) -> None:
    """Unscale (fp16), clip, step, zero the gradients, then move the EMA target: no host sync."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_target(ema_decay)


def _status(row: dict[str, Any]) -> str:
    parts = [f"ep {row['epoch']}", f"loss {row['loss']:.4f}", f"m2d {row['loss_m2d']:.4f}"]
    if "loss_offline" in row:
        parts.append(f"off {row['loss_offline']:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"ema {row['ema_decay']:.6f}", f"{row['samples_per_s']:.1f} samples/s"]
    return "  ".join(parts)


# ---------------------------------------------------------------------------- entry points
def _hold_if_main(run_dir: Path, command: str) -> RunLock | None:
    """Rank 0 holds the run folder's lock (the other DDP ranks write nothing of their own there)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = hold(run_dir, command)
    remove_stale_temp_files(run_dir)  # half-written files of a killed earlier holder
    return lock


def start_run(recipe: PretrainRecipe, on_save: Callable[[Path], None] | None = None, progress: bool = True,
              command: str = "m2dx further-pretrain") -> Path:
    """A new run: take the folder, write the resolved recipe and environment facts, then train."""
    run_dir = Path(recipe.run.out) if recipe.run.out else default_run_dir(recipe.name)
    lock = _hold_if_main(run_dir, command)
    try:
        if ckpt_io.latest_resume_point(run_dir) is not None:
            raise ConfigError(f"{run_dir}: already holds a run; resume it with --resume {run_dir} or pick another --out")
        recipe.run.out = str(run_dir)
        trainer = Pretrainer(recipe, run_dir, on_save=on_save)
        if trainer.ddp.is_main:
            save_resolved(recipe, run_dir / "recipe.toml", header=f"resolved recipe of run {run_dir.name}")
            facts = {**environment_facts(), "world_size": trainer.ddp.world_size, "device": str(trainer.device),
                     "amp": str(trainer.amp_dtype), "notes": trainer.notes}
            atomic_write_json(run_dir / "environment.json", facts, end="")
            for note in trainer.notes:
                console.print(f"[dim]{note}[/]")
        return trainer.train(progress)
    finally:
        if lock is not None:
            lock.release()


def resume_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (),
               on_save: Callable[[Path], None] | None = None, progress: bool = True,
               command: str = "m2dx further-pretrain --resume") -> Path:
    """Continue a run from its newest checkpoint with the recipe saved in the run (plus overrides)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise ConfigError(f"{run_dir}: no recipe.toml here; pass the run directory that further-pretrain created")
    fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("model.", "base"))]
    if fixed:  # the run's checkpoints decide the geometry and the base: an override would be silently ignored
        raise ConfigError(f"{run_dir}: --resume continues the model the run's checkpoints hold; drop "
                          f"{', '.join(fixed)} (or start a new run with it)")
    lock = _hold_if_main(run_dir, command)
    try:
        recipe = load_recipe(PretrainRecipe, run_dir / "recipe.toml", overrides)
        point = ckpt_io.latest_resume_point(run_dir)
        if point is None:
            console.print(f"[yellow]{run_dir}: no checkpoint yet; starting the run from the beginning[/]")
        trainer = Pretrainer(recipe, run_dir, resume_from=point, on_save=on_save)
        if trainer.ddp.is_main and overrides:  # recipe.toml states what the resumed run trains (e.g. --epochs)
            save_resolved(recipe, run_dir / "recipe.toml",
                          header=f"resolved recipe of run {run_dir.name}; resumed with {' '.join(overrides)}")
        if trainer.ddp.is_main and point is not None:
            console.print(f"resuming {run_dir} from {point} (epoch {trainer.epoch}, step {trainer.opt_step})")
        return trainer.train(progress)
    finally:
        if lock is not None:
            lock.release()


def start_or_resume(recipe: str | Path, resume: Path | None, overrides: list[str],
                    on_save: Callable[[Path], None] | None = None, command: str = "m2dx further-pretrain") -> Path:
    """What `further-pretrain` and `pretrain` do: continue RUN_DIR (`resume`), or start a new run of `recipe`."""
    if resume is not None:
        return resume_run(resume, overrides, on_save=on_save, command=f"{command} --resume")
    return start_run(load_recipe(PretrainRecipe, recipe, overrides), on_save=on_save, command=command)
