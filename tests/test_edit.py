"""keep_counts against a pair-by-pair oracle; edit_weight against the explicit formula; edit_model."""
import heapq

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvfast
from curvfast.edit import edit_weight_ref
from curvfast.keepset import keep_mask, kept_mass
from curvfast.modules import weight_matrix

from tiny_models import lm_batch, make


def oracle_counts(lam, mu, rho):
    """The SPEC's definition, literally: pop pairs by descending Π = λ_i μ_j (ties by (i, j))
    and stop once the popped mass reaches ρ · total."""
    lam, mu = [float(v) for v in lam], [float(v) for v in mu]
    k = [0] * len(lam)
    if rho >= 1:
        return [len(mu)] * len(lam)
    if rho <= 0:
        return k
    target = rho * sum(lam) * sum(mu)
    heap = [(-(lam[i] * mu[j]), i, j) for i in range(len(lam)) for j in range(len(mu))]
    heapq.heapify(heap)
    mass = 0.0
    while heap and mass < target:
        p, i, j = heapq.heappop(heap)
        mass += -p
        k[i] += 1
    return k


spectrum = st.lists(st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.floats(0, 10, allow_nan=False)),
                    min_size=1, max_size=14)


@settings(max_examples=300, deadline=None)
@given(lam=spectrum, mu=spectrum, rho=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 0.25, 0.5, 1.0])))
def test_keep_counts_equals_pair_by_pair_oracle(lam, mu, rho):
    lam = torch.tensor(sorted(lam, reverse=True), dtype=torch.float64)
    mu = torch.tensor(sorted(mu, reverse=True), dtype=torch.float64)
    k = curvfast.keep_counts(lam, mu, rho)
    assert k.dtype == torch.int64 and k.shape == lam.shape
    assert k.tolist() == oracle_counts(lam, mu, rho)
    assert (k[1:] <= k[:-1]).all()  # staircase


@pytest.mark.parametrize("seed", range(5))
def test_kept_mass_reaches_rho_and_is_minimal(seed):
    g = torch.Generator().manual_seed(seed)
    lam = (torch.rand(40, generator=g) ** 4).sort(descending=True).values
    mu = (torch.rand(30, generator=g) ** 4).sort(descending=True).values
    for rho in (0.1, 0.6, 0.9):
        k = curvfast.keep_counts(lam, mu, rho)
        total = float(lam.double().sum() * mu.double().sum())
        assert kept_mass(lam, mu, k) >= rho - 1e-12
        # Dropping the smallest kept pair must fall below ρ: the set is minimal.
        prods = [(float(lam[i]) * float(mu[j]), i) for i in range(40) for j in range(int(k[i]))]
        smallest = min(prods)[0]
        assert kept_mass(lam, mu, k) - smallest / total < rho


def test_keep_counts_edge_cases():
    lam, mu = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.0])
    assert curvfast.keep_counts(lam, mu, 1.0).tolist() == [2, 2]
    assert curvfast.keep_counts(lam, mu, 0.0).tolist() == [0, 0]
    assert curvfast.keep_counts(torch.zeros(3), torch.zeros(2), 0.5).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="descending"):
        curvfast.keep_counts(torch.tensor([1.0, 2.0]), mu, 0.5)
    with pytest.raises(ValueError, match="negative"):
        curvfast.keep_counts(torch.tensor([1.0, -2.0]), mu, 0.5)


def random_basis(n, g):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = (torch.rand(n, generator=g, dtype=torch.float64) ** 3).sort(descending=True).values
    return ev, q


@pytest.mark.parametrize("shape", [(7, 5), (33, 17), (1, 9), (40, 40)])
@pytest.mark.parametrize("rho", [0.3, 0.75])
def test_edit_weight_matches_explicit_formula(shape, rho):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g)
    lg, UG = random_basis(shape[0], g)
    la, UA = random_basis(shape[1], g)
    k = torch.tensor(oracle_counts(lg, la, rho))
    mask = torch.zeros(shape, dtype=torch.float64)
    for i, ki in enumerate(k.tolist()):
        mask[i, :ki] = 1
    expected = UG @ ((UG.T @ W.double() @ UA) * mask) @ UA.T
    out = curvfast.edit_weight(W, lg.float(), UG.float(), la.float(), UA.float(), rho)
    assert out.dtype == W.dtype and out.shape == W.shape
    assert float((out.double() - expected).abs().max()) < 1e-5 * float(W.abs().max()) * max(shape)
    assert torch.allclose(edit_weight_ref(W, lg, UG, la, UA, rho).double(), expected.float().double(), atol=1e-6)


def test_edit_properties_rho1_identity_idempotent_bf16():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g)
    lg, UG = random_basis(12, g)
    la, UA = random_basis(9, g)
    args = (lg.float(), UG.float(), la.float(), UA.float())
    assert torch.equal(curvfast.edit_weight(W, *args, 1.0), W)
    assert torch.count_nonzero(curvfast.edit_weight(W, *args, 0.0)) == 0 or \
        float(curvfast.edit_weight(W, *args, 0.0).abs().max()) < 1e-6
    once = curvfast.edit_weight(W, *args, 0.5)
    twice = curvfast.edit_weight(once, *args, 0.5)
    assert torch.allclose(once, twice, atol=1e-5)
    assert not torch.allclose(once, W, atol=1e-3)
    wb = W.to(torch.bfloat16)
    ob = curvfast.edit_weight(wb, *args, 0.5)
    assert ob.dtype == torch.bfloat16
    assert torch.allclose(ob.float(), curvfast.edit_weight(wb.float(), *args, 0.5), atol=2e-2)


def test_edit_weight_rejects_mismatched_basis():
    g = torch.Generator().manual_seed(0)
    lg, UG = random_basis(5, g)
    la, UA = random_basis(4, g)
    with pytest.raises(ValueError, match="d_in"):
        curvfast.edit_weight(torch.randn(5, 6), lg, UG, la, UA, 0.5)


def test_svd_truncate():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 6, generator=g)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r2 = curvfast.svd_truncate(W, rank=2)
    assert torch.allclose(r2.double(), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5)
    assert torch.equal(curvfast.svd_truncate(W, rho=1.0), W)
    energy = (S**2).cumsum(0) / (S**2).sum()
    r = curvfast.svd_truncate(W, rho=0.7)
    expected_rank = int((energy < 0.7).sum()) + 1
    assert int((torch.linalg.svdvals(r.double()) > 1e-4).sum()) == expected_rank


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_model_matches_edit_weight_and_undoes(family):
    model = make(family)
    fs = curvfast.collect_factors(model, [lm_batch(0), lm_batch(1)], modules="mlp_in", fisher="true", seed=0,
                                  progress=False)
    es = curvfast.eigendecompose(fs, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(es)
    rho = {n: (0.5 if i % 2 else 0.8) for i, n in enumerate(names)}
    result = curvfast.edit_model(model, es, rho=rho)
    for n in names:
        e = es[n]
        mod = model.get_submodule(n)
        W0 = before[n + ".weight"]
        W0 = W0.t() if family == "gpt2" else W0  # Conv1D stores (d_in, d_out)
        expected = curvfast.edit_weight(W0, e.evals_G, e.evecs_G, e.evals_A, e.evecs_A, rho[n])
        assert torch.allclose(weight_matrix(mod), expected, atol=1e-6)
        r = result.reports[n]
        assert r["kept_mass"] >= rho[n] - 1e-9 and 0 < r["rel_change"] < 1.5
        if getattr(mod, "bias", None) is not None:
            assert torch.equal(mod.bias, before[n + ".bias"])
    for n, p in model.named_parameters():
        if not any(n.startswith(m + ".") for m in names):
            assert torch.equal(p, before[n])
    result.undo()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(RuntimeError, match="undone"):
        result.undo()


def test_edit_model_validates_before_touching_weights():
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], modules="mlp", fisher="true", seed=0, progress=False)
    es = curvfast.eigendecompose(fs, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curvfast.edit_model(model, es, rho=1.5)
    other = make("qwen2")  # same module names, but a bias-free mismatch is caught by shape
    other.model.layers[1].mlp.down_proj = torch.nn.Linear(41, 24, bias=False)
    with pytest.raises(ValueError, match="d_in"):
        curvfast.edit_model(other, es, rho=0.5)
    with pytest.raises(KeyError, match="no eigenbasis"):
        curvfast.edit_model(model, es, rho=0.5, modules=["model.layers.0.self_attn.q_proj"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_keep_mask_is_staircase():
    m = keep_mask(torch.tensor([3, 1, 0]), 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]
