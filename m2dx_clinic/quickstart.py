"""The first ten minutes: the whole journey on any laptop, no GPU, no internet.

1. generate respiratory-like example recordings in the ICBHI layout (deterministic, licence-clean)
2. further pre-train a tiny M2D-X on them with the bundled CC0 background noise (`tiny_cpu` recipe)
3. fine-tune the last checkpoint and report Sensitivity / Specificity / Score next to a classical
   baseline and chance, with a model card (`tiny_finetune`)
4. build the checkpoint-progress report with a linear probe per checkpoint
5. classify one of the recordings with the fine-tuned classifier (`m2dx predict`)

The same library calls take real data: pass `data=` an ICBHI-layout folder (and `noise=`).
"""

from __future__ import annotations

import time
from pathlib import Path

from . import checkpoint as ckpt_io
from .audio import AUDIO_SUFFIXES
from .config import load_recipe, to_dict
from .data.icbhi import SPLIT_FILE, annotation_dir
from .demo_data import demo_noise_dir, make_demo_icbhi
from .errors import ConfigError
from .finetune import finetune
from .predict import predict
from .predict_outputs import describe_recording
from .pretrain import resume_run, start_run
from .recipes import FinetuneRecipe, PretrainRecipe
from .rundir import check_inputs, fingerprint, hold, record_inputs, tree_fingerprint
from .progress import console
from .report import build_report, render_report_table


def run_quickstart(out: Path, *, data: Path | None = None, noise: Path | None = None,
                   progress: bool = True) -> dict[str, Path]:
    """Run the journey into `out` and return the paths of what it wrote.

    Re-running reuses finished steps, but only when their inputs (data, noise, recipe, checkpoint,
    package version) are the ones recorded in the step's inputs.json; otherwise one line says which
    differ. One quickstart at a time writes `out`.
    """
    out = Path(out)
    with hold(out, "m2dx quickstart"):
        return _journey(out, data, noise, progress)


def _journey(out: Path, data: Path | None, noise: Path | None, progress: bool) -> dict[str, Path]:
    """The five steps; a step with earlier work in `out` reuses it only when its inputs are the same."""
    t0 = time.perf_counter()
    if data is None:
        data = out / "demo_icbhi"
        if not (data / SPLIT_FILE).is_file():
            console.rule("1/5  example recordings")
            make_demo_icbhi(data)
            console.print(f"generated ICBHI-format example recordings in {data}")
    audio_dir = annotation_dir(data)  # a folder without ICBHI annotations is refused here, before training
    noise = noise or demo_noise_dir()

    console.rule("2/5  further pre-training (tiny M2D-X, CPU)")
    run_dir = out / "further_pretrain"
    # tiny_cpu, run a little longer so the curves and the report have something to show (~30 s)
    overrides = [f"data.data={audio_dir}", f"data.noise={noise}", f"run.out={run_dir}",
                 f"data.cache_dir={out / 'cache'}", "optim.epochs=10", "optim.warmup_epochs=2",
                 "run.save_every=5", "data.min_ds_size=256"]
    recipe = load_recipe(PretrainRecipe, "tiny_cpu", overrides)
    inputs = fingerprint(step="further-pretrain", data=tree_fingerprint(audio_dir), noise=tree_fingerprint(noise),
                         recipe=to_dict(recipe))
    if not (run_dir / "recipe.toml").is_file():
        record_inputs(run_dir, inputs)
        start_run(recipe, progress=progress, command="m2dx quickstart")  # step 4 builds the full report
    else:
        check_inputs(run_dir, inputs, "a quickstart pre-training run")
        if _unfinished(run_dir, recipe.optim.epochs):
            resume_run(run_dir, progress=progress, command="m2dx quickstart")
    checkpoints = ckpt_io.list_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"{run_dir}: the pre-training run saved no checkpoint")
    last_epoch, last_ckpt = checkpoints[-1]

    console.rule("3/5  fine-tuning with ICBHI-style scores, a baseline and chance")
    ft_dir = out / "finetune"
    ft_recipe = load_recipe(FinetuneRecipe, "tiny_finetune", [f"run.out={ft_dir}", f"data.cache_dir={out / 'cache'}"])
    inputs = fingerprint(step="finetune", data=tree_fingerprint(data), checkpoint=tree_fingerprint(last_ckpt),
                         recipe=to_dict(ft_recipe))
    if (ft_dir / "metrics.json").is_file():
        check_inputs(ft_dir, inputs, "a quickstart fine-tune")
    else:
        record_inputs(ft_dir, inputs)
        finetune(ft_recipe, task="icbhi", data=data, checkpoint=last_ckpt, progress=progress)

    console.rule("4/5  checkpoint-progress report")
    report = build_report(run_dir, task="icbhi", data=data, probe=True, progress=progress)
    console.print(render_report_table(report))

    console.rule("5/5  classifying a recording with the fine-tuned classifier")
    recording = _a_test_recording(ft_dir, audio_dir)
    predicted = predict(ft_dir, [recording], out / "predictions", progress=progress)
    for row in predicted.recordings.to_dict("records"):
        console.print(describe_recording(row, predicted.summary), highlight=False)

    paths = {
        "data": data,
        "pretrain_run": run_dir,
        "checkpoint": last_ckpt,
        "finetune_run": ft_dir,
        "metrics": ft_dir / "metrics.json",
        "predictions": ft_dir / "predictions.csv",
        "model_card": ft_dir / "MODEL_CARD.md",
        "report": run_dir / "report" / "report.html",
        "prediction": out / "predictions" / "recordings.csv",
    }
    console.rule(f"done in {time.perf_counter() - t0:.0f} s")
    for name, path in paths.items():
        console.print(f"  {name:<13} {path}")
    console.print("Next: the same commands on your data, see examples/02_own_recordings.sh")
    return paths


def _a_test_recording(ft_dir: Path, audio_dir: Path) -> Path:
    """The audio of the first test recording of the fine-tune (a recording the model never trained on)."""
    import pandas as pd

    pred = pd.read_csv(ft_dir / "predictions.csv")
    names = pred.loc[pred["split"] == "test", "recording"] if "test" in set(pred["split"]) else pred["recording"]
    name = sorted(names.unique())[0]
    return next(p for p in sorted(audio_dir.glob(f"{name}.*")) if p.suffix.lower() in AUDIO_SUFFIXES)


def _unfinished(run_dir: Path, epochs: int) -> bool:
    """The last epoch is always saved as a published checkpoint, so its file name says the run is done."""
    return not any(epoch >= epochs for epoch, _ in ckpt_io.list_checkpoints(run_dir))
