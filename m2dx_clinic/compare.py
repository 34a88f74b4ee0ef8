"""`m2dx finetune --mode compare`: the best classifier for the data, chosen on validation.

Three candidates on exactly the same items (the task is loaded once and handed to each run):
- `baseline`: log-mel statistics + logistic regression (no encoder);
- `linear`: linear evaluation of the frozen encoder (clip embeddings + logistic regression);
- `full`: the whole encoder fine-tuned.
Each is a complete fine-tuning run folder (`RUN/<candidate>/`: predictions, metrics with bootstrap
CIs, plots, its model card and classifier files). The recommendation reads only their validation
predictions: the best validation Score wins, but a simpler candidate whose validation Score lies
inside the winner's 95 % bootstrap CI is preferred (a difference the data cannot show is no reason
to ship the larger model). The test split is scored once per candidate and never used to choose.

Written here: `metrics.json` (`candidates` and `recommended`), `candidates.json` (which folder is
which candidate; `m2dx predict --model RUN --candidate K` reads it), `predictions.csv` (every
candidate's rows, with a `candidate` column), `best.pt` (the recommended candidate's file) and the
comparison's model card.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._version import __version__
from .checkpoint.classifier import COMPARISON_FILE
from .data.tasks import load_task
from .errors import ConfigError
from .evaluation.calibration import apply_temperature, shipped_report
from .evaluation.clinical import clinical_report
from .fileio import atomic_link_or_copy, atomic_write_csv, atomic_write_json, to_jsonable
from .finetune import finetune
from .finetune_outputs import METHOD_WORDS, SELECTED_CLASSIFIER as SELECTED_FILE
from .model_card import calibration_cells, write_comparison_card
from .progress import console
from .recipes import FinetuneRecipe, validate_finetune_recipe
from .rundir import default_run_dir, hold

SIMPLEST_FIRST = ("baseline", "linear", "full")
NAMES = {"baseline": "the log-mel baseline", "linear": "linear evaluation of the frozen encoder",
         "full": "the fully fine-tuned encoder"}
RULE = ("the best validation Score; a simpler candidate (baseline, then linear, then full) whose validation Score "
        "is inside the best one's 95 % bootstrap CI is preferred; the test split never chooses")


@dataclass
class CompareResult:
    run_dir: Path
    recommended: str
    reason: str
    candidates: dict[str, dict[str, Any]]


def _ensemble(frame: pd.DataFrame, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities [N, K] averaged over repeats, labels [N], subjects [N]) of one split of predictions.csv."""
    rows = frame[frame["split"] == split]
    cols = [f"prob_{c}" for c in classes]
    mean = rows.groupby("item_id", sort=False)[cols].mean()
    first = rows.drop_duplicates("item_id").set_index("item_id").loc[mean.index]
    return mean.to_numpy(np.float64), first["true_index"].to_numpy(int), first["subject"].astype(str).tolist()


def _candidate(kind: str, folder: Path, seconds: float, recipe: FinetuneRecipe) -> dict[str, Any]:
    """One row of the comparison: validation Score with its bootstrap CI, test metrics, time, files."""
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    frame = pd.read_csv(folder / "predictions.csv")
    classes, normal = metrics["classes"], int(metrics["normal_class_index"])
    ensemble = metrics.get("ensemble") or {}
    point = ensemble.get("operating_point")
    temperature = (ensemble.get("calibration") or {}).get("temperature")
    val = None
    if (frame["split"] == "val").any():
        probs, labels, groups = _ensemble(frame, "val", classes)  # predictions.csv holds unscaled probabilities
        probs = apply_temperature(probs, float(temperature)) if temperature else probs  # what the point was chosen on
        val = clinical_report(probs, labels, groups, classes, normal, point["threshold"] if point else None,
                              resamples=recipe.run.bootstrap, seed=recipe.run.seed)
    return {"method": METHOD_WORDS[kind], "folder": folder.name, "classifier": f"{folder.name}/best.pt",
            "val": val, "test": ensemble.get("test"), "operating_point": point,
            "temperature": temperature, "calibration": _calibration_summary(metrics.get("calibration") or {}),
            # from the prepared segments to the written outputs (the embeddings of linear evaluation included);
            # reading the audio is shared (the first candidate decodes, the others read the cache): wall_seconds
            "seconds": float(metrics.get("seconds", seconds)), "wall_seconds": seconds,
            "repeats": metrics.get("repeats"), "warnings": metrics.get("warnings", []),
            "items": metrics.get("items"), "data_sha256": (metrics.get("data_fingerprint") or {}).get("sha256")}


def _calibration_summary(blocks: dict[str, Any]) -> dict[str, Any]:
    """Per scored split, the ECE and Brier score of the probabilities the candidate ships (after its temperature
    when it has one), from its own metrics.json (`evaluation.calibration`)."""
    out = {}
    for split, block in blocks.items():
        shipped = shipped_report(block)
        out[split] = {"ece": shipped.get("ece"), "brier": shipped.get("brier"), "bins": shipped.get("bins"),
                      "scaled": "after_scaling" in block}
    return out


def _score(block: dict[str, Any] | None) -> float:
    value = ((block or {}).get("values") or {}).get("score")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def recommend(candidates: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(recommended candidate, one sentence a clinician understands) by `RULE` on validation only."""
    order = [k for k in SIMPLEST_FIRST if k in candidates]
    best = max(order, key=lambda k: (_score(candidates[k]["val"]), -order.index(k)))  # ties: the simpler
    best_val = _score(candidates[best]["val"])
    ci = ((candidates[best]["val"] or {}).get("ci95") or {}).get("score")
    low = ci[0] if ci and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci) else best_val
    chosen = next(k for k in order if _score(candidates[k]["val"]) >= low or k == best)
    pct = lambda k: f"{100 * _score(candidates[k]['val']):.1f} %"  # noqa: E731
    others = ", ".join(f"{NAMES[k]} {pct(k)}" for k in order if k != chosen)
    tied = [k for k in order if k != chosen and _score(candidates[k]["val"]) == _score(candidates[chosen]["val"])]
    after = "; the test recordings were scored once, after this choice."
    if chosen == best and tied:
        reason = (f"Recommended: {NAMES[chosen]}, because on the validation recordings, which no candidate was "
                  f"trained on, it scored as well as any other (Score {pct(chosen)}; {others}) and it is the "
                  f"simplest of them{after}")
    elif chosen == best:
        reason = (f"Recommended: {NAMES[chosen]}, because it scored best on the validation recordings, which no "
                  f"candidate was trained on (Score {pct(chosen)}; {others}){after}")
    else:
        reason = (f"Recommended: {NAMES[chosen]}, because its validation Score ({pct(chosen)}) is within the "
                  f"uncertainty of the best one ({NAMES[best]}, {pct(best)}, 95 % CI {100 * low:.1f}-"
                  f"{100 * ci[1]:.1f} %), and a simpler model that does about as well is easier to trust{after}")
    return chosen, reason


def compare_candidates(recipe: FinetuneRecipe, *, task: str, data: Path, checkpoint: str | Path,
                       normal_class: str | None = None, progress: bool = True,
                       candidates: tuple[str, ...] = SIMPLEST_FIRST) -> CompareResult:
    """Run every candidate on the same items into RUN/<candidate>/ and write the comparison (module docstring)."""
    validate_finetune_recipe(recipe)
    if recipe.run.selection != "val":
        raise ConfigError("--mode compare chooses on the validation split; drop --selection (or use run.selection=val)")
    run_dir = Path(recipe.run.out) if recipe.run.out else default_run_dir(recipe.name)
    lock = hold(run_dir, "m2dx finetune --mode compare")
    try:
        if (run_dir / "metrics.json").exists():
            raise ConfigError(f"{run_dir}: already holds a finished run; pick another --out")
        td = load_task(task, data, normal_class=normal_class, val_fraction=recipe.data.val_fraction,
                       seed=recipe.run.seed, test_set=recipe.data.test_set)
        rows: dict[str, dict[str, Any]] = {}
        for kind in candidates:
            sub = copy.deepcopy(recipe)
            sub.run.mode, sub.run.out = kind, str(run_dir / kind)
            if progress:
                console.rule(f"candidate: {NAMES[kind]}")
            t0 = time.perf_counter()
            finetune(sub, task=task, data=data, checkpoint=checkpoint, task_data=td, progress=progress)
            rows[kind] = _candidate(kind, run_dir / kind, time.perf_counter() - t0, recipe)
        if len({row["data_sha256"] for row in rows.values()}) != 1:  # cannot happen: one task, one seed
            raise ConfigError(f"{run_dir}: the candidates saw different items; this is a bug, please report it")
        chosen, reason = recommend(rows)
        provenance = json.loads((run_dir / chosen / "metrics.json").read_text(encoding="utf-8")).get("provenance") or {}
        atomic_link_or_copy(run_dir / chosen / SELECTED_FILE, run_dir / SELECTED_FILE)
        atomic_write_json(run_dir / COMPARISON_FILE, {"recommended": chosen, "candidates": {k: k for k in rows}})
        frames = [pd.read_csv(run_dir / k / "predictions.csv").assign(candidate=k) for k in rows]
        frame = pd.concat(frames, ignore_index=True)
        columns = ["candidate", *[c for c in frame.columns if c != "candidate"]]
        atomic_write_csv(run_dir / "predictions.csv", frame[columns])
        first = next(iter(rows.values()))
        metrics = to_jsonable({
            "mode": "compare", "task": td.name, "name": provenance.get("name") or td.name, "provenance": provenance,
            "command": f"m2dx finetune --mode compare --task {task} --data {data} --checkpoint {checkpoint}",
            "classes": list(td.classes), "normal_class": td.classes[td.normal_class],
            "normal_class_index": td.normal_class, "items": first["items"], "data_sha256": first["data_sha256"],
            "candidates": rows, "recommended": chosen, "reason": reason,
            "rule": RULE, "selected": SELECTED_FILE, "package_version": __version__,
            "seconds_note": "seconds: each candidate's own work, from the prepared segments to its written outputs; "
                            "wall_seconds adds loading the checkpoint and reading the audio (cached after the first)",
            "metrics_note": "each candidate's rows are in predictions.csv (column candidate); val and test are the mean "
                            "of its repeats' probabilities; val CIs by the subject bootstrap of evaluation/clinical",
        })
        atomic_write_json(run_dir / "metrics.json", metrics, end="")
        write_comparison_card(run_dir, metrics)
    finally:
        lock.release()
    if progress:
        console.print(comparison_table(rows, chosen))
        console.print(f"[bold]{reason}[/]")
        for warning in rows[chosen]["warnings"]:
            console.print(f"[yellow]warning ({chosen}):[/] {warning}")
        console.print(f"{run_dir / SELECTED_FILE} is the {chosen} candidate; m2dx predict --model {run_dir} applies it "
                      f"(--candidate {'|'.join(rows)} picks another)")
    return CompareResult(run_dir, chosen, reason, rows)


def comparison_table(rows: dict[str, dict[str, Any]], chosen: str) -> Any:
    """A rich table: each candidate's validation and test Score and AUROC with 95 % CIs, and its time."""
    from rich.table import Table

    def cell(block: dict[str, Any] | None, key: str) -> str:
        value = ((block or {}).get("values") or {}).get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return "-"
        ci = ((block or {}).get("ci95") or {}).get(key)
        interval = f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci and all(map(math.isfinite, ci)) else ""
        return f"{100 * value:.1f}{interval}"

    table = Table(title="candidates on the same items (95 % CIs over subjects); chosen on validation only")
    for name in ("candidate", "val Score", "val AUROC", "test Score", "test AUROC", "test ECE", "test Brier", "seconds"):
        table.add_column(name, justify="left" if name == "candidate" else "right")
    for kind, row in rows.items():
        table.add_row(f"{kind}{' (recommended)' if kind == chosen else ''}", cell(row["val"], "score"),
                      cell(row["val"], "auroc_abnormal"), cell(row["test"], "score"),
                      cell(row["test"], "auroc_abnormal"), *calibration_cells(row), f"{row['seconds']:.1f}")
    return table

