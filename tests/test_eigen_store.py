"""eigh by residual/orthogonality and fallbacks; eigendecompose sharing; safetensors store."""
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import curvfast
from curvfast import eigen as eigen_mod
from curvfast.eigen import check_eigh

from tiny_models import lm_batch, make


def spd(n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if kind == "wide":
        ev = torch.logspace(-8, 0, n, dtype=torch.float64)
    elif kind == "clustered":
        ev = torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), 1e-3)]).double()
    elif kind == "rankdef":  # built like a real factor: XᵀX with T < d
        x = torch.randn(max(1, n // 3), n, generator=g, dtype=torch.float64)
        return (x.T @ x / x.shape[0]).float()
    else:
        ev = torch.rand(n, generator=g, dtype=torch.float64)
    return ((q * ev) @ q.T).float()


@pytest.mark.parametrize("n", [1, 2, 33, 300])
@pytest.mark.parametrize("kind", ["random", "wide", "clustered", "rankdef"])
def test_eigh_residual_orthogonality_descending(n, kind):
    M = spd(n, kind)
    evals, evecs = curvfast.eigh(M)
    assert evals.dtype == torch.float32 and evecs.shape == (n, n)
    assert (evals[1:] <= evals[:-1]).all()
    res, orth = check_eigh(M.double(), evals.double(), evecs.double())
    assert res <= 1e-5 and orth <= 1e-5
    ref = torch.linalg.eigvalsh(M.double()).flip(0)
    assert torch.allclose(evals.double(), ref, atol=1e-5 * float(ref.abs().max()) + 1e-12)


def test_eigh_rejects_nan_and_nonsquare():
    with pytest.raises(ValueError, match="NaN"):
        curvfast.eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), name="A of layer7")
    with pytest.raises(ValueError, match="square"):
        curvfast.eigh(torch.ones(2, 3))


def test_eigh_falls_back_to_float64_and_logs(monkeypatch, caplog):
    real = eigen_mod.eigh_ref

    def flaky(M):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return real(M)

    monkeypatch.setattr(eigen_mod, "eigh_ref", flaky)
    M = spd(20, "random")
    with caplog.at_level(logging.WARNING, logger="curvfast"):
        evals, evecs = curvfast.eigh(M, name="G of model.layers.3.mlp.up_proj")
    assert evals.dtype == torch.float32
    assert "model.layers.3.mlp.up_proj" in caplog.text and "fallback" in caplog.text
    res, orth = check_eigh(M.double(), evals.double(), evecs.double())
    assert res < 1e-6 and orth < 1e-6


def test_eigh_rejects_garbage_results(monkeypatch):
    real = eigen_mod.eigh_ref

    def garbage(M):
        ev, vec = real(M)
        if M.dtype == torch.float32:
            return ev, torch.roll(vec, 1, dims=1)  # valid orthogonal matrix, wrong eigenvectors
        return ev, vec

    monkeypatch.setattr(eigen_mod, "eigh_ref", garbage)
    M = spd(10, "random")
    evals, evecs = curvfast.eigh(M)
    res, _ = check_eigh(M.double(), evals.double(), evecs.double())
    assert res < 1e-6


def test_eigendecompose_shares_A_and_clamps(monkeypatch):
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], modules="mlp", fisher="true", seed=0, progress=False)
    calls = []
    real = eigen_mod.spectrum
    monkeypatch.setattr(eigen_mod, "spectrum", lambda M, dtype=None, name="": calls.append(name) or real(M, dtype, name))
    es = curvfast.eigendecompose(fs, progress=False)
    assert len(calls) == 2 * 2 + 6  # per layer: A of gate/up (shared), A of down; six G's
    gate, up = es["model.layers.0.mlp.gate_proj"], es["model.layers.0.mlp.up_proj"]
    assert gate.evecs_A is up.evecs_A
    for name, e in es.items():
        assert (e.evals_A >= 0).all() and (e.evals_G >= 0).all()
        f = fs[name]
        rec = (e.evecs_G * e.evals_G) @ e.evecs_G.T
        assert float((rec - f.G).norm() / f.G.norm()) < 1e-4
        assert e.A.diagnostics()["effective_rank"] > 0


def test_store_round_trip(tmp_path):
    model = make("gpt2")
    fs = curvfast.collect_factors(model, [lm_batch()], fisher="empirical", progress=False)
    p = curvfast.save_factors(fs, tmp_path / "f.safetensors")
    back = curvfast.load_factors(p, model=model)
    assert back.meta["fisher"] == "empirical" and back.meta["tokens"] == fs.tokens
    assert back.meta["convention"] == fs.meta["convention"]
    for n in fs:
        assert torch.equal(back[n].A, fs[n].A) and torch.equal(back[n].G, fs[n].G)
    es = curvfast.eigendecompose(fs, progress=False)
    pe = curvfast.save_eigen(es, tmp_path / "e.safetensors")
    eb = curvfast.load_eigen(pe, model=model)
    for n in es:
        assert torch.equal(eb[n].evecs_A, es[n].evecs_A) and torch.equal(eb[n].evals_G, es[n].evals_G)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary leftovers


def test_store_errors(tmp_path):
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], fisher="empirical", progress=False)
    good = curvfast.save_factors(fs, tmp_path / "f.safetensors")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(curvfast.StoreError, match="not a readable"):
        curvfast.load_factors(trunc)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(curvfast.StoreError, match="not a curvfast file"):
        curvfast.load_factors(foreign)
    with pytest.raises(curvfast.StoreError, match="expected eigen"):
        curvfast.load_eigen(good)
    with pytest.raises(curvfast.StoreError, match="different model"):
        curvfast.load_factors(good, model=make("qwen2"))
    with pytest.raises(FileNotFoundError):
        curvfast.load_factors(tmp_path / "missing.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], fisher="empirical", progress=False)
    path = curvfast.save_factors(fs, tmp_path / "f.safetensors")
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        curvfast.save_factors(fs, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["f.safetensors"]


def test_packed_factors_half_the_size(tmp_path):
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], fisher="empirical", progress=False)
    packed = curvfast.save_factors(fs, tmp_path / "p.safetensors")
    full = curvfast.save_factors(fs, tmp_path / "f.safetensors", packed=False)
    ratio = packed.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.62  # n(n+1)/2 of n² values, plus the header
    a, b = curvfast.load_factors(packed), curvfast.load_factors(full)
    for n in fs:
        assert torch.equal(a[n].A, b[n].A) and torch.equal(a[n].G, fs[n].G)
    assert a["model.layers.0.mlp.gate_proj"].A is a["model.layers.0.mlp.up_proj"].A
