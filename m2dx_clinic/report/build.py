"""Building the checkpoint-progress report of a further-pretraining run: `m2dx report RUN_DIR`.

A team that further-pretrains M2D/M2D-X on its own recordings needs to know which saved checkpoint
to hand to fine-tuning, and whether training went wrong (collapse, drifting away from the base).
The report answers that with one row per checkpoint (epoch 0 = the base or the from-scratch
teacher), built from four sources of evidence, cheapest first:

1. training curves from `metrics.jsonl` (loss, M2D / offline loss, lr, EMA decay at that epoch);
2. label-free health on a fixed, seeded set of clean crops of the run's own audio (`report.health`);
3. `--probe`: a linear probe on the task's validation split (`report.probe`);
4. `--finetune`: a full fine-tune per checkpoint with a given recipe (val and test scores).

A missing or corrupt checkpoint becomes a row with `error` set; the rest of the report is still
written. `update_progress_report` is the cheap part (1 + 2 only, with per-checkpoint caching) that
the training loop calls after every published save; it never raises.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..audio import FrontEndConfig
from ..config import find_recipe, load_recipe
from ..data.corpora import cache_root
from ..data.tasks import load_task
from ..errors import ConfigError, DataError, M2DXError, one_line
from ..fileio import to_jsonable
from ..finetune import finetune as run_finetune
from ..finetune import finetune_inputs, select_splits
from ..models.vit import AudioViT
from ..progress import console, read_jsonl
from ..recipes import FinetuneRecipe
from ..weights import checkpoint_key
from .health import (
    DRIFT_WARN_COS,
    HEALTH_BASE_NAME,
    HEALTH_CROPS_NAME,
    HEALTH_SEED,
    NUM_HEALTH_CROPS,
    RANK_COLLAPSE_DROP,
    HealthCache,
    HealthCrops,
    _crops_key,
    explained_variance_auc,
    health_crops,
    health_metrics,
    rankme,
    row_warnings,
)
from .probe import ProbeSet, probe_baseline, probe_scores
from .render import write_report_files
from ..rundir import hold, remove_stale_temp_files
from .runinfo import Slot, collect_slots, epoch_end_rows, finite, load_run_recipe, run_norm_stats

REPORT_DIR_NAME = "report"
_SCORE_DECIMALS = 4  # labelled scores equal to this many decimals count as a tie


# ============================================================================ fine-tune per checkpoint, recommendation
def _metric_block(run: Any, split: str) -> dict[str, Any] | None:
    """The `val` / `test` metrics dict of one fine-tune run record (None when the split was not scored)."""
    block = run.get(split) if isinstance(run, dict) else None
    return block if isinstance(block, dict) else None


def _mean_scores(blocks: list[dict[str, Any]]) -> dict[str, float | None] | None:
    if not blocks:
        return None
    out: dict[str, float | None] = {}
    for key in ("sp", "se", "score", "accuracy", "n_normal", "n_abnormal"):
        values = [v for b in blocks if (v := finite(b.get(key))) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def score_noise(block: dict[str, Any]) -> float | None:
    """Standard error of an ICBHI Score measured on `n_normal` + `n_abnormal` items (binomial Sp and Se)."""
    sp, se, n_normal, n_abnormal = (finite(block.get(k)) for k in ("sp", "se", "n_normal", "n_abnormal"))
    if None in (sp, se, n_normal, n_abnormal) or not n_normal or not n_abnormal:
        return None
    return 0.5 * math.sqrt(sp * (1 - sp) / n_normal + se * (1 - se) / n_abnormal)


def _finetune_checkpoint(path: Path, epoch: int, *, recipe_name: str, task: str, data: Path, normal_class: str | None,
                         report_dir: Path, task_data: Any, progress: bool) -> dict[str, Any]:
    """One full fine-tune of this checkpoint; its run folder is `report/finetune/epoch-<N>/`.

    An earlier fine-tune in that folder is reused only when it was made from the same inputs (data
    items, checkpoint file, recipe); otherwise the next free `epoch-<N>-<k>` folder gets a new one.
    """
    recipe = load_recipe(FinetuneRecipe, recipe_name)
    expected = finetune_inputs(recipe, task_data.fingerprint(select_splits(task_data, recipe, score_test=True))["sha256"],
                               checkpoint_key(path))
    base_out = report_dir / "finetune" / f"epoch-{epoch}"
    out, attempt = base_out, 1
    while (out / "metrics.json").is_file():
        reused = _reuse_finetune(out, expected)
        if reused is not None:
            return reused  # the same inputs were already fine-tuned: a rerun of the report costs nothing
        attempt += 1
        out = base_out.with_name(f"{base_out.name}-{attempt}")
    recipe.run.out = str(out)
    result = run_finetune(recipe, task=task, data=data, checkpoint=path, normal_class=normal_class,
                         score_test=True, progress=progress, task_data=task_data)
    return _finetune_summary(result.run_dir, result.runs, result.aggregate, result.selection)


def _reuse_finetune(out: Path, expected: dict[str, str]) -> dict[str, Any] | None:
    """The earlier fine-tune in `out` when its recorded inputs match `expected`, else None."""
    try:
        saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (saved.get("inputs") or {}).get("sha256") != expected["sha256"] or not isinstance(saved.get("runs"), list):
        return None
    summary = _finetune_summary(out, saved["runs"], saved.get("aggregate") or {}, str(saved.get("selection", "")))
    summary["reused"] = True
    return summary


def _finetune_summary(run_dir: Path, runs: list[dict[str, Any]], aggregate: Any, selection: str) -> dict[str, Any]:
    """Mean val / test Sp, Se, Score over repeats, the fine-tune's own aggregate and its baseline, for one row."""
    vals = [b for r in runs if (b := _metric_block(r, "val"))]
    tests = [b for r in runs if (b := _metric_block(r, "test"))]
    try:
        saved = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    baseline = ((saved.get("baseline") or {}).get("test") or {}).get("values")
    ensemble = ((saved.get("ensemble") or {}).get("test") or {}).get("values")
    return {"run_dir": str(run_dir), "selection": selection, "repeats": len(runs), "reused": False,
            "val": _mean_scores(vals), "test": _mean_scores(tests), "aggregate": to_jsonable(aggregate),
            "test_auroc_abnormal": finite((ensemble or {}).get("auroc_abnormal")),
            "baseline_test": {k: finite(baseline.get(k)) for k in ("sp", "se", "score", "auroc_abnormal")}
            if baseline else None,
            "model_card": str(Path(run_dir) / "MODEL_CARD.md") if (Path(run_dir) / "MODEL_CARD.md").is_file() else None}


def recommend(rows: list[dict[str, Any]], global_warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Which checkpoint to use and why.

    Labelled evidence wins: the best fine-tune validation Score, else the best probe validation
    Score; ties (to 4 decimals) go to the row with fewer warnings, then the higher RankMe. Without
    labels the choice rests on health alone (the highest RankMe among rows without warnings), and
    the reason says so. Test scores are never used to choose.
    """
    ok = [r for r in rows if not r.get("error")]
    warnings = list(global_warnings)
    failed = [r for r in rows if r.get("error")]
    if failed:
        warnings.append(f"{len(failed)} checkpoint(s) could not be scored: epochs {', '.join(str(r['epoch']) for r in failed)}")
    if not ok:
        return {"epoch": None, "checkpoint": None, "basis": "none", "reason": "no checkpoint could be loaded", "warnings": warnings}

    def health_key(r: dict[str, Any]) -> tuple:
        return (-len(r.get("warnings") or []), r.get("rankme") if r.get("rankme") is not None else -math.inf)

    def ft_score(r: dict[str, Any]) -> float | None:
        ft = r.get("finetune") or {}
        return finite((ft.get("val") or {}).get("score"))

    def probe_score(r: dict[str, Any]) -> float | None:
        return finite((r.get("probe") or {}).get("score"))

    def block_of(r: dict[str, Any], name: str) -> dict[str, Any]:
        return ((r.get("finetune") or {}).get("val") or {}) if name == "finetune" else (r.get("probe") or {})

    basis, best = "health", None
    for name, getter, label in (("finetune", ft_score, "fine-tune validation Score"),
                                ("probe", probe_score, "linear-probe validation Score")):
        scored = [r for r in ok if getter(r) is not None]
        if scored:
            best = max(scored, key=lambda r: (round(getter(r), _SCORE_DECIMALS), *health_key(r)))
            basis = name
            value = getter(best)
            ties = [r for r in scored if round(getter(r), _SCORE_DECIMALS) == round(value, _SCORE_DECIMALS)]
            reason = f"best {label} ({value * 100:.1f}%)"
            if len(ties) > 1:
                reason += (f", tied with epoch(s) {', '.join(str(r['epoch']) for r in ties if r is not best)}; "
                           "tie broken by label-free health (fewer warnings, higher RankMe)")
            others = sorted((r for r in scored if r not in ties), key=getter, reverse=True)
            noise = [n for r in (best, *others[:1]) if (n := score_noise(block_of(r, name))) is not None]
            if others and len(noise) == 2:
                gap, band = value - getter(others[0]), 1.96 * math.sqrt(noise[0] ** 2 + noise[1] ** 2)
                if gap < band:
                    reason += (f"; the next best, epoch {others[0]['epoch']}, is {100 * gap:.1f} points lower, within "
                               f"noise (±{100 * band:.1f} points on this validation split): either is as good")
            break
    if best is None:
        healthy = [r for r in ok if r.get("rankme") is not None]
        if healthy:
            best = max(healthy, key=lambda r: (*health_key(r), r["epoch"]))
            reason = (f"no labels: chosen on label-free health only (highest RankMe {best['rankme']:.1f}"
                      f"{' among checkpoints without warnings' if not best.get('warnings') else ''}); "
                      "run with --probe --task ... --data ... to choose on validation scores")
        else:
            best = max(ok, key=lambda r: r["epoch"])
            reason = "no labels and no health metrics: the newest readable checkpoint by default"
            basis = "newest"
    if best["epoch"] == 0:
        reason += "; the starting checkpoint scores best, so further pre-training did not help (yet)"
    warnings = list(best.get("warnings") or []) + warnings
    return {"epoch": best["epoch"], "checkpoint": best["checkpoint"], "basis": basis, "reason": reason,
            "warnings": warnings}


def _resolve_norm_stats(meta: dict[str, Any], run_stats: tuple[float, float] | None,
                        encoder: AudioViT) -> tuple[float, float]:
    """The statistics the training loop fed this model: its meta, else the run's, else its own buffer."""
    stats = meta.get("norm_stats") if isinstance(meta, dict) else None
    if isinstance(stats, (list, tuple)) and len(stats) == 2:
        return float(stats[0]), float(stats[1])
    if run_stats is not None:
        return run_stats
    return float(encoder.norm_stats[0]), float(encoder.norm_stats[1])


# ============================================================================ building the report
class _ReportBuilder:
    """One report being built: the run's facts, the shared crop set and probe set, and the rows so far."""

    def __init__(self, run_dir: Path, *, kind: str, task: str | None, data: Path | None, probe: bool,
                 finetune: bool, finetune_recipe: str, normal_class: str | None, progress: bool,
                 device: str | torch.device | None, num_crops: int):
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: run folder not found; pass the folder that further-pretrain created")
        self.run_dir, self.kind, self.task, self.data = run_dir, kind, task, data
        self.finetune, self.finetune_recipe, self.normal_class = finetune, finetune_recipe, normal_class
        self.progress, self.device, self.num_crops = progress, device, num_crops
        self.report_dir = run_dir / REPORT_DIR_NAME
        self.checkpoints = ckpt_io.list_checkpoints(run_dir)
        self.recipe, self.warnings = load_run_recipe(run_dir, self.checkpoints)
        self.metrics = read_jsonl(run_dir / "metrics.jsonl")
        self.ends = epoch_end_rows(self.metrics)
        self.task_data = None
        if probe or finetune:
            if not task or data is None:
                raise ConfigError("--probe / --finetune need a labelled task: pass --task icbhi|sprsound|csv and --data PATH")
            self.task_data = load_task(task, data, normal_class=normal_class)
        if finetune:
            find_recipe(finetune_recipe)  # a bad recipe name is the user's error: say so before any work
        cycles = cache_root(self.recipe.data.cache_dir, self.recipe.data.data_root) / "cycles"
        self.probe_set = ProbeSet(self.task_data, cache_dir=cycles, progress=progress) if probe else None
        self.cache = HealthCache(self.report_dir)
        self.crops: HealthCrops | None = None
        self.crops_failed = False
        self.run_stats = run_norm_stats(self.checkpoints)
        self.base_emb: np.ndarray | None = None
        self.base_key: str | None = None
        self.probe_frontend: FrontEndConfig | None = None  # set when a probe ran: its baseline uses the same cycles

    def ensure_crops(self, vit_config: Any) -> HealthCrops | None:
        """The crop set, from the cache when it was drawn the same way; None (with a warning) when impossible."""
        if self.crops is not None or self.crops_failed:
            return self.crops
        frontend = FrontEndConfig.for_sample_rate(vit_config.sample_rate)
        width = int(vit_config.input_size[1])
        source = str(self.recipe.data.data)
        key = _crops_key(source, self.num_crops, HEALTH_SEED, width, frontend)
        cached = self.cache.load_array(HEALTH_CROPS_NAME, "crops", key)
        if cached is not None:
            self.crops = HealthCrops(cached, key, source)
            return self.crops
        try:
            self.crops = health_crops(self.recipe, width, frontend, num_crops=self.num_crops, seed=HEALTH_SEED)
            self.cache.save_array(HEALTH_CROPS_NAME, "crops", self.crops.key, self.crops.lms, source=self.crops.source)
        except (M2DXError, OSError) as exc:
            self.crops_failed = True
            self.warnings.append(f"label-free metrics skipped: the training audio is not available ({exc})")
        return self.crops

    def new_row(self, slot: Slot) -> dict[str, Any]:
        end = self.ends.get(slot.epoch, {}) if slot.epoch > 0 else {}
        return {
            "epoch": slot.epoch, "source": slot.source, "checkpoint": slot.checkpoint, "error": slot.error,
            "loss": finite(end.get("loss")), "loss_m2d": finite(end.get("loss_m2d")),
            "loss_offline": finite(end.get("loss_offline")), "lr": finite(end.get("lr")),
            "ema_decay": finite(end.get("ema_decay")), "opt_step": end.get("opt_step"),
            "rankme": None, "ev_auc": None, "drift_cos": None, "probe": None, "finetune": None,
            "warnings": [],
        }

    def score(self, slot: Slot, row: dict[str, Any]) -> None:
        """Fill one row: health (cached when possible), probe and fine-tune. Raises on an unreadable checkpoint.

        The base's embeddings (epoch 0, scored first) are the drift reference of the other rows.
        """
        assert slot.path is not None
        key = HealthCache.file_key(slot.path)
        is_base = slot.epoch == 0
        crops_info = self.cache.data.get("crops")
        crops_key_now = crops_info.get("key") if isinstance(crops_info, dict) else None
        cached = None if is_base else (self.cache.get(key, crops_key_now, self.base_key) if crops_key_now else None)
        need_model = cached is None or self.probe_set is not None or self.finetune
        loaded = ckpt_io.LoadedCheckpoint(slot.path) if need_model or is_base else None
        crops = None
        if loaded is not None:
            encoder = loaded.encoder()
            stats = _resolve_norm_stats(loaded.meta, self.run_stats, encoder)
            crops = self.ensure_crops(loaded.vit_config)
        if cached is not None:
            row.update({k: cached.get(k) for k in ("rankme", "ev_auc", "drift_cos")})
        elif crops is not None and loaded is not None:
            emb = self.cache.load_array(HEALTH_BASE_NAME, "base", f"{key}|{crops.key}") if is_base else None
            if emb is not None:
                health = {"rankme": rankme(emb), "ev_auc": explained_variance_auc(emb), "drift_cos": 1.0,
                          "embeddings": emb}
            else:
                health = health_metrics(encoder, crops, base_embeddings=self.base_emb, norm_stats=stats,
                                        device=self.device, return_embeddings=True)
                if is_base:
                    health["drift_cos"] = 1.0
                    try:
                        self.cache.save_array(HEALTH_BASE_NAME, "base", f"{key}|{crops.key}", health["embeddings"])
                    except OSError:
                        pass
            row.update({k: health[k] for k in ("rankme", "ev_auc", "drift_cos")})
            if is_base:
                self.base_emb, self.base_key = health["embeddings"], key
            else:
                self.cache.put(key, crops.key, self.base_key, health)
        if is_base and self.base_key is None:
            self.base_key = key
        if self.probe_set is not None and loaded is not None:
            self.probe_frontend = FrontEndConfig.for_sample_rate(loaded.vit_config.sample_rate)
            try:
                row["probe"] = probe_scores(encoder, self.task_data, probe_set=self.probe_set, norm_stats=stats,
                                            device=self.device)
            except DataError as exc:
                row["warnings"].append(f"probe skipped: {exc}")
        if self.finetune and loaded is not None:
            try:
                row["finetune"] = _finetune_checkpoint(
                    slot.path, slot.epoch, recipe_name=self.finetune_recipe, task=self.task, data=self.data,
                    normal_class=self.normal_class, report_dir=self.report_dir, task_data=self.task_data,
                    progress=self.progress)
            except M2DXError as exc:
                row["warnings"].append(f"fine-tune failed: {exc}")
            except Exception as exc:  # a crashed fine-tune is reported on its row, the report goes on
                row["warnings"].append(f"fine-tune failed: {one_line(exc, limit=300, with_type=True)}")

    def _probe_baseline(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The log-mel baseline on the probe's cycles, and a warning when no checkpoint's probe beats it."""
        if self.probe_set is None or self.probe_frontend is None:
            return None
        try:
            baseline = probe_baseline(self.task_data, self.probe_set, self.probe_frontend)
        except DataError as exc:
            self.warnings.append(f"probe baseline skipped: {exc}")
            return None
        scores = [v for r in rows if (v := finite((r.get("probe") or {}).get("score"))) is not None]
        if scores and max(scores) < baseline["score"]:
            self.warnings.append(f"no checkpoint's linear probe ({100 * max(scores):.1f}% at best) beats the log-mel "
                                 f"statistics baseline on the same cycles ({100 * baseline['score']:.1f}%)")
        return baseline

    def _data_summary(self) -> dict[str, Any]:
        d = self.recipe.data
        out: dict[str, Any] = {"training_audio": d.data, "noise": d.noise or None, "noise_ratio": d.noise_ratio,
                               "health_crops": int(len(self.crops.lms)) if self.crops is not None else 0}
        if self.task_data is not None:
            counts = self.task_data.counts()
            out["task"] = {"name": self.task_data.name, "classes": list(self.task_data.classes),
                           "counts": {split: {c: int(counts.loc[split, c]) for c in self.task_data.classes}
                                      for split in counts.index}}
        return out

    def build(self) -> dict[str, Any]:
        """Score every checkpoint and write the report, holding report/'s lock: one writer at a time.

        The training loop's background refresh waits for a user's `m2dx report` to finish; a user's
        report started while another writes gets one line naming it.
        """
        with hold(self.report_dir, "m2dx report", wait=self.kind == "progress"):
            remove_stale_temp_files(self.report_dir)
            return self._build()

    def _build(self) -> dict[str, Any]:
        slots = collect_slots(self.run_dir, self.recipe, self.ends, self.checkpoints)
        rows: list[dict[str, Any]] = []
        # Plain status lines, not a live bar: the probe and the fine-tune loop open their own bars,
        # and rich allows one live display at a time.
        for index, slot in enumerate(slots, start=1):
            if self.progress:
                console.print(f"[dim]report: epoch {slot.epoch} ({index}/{len(slots)}) {slot.checkpoint}[/]")
            row = self.new_row(slot)
            rows.append(row)
            if slot.error is not None or slot.path is None:
                continue
            try:
                self.score(slot, row)
            except M2DXError as exc:
                row["error"] = str(exc)
            except Exception as exc:  # one bad checkpoint must not cost the whole report
                row["error"] = f"{slot.checkpoint}: {one_line(exc, limit=300, with_type=True)}"
        try:
            self.cache.save()
        except OSError as exc:
            self.warnings.append(f"health cache not saved ({exc})")
        base_rankme = next((r.get("rankme") for r in rows if r["epoch"] == 0 and not r["error"]), None)
        for row in rows:
            if not row["error"]:
                row["warnings"] = row_warnings(row, base_rankme) + row["warnings"]
        if self.probe_set is not None and self.probe_set.skipped:
            self.warnings.append(f"probe: {len(self.probe_set.skipped)} cycle(s) unreadable and skipped "
                                 f"(e.g. {self.probe_set.skipped[0]})")
        if self.task_data is not None:
            self.warnings.extend(f"task: {w}" for w in self.task_data.warnings)
        if not any(r["epoch"] == 0 for r in rows):
            self.warnings.append("no epoch-0 checkpoint (no base and no saved teacher): drift cannot be measured")
        labelled = self.task_data is not None
        recipe = self.recipe
        baseline = self._probe_baseline(rows)
        report = {
            "kind": self.kind,
            "run_dir": str(self.run_dir),
            "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "task": self.task if labelled else None,
            "data": str(self.data) if self.data is not None and labelled else None,
            "recipe": {"name": recipe.name, "base": recipe.base, "epochs": recipe.optim.epochs,
                       "save_every": recipe.run.save_every, "offline_task": recipe.objective.offline_task},
            "health": {"crops": int(len(self.crops.lms)) if self.crops is not None else 0, "seed": HEALTH_SEED,
                       "source": self.crops.source if self.crops is not None else None,
                       "rank_collapse_drop": RANK_COLLAPSE_DROP, "drift_warn_cos": DRIFT_WARN_COS},
            "rows": rows,
            "probe_baseline": baseline,
            "chance_score": 0.5 if labelled else None,  # always answering 'normal': Sp 1, Se 0
            "data_summary": self._data_summary(),
            "recommendation": recommend(rows, self.warnings),
            "warnings": self.warnings,
        }
        report = to_jsonable(report)
        write_report_files(report, self.report_dir, self.metrics)
        return report


def build_report(
    run_dir: str | Path,
    *,
    task: str | None = None,
    data: str | Path | None = None,
    probe: bool = False,
    finetune: bool = False,
    finetune_recipe: str = "tiny_finetune",
    normal_class: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_crops: int = NUM_HEALTH_CROPS,
) -> dict[str, Any]:
    """The full report of a further-pretraining run, written to `RUN_DIR/report/` and returned as a dict.

    One row per checkpoint (epoch 0 = base / teacher): curve summaries, label-free health, the
    probe's validation scores with `probe`, fine-tune scores with `finetune` (both need `task` and
    `data`), and a recommendation. Raises ConfigError only for a folder that is not a run at all.
    """
    return _ReportBuilder(Path(run_dir), kind="full", task=task, data=Path(data) if data is not None else None,
                          probe=probe, finetune=finetune, finetune_recipe=finetune_recipe, normal_class=normal_class,
                          progress=progress, device=device, num_crops=num_crops).build()


def update_progress_report(run_dir: str | Path, *, num_crops: int = NUM_HEALTH_CROPS) -> Path | None:
    """Refresh the cheap report (curves + label-free health) after a save; returns report.json or None.

    Called from the training loop, so it must never raise: any problem is a warning and None.
    Cached health metrics mean each call scores only checkpoints that are new or changed.
    """
    try:
        _ReportBuilder(Path(run_dir), kind="progress", task=None, data=None, probe=False, finetune=False,
                       finetune_recipe="", normal_class=None, progress=False, device=None,
                       num_crops=num_crops).build()
        return Path(run_dir) / REPORT_DIR_NAME / "report.json"
    except Exception as exc:  # never let the report stop a training run
        try:
            console.print(f"[yellow]warning: progress report of {run_dir} not updated: {one_line(exc, limit=None, with_type=True)}[/]")
        except Exception:
            pass
        return None


class BackgroundReporter:
    """`on_save` hook that refreshes the progress report in a worker thread, so training never waits for it.

    Saves that arrive while a refresh runs coalesce into one more refresh (of the newest state);
    `close()` waits for the last one, so a finished run always has the report of its final checkpoint.
    """

    def __init__(self, num_crops: int = NUM_HEALTH_CROPS):
        self.num_crops = num_crops
        self._lock = threading.Lock()
        self._pending: Path | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, checkpoint_path: str | Path) -> None:
        run_dir = Path(checkpoint_path).parent.parent  # RUN/<published folder>/checkpoint-N.pth
        with self._lock:
            self._pending = run_dir
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="m2dx-progress-report", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                run_dir, self._pending = self._pending, None
                if run_dir is None:
                    self._thread = None
                    return
            update_progress_report(run_dir, num_crops=self.num_crops)

    def close(self) -> None:
        """Wait for the refresh in flight (and any it still has queued)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


