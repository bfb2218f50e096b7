"""Activation-band analysis on constructed cases with known answers."""
import math

import pytest
import torch

import curvfast
from curvfast.bands import band_edges, band_energy, band_fractions, band_labels, format_bands

pytest.importorskip("transformers")
from tiny_models import VOCAB, make  # noqa: E402


def test_edges_and_labels():
    assert band_edges(20) == [0, 2, 5, 10, 20]
    assert band_edges(1) == [0, 0, 0, 0, 1]  # round(0.5) = 0: everything in the bottom band
    assert band_labels() == ["top 10%", "10%–25%", "25%–50%", "bottom 50%"]
    with pytest.raises(ValueError, match="ending at 1.0"):
        band_edges(10, (0.5, 0.9))


def test_band_fractions_constructed():
    d = 20
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    # rows built from known eigen-directions: energies 9 along u_0 (top band), 4 along u_3
    # (10–25%: ranks 2–4), 1 along u_19 (bottom band), and 2 along u_7 (25–50%: ranks 5–9)
    x = torch.stack([3 * Q[:, 0] + 2 * Q[:, 3], Q[:, 19] + math.sqrt(2) * Q[:, 7]])
    got = band_fractions(x, Q)
    torch.testing.assert_close(got, torch.tensor([9.0, 4.0, 2.0, 1.0], dtype=torch.float64) / 16.0)
    assert float(got.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_on_factor_data_shares_equal_eigenvalue_mass(family):
    """A = mean x xᵀ over the same samples, so band energy shares = band shares of Σμ."""
    model = make(family)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        ids = torch.randint(3, VOCAB, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        data.append({"input_ids": ids, "attention_mask": mask})
    eigen = curvfast.eigendecompose(curvfast.collect_factors(model, data, modules="mlp", seed=0, progress=False),
                                    dtype=torch.float64, progress=False)
    res = band_energy(model, eigen, data)
    assert set(res) == {e.a_key for e in eigen.values()}
    for key, r in res.items():
        assert r["samples"] == 3 * (9 + 5 + 9)
        assert r["fraction"] == pytest.approx(r["mu_fraction"], abs=1e-6)
        assert sum(r["fraction"]) == pytest.approx(1.0)
    # different data: shares differ from the Σμ shares, still sum to 1
    other = [{"input_ids": torch.full((2, 8), 5)}]
    r2 = band_energy(model, eigen, other)
    assert any(abs(a - b) > 1e-3 for r in r2.values() for a, b in zip(r["fraction"], r["mu_fraction"]))
    md = format_bands({"factor data": res, "constant": r2})
    assert "bottom 50%" in md and "(Σμ share)" in md


def test_classifier_uses_cls_position():
    model = make("vit")
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 1, 8, 8, generator=g), "labels": torch.randint(0, 5, (4,), generator=g)}
            for _ in range(2)]
    eigen = curvfast.eigendecompose(curvfast.collect_factors(model, data, modules="mlp", seed=0, progress=False),
                                    dtype=torch.float64, progress=False)
    res = band_energy(model, eigen, data)
    for r in res.values():
        assert r["samples"] == 8
        assert r["fraction"] == pytest.approx(r["mu_fraction"], abs=1e-6)
