"""Recipes are data: TOML files mapped onto typed dataclasses, with `section.key=value` overrides.

Each training entry point declares its recipe as a tree of dataclasses (defaults = paper values).
`load_recipe` reads a TOML file over those defaults, applies command-line overrides, type-checks
every value against the declared field type and rejects unknown keys, so a typo fails at once
instead of silently training with a default. `dump_toml` writes the resolved copy into the run.

The model geometry (`ViTConfig`, `PredictorConfig`) lives here too: it is plain data that a recipe's
`[model]` table sets, a checkpoint's metadata records and `models/` builds from, so the recipe layer
declares it once without importing the networks (`models.vit` / `models.m2d` re-export it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .fileio import atomic_write_text as atomic_write_text  # save_resolved; re-exported for older importers

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


# ---------------------------------------------------------------------------- model geometry
@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Encoder geometry and size. Defaults = ViT-Base on 80x200 log-mel with 16x4 patches (ICBHI base).

    The field names are the keys of the `vit_config` dict every checkpoint and classifier file stores:
    published-checkpoint compatibility depends on them, so they never change.
    """

    input_size: tuple[int, int] = (80, 200)  # (mel bins, frames) the model is trained on
    patch_size: tuple[int, int] = (16, 4)  # (freq, time)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    sample_rate: int = 16000

    @property
    def grid_size(self) -> tuple[int, int]:
        """(F, T') patches along frequency and time."""
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        f, t = self.grid_size
        return f * t


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """The M2D predictor ("decoder"): 512-d, 8 blocks, 16 heads in every published model (`predictor_config`
    in a training checkpoint's metadata)."""

    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


def list_recipes() -> list[dict[str, str]]:
    """The bundled recipes: name, which command reads them, and the first line of their header."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        header = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                       if line.startswith("#") and line.lstrip("# ").strip()), "")
        stem = path.stem
        command = ("m2dx tune" if stem.endswith("_tune") else "m2dx finetune" if stem.endswith("_finetune")
                   else "m2dx pretrain" if stem.startswith("audioset") else "m2dx further-pretrain")
        out.append({"name": stem, "command": command, "about": header})
    return out


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or a short name looked up in `recipes/` (`tiny_cpu` -> recipes/tiny_cpu.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / f"{name_or_path}.toml", RECIPES_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))) or "none"
    raise ConfigError(f"{name_or_path}: recipe not found; pass a TOML path or one of: {known}")


def read_toml(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    """A TOML file as a dict; unreadable or malformed files are one-line ConfigErrors naming `what` it is."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a TOML or override value against a field's type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Instantiate `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown recipe key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    # nested dataclasses with defaults must be rebuilt so partial tables merge over defaults
    for name, f in fields.items():
        if name in kwargs or not _is_dataclass_type(hints[name]):
            continue
        kwargs[name] = build_dataclass(hints[name], {}, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.blr=1e-4` -> (['optim', 'blr'], 1e-4); values use TOML syntax, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `updates` into a copy of `base`."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`values` with each `a.b=value` override merged in, in order (later ones win)."""
    out = dict(values)
    for text in overrides:
        path, value = parse_override(text)
        nested: dict[str, Any] = value
        for part in reversed(path):
            nested = {part: nested}
        out = merge(out, nested)
    return out


def load_recipe(
    cls: type[T],
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> T:
    """Defaults of `cls` <- recipe TOML <- `extra` (typed CLI options) <- `overrides` (`a.b=value`)."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values = read_toml(find_recipe(recipe))
        values.pop("about", None)  # free-text header table for humans
    if extra:
        values = merge(values, extra)
    values = apply_overrides(values, overrides)
    return build_dataclass(cls, values)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict of TOML-compatible values (tuples become lists, Paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def toml_value(value: Any) -> str:
    """One value as a TOML literal: recipes written to disk and `key=value` overrides both use it.

    Floats keep `repr` (nan / inf / -inf are TOML too); a JSON string is a valid TOML basic string
    with every control character escaped. Tables, dates and None have no override form.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ConfigError(f"value {value!r} cannot be written as a TOML scalar (tables, dates and null are not supported)")


def dump_toml(values: dict[str, Any], header: str = "") -> str:
    """A small TOML writer for recipe-shaped dicts (scalars, lists, nested tables). None values are skipped."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {toml_value(value)}")
        for key, value in tables.items():
            emit(value, f"{prefix}.{key}" if prefix else key)

    emit(values, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def to_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Values -> `a.b=value` override strings (TOML literals); the one converter every caller uses.

    Keys may be dotted (`{"optim.lr": 1e-4}`, typed CLI options, Optuna parameters) or nested
    tables (`{"optim": {"lr": 1e-4}}`, a best-parameters file); None values are skipped (an
    option the user did not give). numpy scalars from a storage round trip become Python values.
    """
    out: list[str] = []
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.extend(to_overrides(value, name))
        elif value is not None:
            if hasattr(value, "item") and not isinstance(value, (str, bytes)):
                value = value.item()
            out.append(f"{name}={toml_value(value)}")
    return out


def load_params_toml(path: str | Path) -> list[str]:
    """A best-parameters TOML (recipe-shaped tables, e.g. `m2dx tune`'s best.toml) -> override strings.

    An `[about]` table (free text for humans) is ignored; unknown keys are left for `load_recipe`
    to reject with its usual message.
    """
    values = read_toml(path, what="parameters file")
    values.pop("about", None)
    return to_overrides(values)


PARAMS_RECIPE_KEY = "finetune_recipe"  # in the [about] table of a best-parameters file
DEFAULT_FINETUNE_RECIPE = "icbhi_finetune"


def params_recipe(path: str | Path) -> str | None:
    """The fine-tuning recipe a best-parameters file was tuned with: `[about] finetune_recipe`, or (files
    written before it existed) the `# fine-tune recipe: NAME` header line; None when it says nothing."""
    values = read_toml(path, what="parameters file")
    about = values.get("about")
    if isinstance(about, dict) and about.get(PARAMS_RECIPE_KEY):
        return str(about[PARAMS_RECIPE_KEY])
    text = Path(path).expanduser().read_text(encoding="utf-8")
    match = re.search(r"^#\s*fine-tune recipe:\s*(\S+)\s*$", text, flags=re.MULTILINE)
    return match.group(1) if match else None


def recipe_for_params(recipe: str | None, params: str | Path | None) -> str:
    """The fine-tuning recipe to use: --recipe, else the one --params was tuned with, else the default.

    Tuned values applied to another recipe would silently train something that was never tuned, so a
    --recipe that differs from the tuned one is refused with one line naming both.
    """
    tuned = params_recipe(params) if params else None
    if recipe is None:
        return tuned or DEFAULT_FINETUNE_RECIPE
    if tuned is not None and recipe != tuned and Path(recipe).stem != Path(tuned).stem:
        raise ConfigError(f"{params}: tuned with recipe {tuned!r}, but --recipe {recipe!r} was given; "
                          f"drop --recipe (or pass --recipe {tuned})")
    return recipe


def save_resolved(recipe: Any, path: str | Path, header: str = "") -> Path:
    """Write the fully resolved recipe as TOML (it can be passed back with --recipe)."""
    return atomic_write_text(path, dump_toml(to_dict(recipe), header))
