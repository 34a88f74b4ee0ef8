"""Deterministic respiratory-like example recordings in the ICBHI 2017 layout.

The real ICBHI audio cannot be shipped (and the test copy holds only 118 of 920 recordings), so the
offline demo synthesises a small look-alike set: breathing is band-passed noise under an
inhale/exhale envelope, crackles are short damped transients, wheezes are sustained tones with
vibrato. Amplitudes vary and normal cycles carry occasional clicks and short tones, so the
classes are learnable from log-mels but not trivially separable.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import ConfigError, DataError

DATABASE_FOLDER = "ICBHI_final_database"
SPLIT_FILE = "ICBHI_challenge_train_test.txt"
MANIFEST_NAME = "demo_manifest.csv"
CONDITIONS = ("healthy", "crackles", "wheezes")
_LOCATIONS = ("Tc", "Al", "Ar", "Pl", "Pr", "Ll", "Lr")
# Probability of normal, crackle, wheeze, both for a cycle of a patient with each condition.
_CYCLE_PROBS = {
    "healthy": (0.88, 0.06, 0.06, 0.0),
    "crackles": (0.40, 0.45, 0.05, 0.10),
    "wheezes": (0.40, 0.05, 0.45, 0.10),
}
_EDGE_S = 0.05  # keep cycles this far from the end of the file


def demo_noise_dir() -> Path:
    """The bundled CC0 background-noise clips (ESC-10 excerpts, see its README and ATTRIBUTION.csv)."""
    return Path(__file__).resolve().parent / "assets" / "noise"


@dataclass
class _Recording:
    name: str
    patient: int
    condition: str
    split: str
    cycles: list[tuple[float, float, int, int]] = field(default_factory=list)


def _plan(num_patients: int, recordings_per_patient: int, seconds: float, seed: int) -> list[_Recording]:
    """Patients, conditions, a patient-disjoint ~60/40 split and cycle labels (no audio yet)."""
    rng = np.random.default_rng([seed, 0])
    patients = [101 + i for i in range(num_patients)]
    condition = {pid: CONDITIONS[i % len(CONDITIONS)] for i, pid in enumerate(patients)}
    # Interleave conditions before cutting the split so both sides see every condition.
    groups = [[p for p in patients if condition[p] == c] for c in CONDITIONS]
    for g in groups:
        rng.shuffle(g)
    order = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    n_test = min(num_patients - 1, max(1, round(0.4 * num_patients)))
    split = {pid: ("test" if k < n_test else "train") for k, pid in enumerate(order)}

    recordings: list[_Recording] = []
    for pid in patients:
        for k in range(recordings_per_patient):
            name = f"{pid}_{k // len(_LOCATIONS) + 1}b1_{_LOCATIONS[k % len(_LOCATIONS)]}_sc_Meditron"
            rec = _Recording(name, pid, condition[pid], split[pid])
            t = float(rng.uniform(0.05, 0.4))
            while True:
                dur = float(rng.uniform(2.0, 4.0))
                dur = min(dur, seconds - _EDGE_S - t)
                if dur < 2.0:
                    break
                cls = int(rng.choice(4, p=_CYCLE_PROBS[rec.condition]))
                rec.cycles.append((round(t, 3), round(t + dur, 3), cls & 1, cls >> 1))
                t += dur + float(rng.uniform(0.0, 0.1))
            recordings.append(rec)

    # Guarantee crackle and wheeze cycles on both sides of the split, whatever the draw.
    for side in ("train", "test"):
        recs = [r for r in recordings if r.split == side and r.cycles]
        for flag, position in ((0, 0), (1, -1)):
            if recs and not any(c[2 + flag] for r in recs for c in r.cycles):
                start, end, crackle, wheeze = recs[0].cycles[position]
                recs[0].cycles[position] = (start, end, 1 if flag == 0 else crackle, 1 if flag == 1 else wheeze)
    return recordings


def _band_noise(rng: np.random.Generator, n: int, sr: int, low: float, high: float) -> np.ndarray:
    """White noise shaped by a smooth band-pass (4th-order-like skirts), unit std."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    freqs[0] = 1e-3
    gain = 1.0 / (1.0 + (low / freqs) ** 4) / (1.0 + (freqs / high) ** 4)
    out = np.fft.irfft(spectrum * gain, n=n)
    return out / (out.std() + 1e-12)


def _crackle(rng: np.random.Generator, sr: int) -> np.ndarray:
    """A 5-20 ms damped transient with a sharp first deflection."""
    dur = rng.uniform(0.005, 0.020)
    tt = np.arange(int(dur * sr)) / sr
    freq = rng.uniform(150.0, 1200.0)
    tau = dur / rng.uniform(3.0, 5.0)
    return np.exp(-tt / tau) * np.sin(2 * np.pi * freq * tt + rng.uniform(-0.5, 0.5))


def _tone(rng: np.random.Generator, n: int, sr: int, f0: float) -> np.ndarray:
    """A wheeze-like tone: slight vibrato, a weak second harmonic, 40 ms fades."""
    tt = np.arange(n) / sr
    depth = rng.uniform(0.01, 0.03)
    rate = rng.uniform(3.0, 7.0)
    inst = f0 * (1.0 + depth * np.sin(2 * np.pi * rate * tt + rng.uniform(0, 2 * np.pi)))
    inst *= 1.0 + rng.uniform(-0.08, 0.08) * tt / max(tt[-1], 1e-6)  # slow glide
    phase = 2 * np.pi * np.cumsum(inst) / sr
    tone = np.sin(phase) + rng.uniform(0.1, 0.4) * np.sin(2 * phase)
    fade = min(n // 2, int(0.04 * sr))
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
        tone[:fade] *= ramp
        tone[-fade:] *= ramp[::-1]
    return tone


def _synthesise(rec: _Recording, seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1, rec.patient, _name_seed(rec.name)])
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    breath = _band_noise(rng, n, sr, rng.uniform(80.0, 160.0), rng.uniform(500.0, 1100.0))

    envelope = np.full(n, 0.06)
    for start, end, _, _ in rec.cycles:
        i0, i1 = int(start * sr), int(end * sr)
        u = (t[i0:i1] - start) / (end - start)
        p_in = rng.uniform(0.33, 0.45)
        inhale = np.sin(np.pi * np.clip(u / p_in, 0, 1))
        exhale = rng.uniform(0.4, 0.8) * np.sin(np.pi * np.clip((u - p_in) / (1 - p_in), 0, 1))
        envelope[i0:i1] = np.maximum(np.where(u < p_in, inhale, exhale), 0.06)
    signal = breath * envelope

    # Heart sounds: low thumps, present in every recording.
    beat = 1.0 / rng.uniform(1.0, 1.5)
    thump_t = np.arange(int(0.08 * sr)) / sr
    thump = np.exp(-thump_t / 0.02) * np.sin(2 * np.pi * rng.uniform(50.0, 80.0) * thump_t) * rng.uniform(0.3, 0.8)
    for onset in np.arange(rng.uniform(0, beat), seconds - 0.1, beat):
        i = int(onset * sr)
        signal[i : i + len(thump)] += thump[: n - i]

    for start, end, crackle, wheeze in rec.cycles:
        length = end - start
        if crackle:
            for _ in range(int(rng.integers(3, 12))):
                onset = start + length * rng.uniform(0.02, 0.7)  # mostly inspiratory
                shape = _crackle(rng, sr) * rng.uniform(0.8, 3.0)
                i = int(onset * sr)
                signal[i : i + len(shape)] += shape[: n - i]
        elif rng.random() < 0.35:  # stethoscope friction clicks: crackle-like distractors
            for _ in range(int(rng.integers(1, 3))):
                shape = _crackle(rng, sr) * rng.uniform(0.4, 1.2)
                i = int((start + length * rng.uniform(0, 0.95)) * sr)
                signal[i : i + len(shape)] += shape[: n - i]
        if wheeze:
            frac = rng.uniform(0.3, 0.8)
            w_start = start + rng.uniform(0.0, 1.0 - frac) * length
            m = int(frac * length * sr)
            f0 = math.exp(rng.uniform(math.log(100.0), math.log(1000.0)))
            i = int(w_start * sr)
            signal[i : i + m] += _tone(rng, m, sr, f0)[: n - i] * rng.uniform(0.25, 1.0)
        elif rng.random() < 0.15:  # a brief low tone (snore-like) in a cycle without wheeze
            m = int(rng.uniform(0.08, 0.15) * sr)
            i = int((start + rng.uniform(0, length - 0.2)) * sr)
            signal[i : i + m] += _tone(rng, m, sr, rng.uniform(100.0, 250.0))[: n - i] * rng.uniform(0.2, 0.5)

    signal += 0.02 * rng.standard_normal(n)  # sensor noise
    signal *= rng.uniform(0.3, 0.8) / (np.abs(signal).max() + 1e-12)
    return signal.astype(np.float32)


def _name_seed(name: str) -> int:
    """A stable integer from a recording name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _check_folder(db: Path, recordings: list[_Recording]) -> None:
    """Refuse to mix the demo into a folder that holds other recordings (never delete them)."""
    if not db.is_dir():
        return
    ours = {f"{r.name}{ext}" for r in recordings for ext in (".wav", ".txt")}
    foreign = sorted(p.name for p in db.iterdir() if p.is_file() and p.suffix.lower() in (".wav", ".txt", ".flac") and p.name not in ours)
    if foreign:
        raise DataError(f"{db}: already holds other recordings (e.g. {foreign[0]}); pass an empty folder for the demo data")


def _write_demo(out_dir: Path, num_patients: int, recordings_per_patient: int, seconds: float, sample_rate: int, seed: int) -> list[_Recording]:
    if num_patients < 2:
        raise ConfigError(f"num_patients must be at least 2 for a train/test split, got {num_patients}")
    if recordings_per_patient < 1:
        raise ConfigError(f"recordings_per_patient must be at least 1, got {recordings_per_patient}")
    if seconds < 3.0:
        raise ConfigError(f"seconds must be at least 3 to hold a 2-4 s breathing cycle, got {seconds}")
    if sample_rate < 4000:
        raise ConfigError(f"sample_rate must be at least 4000 Hz, got {sample_rate}")
    out_dir = Path(out_dir).expanduser()
    recordings = _plan(num_patients, recordings_per_patient, seconds, seed)
    db = out_dir / DATABASE_FOLDER
    _check_folder(db, recordings)
    db.mkdir(parents=True, exist_ok=True)
    for rec in recordings:
        audio = _synthesise(rec, seconds, sample_rate, seed)
        sf.write(str(db / f"{rec.name}.wav"), audio, sample_rate, subtype="PCM_16")
        lines = [f"{s:.3f}\t{e:.3f}\t{c}\t{w}" for s, e, c, w in rec.cycles]
        (db / f"{rec.name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / SPLIT_FILE).write_text("".join(f"{r.name}\t{r.split}\n" for r in recordings), encoding="utf-8")
    return recordings


def make_demo_icbhi(
    out_dir: Path,
    *,
    num_patients: int = 12,
    recordings_per_patient: int = 2,
    seconds: float = 12.0,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Path:
    """Write a synthetic ICBHI-layout data set under `out_dir` and return `out_dir`.

    `out_dir/ICBHI_final_database/<rec>.wav` + `<rec>.txt` (start, end, crackle, wheeze per cycle)
    and `out_dir/ICBHI_challenge_train_test.txt` with a patient-disjoint ~60/40 split.
    The same arguments always give byte-identical files.
    """
    _write_demo(Path(out_dir), num_patients, recordings_per_patient, seconds, sample_rate, seed)
    return Path(out_dir).expanduser()


def make_demo_csv(out_dir: Path, *, seed: int = 0) -> Path:
    """A 'bring your own data' example: demo recordings plus a `path,label,subject` CSV manifest.

    The label is the patient's condition (healthy / crackles / wheezes), the subject the patient id;
    paths are relative to the CSV so the folder can be moved. Returns the CSV path.
    """
    out_dir = Path(out_dir).expanduser()
    recordings = _write_demo(out_dir, 12, 2, 12.0, 16000, seed)
    manifest = out_dir / MANIFEST_NAME
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "subject"])
        for rec in recordings:
            writer.writerow([f"{DATABASE_FOLDER}/{rec.name}.wav", rec.condition, str(rec.patient)])
    return manifest
