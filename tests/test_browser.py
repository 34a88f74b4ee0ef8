"""The checkpoint report and the model card in a real browser: every image loads, no console error.

Headless Chromium from Debian's `chromium` package (`.ci/run` installs it when missing), driven by
Playwright without any browser download. Skips with the reason when no Chromium can be found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from m2dx_clinic.report import build_report

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (install Debian's chromium package; .ci/run does this)")


def _open(page_url: str, executable: str) -> dict:
    """Load a page; return its images (src, loaded) and every console error, page error and failed request."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.goto(page_url, wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'),"
                " loaded: i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width}))")
            title = page.title()
        finally:
            browser.close()
    return {"images": images, "problems": problems, "title": title}


@pytest.mark.slow
def test_report_and_model_card_render_in_chromium(tiny_run, tmp_path):
    executable = _chromium()
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run_dir, ignore=shutil.ignore_patterns("report"))
    recipe = tmp_path / "ft.toml"  # one epoch, no worker threads, few bootstrap resamples: seconds per checkpoint
    recipe.write_text((REPO_ROOT / "recipes" / "tiny_finetune.toml").read_text()
                      .replace("epochs = 3", "epochs = 1").replace("num_workers = 2", "num_workers = 0")
                      .replace("bootstrap = 200", "bootstrap = 20"))
    report = build_report(run_dir, task="icbhi", data=tiny_run["data"], probe=True, finetune=True,
                          finetune_recipe=str(recipe), progress=False, num_crops=32)
    card = Path(next(r for r in report["rows"] if r.get("finetune"))["finetune"]["run_dir"]) / "model_card.html"
    pages = {"report": run_dir / "report" / "report.html", "model card": card}
    for name, path in pages.items():
        seen = _open(path.as_uri(), executable)
        assert not seen["problems"], (name, seen["problems"])
        assert seen["images"], f"{name}: no image at all"
        not_loaded = [i["src"] for i in seen["images"] if not i["loaded"]]
        assert not not_loaded, f"{name}: images that did not load: {not_loaded}"
        assert all(i["width"] >= 600 for i in seen["images"]), (name, seen["images"])  # readable at 100 % zoom
    html = pages["report"].read_text()
    for section in ("What the columns mean", "Fine-tune results", "RankMe", "baseline"):
        assert section in html, section
