"""The study's storage and bookkeeping: RDB storage with heartbeats, pruners, trial counts.

A study lives in an RDB storage: a SQLite file in the output folder by default (one worker), or a
server (`postgresql://...`) that several workers share. Heartbeats mark the trial of a killed worker
as failed after the grace period and re-queue its parameters, so no trial is lost.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import optuna

from ..errors import ConfigError, one_line
from ..recipes import TuneSettings

PRUNERS = ("auto", "median", "hyperband", "wilcoxon", "none")
TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED)
ACTIVE = (TS.COMPLETE, TS.PRUNED, TS.RUNNING)


class SurplusTrial(Exception):
    """A trial started when the study already had its target of finished or running trials."""



def fail_orphaned_trials(study: optuna.Study) -> None:
    """With the default one-worker SQLite study, a RUNNING trial at start-up belongs to a killed run.

    Heartbeats would fail it only after the grace period; doing it now lets the resumed run retry its
    parameters at once. Shared RDB studies (--storage) are left to the heartbeats: other workers may be alive.
    """
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "error", "the tuning process was killed during this trial")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def storage_url(url: str | None, out: Path) -> str:
    """The study's database URL: `sqlite:///<out>/optuna.db` by default; a bare file name is a SQLite file."""
    if url is None:
        return f"sqlite:///{(Path(out) / 'optuna.db').resolve()}"
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def make_storage(url: str | None, out: Path, settings: TuneSettings) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: trials of a killed process are failed after the grace period and retried."""
    Path(out).mkdir(parents=True, exist_ok=True)
    url = storage_url(url, out)
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
        raise ConfigError(f"--storage {hide_password(url)}: the database driver is missing ({exc}); install it") from None
    except Exception as exc:
        raise ConfigError(f"--storage {hide_password(url)}: cannot open the study database ({one_line(exc, limit=500, with_type=True)})") from None


def hide_password(url: str) -> str:
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


def trial_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    surplus = sum(1 for t in trials if t.state == TS.FAIL and t.user_attrs.get("surplus"))
    return {"complete": states.count(TS.COMPLETE), "pruned": states.count(TS.PRUNED),
            "failed": states.count(TS.FAIL) - surplus, "running": states.count(TS.RUNNING),
            "waiting": states.count(TS.WAITING), "surplus": surplus}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None
