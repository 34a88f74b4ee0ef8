"""Running a search: the Optuna study, its storage, the objective, and what a finished search writes.

Trials are selected on the validation split ONLY. Tuning on the test split would turn the test score
into a training signal and inflate the reported number, so this is enforced three times: the space
may not touch `run.*` (`tuning.space`), the resolved recipe must have `run.selection = "val"` before
the study starts, and every trial calls `finetune(score_test=False)` and checks that no test metric
came back. The test split is scored once, after the search, with the best parameters.

The study lives in an RDB storage (SQLite file in the run folder by default) with heartbeats, so a
killed run is resumed by re-running the same command, and several machines share one study
through a server URL (README, "Tuning on several machines").
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..config import PARAMS_RECIPE_KEY, dump_toml, load_recipe, to_overrides
from ..evaluation.checks import warn_identical
from ..data.task_data import TaskData
from ..data.tasks import load_task
from ..errors import ConfigError, M2DXError, one_line
from ..fileio import atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text
from ..finetune import FinetuneRecipe, FinetuneResult, finetune
from ..metrics import aggregate_runs
from ..progress import console, environment_facts, make_progress
from ..recipes import TuneSettings
from ..rundir import RunLock, fingerprint, fresh_dir, hold, remove_stale_temp_files
from .storage import (
    ACTIVE,
    TS,
    SurplusTrial,
    best_trial,
    trial_counts,
    fail_orphaned_trials,
    hide_password,
    make_pruner,
    make_storage,
    storage_url,
)
from .space import Param, assert_validation_only, load_search_space, params_to_tables, suggest

def metric_text(metric: str, value: float | None) -> str:
    """One unit everywhere: scores in percent, the loss as a plain number."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if metric == "loss" else f"{100 * value:.2f}%"


@dataclass
class TuneJob:
    """One search, resolved and checked before any compute: what to tune, on what, where, how."""

    settings: TuneSettings  # the tune recipe's [tune] table with this invocation's flags over it
    recipe_settings: TuneSettings  # the table as the recipe file says it: what identifies the study
    params: list[Param]
    tune_recipe: str
    task: str
    data: Path
    checkpoint: str | Path
    normal_class: str | None
    overrides: list[str]
    base: FinetuneRecipe  # the recipe every trial starts from
    task_data: TaskData
    out_dir: Path
    study_name: str
    storage: str | None  # None = the default one-worker SQLite file in out_dir
    pruner: optuna.pruners.BasePruner
    final_test: bool
    progress: bool

    @property
    def target(self) -> int:
        """Finished trials the study should hold (`tune.trials`)."""
        return self.settings.trials

    @property
    def repeats(self) -> int:
        """Seeds per trial (`tune.repeats`)."""
        return self.settings.repeats

    @property
    def timeout(self) -> float | None:
        """Seconds this invocation may search (`tune.timeout`; None: no limit)."""
        return self.settings.timeout


class _Objective:
    """The Optuna objective: fine-tune on train, score on validation, never on test.

    Seeds run one by one so the Wilcoxon pruner can stop a trial after a few seeds that are already
    significantly worse than the best; per-epoch pruners watch the first seed's validation curve.
    """

    def __init__(self, job: "TuneJob", *, per_epoch: bool, on_epoch=None):
        self.job, self.per_epoch, self.on_epoch = job, per_epoch, on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=ACTIVE) if t.number < trial.number]
        if len(earlier) >= self.job.target:
            # Another worker started the study's last trial at the same moment: this one would be one too
            # many, so it runs nothing and is recorded as such (not counted as finished).
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study already had {self.job.target} finished or running trials")
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            # Optuna keeps the state (FAIL) but not the reason; store it for trials.csv and summaries.
            trial.set_user_attr("error", one_line(exc, limit=500, with_type=True))
            raise

    def _run(self, trial: optuna.Trial) -> float:
        job = self.job
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, in a shared study
        suggested = suggest(trial, job.params)
        trial_dir = fresh_dir(job.out_dir / "trials" / f"trial_{trial.number:04d}")
        trial.set_user_attr("trial_dir", str(trial_dir))
        metric = job.settings.metric
        scores: list[float] = []
        for i in range(job.repeats):
            run_dir = trial_dir if job.repeats == 1 else trial_dir / f"seed_{i}"
            recipe = load_recipe(FinetuneRecipe, job.settings.finetune_recipe, [
                *job.overrides, *suggested,
                *to_overrides({"run.out": str(run_dir), "run.repeats": 1, "run.seed": job.base.run.seed + i})])
            assert_validation_only(recipe, f"trial {trial.number}")
            report_epochs = self.per_epoch and i == 0

            def callback(epoch: int, val: dict[str, Any], _report: bool = report_epochs) -> None:
                value = float(val[metric])
                if self.on_epoch is not None:
                    self.on_epoch(trial.number, i, epoch, value)
                if _report:
                    trial.report(value, int(epoch))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch} ({metric} {metric_text(metric, value)})")

            score_test = False  # the one place trials call finetune: the test split stays unseen
            result = finetune(recipe, task=job.task, data=job.data, checkpoint=job.checkpoint,
                              normal_class=job.normal_class, epoch_callback=callback, score_test=score_test,
                              progress=False, task_data=job.task_data)
            if any(run.get("test") is not None for run in result.runs):
                raise RuntimeError("finetune returned test metrics inside a tuning trial; refusing to use them")
            value = float(sum(float(run["val"][metric]) for run in result.runs) / len(result.runs))
            scores.append(value)
            trial.set_user_attr("seed_scores", scores)
            if not self.per_epoch and job.repeats > 1:
                trial.report(value, i)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after seed {i} ({metric} {metric_text(metric, value)})")
        return sum(scores) / len(scores)




# ---------------------------------------------------------------------------- study
@dataclass
class TuneResult:
    """What a search produced; `final` holds the test-scored fine-tune with the best parameters."""

    out_dir: Path
    study_name: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int
    n_failed: int
    final: FinetuneResult | None = None
    best_trial: int | None = None
    metric: str = "score"



def _short_params(params: dict[str, Any], limit: int = 60) -> str:
    parts = []
    for key, value in params.items():
        name = key.split(".")[-1]
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _save_plots(study: optuna.Study, out: Path, min_for_importance: int) -> list[str]:
    """optimization_history.png and param_importances.png; a plot that cannot be made is a warning, not a crash.

    Importances are estimated from the complete trials; with fewer than `min_for_importance` (or when
    every trial scored the same) they are noise, so the plot is left out and the summary says why.
    """
    problems = []
    try:
        if "matplotlib.pyplot" not in sys.modules:
            import matplotlib

            matplotlib.use("Agg")  # headless: a tuning server has no display
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except Exception as exc:
        return [f"plots skipped: matplotlib unavailable ({one_line(exc, limit=500, with_type=True)})"]
    n_complete = trial_counts(study)["complete"]
    values = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    identical = len(values) >= 2 and max(values) - min(values) < 1e-12
    (out / "param_importances.png").unlink(missing_ok=True)  # never leave an earlier, now misleading plot
    jobs = [("optimization_history.png", ovm.plot_optimization_history, 1),
            ("param_importances.png", ovm.plot_param_importances, min_for_importance)]
    for name, plot, needed in jobs:
        if n_complete < needed:
            problems.append(f"{name} skipped: parameter importances need at least {needed} complete trials, "
                            f"have {n_complete}" if name.startswith("param") else
                            f"{name} skipped: needs at least {needed} complete trial(s), have {n_complete}")
            continue
        if identical and name.startswith("param"):
            problems.append(f"{name} skipped: every complete trial scored the same, so no parameter mattered")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            atomic_savefig(fig, out / name, format="png", dpi=120)
            plt.close(fig)
        except Exception as exc:
            problems.append(f"{name} not written: {one_line(exc, limit=500, with_type=True)}")
    return problems


def _final_summary(final: FinetuneResult | None) -> dict[str, Any] | None:
    if final is None:
        return None
    tests = [run["test"] for run in final.runs if run.get("test")]
    return {"run_dir": str(final.run_dir), "selection": final.selection, "runs": final.runs,
            "test": aggregate_runs(tests) if tests else None, "aggregate": final.aggregate}


def _previous_final(out_dir: Path) -> dict[str, Any] | None:
    """The `final` entry of an earlier summary.json, when it recorded a test-scored run."""
    try:
        info = json.loads((out_dir / "summary.json").read_text(encoding="utf-8")).get("final")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("test") else None


def _print_summary(result: TuneResult, final_info: dict[str, Any] | None, warnings_: list[str]) -> None:
    from rich.table import Table

    table = Table(title=f"tuning {result.study_name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("trials", f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed")
    best = "-" if result.best_value is None else \
        f"{metric_text(result.metric, result.best_value)} (trial {result.best_trial})"
    table.add_row("best validation", best)
    for key, value in result.best_params.items():
        table.add_row(f"  {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
    if final_info and final_info.get("test"):
        agg = final_info["test"]

        def finite(x: Any) -> bool:  # values read back from summary.json may be None
            return isinstance(x, (int, float)) and math.isfinite(x)

        def fmt(k: str) -> str:
            m = agg.get(k) or {}
            if not finite(m.get("mean")):
                return "n/a"
            ci = f" ± {100 * m['ci95']:.2f}" if finite(m.get("ci95")) else ""
            return f"{100 * m['mean']:.2f}{ci}"

        table.add_row("final test Sp / Se / Score", f"{fmt('sp')} / {fmt('se')} / {fmt('score')}")
        table.add_row("final run", final_info["run_dir"])
    table.add_row("outputs", str(result.out_dir))
    console.print(table)
    for line in warnings_:
        console.print(f"[yellow]warning: {line}[/]")



def tune(
    *,
    task: str,
    data: Path | str,
    checkpoint: str | Path,
    tune_recipe: str | Path = "icbhi_tune",
    trials: int | None = None,
    timeout: str | float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    out: Path | None = None,
    repeats: int | None = None,
    pruner: str | None = None,
    normal_class: str | None = None,
    overrides: Sequence[str] = (),
    tune_overrides: Sequence[str] = (),
    final_test: bool = True,
    progress: bool = True,
) -> TuneResult:
    """Search fine-tuning hyper-parameters on the validation split, then test the best once.

    `trials`, `timeout`, `repeats` and `pruner` default to the tune recipe's `[tune]` values; they
    become `tune.<key>=value` overrides, followed by `tune_overrides` (what `m2dx tune` passes: its
    flags, turned into overrides like `m2dx finetune`'s), so a value from Python, the command line or
    the file is checked by one rule. `overrides` apply to the fine-tuning recipe of every trial.
    `trials` is the study's target: finished (complete + pruned) trials already in the study count, so
    re-running the same command resumes a killed search and only runs what is missing. `timeout`
    (seconds, or a duration like "8h") limits this invocation.

    Storage: by default `sqlite:///<out>/optuna.db`, which suits ONE worker process. Pass an RDB URL
    (`postgresql://user:pw@host/db`, `mysql://...`) with the same `study_name` on several machines to
    let them share one study; each stops when the study reaches `trials`. Heartbeats mark trials
    of a killed worker as failed and re-queue their parameters (`RetryFailedTrialCallback`).

    Outputs in `out`: `trials/trial_NNNN/` (one fine-tune run per trial), `best.toml` (pass to
    `m2dx finetune --params`), `trials.csv`, `summary.json`, `optimization_history.png`,
    `param_importances.png` and, with `final_test`, `final/` - the single run scored on test.
    """
    given = to_overrides({"tune.trials": trials, "tune.timeout": timeout, "tune.repeats": repeats, "tune.pruner": pruner})
    job = plan_search(task=task, data=data, checkpoint=checkpoint, tune_recipe=tune_recipe,
                      tune_overrides=[*given, *tune_overrides],
                      overrides=overrides, storage=storage, study_name=study_name, out=out,
                      normal_class=normal_class, final_test=final_test, progress=progress)
    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines replace Optuna's INFO logs
    try:
        if not is_shared(job):  # the default one-worker SQLite study: one writer for the whole search
            with hold(job.out_dir, "m2dx tune"):
                remove_stale_temp_files(job.out_dir)
                return finish_search(job, run_search(job))
        # A shared study: every worker searches (shared lock), the last one to finish writes the results.
        with RunLock(job.out_dir, "m2dx tune (a worker of a shared study)").acquire(shared=True):
            study = run_search(job)
        try:
            results = hold(job.out_dir, "m2dx tune (writing the study's results)")
        except ConfigError:
            console.print(f"another worker of study {job.study_name!r} is still searching or writing its results "
                          f"in {job.out_dir}; it writes best.toml")
            return _result_of(job, study)
        with results:
            return finish_search(job, study)
    finally:
        optuna.logging.set_verbosity(old_verbosity)


def plan_search(*, task: str, data: Path | str, checkpoint: str | Path, tune_recipe: str | Path,
                tune_overrides: Sequence[str], overrides: Sequence[str], storage: str | None, study_name: str | None,
                out: Path | None, normal_class: str | None, final_test: bool, progress: bool) -> TuneJob:
    """Everything that can be checked without compute, in the order a user's mistake is most likely.

    `tune_overrides` (`tune.key=value`) go over the tune recipe's [tune] table and `overrides` over the
    fine-tuning recipe, each checked by the same rules as the file it overrides.
    """
    settings, params = load_search_space(tune_recipe, tune_overrides)
    # The study is identified by its recipe as written: trials, timeout, repeats and pruner given as flags
    # may differ between the invocations that resume it (as they always could).
    recipe_settings = load_search_space(tune_recipe)[0] if tune_overrides else settings
    recipe_stem = Path(str(tune_recipe)).stem
    overrides = list(overrides)
    # The recipe every trial starts from: must be valid and select on validation BEFORE any compute.
    base = load_recipe(FinetuneRecipe, settings.finetune_recipe, overrides)
    assert_validation_only(base, str(settings.finetune_recipe))
    if base.run.mode != "full":  # linear / baseline choose their one parameter (C) on validation already
        raise ConfigError(f"m2dx tune searches the settings of a full fine-tune; run.mode={base.run.mode} has none to "
                          "search (C is chosen on validation in every run); use m2dx finetune --mode "
                          f"{base.run.mode} directly")
    out_dir = (Path(out) if out is not None else Path("runs") / f"tune-{task}-{recipe_stem}").expanduser()
    pruner = make_pruner(settings.pruner, settings, settings.repeats)  # validates the pruner/repeats pair early
    # Load the task once: every trial shares the same items and the same validation split.
    task_data = load_task(task, data, normal_class=normal_class, val_fraction=base.data.val_fraction,
                          seed=base.run.seed, test_set=base.data.test_set)
    return TuneJob(settings=settings, recipe_settings=recipe_settings, params=params, tune_recipe=str(tune_recipe),
                   task=task, data=Path(data), checkpoint=checkpoint, normal_class=normal_class, overrides=overrides,
                   base=base, task_data=task_data, out_dir=out_dir, study_name=study_name or f"{recipe_stem}-{task}",
                   storage=storage, pruner=pruner, final_test=final_test, progress=progress)


def is_shared(job: TuneJob) -> bool:
    """A study several workers may run at once: any --storage that is not a SQLite file."""
    return not storage_url(job.storage, job.out_dir).startswith("sqlite")


def study_inputs(job: TuneJob) -> dict[str, str]:
    """What a study's trials were made from; a resumed study must match (or trials from two data sets mix)."""
    return fingerprint(task=job.task, data=job.task_data.fingerprint()["sha256"], checkpoint=str(job.checkpoint),
                       settings=dataclasses.asdict(job.recipe_settings) | {"trials": None, "timeout": None},
                       space=[dataclasses.asdict(p) for p in job.params], overrides=job.overrides)


def open_study(job: TuneJob) -> optuna.Study:
    """Create or load the study; a study made from other inputs is refused with one line."""
    settings = job.settings
    job.out_dir.mkdir(parents=True, exist_ok=True)
    rdb = make_storage(job.storage, job.out_dir, settings)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.sampler_startup_trials)
    study = optuna.create_study(storage=rdb, sampler=sampler, pruner=job.pruner, study_name=job.study_name,
                                direction=settings.direction, load_if_exists=True)
    inputs = study_inputs(job)
    saved = study.user_attrs.get("inputs")
    if saved is None:
        study.set_user_attr("inputs", inputs)
    elif saved.get("sha256") != inputs["sha256"]:
        differ = sorted(k for k in inputs if k not in ("sha256",) and saved.get(k) != inputs[k])
        raise ConfigError(f"study {job.study_name!r} in {hide_password(storage_url(job.storage, job.out_dir))} was "
                          f"made from other inputs ({', '.join(differ)} differ); pass another --study or --out")
    study.set_user_attr("tune_recipe", job.tune_recipe)
    study.set_user_attr("finetune_recipe", str(settings.finetune_recipe))
    study.set_user_attr("metric", settings.metric)
    return study


def run_search(job: TuneJob) -> optuna.Study:
    """Run trials until the study holds `job.target` finished ones (or the timeout / failure limit ends it).

    One trial at a time, checking the study before each: several workers on one shared study stop
    exactly at the target, and a worker waits (instead of leaving) while the last trials run
    elsewhere, so a trial whose worker died is failed by the heartbeat, re-queued and run here.
    An invocation starts at most as many trials as the study lacked when it began; a failed trial
    uses its place (re-run the command to replace it).
    """
    settings = job.settings
    study = open_study(job)
    shared = is_shared(job)
    if not shared:
        fail_orphaned_trials(study)
    counts = trial_counts(study)
    finished = counts["complete"] + counts["pruned"]
    if finished:
        console.print(f"resuming study {job.study_name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
                      f"{counts['failed']} failed; {max(0, job.target - finished)} trial(s) to go")
    if finished >= job.target:
        return study

    bar = make_progress(show=job.progress)
    task_id = None
    state = {"consecutive_failures": 0, "best": "", "stop": False}

    def best_text() -> str:
        best = best_trial(study)
        if best is None:
            return "best -"
        return f"best {metric_text(settings.metric, best.value)} #{best.number} {_short_params(best.params)}"

    def on_epoch(number: int, seed_index: int, epoch: int, value: float) -> None:
        if task_id is not None:
            seed = f" seed {seed_index}" if job.repeats > 1 else ""
            bar.update(task_id, status=f"#{number}{seed} ep {epoch} {settings.metric} "
                                       f"{metric_text(settings.metric, value)} | {state['best']}")

    def after_trial(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TS.FAIL and not trial.user_attrs.get("surplus"):
            state["consecutive_failures"] += 1
            console.print(f"[yellow]trial {trial.number} failed: {trial.user_attrs.get('error', 'see log')}[/]")
            if state["consecutive_failures"] >= settings.max_consecutive_failures:
                console.print(f"[red]{state['consecutive_failures']} trials in a row failed; stopping the search[/]")
                state["stop"] = True
        elif trial.state != TS.FAIL:
            state["consecutive_failures"] = 0
        state["best"] = best_text()

    objective = _Objective(job, per_epoch=not isinstance(job.pruner, optuna.pruners.WilcoxonPruner), on_epoch=on_epoch)
    deadline = time.monotonic() + job.timeout if job.timeout else None
    try:
        state["best"] = best_text()
        bar.start()
        task_id = bar.add_task("tuning", total=job.target, completed=finished, status=state["best"])
        budget = job.target - finished  # trials this invocation may start (a failed one uses its place)
        while not state["stop"] and budget > 0 and (deadline is None or time.monotonic() < deadline):
            counts = trial_counts(study)
            finished = counts["complete"] + counts["pruned"]
            bar.update(task_id, completed=min(finished, job.target), status=state["best"])
            if finished >= job.target:
                break
            if finished + counts["running"] >= job.target:  # the last trials run on other workers
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed and re-queued
                time.sleep(min(5.0, settings.heartbeat_interval))
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            study.optimize(objective, n_trials=1, timeout=left, catch=(Exception,), callbacks=[after_trial])
            budget -= 1
        counts = trial_counts(study)
        bar.update(task_id, completed=min(counts["complete"] + counts["pruned"], job.target))
    finally:
        bar.stop()
    return study


def _result_of(job: TuneJob, study: optuna.Study) -> TuneResult:
    counts, best = trial_counts(study), best_trial(study)
    return TuneResult(out_dir=job.out_dir, study_name=job.study_name,
                      storage=hide_password(storage_url(job.storage, job.out_dir)),
                      best_value=None if best is None else float(best.value),
                      best_params={} if best is None else dict(best.params),
                      n_complete=counts["complete"], n_pruned=counts["pruned"], n_failed=counts["failed"],
                      best_trial=None if best is None else best.number, metric=job.settings.metric)


def finish_search(job: TuneJob, study: optuna.Study) -> TuneResult:
    """trials.csv, best.toml, plots, the final test-split run and summary.json; raises when nothing completed."""
    out_dir, settings = job.out_dir, job.settings
    counts = trial_counts(study)
    remaining = max(0, job.target - counts["complete"] - counts["pruned"])
    best = best_trial(study)
    notes: list[str] = []
    # trials.csv first: it is the record that explains a search where nothing completed
    # host:pid of each trial's worker stays in the study database (internal), out of the shareable table
    atomic_write_csv(out_dir / "trials.csv", study.trials_dataframe().drop(columns=["user_attrs_worker"], errors="ignore"),
                     float_format=None)

    result = _result_of(job, study)
    if best is not None:
        header = (f"best parameters of study {job.study_name!r} (trial {best.number}, validation {settings.metric} "
                  f"{metric_text(settings.metric, best.value)})\nfine-tune recipe: {settings.finetune_recipe}\n"
                  "use: m2dx finetune --params best.toml ... (it brings its recipe; a different --recipe is refused)")
        tables = {"about": {PARAMS_RECIPE_KEY: str(settings.finetune_recipe)},
                  **params_to_tables(best.params, job.overrides)}
        atomic_write_text(out_dir / "best.toml", dump_toml(tables, header))
        notes.extend(_save_plots(study, out_dir, settings.min_trials_for_importance))
        complete = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        notes.extend(warn_identical(complete, f"complete trial's validation {settings.metric}",
                                    lambda v: metric_text(settings.metric, v)))

    final: FinetuneResult | None = None
    final_dir = out_dir / "final"
    previous_final = None
    if best is not None and job.final_test and not remaining and final_dir.exists():
        # Nothing new was searched, so the best is unchanged: keep the earlier final run instead of
        # spending another full fine-tune (delete out/final to force one).
        previous_final = _previous_final(out_dir)
        if previous_final is not None:
            notes.append(f"no new trials; kept the earlier final run in {final_dir} (delete it to rerun)")
    if best is not None and job.final_test and previous_final is None:
        if final_dir.exists():  # a resumed search keeps the previous final run next to the new one
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            final_dir.rename(fresh_dir(out_dir / f"final-{stamp}"))
        final_recipe = load_recipe(FinetuneRecipe, settings.finetune_recipe,
                                   [*job.overrides, *to_overrides(best.params), *to_overrides({"run.out": str(final_dir)})])
        assert_validation_only(final_recipe, "final fine-tune")
        final = finetune(final_recipe, task=job.task, data=job.data, checkpoint=job.checkpoint,
                         normal_class=job.normal_class, score_test=True, progress=job.progress,
                         task_data=job.task_data)
        result.final = final
    final_info = _final_summary(final) if previous_final is None else previous_final

    summary = {
        "study_name": job.study_name, "storage": result.storage, "tune_recipe": job.tune_recipe,
        "finetune_recipe": str(settings.finetune_recipe), "task": job.task, "data": str(job.data),
        "checkpoint": str(job.checkpoint), "overrides": job.overrides, "metric": settings.metric,
        "direction": settings.direction, "pruner": type(job.pruner).__name__, "repeats": job.repeats,
        "trials_target": job.target, "counts": counts, "best_trial": result.best_trial,
        "best_value": result.best_value, "best_params": result.best_params,
        "space": [dataclasses.asdict(p) for p in job.params], "final": final_info, "warnings": notes,
        "environment": environment_facts(), "written": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    _print_summary(result, final_info, notes)
    if best is None:
        errors = [t.user_attrs.get("error") for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error")]
        last = f"; last error: {errors[-1]}" if errors else ""
        raise M2DXError(f"{out_dir}: no trial completed ({counts['failed']} failed, {counts['pruned']} pruned){last}; "
                        f"see {out_dir / 'trials.csv'}")
    return result
