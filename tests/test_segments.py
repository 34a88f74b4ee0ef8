"""Segments: fitting a segment to a fixed length (the ICBHI cycle preparation)."""

from __future__ import annotations

import pytest
import torch

from m2dx_clinic.data.segments import fixed_length
from m2dx_clinic.errors import ConfigError


def test_fixed_length_cut_keeps_first_seconds():
    wave = torch.arange(10 * 100, dtype=torch.float32)
    out = fixed_length(wave, 100, length_s=8.0)
    assert out.shape == (800,)
    assert torch.equal(out, wave[:800])
    assert torch.equal(fixed_length(wave[:800], 100), wave[:800])


def test_fixed_length_zero_pad():
    wave = torch.ones(300)
    out = fixed_length(wave, 100, length_s=8.0, pad="zero")
    assert out.shape == (800,)
    assert torch.equal(out[:300], wave) and not out[300:].any()


def test_fixed_length_circular_repeats_with_linear_fades():
    sr, n = 160, 300
    wave = torch.linspace(1.0, 2.0, n)  # never zero, so gains can be read as out / wave
    out = fixed_length(wave, sr, length_s=8.0)
    f = sr // 16  # 10
    assert out.shape == (8 * sr,)
    ramp = torch.arange(f) / f
    # first copy: untouched start, faded-out end
    assert torch.equal(out[: n - f], wave[: n - f])
    assert torch.allclose(out[n - f : n] / wave[n - f :], ramp.flip(0))
    # second copy: faded-in start, untouched middle, faded-out end
    assert torch.allclose(out[n : n + f] / wave[:f], ramp)
    assert torch.equal(out[n + f : 2 * n - f], wave[f : n - f])
    assert torch.allclose(out[2 * n - f : 2 * n] / wave[n - f :], ramp.flip(0))
    # last (partial) copy: faded-in start, then the cycle, cut without a fade
    last = 4 * n
    assert torch.allclose(out[last : last + f] / wave[:f], ramp)
    assert torch.equal(out[last + f :], wave[f : 8 * sr - last])


def test_fixed_length_fade_options_and_errors():
    wave = torch.ones(100)
    no_fade = fixed_length(wave, 16000, length_s=0.05, fade_samples=0)
    assert torch.equal(no_fade, torch.ones(800))
    capped = fixed_length(torch.ones(6), 16000, length_s=0.001)  # f capped at n // 2 = 3
    assert torch.allclose(capped[:6], torch.tensor([1, 1, 1, 2 / 3, 1 / 3, 0.0]))
    assert torch.allclose(capped[6:12], torch.tensor([0, 1 / 3, 2 / 3, 2 / 3, 1 / 3, 0.0]))  # a middle copy: both
    with pytest.raises(ConfigError):
        fixed_length(wave, 100, pad="reflect")
    with pytest.raises(ValueError):
        fixed_length(torch.zeros(0), 100)
