"""The prediction review page: the occlusion map finds a known cause, the page is complete, private and
renders in a real browser, and a bad prediction folder is one line with exit code 2."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from m2dx_clinic.audio import FrontEndConfig, LogMelSpectrogram, list_audio_files
from m2dx_clinic.checkpoint.classifier import save_classifier
from m2dx_clinic.config import to_dict
from m2dx_clinic.errors import DataError
from m2dx_clinic.models.classifier import Classifier
from m2dx_clinic.predict import load_model_set, predict
from m2dx_clinic.review import occlusion_map, segment_input, write_review
from m2dx_clinic.weights import load_encoder

from conftest import write_wav
from test_browser import _chromium

SR, SEGMENT_S, TONE_HZ = 16000, 2.0, 2000.0
CLI = [sys.executable, "-m", "m2dx_clinic"]


def _noise(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Quiet breath-like noise: white noise, low-passed by a short moving average."""
    white = rng.standard_normal(int(seconds * SR))
    return 0.05 * np.convolve(white, np.ones(4) / 4, mode="same")


def _burst(samples: np.ndarray, start: float, length: float = 0.4) -> np.ndarray:
    """Add a 2 kHz tone burst (Hann-shaped) at `start` seconds."""
    out = samples.copy()
    n, first = int(length * SR), int(start * SR)
    t = np.arange(n) / SR
    out[first:first + n] += 0.3 * np.hanning(n) * np.sin(2 * np.pi * TONE_HZ * t)
    return out


def hand_classifier(tiny_ckpt: Path, path: Path, *, threshold: float = 0.5) -> Path:
    """A classifier whose P(abnormal) is driven by a 2 kHz tone burst: the tiny encoder with a head set by
    hand along the difference of the clip features of burst and burst-free segments (no training)."""
    frontend = FrontEndConfig()
    rng = np.random.default_rng(0)
    clean = [_noise(SEGMENT_S, rng) for _ in range(8)]
    burst = [_burst(_noise(SEGMENT_S, rng), rng.uniform(0.1, 1.5)) for _ in range(8)]
    waves = torch.tensor(np.stack(clean + burst), dtype=torch.float32)  # [16, samples]
    model = Classifier(load_encoder(tiny_ckpt), 2).eval()
    with torch.no_grad():
        feats = model.features(model.encoder.normalize(LogMelSpectrogram(frontend)(waves)).unsqueeze(1))  # [16, F*D]
        direction = feats[8:].mean(0) - feats[:8].mean(0)
        middle = (feats[8:].mean(0) + feats[:8].mean(0)) / 2
        scale = 6.0 / float(direction @ direction)  # logit gap of about +-3 at the two class means
        model.head.weight.copy_(torch.stack([-direction, direction]) * scale / 2)
        model.head.bias.copy_(torch.tensor([1.0, -1.0]) * float(direction @ middle) * scale / 2)
    meta = {"created": dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc).isoformat(), "classes": ["normal", "abnormal"],
            "normal_class": "normal", "normal_class_index": 0, "norm_stats": model.encoder.norm_stats.tolist(),
            "frontend": asdict(frontend), "segment": {"seconds": SEGMENT_S, "pad": "circular", "positions": "chunked"},
            "vit_config": to_dict(model.encoder.config), "operating_point": {"threshold": threshold},
            "data": {"sha256": "ab" * 32}, "task": "tone-burst-test"}
    return save_classifier(model, meta, path, epoch=0)


@pytest.fixture(scope="module")
def burst_case(tmp_path_factory, tiny_ckpt) -> dict:
    """A 6-s recording with a tone burst at 2.8-3.2 s (inside window 1 of three 2-s windows), predicted."""
    tmp = tmp_path_factory.mktemp("review")
    clf = hand_classifier(tiny_ckpt, tmp / "clf" / "tone.pt")
    rng = np.random.default_rng(1)
    rec = write_wav(tmp / "audio" / "patient_7.wav", _burst(_noise(6.0, rng), 2.8))
    quiet = write_wav(tmp / "audio" / "patient_8.wav", _noise(4.0, rng))
    result = predict(clf, [rec, quiet], tmp / "pred", progress=False)
    return {"tmp": tmp, "clf": clf, "rec": rec, "pred": tmp / "pred", "result": result}


def test_occlusion_map_points_at_the_tone_burst(burst_case):
    seg = burst_case["result"].segments
    seg = seg[seg["recording"] == str(burst_case["rec"])]
    assert seg.loc[seg["segment"] == 1, "abnormal"].all() and not seg.loc[seg["segment"] != 1, "abnormal"].any()
    models = load_model_set(burst_case["clf"])
    frontend = models.first.frontend
    lms = segment_input(models, burst_case["rec"], 2.0, 4.0)  # [80, 201], what predict fed the model
    found = occlusion_map(models, lms, valid_frames=lms.shape[1], device=torch.device("cpu"), patch_frames=32)
    assert found.p_abnormal == pytest.approx(float(seg.loc[seg["segment"] == 1, "p_abnormal"].iloc[0]), abs=1e-5)
    assert found.passes == 1 + found.drop.size
    b, s = np.unravel_index(int(np.argmax(found.drop)), found.drop.shape)
    t0, t1 = 2.0 + found.frame_edges[s] / frontend.frames_per_second, 2.0 + found.frame_edges[s + 1] / frontend.frames_per_second
    assert t0 < 3.2 and t1 > 2.8, f"strongest patch {t0:.2f}-{t1:.2f} s misses the burst at 2.8-3.2 s"
    fb = LogMelSpectrogram(frontend).mel.mel_scale.fb  # [n_freqs, n_mels]
    centres = np.linspace(0, SR / 2, fb.shape[0])[fb.argmax(dim=0).numpy()]
    low, high = centres[found.band_edges[b]], centres[found.band_edges[b + 1] - 1]
    assert low <= TONE_HZ <= high, f"strongest patch {low:.0f}-{high:.0f} Hz misses the {TONE_HZ:.0f} Hz tone"
    times = 2.0 + found.frame_edges / frontend.frames_per_second
    on_burst = (times[:-1] < 3.2) & (times[1:] > 2.8)  # [steps] patches overlapping the burst in time
    away = np.abs(found.drop).copy()
    away[b, on_burst] = 0.0
    assert found.drop[b, s] > 0.2 and away.max() < 0.25 * found.drop[b, s], found.drop.round(3)


def test_review_page_is_complete_and_private(burst_case, tmp_path):
    index = write_review(burst_case["pred"], out=tmp_path / "review", progress=False, device="cpu")
    page = index.read_text()
    segments = pd.read_csv(burst_case["pred"] / "segments.csv")
    assert page.count("<tr class='seg") == len(segments)
    assert page.index("patient_7.wav") < page.index("patient_8.wav")  # most likely abnormal first
    assert str(burst_case["tmp"]) not in page and "P(abnormal) &gt;= 0.5" in page
    assert "Not a diagnostic device" in page and "tone-burst-test" in page and "sha256:abababababab" in page
    assert page.count("Where the model looked") == 1 and "forward passes" in page
    media = sorted(p.name for p in (tmp_path / "review" / "media").iterdir())
    assert media == ["rec-0001-seg-001.png", "rec-0001.png", "rec-0001.wav", "rec-0002.png", "rec-0002.wav"]
    full = write_review(burst_case["pred"], out=tmp_path / "full", show_paths=True, explain=0, page_size=1,
                        progress=False, device="cpu")
    assert str(burst_case["rec"].resolve()) in full.read_text() and (tmp_path / "full" / "page-2.html").is_file()
    assert "Where the model looked" not in full.read_text()
    done = subprocess.run(CLI + ["predict", "--model", str(burst_case["clf"]), str(burst_case["rec"]), "--out",
                                 str(tmp_path / "cli"), "--html", "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "review" / "index.html").read_text().count("<tr class='seg") == 3


def test_a_bad_prediction_folder_is_one_line(burst_case, tmp_path):
    broken = tmp_path / "pred"
    shutil.copytree(burst_case["pred"], broken)
    (broken / "segments.csv").unlink()
    done = subprocess.run(CLI + ["review", str(broken)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "segments.csv" in lines[0] and "m2dx predict" in lines[0], lines
    shutil.copy(burst_case["pred"] / "segments.csv", broken / "segments.csv")
    recs = pd.read_csv(broken / "recordings.csv")
    recs.loc[0, "recording"] = str(tmp_path / "gone.wav")
    recs.to_csv(broken / "recordings.csv", index=False)
    with pytest.raises(DataError, match="gone.wav is missing; restore it"):
        write_review(broken, progress=False, device="cpu")


def _open_review(index: Path, shot: Path) -> dict:
    """Load the page in headless Chromium, force every lazy image, wait for the players; screenshot at 1280 px."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    from test_browser import CHROMIUM_ARGS

    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            # Chromium's media loader aborts its first request for a file once it switches to range reads
            # (net::ERR_ABORTED); whether each player loaded is checked from the element itself below.
            page.on("requestfailed", lambda req: None if req.url.endswith(".wav") and req.failure == "net::ERR_ABORTED"
                    else problems.append(f"request failed: {req.url} ({req.failure})"))
            page.goto(index.as_uri(), wait_until="load")
            page.evaluate("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; return i.decode(); }))")
            page.wait_for_function("Array.from(document.querySelectorAll('audio'))"
                                   ".every(a => a.readyState >= 1 || a.error)", timeout=20000)
            seen = page.evaluate(
                "({images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), loaded: i.complete &&"
                " i.naturalWidth > 0, width: i.getBoundingClientRect().width})), audio: Array.from("
                "document.querySelectorAll('audio')).map(a => ({src: a.getAttribute('src'), ok: !a.error &&"
                " a.duration > 0})), segments: document.querySelectorAll('tr.seg').length})")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return {**seen, "problems": problems}


@pytest.mark.slow
@pytest.mark.realdata
def test_review_of_real_icbhi_recordings_in_chromium(icbhi_dir, tiny_ckpt, tmp_path):
    files = list_audio_files(icbhi_dir / "ICBHI_final_database")[:4]  # FLAC, several sample rates
    first = predict(hand_classifier(tiny_ckpt, tmp_path / "clf.pt"), files, tmp_path / "p0", progress=False)
    median = float(first.segments["p_abnormal"].median())  # flag about half, so the page shows both kinds
    clf = hand_classifier(tiny_ckpt, tmp_path / "clf.pt", threshold=median)
    result = predict(clf, files, tmp_path / "pred", progress=False)
    assert result.segments["abnormal"].any() and not result.segments["abnormal"].all()
    index = write_review(tmp_path / "pred", progress=False, device="cpu", explain=2)
    shot = Path(os.environ.get("M2DX_SCREENSHOT_DIR", tmp_path)) / "review_1280px.png"  # for a person to look at
    seen = _open_review(index, shot)
    assert not seen["problems"], seen["problems"]
    assert len(seen["images"]) == len(files) + 2 and all(i["loaded"] for i in seen["images"]), seen["images"]
    assert all(i["width"] >= 1000 for i in seen["images"]), seen["images"]  # not squeezed at 1280 px
    assert len(seen["audio"]) == len(files) and all(a["ok"] for a in seen["audio"]), seen["audio"]
    assert seen["segments"] == len(pd.read_csv(tmp_path / "pred" / "segments.csv"))
    assert str(icbhi_dir) not in index.read_text()
