"""The search space of a tune recipe: `[space."optim.lr"]` tables checked against the fine-tuning recipe.

The space is data (`recipes/icbhi_tune.toml`), not code, so a clinician can widen a range or freeze
a parameter without touching Python; every key is checked against the real `FinetuneRecipe` fields
so a typo fails before hours of compute are spent. Keys that could let the test split decide
anything (`run.*`, above all `run.selection`) are refused here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from .. import config
from ..config import apply_overrides, find_recipe, parse_override, read_toml, to_overrides
from ..errors import ConfigError
from ..recipes import FinetuneRecipe, TuneSettings, validate_tune_settings

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
TEST_LEAK_MESSAGE = "tuning must select on validation"


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


def _check_value(key: str, value: Any) -> None:
    """Type-check one value for a recipe key by building the recipe with it (the same rules as `load_recipe`)."""
    try:
        config.build_dataclass(FinetuneRecipe, apply_overrides({}, to_overrides({key: value})))
    except ConfigError as exc:
        raise ConfigError(f"space.{key}: {exc}") from None


def _parse_param(key: str, table: dict[str, Any]) -> Param:
    """Validate one `[space."a.b"]` table against the recipe field it targets."""
    section = key.split(".", 1)[0]
    if section == "run":
        if key == "run.selection":
            raise ConfigError(f"space.{key}: {TEST_LEAK_MESSAGE}; remove run.selection from the search space")
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


def load_search_space(path_or_name: str | Path, overrides: Sequence[str] = ()) -> tuple[TuneSettings, list[Param]]:
    """Read a tune recipe (`icbhi_tune` or a path) into checked settings and parameters.

    `overrides` are `tune.key=value` strings over its `[tune]` table (`m2dx tune --trials 5` arrives as
    `tune.trials=5`, the way `m2dx finetune`'s flags reach its recipe), so a value given on the command
    line is checked by the same rules as one written in the file. Everything is validated here, before
    any compute: unknown keys, wrong types, inverted bounds and any attempt to search `run.*` (which
    could select models on the test split) raise ConfigError.
    """
    path = find_recipe(path_or_name)
    values = read_toml(path)
    values.pop("about", None)
    outside = [text for text in overrides if not text.split("=", 1)[0].strip().startswith("tune.")]
    if outside:
        raise ConfigError(f"{', '.join(outside)}: only [tune] keys (tune.key=value) override a tune recipe")
    values = apply_overrides(values, list(overrides))
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
    if isinstance(tune_table.get("pruner"), str):  # `--pruner Median` means median
        tune_table["pruner"] = tune_table["pruner"].strip().lower()
    where = f"{path} with {' '.join(overrides)}" if overrides else str(path)  # a flag's mistake is not the file's
    try:
        settings = config.build_dataclass(TuneSettings, tune_table, "tune")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate_tune_settings(settings, where)
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


def suggest(trial: optuna.trial.BaseTrial, params: Sequence[Param]) -> list[str]:
    """Ask the trial for a value of every parameter and return recipe overrides `key=value` (TOML syntax).

    Overrides go through the same parser as the command line, so a suggested value is type-checked
    exactly like a user's `--set optim.lr=1e-4`.
    """
    values: dict[str, Any] = {}
    for p in params:
        if p.type == "float":
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log, step=p.step)
        elif p.type == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            values[p.key] = trial.suggest_categorical(p.key, p.choices)
    return to_overrides(values)


def params_to_tables(params: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Dotted best params (plus the fixed overrides of the search) -> nested recipe tables for best.toml.

    `run.*` and cache-location overrides are left out: they describe the machine and folder of this
    search, and the person re-running `m2dx finetune --params best.toml` chooses their own.
    """
    kept = []
    for text in overrides:
        path, _ = parse_override(text)
        if not ((path and path[0] == "run") or ".".join(path) in _MACHINE_KEYS):
            kept.append(text)
    return apply_overrides({}, [*kept, *to_overrides(params)])


def assert_validation_only(recipe: FinetuneRecipe, where: str) -> None:
    """Refuse any model-selection rule that reads the test split ("val" and "last" never do)."""
    if recipe.run.selection not in ("val", "last"):
        raise ConfigError(f"{where}: run.selection={recipe.run.selection}: {TEST_LEAK_MESSAGE}; "
                          "drop the override (or set run.selection=val in the fine-tune recipe)")


