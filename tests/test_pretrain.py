"""The further-pretraining loop: runs, checkpoints, exact resume, accumulation, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2dx_clinic import checkpoint as ckpt_io
from m2dx_clinic.weights import load_encoder
from m2dx_clinic.config import load_recipe
from m2dx_clinic.demo_data import demo_noise_dir, make_demo_icbhi
from m2dx_clinic.errors import ConfigError, DataError
from m2dx_clinic.models.m2d import M2D, PredictorConfig
from m2dx_clinic.models.vit import AudioViT, ViTConfig
from m2dx_clinic.objectives import TeacherTask
from m2dx_clinic.pretrain import m2dx_losses, resume_run, start_run
from m2dx_clinic.recipes import PretrainRecipe

M2DX = [sys.executable, "-m", "m2dx_clinic"]


@pytest.fixture(scope="module")
def demo_audio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_icbhi(root, num_patients=4, recordings_per_patient=1, seconds=6)
    return root / "ICBHI_final_database"


def tiny_recipe(tmp: Path, audio: Path, *extra: str) -> PretrainRecipe:
    return load_recipe(PretrainRecipe, "tiny_cpu", [
        f"data.data={audio}", f"data.noise={demo_noise_dir()}", f"run.out={tmp / 'run'}",
        f"data.cache_dir={tmp / 'cache'}", "data.min_ds_size=32", "data.norm_stats_samples=64",
        "optim.batch_size=8", "optim.accum_steps=2", "run.log_every=1", *extra])


def test_two_epochs_write_published_checkpoints_that_load(tmp_path, demo_audio):
    run = start_run(tiny_recipe(tmp_path, demo_audio), progress=False)
    found = ckpt_io.list_checkpoints(run)
    assert [e for e, _ in found] == [1, 2]
    folder = found[-1][1].parent.name
    # the published convention: <model>-<F>x<T>p<pf>x<pt>p16k-<yymmdd>; the reference parser splits on '-' and 'p'
    size, patch, rate = folder.split("-")[1].split("p")[:3]
    assert (size, patch, rate) == ("80x200", "16x4", "16k")
    encoder = load_encoder(found[-1][1])
    raw = ckpt_io.load_checkpoint_file(found[-1][1])
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(raw)
    assert raw["epoch"] == 2
    assert "offline_predictor.weight" in raw["model"] and "target_blocks.0.norm1.weight" in raw["model"]
    # norm_stats are the data set's, not AudioSet's defaults
    assert tuple(encoder.norm_stats.tolist()) != (-7.1, 4.2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in rows if r.get("epoch_end")]
    assert [r["epoch"] for r in ends] == [1, 2]
    assert all(k in rows[0] for k in ("loss", "loss_m2d", "loss_offline", "lr", "ema_decay", "samples_per_s"))
    assert (run / "recipe.toml").is_file() and (run / "environment.json").is_file()
    # the resolved recipe reloads as a recipe
    again = load_recipe(PretrainRecipe, run / "recipe.toml")
    assert again.optim.batch_size == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path, demo_audio, workers):
    # with 2 workers the uninterrupted run keeps them across epochs, the resumed one starts new ones
    opts = ("optim.epochs=3", "run.save_every=3", f"data.loader_workers={workers}")
    full = start_run(tiny_recipe(tmp_path / "a", demo_audio, *opts), progress=False)
    # the same run cut after epoch 1 (as if killed during epoch 2), then resumed
    cut = tmp_path / "b"
    recipe = tiny_recipe(cut, demo_audio, *opts)
    from m2dx_clinic.pretrain import Pretrainer

    trainer = Pretrainer(recipe, cut / "run")
    from m2dx_clinic.config import save_resolved

    save_resolved(recipe, cut / "run" / "recipe.toml")
    recipe.optim.epochs = 3
    trainer.recipe.run.max_steps = 2  # one epoch = 2 optimiser steps (32 items / (8 x 2))
    trainer.train(progress=False)
    assert (cut / "run" / "state" / "last.pth").is_file() or ckpt_io.list_checkpoints(cut / "run")
    # resume from the saved state of epoch 1 (max_steps is a run option; the resumed run has none)
    resumed = resume_run(cut / "run", ["run.max_steps=0"], progress=False)
    a = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(full)[-1][1])
    b = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(resumed)[-1][1])
    assert a.epoch == b.epoch == 3
    for key, value in a.state.items():
        assert torch.equal(value, b.state[key]), key


def tiny_m2dx() -> tuple[M2D, TeacherTask]:
    """A 64-d M2D-X model and its frozen teacher, seeded."""
    torch.manual_seed(0)
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=4)
    teacher = TeacherTask(AudioViT(cfg))
    return M2D(cfg, PredictorConfig(64, 1, 4), offline_dim=teacher.out_dim), teacher


def test_every_rank_centres_the_noise_alike_but_draws_its_own(tmp_path, demo_audio):
    from m2dx_clinic.audio import FrontEndConfig
    from m2dx_clinic.pretrain import prepare_data

    recipe = tiny_recipe(tmp_path, demo_audio)
    ranks = [prepare_data(recipe, FrontEndConfig(), 200, None, None, progress=False, rank=r) for r in (0, 1)]
    assert ranks[0].noise.mean == ranks[1].noise.mean
    assert ranks[0].noise.seed != ranks[1].noise.seed
    assert [ranks[0].noise.clip_at(p) for p in range(8)] != [ranks[1].noise.clip_at(p) for p in range(8)]


def test_grad_accumulation_matches_one_big_batch():
    model, teacher = tiny_m2dx()
    x = torch.randn(8, 1, 80, 200)

    def grads(chunks: int) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(123)  # the same masks: rand(8, L) == two rand(4, L) draws in sequence
        for part in x.chunk(chunks):
            losses = m2dx_losses(model, model, teacher, part, part, {}, mask_ratio=0.7, lambda_m2d=1.0,
                                 lambda_off=1.0, amp_dtype=None)
            (losses["loss"] / chunks).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, two = grads(1), grads(2)
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_data_folder_and_missing_noise_fail_before_training(tmp_path, demo_audio):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        start_run(tiny_recipe(tmp_path, empty), progress=False)
    recipe = tiny_recipe(tmp_path, demo_audio, "data.noise=fsd50k", f"data.data_root={tmp_path / 'root'}")
    with pytest.raises(DataError, match="m2dx data download fsd50k"):
        start_run(recipe, progress=False)
    assert not ckpt_io.list_checkpoints(tmp_path / "run")
    with pytest.raises(ConfigError):
        start_run(tiny_recipe(tmp_path, demo_audio, "objective.mask_ratio=1.5"), progress=False)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "sounds"
    bad.mkdir()
    (bad / "broken.wav").write_bytes(b"RIFF....not audio")
    proc = subprocess.run([*M2DX, "further-pretrain", "--recipe", "tiny_cpu", "--data", str(bad), "--noise", "none",
                           "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "broken.wav" in lines[-1] and "--skip-bad" in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compiled_loop_compiles_the_teacher_and_matches_eager(tmp_path, demo_audio):
    """run.compile=true compiles the model and the frozen teacher; the first steps' losses equal eager's."""
    from m2dx_clinic.pretrain import Pretrainer

    losses = {}
    for flag in ("false", "true"):
        recipe = tiny_recipe(tmp_path / flag, demo_audio, f"run.compile={flag}", "run.max_steps=2",
                             "optim.accum_steps=1", "run.report_on_save=false")
        trainer = Pretrainer(recipe, tmp_path / flag / "run")
        compiled = hasattr(trainer.task.teacher.encode_lms, "_torchdynamo_orig_callable")
        assert compiled == (flag == "true") and (trainer.ddp_model is not trainer.model) == compiled
        trainer.train(progress=False)
        rows = [json.loads(line) for line in (tmp_path / flag / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [(r["loss_m2d"], r["loss_offline"]) for r in rows if not r.get("epoch_end")]
    assert len(losses["true"]) == 2
    for eager, compiled in zip(losses["false"], losses["true"]):
        assert compiled == pytest.approx(eager, rel=1e-3)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(tmp_path, demo_audio):
    out = tmp_path / "run"
    args = [*M2DX, "further-pretrain", "--recipe", "tiny_cpu", "--data", str(demo_audio),
            "--noise", str(demo_noise_dir()), "--out", str(out), "--epochs", "6", "--save-every", "1",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.min_ds_size=64"]
    env = {**os.environ, "M2DX_NO_PROGRESS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and len(ckpt_io.list_checkpoints(out)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [e for e, _ in ckpt_io.list_checkpoints(out)]
    assert saved and max(saved) < 6, "the run should have been killed before finishing"
    for _, path in ckpt_io.list_checkpoints(out):
        load_encoder(path)  # every file on disk is complete (atomic writes)
    done = subprocess.run([*M2DX, "further-pretrain", "--resume", str(out)], capture_output=True, text=True,
                          timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e for e, _ in ckpt_io.list_checkpoints(out)] == [1, 2, 3, 4, 5, 6]
    epochs = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()
              if '"epoch_end": true' in l]
    assert epochs[-1] == 6


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_then_resume(tmp_path, demo_audio):
    out = tmp_path / "ddp"
    env = {**os.environ, "M2DX_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*M2DX, "pretrain", "--recipe", "tiny_cpu", "--nproc", "2", "--data", str(demo_audio),
                           "--out", str(out), "--epochs", "1", "--device", "cpu",
                           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.min_ds_size=32",
                           "--set", "optim.batch_size=4", "--set", f"data.noise=\"{demo_noise_dir()}\""],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = ckpt_io.list_checkpoints(out)
    assert [e for e, _ in found] == [1]
    env_facts = json.loads((out / "environment.json").read_text())
    assert env_facts["world_size"] == 2
    meta = ckpt_io.LoadedCheckpoint(found[0][1]).meta
    per_rank = meta["per_rank"]
    assert len(per_rank) == 2  # each rank's RNG (masks), so a resumed DDP run continues exactly
    assert not torch.equal(per_rank[0]["rng"]["torch"], per_rank[1]["rng"]["torch"])
    load_encoder(found[0][1])
    resumed = subprocess.run([*M2DX, "pretrain", "--resume", str(out), "--nproc", "2", "--epochs", "2"],
                             capture_output=True, text=True, timeout=400, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e for e, _ in ckpt_io.list_checkpoints(out)] == [1, 2]


@pytest.mark.slow
@pytest.mark.realdata
def test_further_pretrain_on_shared_icbhi_two_epochs(tmp_path, icbhi_dir, noise_dir):
    proc = subprocess.run([*M2DX, "further-pretrain", "--recipe", "tiny_cpu",
                           "--data", str(icbhi_dir / "ICBHI_final_database"), "--noise", str(noise_dir / "esc10"),
                           "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "M2DX_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = ckpt_io.list_checkpoints(tmp_path / "run")
    assert [e for e, _ in found] == [1, 2]
    assert (tmp_path / "run" / "report" / "report.json").is_file()  # the cheap report refreshed at each save
    load_encoder(found[-1][1])


def test_amp_choice_on_cpu(monkeypatch):
    from m2dx_clinic import runtime

    cpu = torch.device("cpu")
    for available in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: available)
        assert runtime.pick_amp("auto", cpu) is None  # the default: fp32 on CPU
        assert runtime.pick_amp("off", cpu) is None
        assert runtime.pick_amp("fp16", cpu) is None  # never fp16 on a CPU
        assert runtime.pick_amp("bf16", cpu) == (torch.bfloat16 if available else None)


def test_bf16_step_on_cpu_matches_fp32_closely():
    model, teacher = tiny_m2dx()
    x = torch.randn(4, 1, 80, 200)
    values = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)  # the same masks
        losses = m2dx_losses(model, model, teacher, x, x, {}, mask_ratio=0.7, lambda_m2d=1.0, lambda_off=1.0,
                             amp_dtype=dtype)
        losses["loss"].backward()
        values[dtype] = losses["loss"].item()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    assert values[torch.bfloat16] == pytest.approx(values[None], rel=0.05)


def _m2dx_step_values(model, teacher, x) -> tuple[float, list[torch.Tensor]]:
    """One fp32 M2D-X step with fixed masks: the loss and every gradient."""
    torch.manual_seed(1)  # the same masks
    losses = m2dx_losses(model, model, teacher, x, x, {}, mask_ratio=0.7, lambda_m2d=1.0, lambda_off=1.0,
                         amp_dtype=None)
    losses["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return losses["loss"].item(), grads


def test_matmul_attention_gives_the_fused_kernels_losses_and_gradients():
    """The CPU bf16 path's attention (two matmuls + softmax) is the same function as SDPA: checked in fp32."""
    from m2dx_clinic.models.cpu_kernels import use_matmul_attention

    model, teacher = tiny_m2dx()
    x = torch.randn(4, 1, 80, 200)
    fused_loss, fused_grads = _m2dx_step_values(model, teacher, x)
    assert use_matmul_attention(model) == 2 * 2 + 1 and use_matmul_attention(teacher.teacher) == 2
    matmul_loss, matmul_grads = _m2dx_step_values(model, teacher, x)
    assert matmul_loss == pytest.approx(fused_loss, rel=1e-6, abs=1e-6)
    for a, b in zip(fused_grads, matmul_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_onednn_linear_gives_nn_linears_losses_gradients_and_state_dict():
    """The CPU fp32 path's oneDNN products compute the same step; parameters and keys are untouched."""
    import copy

    from m2dx_clinic.models.cpu_kernels import OneDnnLinear, onednn_linear_available, use_onednn_linear

    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    model, teacher = tiny_m2dx()
    x = torch.randn(4, 1, 80, 200)
    keys = list(model.state_dict())
    plain_loss, plain_grads = _m2dx_step_values(model, teacher, x)
    switched = use_onednn_linear(model)
    assert switched == sum(isinstance(m, OneDnnLinear) for m in model.modules()) > 10
    use_onednn_linear(teacher.teacher)
    assert list(model.state_dict()) == keys
    assert isinstance(copy.deepcopy(model).blocks[0].mlp.fc1, OneDnnLinear)  # EMA copies keep the kernels
    fast_loss, fast_grads = _m2dx_step_values(model, teacher, x)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    assert len(fast_grads) == len(plain_grads)
    for a, b in zip(plain_grads, fast_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert use_onednn_linear(model, enabled=False) == switched
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())


def test_onednn_linear_falls_back_where_it_does_not_apply():
    """Autocast, empty batches and graph capture (torch.compile, torch.export, ONNX) see a plain `F.linear`."""
    from m2dx_clinic.models.cpu_kernels import OneDnnLinear

    layer = nn.Linear(6, 3)
    layer.__class__ = OneDnnLinear
    x = torch.randn(2, 5, 6)
    assert layer(x).shape == (2, 5, 3)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    exported = torch.export.export(layer, (x,))  # what torch.compile and the ONNX exporter trace
    assert "mkldnn" not in str(exported.graph) and "linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), layer(x))
    assert layer(torch.zeros(0, 6)).shape == (0, 3)


def test_cpu_training_picks_the_faster_kernels(tmp_path, demo_audio, monkeypatch):
    """bf16: matmul attention in student and teacher; fp32: oneDNN linear layers, SDPA attention."""
    from m2dx_clinic import runtime
    from m2dx_clinic.models.cpu_kernels import OneDnnLinear, onednn_linear_available
    from m2dx_clinic.pretrain import Pretrainer

    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: True)
    recipe = tiny_recipe(tmp_path, demo_audio, "run.amp=bf16")
    trainer = Pretrainer(recipe, tmp_path / "run")
    attention = [m for m in trainer.model.modules() if hasattr(m, "fused_attn")]
    assert attention and not any(m.fused_attn for m in attention)
    assert not any(m.fused_attn for m in trainer.task.teacher.modules() if hasattr(m, "fused_attn"))
    assert not any(isinstance(m, OneDnnLinear) for m in trainer.model.modules())
    fp32 = Pretrainer(tiny_recipe(tmp_path / "b", demo_audio), tmp_path / "b" / "run")
    assert all(m.fused_attn for m in fp32.model.modules() if hasattr(m, "fused_attn"))
    if onednn_linear_available():
        assert isinstance(fp32.model.blocks[0].attn.qkv, OneDnnLinear)
        assert isinstance(fp32.task.teacher.blocks[0].mlp.fc2, OneDnnLinear)
        assert any("oneDNN" in note for note in fp32.notes)


def test_freed_cpu_memory_is_kept_only_for_cpu_runs():
    """The glibc setting applies to CPU runs and says so in the run's notes; other devices get nothing."""
    import platform

    from m2dx_clinic.runtime import keep_freed_cpu_memory

    assert keep_freed_cpu_memory(torch.device("meta")) == []
    notes = keep_freed_cpu_memory(torch.device("cpu"))
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert len(notes) == 1 and "freed step memory" in notes[0]
    assert keep_freed_cpu_memory(torch.device("cpu")) == notes  # applied once, the same answer after


# ---------------------------------------------------------------------------- the loop never waits (issue 26)
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")  # device -> host reads


def _host_reads_during_training(monkeypatch, trainer) -> tuple[list[str], int]:
    """Train, counting every device-to-host read on the training thread: returns the reads that did not go
    through `LateReader` (with their call sites) and the number that did.

    The loader's own host tensors (shuffles and crops, in worker processes on a real run) never reach the
    device and are not counted; nor is the background writer's thread.
    """
    outside: list[str] = []
    late = [0]
    main = threading.main_thread()

    def counted(name, real):
        def read(self, *args, **kwargs):
            if threading.current_thread() is main:
                frame, where = sys._getframe(1), None
                while frame is not None:
                    file = frame.f_code.co_filename.replace(os.sep, "/")
                    if where is None:
                        where = f"{name} at {Path(file).name}:{frame.f_lineno}"
                    if frame.f_code.co_name == "_read" and file.endswith("m2dx_clinic/runtime.py"):
                        late[0] += 1
                        break
                    if "torch/utils/data/" in file or "m2dx_clinic/data/" in file:
                        break
                    frame = frame.f_back
                else:
                    outside.append(where)
            return real(self, *args, **kwargs)
        return read

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        trainer.train(progress=False)
    finally:
        monkeypatch.undo()
    return outside, late[0]


def test_between_log_lines_the_loop_never_reads_the_device(tmp_path, demo_audio, monkeypatch):
    """Every value the loop reads back (losses for the log and the NaN check) goes through the late reader,
    one read per logged row; a read added to the step (here `.item()` on the loss) is caught."""
    import m2dx_clinic.pretrain as pretrain

    opts = ("optim.epochs=2", "run.log_every=2", "data.min_ds_size=64", "run.report_on_save=false")
    trainer = pretrain.Pretrainer(tiny_recipe(tmp_path / "a", demo_audio, *opts), tmp_path / "a" / "run")
    outside, late = _host_reads_during_training(monkeypatch, trainer)
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert outside == []
    assert late == len(rows) == 2 * 2 + 2  # 4 steps per epoch, a row every 2 steps, and each epoch's end row

    real = pretrain.m2dx_losses

    def reads_every_step(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["loss"].item()
        return losses

    monkeypatch.setattr(pretrain, "m2dx_losses", reads_every_step)
    trainer = pretrain.Pretrainer(tiny_recipe(tmp_path / "b", demo_audio, *opts), tmp_path / "b" / "run")
    outside, _ = _host_reads_during_training(monkeypatch, trainer)
    assert len(outside) == 16 and outside[0].startswith("item at test_pretrain.py")  # 8 batches per epoch


@pytest.mark.parametrize("minutes, saved", [(0, ["last.pth@1", "checkpoint-2.pth@2"]), (60, ["checkpoint-2.pth@2"])])
def test_resume_state_waits_for_its_interval_and_one_loader_iterator_spans_the_run(
        tmp_path, demo_audio, monkeypatch, minutes, saved):
    """The resume state follows run.resume_every_minutes; published checkpoints and the end are always saved.
    The loader is iterated once for the whole run, so its workers load across epoch boundaries."""
    submitted, iterators = [], []
    real_submit, real_iter = ckpt_io.BackgroundSaver.submit, torch.utils.data.DataLoader.__iter__

    def submit(self, state, path, after=None):
        submitted.append(f"{Path(path).name}@{state['epoch']}")
        return real_submit(self, state, path, after)

    def iterate(self):
        iterators.append(self)
        return real_iter(self)

    monkeypatch.setattr(ckpt_io.BackgroundSaver, "submit", submit)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iterate)
    run = start_run(tiny_recipe(tmp_path, demo_audio, "optim.epochs=2", "run.save_every=2",
                                f"run.resume_every_minutes={minutes}", "run.report_on_save=false"), progress=False)
    assert submitted == saved and len(iterators) == 1
    assert not (run / "state" / "last.pth").exists()  # the published checkpoint of epoch 2 replaced it
    ends = [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
            if r.get("epoch_end")]
    assert [r["epoch"] for r in ends] == [1, 2] and all(r["wall_samples_per_s"] > 0 for r in ends)


def test_the_background_saver_writes_the_state_as_it_was_and_reports_a_failed_write(tmp_path):
    saver = ckpt_io.BackgroundSaver()
    weights = torch.zeros(4)
    saver.submit({"model": {"w": weights}, "epoch": 1}, tmp_path / "a.pth")
    weights += 1  # the loop goes on training while the file is written
    saver.close()
    assert torch.equal(torch.load(tmp_path / "a.pth")["model"]["w"], torch.zeros(4))
    assert saver.last_complete == tmp_path / "a.pth"
    (tmp_path / "file").write_text("")
    saver.submit({"epoch": 2}, tmp_path / "file" / "b.pth")  # its folder cannot be made
    with pytest.raises(OSError):
        saver.close()
    assert saver.last_complete == tmp_path / "a.pth" and not list(tmp_path.glob(".*.tmp"))


KILLED_WRITER = r"""
import sys, time
from pathlib import Path
import torch
real_save, marker = torch.save, Path(sys.argv[1])

def slow_save(obj, f, *args, **kwargs):  # the resume state of epoch 3 is half-way to disk for a long time
    real_save(obj, f, *args, **kwargs)
    if isinstance(obj, dict) and obj.get("epoch") == 3:
        f.flush()
        marker.touch()
        time.sleep(600)

torch.save = slow_save
from m2dx_clinic.config import load_recipe
from m2dx_clinic.pretrain import start_run
from m2dx_clinic.recipes import PretrainRecipe
start_run(load_recipe(PretrainRecipe, "tiny_cpu", sys.argv[2:]), progress=False)
"""


@pytest.mark.slow
def test_kill_9_during_a_background_write_resumes_from_the_last_complete_save(tmp_path, demo_audio):
    """Training goes on while the resume state is written; killed mid-write, the run resumes from the
    previous complete state and ends exactly where an uninterrupted run ends."""
    opts = ("optim.epochs=5", "run.save_every=5", "run.resume_every_minutes=0", "run.report_on_save=false")
    full = start_run(tiny_recipe(tmp_path / "full", demo_audio, *opts), progress=False)
    cut = tmp_path / "cut"
    recipe = tiny_recipe(cut, demo_audio, *opts)
    overrides = [f"{k}={v}" for k, v in (
        ("data.data", recipe.data.data), ("data.noise", recipe.data.noise), ("run.out", recipe.run.out),
        ("data.cache_dir", recipe.data.cache_dir), ("data.min_ds_size", 32), ("data.norm_stats_samples", 64),
        ("optim.batch_size", 8), ("optim.accum_steps", 2), ("run.log_every", 1))] + list(opts)
    marker = tmp_path / "writing"
    env = {**os.environ, "M2DX_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(marker), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    metrics = cut / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    # the loop trains epoch 4 while the state of epoch 3 is being written
    while time.time() < deadline and proc.poll() is None and not (
            marker.exists() and metrics.exists() and '"epoch": 4' in metrics.read_text() and "epoch_end" in
            metrics.read_text().split('"epoch": 4', 1)[1]):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    state = cut / "run" / "state"
    assert ckpt_io.peek_checkpoint(state / "last.pth")[0] == 2  # the last complete save
    assert list(state.glob(".last.pth.*.tmp")), "the kill should have landed during the write"
    assert not ckpt_io.list_checkpoints(cut / "run")
    resumed = resume_run(cut / "run", progress=False)
    assert not list((cut / "run").rglob(".*.tmp"))
    a = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(full)[-1][1])
    b = ckpt_io.LoadedCheckpoint(ckpt_io.list_checkpoints(resumed)[-1][1])
    assert a.epoch == b.epoch == 5
    for key, value in a.state.items():
        assert torch.equal(value, b.state[key]), key
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps)  # the rows of epochs 3-4 the killed process logged were dropped


def test_resume_refuses_model_overrides_and_records_the_new_epochs(tmp_path, monkeypatch):
    import types

    from m2dx_clinic import pretrain
    from m2dx_clinic.config import save_resolved
    from m2dx_clinic.recipes import pretrain_notes

    run = tmp_path / "run"
    recipe = load_recipe(PretrainRecipe, "tiny_cpu", ["optim.epochs=1"])
    save_resolved(recipe, run / "recipe.toml")
    with pytest.raises(ConfigError, match=r"drop model\.embed_dim=64"):
        resume_run(run, ["model.embed_dim=64"], progress=False)

    class NoTraining:  # stands in for the trainer: this test is about the recipe, not the loop
        def __init__(self, recipe, run_dir, **kwargs):
            self.ddp = types.SimpleNamespace(is_main=True)

        def train(self, progress):
            return run

    monkeypatch.setattr(pretrain, "Pretrainer", NoTraining)
    resume_run(run, ["optim.epochs=2"], progress=False)
    assert load_recipe(PretrainRecipe, run / "recipe.toml").optim.epochs == 2
    # a recipe with a noise ratio but no noise says so before training
    assert pretrain_notes(load_recipe(PretrainRecipe, "tiny_cpu", ["data.noise=''"]))[0].startswith("no background noise")
    assert pretrain_notes(load_recipe(PretrainRecipe, "tiny_cpu", ["data.noise=''", "data.noise_ratio=0"])) == []


def test_a_checkpoint_of_another_size_is_noted_not_adopted_silently():
    from m2dx_clinic.pretrain import record_geometry

    recipe = load_recipe(PretrainRecipe, "tiny_cpu")
    asked = recipe.model.embed_dim
    other = M2D(ViTConfig(embed_dim=32, depth=1, num_heads=2), PredictorConfig(16, 1, 1))
    notes = record_geometry(recipe.model, other)
    assert len(notes) == 1 and "32-d x 1 blocks" in notes[0] and f"{asked}-d x" in notes[0]
    assert recipe.model.embed_dim == 32  # the recipe now states what is trained
    assert record_geometry(recipe.model, other) == []  # the same geometry again: nothing to say
