"""The package's shape: no import cycle, no module a reader cannot take in one sitting, no pointer to
documents the repository does not have, and nothing below the CLI importing a loop it does not run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "m2dx_clinic"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that `name` imports, at any depth of its code (TYPE_CHECKING blocks
    included: a type-only import back is still a circle a reader has to follow)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            candidates = submodules or [target]  # `from . import checkpoint` depends on checkpoint, not the root
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_module_reads_in_one_sitting():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_comments_point_to_documents_in_the_repository():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "spec §" in p.read_text(encoding="utf-8")]
    assert not offenders, f"'spec §' pointers (use docs/METHOD.md): {offenders}"
    assert (PACKAGE.parent / "docs" / "METHOD.md").is_file()


def test_only_the_cli_and_the_journeys_import_training_loops():
    loops = {"m2dx_clinic.pretrain", "m2dx_clinic.finetune"}
    allowed = {  # each of these runs the loop it imports
        "m2dx_clinic.cli.train", "m2dx_clinic.quickstart", "m2dx_clinic.tuning.study", "m2dx_clinic.report.build",
        "m2dx_clinic.compare",
    }
    graph = _graph()
    wrong = {name: sorted(graph[name] & loops) for name in graph
             if graph[name] & loops and name not in allowed | loops}
    assert not wrong, f"modules importing a training loop they do not run: {wrong}"


LAYERS = [  # docs/ARCHITECTURE.md: each layer imports only from the layers above it
    ("_version",),
    ("errors", "fileio", "config", "recipes", "runtime", "rundir", "progress", "document", "fetch", "provenance"),
    ("audio",),
    ("data", "demo_data"),
    ("models", "objectives", "augment", "metrics", "evaluation"),
    ("checkpoint", "weights", "inference"),
    ("pretrain", "pretrain_setup", "finetune", "finetune_run", "finetune_outputs", "model_card", "linear_eval"),
    ("predict", "predict_outputs", "export", "embed", "review", "review_plots", "evaluate", "evaluation_card"),
    ("tuning", "report", "quickstart", "compare"),
    ("cli", "__main__", "m2dx_clinic"),  # the package root re-exports load_classifier and predict
]


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: not placed in a layer of docs/ARCHITECTURE.md")


def test_each_layer_imports_only_from_the_layers_above():
    graph = _graph()
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if _layer(target) > _layer(name))
    assert not upward, f"imports against the layering: {upward}"
