"""The checkpoint-progress report of a pre-training run (`m2dx report RUN_DIR`).

`health` (label-free metrics of a checkpoint's embeddings), `probe` (the linear probe on the task's
validation split), `runinfo` (what a run folder says about itself), `build` (one row per checkpoint,
the recommendation) and `render` (terminal, Markdown and HTML tables, plots, report.json).
"""

from .build import BackgroundReporter, build_report, recommend, update_progress_report
from .health import clip_embeddings, cosine_drift, explained_variance_auc, health_metrics, rankme
from .probe import ProbeSet, probe_scores
from .render import render_report_table, write_report_files
from .runinfo import epoch_end_rows

__all__ = ["BackgroundReporter", "ProbeSet", "build_report", "clip_embeddings", "cosine_drift", "epoch_end_rows",
           "explained_variance_auc", "health_metrics", "probe_scores", "rankme", "recommend",
           "render_report_table", "update_progress_report", "write_report_files"]
