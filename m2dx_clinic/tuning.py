"""Hyper-parameter search for fine-tuning: an Optuna study over a search space written as TOML data.

Why this module exists as it does:

- The search space is data (`recipes/icbhi_tune.toml`), not code, so a clinician can widen a range
  or freeze a parameter without touching Python; every key is checked against the real
  `FinetuneRecipe` fields so a typo fails before hours of compute are spent.
- Trials are selected on the validation split ONLY. Tuning on the test split would turn the test
  score into a training signal and inflate the reported number, so this is enforced three times:
  the space may not touch `run.*`, the resolved recipe must have `run.selection = "val"` before the
  study starts, and every trial calls `finetune(score_test=False)` and checks that no test metric
  came back. The test split is scored once, after the search, with the best parameters.
- The study lives in an RDB storage (SQLite file in the run folder by default) with heartbeats, so
  a killed run can be resumed by re-running the same command, and several machines can share one
  study through a server URL.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from . import config
from .config import dump_toml, find_recipe, load_recipe, parse_override, read_toml
from .data.tasks import TaskData, load_task
from .errors import ConfigError, M2DXError
from .fileio import atomic_savefig, atomic_write_json, atomic_write_text
from .finetune import FinetuneRecipe, FinetuneResult, finetune
from .metrics import aggregate_runs
from .progress import console, environment_facts, make_progress

PRUNERS = ("auto", "median", "hyperband", "wilcoxon", "none")
# Sections of FinetuneRecipe whose keys may be searched. `run.*` is excluded on purpose: it holds the
# output folder, seeds, repeats, device and the model-selection rule, none of which is a
# hyper-parameter, and `run.selection` is the door through which the test split could leak in.
_SEARCHABLE_SECTIONS = ("model", "data", "augment", "optim")
# Data keys fixed by the task that is loaded once for all trials: varying them per trial would
# silently be ignored (or change the validation split under the sampler's feet).
_FIXED_KEYS = {"data.val_fraction": "the validation split is carved once for all trials",
               "data.test_set": "the task is loaded once for all trials",
               "data.cache_dir": "it is a location, not a hyper-parameter",
               "data.disk_cache": "it is a speed setting, not a hyper-parameter",
               "data.max_items_per_split": "a subset changes the data every trial is compared on"}
# Overrides that describe this machine, not the model: left out of best.toml.
_MACHINE_KEYS = {"data.cache_dir", "data.disk_cache"}
_TEST_LEAK_MESSAGE = "tuning must select on validation"


# ---------------------------------------------------------------------------- search-space recipe
@dataclass
class TuneSettings:
    """The `[tune]` table: what to tune, for how long and how to judge a trial."""

    finetune_recipe: str = "icbhi_finetune"  # name in recipes/, or a path (relative to the tune recipe)
    trials: int = 50  # target number of finished (complete + pruned) trials in the study
    timeout: float | None = None  # seconds for this invocation; TOML accepts 3600 or "8h" / "90m"
    pruner: Literal["auto", "median", "hyperband", "wilcoxon", "none"] = "auto"  # auto: median, wilcoxon if repeats>1
    seed: int = 0  # TPE sampler seed
    repeats: int = 1  # seeds per trial (objective = mean validation metric over them)
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["score", "sp", "se", "accuracy", "loss"] = "score"
    sampler_startup_trials: int = 10  # random trials before TPE models the space
    pruner_startup_trials: int = 5  # median pruner: trials that always run to the end
    pruner_warmup_epochs: int = 5  # median pruner: epochs before a trial may be pruned
    wilcoxon_p: float = 0.1  # wilcoxon pruner p-value threshold
    heartbeat_interval: int = 60  # seconds; a RUNNING trial silent for grace_period is failed and retried
    grace_period: int = 180
    max_retry: int = 3  # retries of a trial whose process died
    max_consecutive_failures: int = 5  # stop early when the setup is broken rather than burn the budget


@dataclass
class Param:
    """One searched recipe key: `key` is the dotted recipe path, also used as the Optuna parameter name."""

    key: str
    type: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)


def parse_duration(value: str | int | float | None) -> float | None:
    """Seconds from 3600, "3600", "90s", "30m", "8h", "1d" or "1h30m"; None/0/"" mean no limit.

    Long runs are naturally given in hours on the command line; the study itself needs seconds.
    """
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise ConfigError(f"timeout: expected a duration like 8h or 3600, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        if not text:
            return None
        try:
            seconds = float(text)
        except ValueError:
            parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ConfigError(f"timeout: {value!r} is not a duration; use e.g. 8h, 90m, 3600s or 1h30m") from None
            scale = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"timeout: {value!r} must be a positive duration")
    return seconds or None


def _field_type(key: str) -> Any:
    """The annotated type of a dotted `FinetuneRecipe` key; ConfigError naming the key when it is not a leaf field."""
    parts = key.split(".")
    cls: Any = FinetuneRecipe
    where = ""
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"space.{key}: {where} is not a section, so {key} is not a recipe key")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            valid = ", ".join(sorted(f"{where}.{n}" if where else n for n in hints))
            raise ConfigError(f"space.{key}: unknown recipe key; valid keys{' in [' + where + ']' if where else ''}: {valid}")
        cls = hints[part]
        where = ".".join(parts[: i + 1])
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        raise ConfigError(f"space.{key}: is a whole section; search single keys such as {key}.<name>")
    return cls


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _check_value(key: str, value: Any) -> None:
    """Type-check one value for a recipe key by building the recipe with it (the same rules as `load_recipe`)."""
    try:
        config.build_dataclass(FinetuneRecipe, _nested(key, value))
    except ConfigError as exc:
        raise ConfigError(f"space.{key}: {exc}") from None


def _parse_param(key: str, table: dict[str, Any]) -> Param:
    """Validate one `[space."a.b"]` table against the recipe field it targets."""
    section = key.split(".", 1)[0]
    if section == "run":
        if key == "run.selection":
            raise ConfigError(f"space.{key}: {_TEST_LEAK_MESSAGE}; remove run.selection from the search space")
        raise ConfigError(f"space.{key}: run.* settings are not hyper-parameters; set them with overrides instead")
    if key in _FIXED_KEYS:
        raise ConfigError(f"space.{key}: cannot be searched ({_FIXED_KEYS[key]}); set it with an override instead")
    field_type = _field_type(key)
    if section not in _SEARCHABLE_SECTIONS:
        raise ConfigError(f"space.{key}: only keys in {', '.join(_SEARCHABLE_SECTIONS)} can be searched")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    kind = table.get("type")
    if kind not in allowed:
        raise ConfigError(f"space.{key}: type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(table) - allowed[kind])
    if unknown:
        raise ConfigError(f"space.{key}: unknown setting(s) {', '.join(unknown)} for type={kind}; "
                          f"valid: {', '.join(sorted(allowed[kind]))}")
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"space.{key}: categorical needs a non-empty list, e.g. choices = [16, 32]")
        for choice in choices:
            if isinstance(choice, (dict, list)) or choice is None:
                raise ConfigError(f"space.{key}: choice {choice!r} must be a number, string or true/false")
            _check_value(key, choice)
        if len({(type(c), c) for c in choices}) != len(choices):
            raise ConfigError(f"space.{key}: choices contain duplicates: {choices!r}")
        return Param(key=key, type="categorical", choices=list(choices))

    base = typing.get_args(field_type) if typing.get_origin(field_type) in (typing.Union, types.UnionType) else (field_type,)
    numeric_ok = {"float": (float,), "int": (int, float)}[kind]
    if not any(t in numeric_ok for t in base) or (kind == "float" and int in base and float not in base):
        hint = "type = \"int\"" if int in base else "type = \"categorical\""
        raise ConfigError(f"space.{key}: the recipe field is {getattr(field_type, '__name__', field_type)}, "
                          f"so type={kind} does not fit; use {hint}")
    for name in ("low", "high"):
        value = table.get(name)
        if value is None:
            raise ConfigError(f"space.{key}: type={kind} needs both low and high")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"space.{key}: {name} must be a number, got {value!r}")
        if kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
            raise ConfigError(f"space.{key}: {name} must be an integer for type=int, got {value!r}")
    low, high = table["low"], table["high"]
    if kind == "int":
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    if low > high:
        raise ConfigError(f"space.{key}: low ({low!r}) is greater than high ({high!r})")
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"space.{key}: log must be true or false, got {log!r}")
    step = table.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise ConfigError(f"space.{key}: step must be a positive number, got {step!r}")
        if log:
            raise ConfigError(f"space.{key}: step and log=true cannot be combined; drop one")
        if kind == "int":
            if not float(step).is_integer():
                raise ConfigError(f"space.{key}: step must be an integer for type=int, got {step!r}")
            step = int(step)
        else:
            step = float(step)
    if log and low <= 0:
        raise ConfigError(f"space.{key}: log=true needs low > 0, got {low!r}")
    _check_value(key, low)
    _check_value(key, high)
    return Param(key=key, type=kind, low=low, high=high, log=log, step=step)


def _collect_space(table: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Accept both `[space."optim.lr"]` and `[space.optim.lr]`: a table with `type` is a parameter."""
    found = []
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if not isinstance(value, dict):
            raise ConfigError(f"space.{key}: expected a table such as {{ type = \"float\", low = 0, high = 1 }}")
        if "type" in value:
            found.append((key, value))
        else:
            found.extend(_collect_space(value, key))
    return found


def load_search_space(path_or_name: str | Path) -> tuple[TuneSettings, list[Param]]:
    """Read a tune recipe (`icbhi_tune` or a path) into checked settings and parameters.

    Everything is validated here, before any compute: unknown keys, wrong types, inverted bounds and
    any attempt to search `run.*` (which could select models on the test split) raise ConfigError.
    """
    path = find_recipe(path_or_name)
    values = read_toml(path)
    values.pop("about", None)
    unknown = sorted(set(values) - {"tune", "space"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; a tune recipe has [tune] and [space.\"<key>\"]")
    tune_table = dict(values.get("tune", {}))
    if not isinstance(tune_table, dict):
        raise ConfigError(f"{path}: [tune] must be a table")
    if "timeout" in tune_table:
        tune_table["timeout"] = parse_duration(tune_table["timeout"])
        if tune_table["timeout"] is None:
            del tune_table["timeout"]
    try:
        settings = config.build_dataclass(TuneSettings, tune_table, "tune")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _check_settings(settings, str(path))
    # A finetune recipe named relative to the tune recipe wins over recipes/ (user recipes live together).
    ft = Path(settings.finetune_recipe)
    if not ft.is_absolute():
        for candidate in (path.parent / ft, path.parent / f"{ft}.toml"):
            if candidate.is_file() and candidate.resolve().parent != config.RECIPES_DIR:
                settings.finetune_recipe = str(candidate.resolve())
                break
    space = values.get("space", {})
    if not isinstance(space, dict):
        raise ConfigError(f"{path}: [space] must hold tables like [space.\"optim.lr\"]")
    try:
        params = [_parse_param(key, table) for key, table in _collect_space(space)]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not params:
        raise ConfigError(f"{path}: the search space is empty; add tables like [space.\"optim.lr\"]")
    return settings, params


def _check_settings(settings: TuneSettings, where: str) -> None:
    positive = {"trials": 1, "repeats": 1, "heartbeat_interval": 1, "grace_period": 1, "max_consecutive_failures": 1}
    for name, minimum in positive.items():
        if getattr(settings, name) < minimum:
            raise ConfigError(f"{where}: tune.{name} must be at least {minimum}, got {getattr(settings, name)}")
    for name in ("sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_epochs", "max_retry", "seed"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{where}: tune.{name} must not be negative")
    if not 0.0 < settings.wilcoxon_p < 1.0:
        raise ConfigError(f"{where}: tune.wilcoxon_p must be in (0, 1), got {settings.wilcoxon_p}")
    if (settings.metric == "loss") != (settings.direction == "minimize"):
        want = "minimize" if settings.metric == "loss" else "maximize"
        raise ConfigError(f"{where}: metric {settings.metric!r} should be {want}d; set tune.direction = \"{want}\"")


# ---------------------------------------------------------------------------- trials
def suggest(trial: optuna.trial.BaseTrial, params: Sequence[Param]) -> list[str]:
    """Ask the trial for a value of every parameter and return recipe overrides `key=value` (TOML syntax).

    Overrides go through the same parser as the command line, so a suggested value is type-checked
    exactly like a user's `--set optim.lr=1e-4`.
    """
    out = []
    for p in params:
        if p.type == "float":
            value: Any = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log, step=p.step)
        elif p.type == "int":
            value = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            value = trial.suggest_categorical(p.key, p.choices)
        out.append(f"{p.key}={_toml_literal(value)}")
    return out


def _toml_literal(value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar from a storage round trip
        value = value.item()
    return config.toml_value(value)


def params_to_tables(params: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Dotted best params (plus the fixed overrides of the search) -> nested recipe tables for best.toml.

    `run.*` and cache-location overrides are left out: they describe the machine and folder of this
    search, and the person re-running `m2dx finetune --params best.toml` chooses their own.
    """
    tables: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        if (path and path[0] == "run") or ".".join(path) in _MACHINE_KEYS:
            continue
        tables = config.merge(tables, _nested(".".join(path), value))
    for key, value in params.items():
        if hasattr(value, "item") and not isinstance(value, str):
            value = value.item()
        tables = config.merge(tables, _nested(key, value))
    return tables


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    line = f"{type(exc).__name__}: {text}"
    return line if len(line) <= 500 else line[:497] + "..."


def _assert_validation_only(recipe: FinetuneRecipe, where: str) -> None:
    """Refuse any model-selection rule that reads the test split ("val" and "last" never do)."""
    if recipe.run.selection not in ("val", "last"):
        raise ConfigError(f"{where}: run.selection={recipe.run.selection}: {_TEST_LEAK_MESSAGE}; "
                          "drop the override (or set run.selection=val in the fine-tune recipe)")


def _fresh_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`... when a previous (e.g. deleted) study left a folder of that name."""
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


class _Objective:
    """The Optuna objective: fine-tune on train, score on validation, never on test.

    Seeds run one by one so the Wilcoxon pruner can stop a trial after a few seeds that are already
    significantly worse than the best; per-epoch pruners watch the first seed's validation curve.
    """

    def __init__(self, *, settings: TuneSettings, params: list[Param], overrides: Sequence[str], task: str,
                 data: Path, checkpoint: str | Path, normal_class: str | None, task_data: TaskData,
                 trials_dir: Path, repeats: int, per_epoch: bool, base_seed: int, on_epoch=None):
        self.settings, self.params, self.overrides = settings, params, list(overrides)
        self.task, self.data, self.checkpoint, self.normal_class = task, data, checkpoint, normal_class
        self.task_data, self.trials_dir, self.repeats = task_data, trials_dir, repeats
        self.per_epoch, self.base_seed, self.on_epoch = per_epoch, base_seed, on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            # Optuna keeps the state (FAIL) but not the reason; store it for trials.csv and summaries.
            trial.set_user_attr("error", _one_line(exc))
            raise

    def _run(self, trial: optuna.Trial) -> float:
        suggested = suggest(trial, self.params)
        trial_dir = _fresh_dir(self.trials_dir / f"trial_{trial.number:04d}")
        trial.set_user_attr("trial_dir", str(trial_dir))
        metric = self.settings.metric
        scores: list[float] = []
        for i in range(self.repeats):
            run_dir = trial_dir if self.repeats == 1 else trial_dir / f"seed_{i}"
            recipe = load_recipe(FinetuneRecipe, self.settings.finetune_recipe, [
                *self.overrides, *suggested, f"run.out={_toml_literal(str(run_dir))}",
                "run.repeats=1", f"run.seed={self.base_seed + i}"])
            _assert_validation_only(recipe, f"trial {trial.number}")
            report_epochs = self.per_epoch and i == 0

            def callback(epoch: int, val: dict[str, Any], _report: bool = report_epochs) -> None:
                value = float(val[metric])
                if self.on_epoch is not None:
                    self.on_epoch(trial.number, i, epoch, value)
                if _report:
                    trial.report(value, int(epoch))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch} ({metric} {value:.4f})")

            score_test = False  # the one place trials call finetune: the test split stays unseen
            result = finetune(recipe, task=self.task, data=self.data, checkpoint=self.checkpoint,
                              normal_class=self.normal_class, epoch_callback=callback, score_test=score_test,
                              progress=False, task_data=self.task_data)
            if any(run.get("test") is not None for run in result.runs):
                raise RuntimeError("finetune returned test metrics inside a tuning trial; refusing to use them")
            value = float(sum(float(run["val"][metric]) for run in result.runs) / len(result.runs))
            scores.append(value)
            trial.set_user_attr("seed_scores", scores)
            if not self.per_epoch and self.repeats > 1:
                trial.report(value, i)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after seed {i} ({metric} {value:.4f})")
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


def _fail_orphaned_trials(study: optuna.Study) -> None:
    """With the default one-worker SQLite study, a RUNNING trial at start-up belongs to a killed run.

    Heartbeats would fail it only after the grace period; doing it now lets the resumed run retry its
    parameters at once. Shared RDB studies (--storage) are left to the heartbeats: other workers may be alive.
    """
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "error", "the tuning process was killed during this trial")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def make_storage(url: str | None, out: Path, settings: TuneSettings) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: trials of a killed process are failed after the grace period and retried."""
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    elif "://" not in url:  # a bare file name means a SQLite file
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    kwargs: dict[str, Any] = {"heartbeat_interval": settings.heartbeat_interval,
                              "grace_period": max(settings.grace_period, 2 * settings.heartbeat_interval)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental; the behaviour is what we need
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9 renamed the hook
                kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=settings.max_retry)
            else:  # pragma: no cover - older Optuna
                kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=settings.max_retry)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError as exc:
        raise ConfigError(f"--storage {_hide_password(url)}: the database driver is missing ({exc}); install it") from None
    except Exception as exc:
        raise ConfigError(f"--storage {_hide_password(url)}: cannot open the study database ({_one_line(exc)})") from None


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def make_pruner(name: str, settings: TuneSettings, repeats: int) -> optuna.pruners.BasePruner:
    """Median (default) or Hyperband over epochs; Wilcoxon over seeds when each trial runs several."""
    if name == "auto":
        name = "wilcoxon" if repeats > 1 else "median"
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                           n_warmup_steps=settings.pruner_warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if name == "wilcoxon":
        if repeats < 2:
            raise ConfigError("--pruner wilcoxon compares seeds; use it with --repeats 2 or more")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental in Optuna; its behaviour is what we document
            return optuna.pruners.WilcoxonPruner(p_threshold=settings.wilcoxon_p, n_startup_steps=min(2, repeats - 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: use one of {', '.join(PRUNERS)}")


def _counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    TS = optuna.trial.TrialState
    return {"complete": states.count(TS.COMPLETE), "pruned": states.count(TS.PRUNED),
            "failed": states.count(TS.FAIL), "running": states.count(TS.RUNNING), "waiting": states.count(TS.WAITING)}


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _short_params(params: dict[str, Any], limit: int = 60) -> str:
    parts = []
    for key, value in params.items():
        name = key.split(".")[-1]
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _save_plots(study: optuna.Study, out: Path) -> list[str]:
    """optimization_history.png and param_importances.png; a plot that cannot be made is a warning, not a crash."""
    problems = []
    try:
        if "matplotlib.pyplot" not in sys.modules:
            import matplotlib

            matplotlib.use("Agg")  # headless: a tuning server has no display
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except Exception as exc:
        return [f"plots skipped: matplotlib unavailable ({_one_line(exc)})"]
    n_complete = _counts(study)["complete"]
    jobs = [("optimization_history.png", ovm.plot_optimization_history, 1),
            ("param_importances.png", ovm.plot_param_importances, 2)]
    for name, plot, needed in jobs:
        if n_complete < needed:
            problems.append(f"{name} skipped: needs at least {needed} complete trial(s), have {n_complete}")
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
            problems.append(f"{name} not written: {_one_line(exc)}")
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
    best = "-" if result.best_value is None else f"{result.best_value:.4f} (trial {result.best_trial})"
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
    final_test: bool = True,
    progress: bool = True,
) -> TuneResult:
    """Search fine-tuning hyper-parameters on the validation split, then test the best once.

    `trials`, `repeats` and `pruner` default to the tune recipe's `[tune]` values. `trials` is the
    study's target: finished (complete + pruned) trials already in the study count, so re-running
    the same command resumes a killed search and only runs what is missing. `timeout` (seconds)
    limits this invocation.

    Storage: by default `sqlite:///<out>/optuna.db`, which suits ONE worker process. Pass an RDB URL
    (`postgresql://user:pw@host/db`, `mysql://...`) with the same `study_name` on several machines to
    let them share one study; each stops when the study reaches `trials`. Heartbeats mark trials
    of a killed worker as failed and re-queue their parameters (`RetryFailedTrialCallback`).

    Outputs in `out`: `trials/trial_NNNN/` (one fine-tune run per trial), `best.toml` (pass to
    `m2dx finetune --params`), `trials.csv`, `summary.json`, `optimization_history.png`,
    `param_importances.png` and, with `final_test`, `final/` - the single run scored on test.
    """
    settings, params = load_search_space(tune_recipe)
    recipe_stem = Path(str(tune_recipe)).stem
    target = settings.trials if trials is None else int(trials)
    repeats = settings.repeats if repeats is None else int(repeats)
    pruner_name = (settings.pruner if pruner is None else pruner).strip().lower()
    timeout = settings.timeout if timeout is None else parse_duration(timeout)
    if target < 1:
        raise ConfigError(f"--trials must be at least 1, got {target}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    overrides = list(overrides)
    # The recipe every trial starts from: must be valid and select on validation BEFORE any compute.
    base = load_recipe(FinetuneRecipe, settings.finetune_recipe, overrides)
    _assert_validation_only(base, str(settings.finetune_recipe))
    out_dir = Path(out) if out is not None else Path("runs") / f"tune-{task}-{recipe_stem}"
    out_dir = out_dir.expanduser()
    name = study_name or f"{recipe_stem}-{task}"
    pruner_obj = make_pruner(pruner_name, settings, repeats)  # validates the pruner/repeats pair early

    # Load the task once: every trial shares the same items and the same validation split.
    task_data = load_task(task, data, normal_class=normal_class, val_fraction=base.data.val_fraction,
                          seed=base.run.seed, test_set=base.data.test_set)

    old_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines replace Optuna's INFO logs
    try:
        return _tune_study(settings=settings, params=params, tune_recipe=tune_recipe, task=task, data=data,
                           checkpoint=checkpoint, storage=storage, name=name, out_dir=out_dir, target=target,
                           timeout=timeout, repeats=repeats, pruner_obj=pruner_obj, normal_class=normal_class,
                           overrides=overrides, final_test=final_test, progress=progress, base=base,
                           task_data=task_data)
    finally:
        optuna.logging.set_verbosity(old_verbosity)


def _tune_study(*, settings: TuneSettings, params: list[Param], tune_recipe: str | Path, task: str,
                data: Path | str, checkpoint: str | Path, storage: str | None, name: str, out_dir: Path,
                target: int, timeout: float | None, repeats: int, pruner_obj: optuna.pruners.BasePruner,
                normal_class: str | None, overrides: list[str], final_test: bool, progress: bool,
                base: FinetuneRecipe, task_data: TaskData) -> TuneResult:
    """The study part of `tune`, after everything that can be checked without compute has been checked."""
    is_wilcoxon = isinstance(pruner_obj, optuna.pruners.WilcoxonPruner)
    out_dir.mkdir(parents=True, exist_ok=True)
    rdb = make_storage(storage, out_dir, settings)
    storage_url = str(rdb.url)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.sampler_startup_trials)
    study = optuna.create_study(storage=rdb, sampler=sampler, pruner=pruner_obj, study_name=name,
                                direction=settings.direction, load_if_exists=True)
    study.set_user_attr("tune_recipe", str(tune_recipe))
    study.set_user_attr("finetune_recipe", str(settings.finetune_recipe))
    study.set_user_attr("metric", settings.metric)
    if storage is None:
        _fail_orphaned_trials(study)
    counts = _counts(study)
    remaining = max(0, target - counts["complete"] - counts["pruned"])
    if counts["complete"] + counts["pruned"]:
        console.print(f"resuming study {name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
                      f"{counts['failed']} failed; {remaining} trial(s) to go")

    bar = make_progress(show=progress)
    task_id = None
    state = {"consecutive_failures": 0, "best": ""}

    def best_text() -> str:
        best = _best(study)
        if best is None:
            return "best -"
        return f"best {best.value:.4f} #{best.number} {_short_params(best.params)}"

    def on_epoch(number: int, seed_index: int, epoch: int, value: float) -> None:
        if task_id is not None:
            seed = f" seed {seed_index}" if repeats > 1 else ""
            bar.update(task_id, status=f"#{number}{seed} ep {epoch} {settings.metric} {value:.3f} | {state['best']}")

    def after_trial(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            state["consecutive_failures"] += 1
            console.print(f"[yellow]trial {trial.number} failed: {trial.user_attrs.get('error', 'see log')}[/]")
            if state["consecutive_failures"] >= settings.max_consecutive_failures:
                console.print(f"[red]{state['consecutive_failures']} trials in a row failed; stopping the search[/]")
                st.stop()
        else:
            state["consecutive_failures"] = 0
        state["best"] = best_text()
        if task_id is not None:
            bar.update(task_id, advance=1, status=state["best"])

    objective = _Objective(settings=settings, params=params, overrides=overrides, task=task, data=Path(data),
                           checkpoint=checkpoint, normal_class=normal_class, task_data=task_data,
                           trials_dir=out_dir / "trials", repeats=repeats, per_epoch=not is_wilcoxon,
                           base_seed=base.run.seed, on_epoch=on_epoch)
    stop_at_target = optuna.study.MaxTrialsCallback(
        target, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    try:
        if remaining:
            state["best"] = best_text()
            bar.start()
            task_id = bar.add_task("tuning", total=remaining, status=state["best"])
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,),
                           callbacks=[after_trial, stop_at_target])
    finally:
        bar.stop()

    counts = _counts(study)
    best = _best(study)
    notes: list[str] = []
    # trials.csv first: it is the record that explains a search where nothing completed
    frame = study.trials_dataframe()
    atomic_write_text(out_dir / "trials.csv", frame.to_csv(index=False))

    result = TuneResult(out_dir=out_dir, study_name=name, storage=_hide_password(storage_url),
                        best_value=None if best is None else float(best.value),
                        best_params={} if best is None else dict(best.params),
                        n_complete=counts["complete"], n_pruned=counts["pruned"], n_failed=counts["failed"],
                        best_trial=None if best is None else best.number)
    if best is not None:
        header = (f"best parameters of study {name!r} (trial {best.number}, validation {settings.metric} "
                  f"{best.value:.4f})\nfine-tune recipe: {settings.finetune_recipe}\n"
                  f"use: m2dx finetune --recipe {Path(str(settings.finetune_recipe)).stem} --params best.toml")
        atomic_write_text(out_dir / "best.toml", dump_toml(params_to_tables(best.params, overrides), header))
        notes.extend(_save_plots(study, out_dir))

    final: FinetuneResult | None = None
    final_dir = out_dir / "final"
    previous_final = None
    if best is not None and final_test and not remaining and final_dir.exists():
        # Nothing new was searched, so the best is unchanged: keep the earlier final run instead of
        # spending another full fine-tune (delete out/final to force one).
        previous_final = _previous_final(out_dir)
        if previous_final is not None:
            notes.append(f"no new trials; kept the earlier final run in {final_dir} (delete it to rerun)")
    if best is not None and final_test and previous_final is None:
        if final_dir.exists():  # a resumed search keeps the previous final run next to the new one
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            final_dir.rename(_fresh_dir(out_dir / f"final-{stamp}"))
        best_overrides = [f"{k}={_toml_literal(v)}" for k, v in best.params.items()]
        final_recipe = load_recipe(FinetuneRecipe, settings.finetune_recipe,
                                   [*overrides, *best_overrides, f"run.out={_toml_literal(str(final_dir))}"])
        _assert_validation_only(final_recipe, "final fine-tune")
        final = finetune(final_recipe, task=task, data=Path(data), checkpoint=checkpoint, normal_class=normal_class,
                         score_test=True, progress=progress, task_data=task_data)
        result.final = final
    final_info = _final_summary(final) if previous_final is None else previous_final

    summary = {
        "study_name": name, "storage": result.storage, "tune_recipe": str(tune_recipe),
        "finetune_recipe": str(settings.finetune_recipe), "task": task, "data": str(data),
        "checkpoint": str(checkpoint), "overrides": overrides, "metric": settings.metric,
        "direction": settings.direction, "pruner": type(pruner_obj).__name__, "repeats": repeats,
        "trials_target": target, "counts": counts, "best_trial": result.best_trial,
        "best_value": result.best_value, "best_params": result.best_params,
        "space": [dataclasses.asdict(p) for p in params], "final": final_info, "warnings": notes,
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
