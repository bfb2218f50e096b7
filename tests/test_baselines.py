"""Baselines (SPEC §6): SVD truncation and BalancedSubnet's mask mechanics.

Each test checks a property a wrong implementation breaks: the exact pruned count per matrix,
bit-for-bit undo, the straight-through gradient reaching the scores, the guard against
batches without memorized rows.
"""
import math

import pytest
import torch

import curvfast
from curvfast.baselines import (_StraightThroughMask, balanced_subnet, balanced_subnet_loss, mixed_batches,
                                prune_mask, svd_model)
from curvfast.modules import weight_matrix

pytest.importorskip("transformers")
from tiny_models import VOCAB, make  # noqa: E402


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _seqs(n, L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, L), generator=g).tolist()


# --------------------------------------------------------------------------------------
# SVD
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_svd_model_matches_svd_truncate_and_undoes(family):
    model = make(family)
    names = curvfast.resolve_modules(model, "mlp")
    before = _snapshot(model)
    want = {n: curvfast.svd_truncate(weight_matrix(model.get_submodule(n)).detach(), rank=3) for n in names}
    res = svd_model(model, names, rank=3)
    for n in names:
        W = weight_matrix(model.get_submodule(n))
        assert torch.equal(W, want[n])
        assert int(torch.linalg.matrix_rank(W.float())) == 3 == res.reports[n]["rank"]
        assert res.reports[n]["rel_change"] > 0
    res.undo()
    assert _same(before, _snapshot(model))
    with pytest.raises(RuntimeError, match="undone"):
        res.undo()


def test_svd_model_rejects_bad_arguments_before_touching():
    model = make("llama")
    before = _snapshot(model)
    with pytest.raises(KeyError, match="no module"):
        svd_model(model, ["model.layers.0.mlp.up_proj", "nope"], rho=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        svd_model(model, ["model.layers.0.mlp.up_proj"])
    assert _same(before, _snapshot(model))


# --------------------------------------------------------------------------------------
# BalancedSubnet: the mask
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (40, 24), (1000,)])
@pytest.mark.parametrize("p", [0.0, 0.0015, 0.1, 0.5, 1.0])
def test_prune_mask_exact_count(shape, p):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    m = prune_mask(s, p)
    k = int(round(p * s.numel()))
    assert m.shape == s.shape and int((m == 0).sum()) == k
    if 0 < k < s.numel():  # the pruned are exactly the smallest |s|
        assert float(s.abs()[m == 0].max()) <= float(s.abs()[m == 1].min())


def test_prune_mask_ties_keep_the_count():
    s = torch.ones(10, 10)
    s[0, :5] = -1.0  # same |s|
    m = prune_mask(s, 0.13)
    assert int((m == 0).sum()) == 13
    assert torch.equal((m == 0).reshape(-1).nonzero().squeeze(1), torch.arange(13))  # by index


def test_straight_through_gradient_reaches_scores():
    """∂L/∂s = ∂L/∂(W ⊙ m) ⊙ W ⊙ sign(s), checked against a direct gradient w.r.t. W ⊙ m."""
    model = make("llama").double()
    name = "model.layers.1.mlp.up_proj"
    W = model.get_submodule(name).weight.detach()
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(W.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    p = 0.2

    def loss_of(weight):
        out = torch.func.functional_call(model, {f"{name}.weight": weight}, args=(), kwargs={"input_ids": ids})
        return out.logits.square().mean()

    loss_of(W * _StraightThroughMask.apply(s, p)).backward()
    masked = (W * prune_mask(s.detach(), p)).requires_grad_(True)
    loss_of(masked).backward()
    want = masked.grad * W * torch.sign(s.detach())
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    torch.testing.assert_close(s.grad, want, rtol=1e-12, atol=1e-15)
    # pruned entries get gradient too (so they can come back), forward is exactly the hard mask
    assert float(s.grad[prune_mask(s.detach(), p) == 0].abs().sum()) > 0


# --------------------------------------------------------------------------------------
# BalancedSubnet: the loss and its guard
# --------------------------------------------------------------------------------------
def _explicit_ce(logits, ids, rows):
    tot, cnt = 0.0, 0
    for r in rows:
        lp = torch.log_softmax(logits[r, :-1].double(), -1)
        tot += float(-lp.gather(1, ids[r, 1:, None]).sum())
        cnt += ids.shape[1] - 1
    return tot / cnt


def test_loss_mixes_and_guards():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (4, 6), generator=g)
    logits = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    lam = 0.7
    mem = torch.tensor([True, False, True, False])
    got = balanced_subnet_loss(logits, {"input_ids": ids, "memorized": mem}, lam)
    want = -(1 - lam) * _explicit_ce(logits, ids, [0, 2]) + lam * _explicit_ce(logits, ids, [1, 3])
    assert float(got) == pytest.approx(want, rel=1e-9)
    # no memorized row: only the retain term, finite (a mean over nothing would be NaN)
    none = balanced_subnet_loss(logits, {"input_ids": ids, "memorized": torch.zeros(4, dtype=torch.bool)}, lam)
    assert math.isfinite(float(none)) and float(none) == pytest.approx(lam * _explicit_ce(logits, ids, range(4)))
    only = balanced_subnet_loss(logits, {"input_ids": ids, "memorized": torch.ones(4, dtype=torch.bool)}, lam)
    assert float(only) == pytest.approx(-(1 - lam) * _explicit_ce(logits, ids, range(4)))
    # nothing counted at all (labels all ignored): no loss, the batch is skipped
    labels = torch.full_like(ids, -100)
    assert balanced_subnet_loss(logits, {"input_ids": ids, "labels": labels, "memorized": mem}, lam) is None


# --------------------------------------------------------------------------------------
# BalancedSubnet end to end on a tiny model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_balanced_subnet_prunes_exact_fraction_and_undoes(family):
    model = make(family)
    model.train()
    names = curvfast.resolve_modules(model, "mlp")
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    before = _snapshot(model)
    batches = mixed_batches(_seqs(4, 10, 0), _seqs(6, 10, 1), batch_size=4, seed=0)
    # a batch with no memorized row and one with nothing counted: guarded, no NaN
    batches.append({"input_ids": torch.tensor(_seqs(2, 10, 2)), "memorized": torch.tensor([False, False])})
    ids = torch.tensor(_seqs(2, 10, 3))
    batches.append({"input_ids": ids, "labels": torch.full_like(ids, -100), "memorized": torch.tensor([True, False])})
    p = 0.05
    res = balanced_subnet(model, names, batches, p=p, lam=0.7, epochs=2, lr=5.0, progress=False)
    assert res.skipped_batches == 2 and len(res.history) == 2 * 4
    assert all(math.isfinite(h["loss"]) for h in res.history)
    for n in names:
        w = model.get_submodule(n).weight
        k = int(round(p * w.numel()))
        assert res.reports[n]["pruned"] == k == int((res.masks[n] == 0).sum())
        orig = before[f"{n}.weight"]
        assert torch.equal(w, orig * res.masks[n])
        assert int(((w == 0) & (orig != 0)).sum()) == k
    # the scores moved: the final mask is not the magnitude mask it started from
    assert any(not torch.equal(res.masks[n], prune_mask(before[f"{n}.weight"].abs(), p)) for n in names)
    # nothing else changed; flags and mode restored
    for k_, v in _snapshot(model).items():
        if not any(k_ == f"{n}.weight" for n in names):
            assert torch.equal(v, before[k_])
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags and model.training
    res.undo()
    assert _same(before, _snapshot(model))


def test_balanced_subnet_needs_memorized_flag():
    model = make("llama")
    with pytest.raises(KeyError, match="memorized"):
        balanced_subnet(model, ["model.layers.0.mlp.up_proj"], [{"input_ids": torch.tensor(_seqs(2, 5, 0))}],
                        epochs=1, progress=False)
