"""Recipes: TOML over dataclass defaults, typed `a.b=value` overrides, strictness, and the TOML round trip."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from m2dx_clinic.config import (
    dump_toml,
    find_recipe,
    load_recipe,
    parse_override,
    save_resolved,
    to_dict,
)
from m2dx_clinic.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    blr: float = 3e-4
    warmup_epochs: int = 20
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass(frozen=True)
class Data:
    name: str = "icbhi"
    crops: list[int] = field(default_factory=lambda: [1, 2])
    noise_dir: str | None = None
    routing: Literal["paper", "reference"] = "paper"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    amp: bool = True
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_without_recipe():
    assert load_recipe(Recipe) == Recipe()


def test_toml_over_defaults(tmp_path):
    path = write(tmp_path, '[about]\ntext = "for humans"\n\n[optim]\nblr = 1e-4\n\n[data]\nname = "sprsound"\n')
    recipe = load_recipe(Recipe, path)
    assert recipe.optim == Optim(blr=1e-4)  # the other optim fields keep their defaults
    assert recipe.data.name == "sprsound" and recipe.data.crops == [1, 2]
    assert recipe.seed == 0 and recipe.amp is True


def test_overrides_are_typed_like_toml(tmp_path):
    path = write(tmp_path, "seed = 3\n[optim]\nblr = 1e-4\n")
    recipe = load_recipe(
        Recipe, path,
        overrides=["optim.warmup_epochs=5", "optim.blr=2.5e-4", "data.crops=[3, 4, 5]", "data.name=esc50",
                   "amp=false", "optim.betas=[0.8, 1]", "data.noise_dir=/tmp/noise dir", "data.routing=reference"],
    )
    assert recipe.seed == 3
    assert recipe.optim.warmup_epochs == 5 and isinstance(recipe.optim.warmup_epochs, int)
    assert recipe.optim.blr == 2.5e-4 and isinstance(recipe.optim.blr, float)
    assert recipe.optim.betas == (0.8, 1.0) and all(isinstance(b, float) for b in recipe.optim.betas)
    assert recipe.data.crops == [3, 4, 5]
    assert recipe.data.name == "esc50"  # bare word -> string
    assert recipe.data.noise_dir == "/tmp/noise dir"
    assert recipe.data.routing == "reference"
    assert recipe.amp is False
    # an int where a float is declared becomes a float
    assert load_recipe(Recipe, overrides=["optim.blr=1"]).optim.blr == 1.0
    # overrides win over the TOML and over `extra`
    assert load_recipe(Recipe, path, overrides=["seed=9"], extra={"seed": 5}).seed == 9
    assert load_recipe(Recipe, path, extra={"seed": 5}).seed == 5


@pytest.mark.parametrize("override, key", [("optim.bogus=1", "optim.bogus"), ("sede=1", "sede"),
                                           ("data.crops.x=1", "data.crops")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(Recipe, overrides=[override])


def test_unknown_key_in_toml(tmp_path):
    path = write(tmp_path, "[optim]\nblr = 1e-4\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate") as info:
        load_recipe(Recipe, path)
    assert "blr" in str(info.value)  # lists the valid keys


@pytest.mark.parametrize(
    "override",
    ["optim.warmup_epochs=abc", "optim.warmup_epochs=1.5", "amp=1", "optim.blr=fast", "data.crops=3",
     "data.crops=[1, \"a\"]", "data.routing=sideways", "optim.betas=[0.9]", "data.name=3", "optim=1"],
)
def test_type_mismatch(override):
    with pytest.raises(ConfigError):
        load_recipe(Recipe, overrides=[override])


def test_bad_override_syntax_and_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.blr")
    assert parse_override("a.b = [1, 2]") == (["a", "b"], [1, 2])
    bad = write(tmp_path, "[optim\nblr = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_recipe(Recipe, bad)
    with pytest.raises(ConfigError, match="recipe not found"):
        find_recipe("no_such_recipe_anywhere")


def test_dump_toml_round_trip(tmp_path):
    recipe = load_recipe(Recipe, overrides=["data.name=with \"quotes\" and \\ slash", "optim.blr=1.5e-05",
                                            "data.noise_dir=/x/y", "seed=-4"])
    text = dump_toml(to_dict(recipe), header="resolved recipe\nsecond line")
    assert text.startswith("# resolved recipe\n# second line\n")
    parsed = tomllib.loads(text)
    assert parsed == to_dict(recipe)
    assert load_recipe(Recipe, write(tmp_path, text)) == recipe
    # None values are left out and come back as the default None
    plain = Recipe()
    assert "noise_dir" not in tomllib.loads(dump_toml(to_dict(plain)))["data"]
    saved = save_resolved(plain, tmp_path / "run" / "recipe.toml", header="x")
    assert load_recipe(Recipe, saved) == plain


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.toml")))
def test_every_shipped_recipe_validates(recipe):
    """Each recipe in recipes/ loads against its schema (unknown keys or bad types would fail here)."""
    from m2dx_clinic.config import find_recipe, read_toml
    from m2dx_clinic.recipes import FinetuneRecipe
    from m2dx_clinic.recipes import PretrainRecipe
    from m2dx_clinic.tuning import load_search_space

    path = find_recipe(recipe)
    text = path.read_text()
    assert text.startswith("#"), "every recipe opens with a usage header"
    if "tune" in read_toml(path):
        settings, params = load_search_space(path)
        assert params
    elif "finetune" in recipe:
        load_recipe(FinetuneRecipe, path)
    else:
        loaded = load_recipe(PretrainRecipe, path)
        assert loaded.name == path.stem


def test_recipes_are_listed_with_the_command_that_reads_them():
    from m2dx_clinic.config import RECIPES_DIR, list_recipes, load_recipe
    from m2dx_clinic.recipes import FinetuneRecipe, PretrainRecipe

    rows = list_recipes()
    assert [r["name"] for r in rows] == sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    kinds = {"m2dx finetune": FinetuneRecipe, "m2dx further-pretrain": PretrainRecipe, "m2dx pretrain": PretrainRecipe}
    for row in rows:
        assert row["about"], row["name"]
        if row["command"] in kinds:  # each loads as the recipe its command reads
            load_recipe(kinds[row["command"]], row["name"])
