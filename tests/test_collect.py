"""collect_factors against an independent float64 computation, and its invariants."""
import copy

import pytest
import torch
import torch.nn.functional as F

import curvfast
from curvfast.modules import weight_matrix

from tiny_models import LM_FAMILIES, VOCAB, lm_batch, make


def reference_factors(model, batches, names):
    """float64, ordinary autograd with retain_grad, positions chosen by explicit loops."""
    m64 = copy.deepcopy(model).double()
    sums = {n: [0.0, 0.0] for n in names}
    count = 0
    for batch in batches:
        store = {}
        handles = []
        for n in names:
            def hook(mod, args, out, n=n):
                out.retain_grad()
                store[n] = (args[0], out)
            handles.append(m64.get_submodule(n).register_forward_hook(hook))
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        logits = m64(input_ids=ids, attention_mask=mask).logits
        positions = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1] - 1)
                     if mask[b, t] == 1 and mask[b, t + 1] == 1]
        loss = sum(-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b, t in positions)
        loss.backward()
        for h in handles:
            h.remove()
        for n in names:
            x, y = store[n]
            for b, t in positions:
                sums[n][0] = sums[n][0] + torch.outer(x[b, t], x[b, t]).detach()
                sums[n][1] = sums[n][1] + torch.outer(y.grad[b, t], y.grad[b, t])
        count += len(positions)
    return {n: (a / count, g / count) for n, (a, g) in sums.items()}, count


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_factors_match_float64_reference(family):
    model = make(family)
    batches = [lm_batch(0), lm_batch(1, pad_rows=((1, 4),))]
    fs = curvfast.collect_factors(model, batches, modules="mlp", fisher="empirical", progress=False)
    ref, count = reference_factors(model, batches, list(fs))
    assert fs.tokens == count
    for name, f in fs.items():
        A, G = ref[name]
        assert f.A.dtype == torch.float32 and f.G.dtype == torch.float32
        assert torch.equal(f.A, f.A.T) and torch.equal(f.G, f.G.T)
        assert rel(f.A, A) < 1e-5, name
        assert rel(f.G, G) < 1e-5, name
        assert f.tokens == count


def test_gate_and_up_share_one_A():
    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], modules="mlp", fisher="empirical", progress=False)
    gate, up, down = (fs[f"model.layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    assert gate.A is up.A and gate.a_key == up.a_key
    assert down.A is not gate.A


def test_labels_minus_100_are_excluded():
    model = make("llama")
    batch = lm_batch(3, pad_rows=())
    labels = batch["input_ids"].clone()
    labels[:, 7:] = -100  # predictions of positions 6.. are ignored
    fs = curvfast.collect_factors(model, [dict(batch, labels=labels)], fisher="empirical", progress=False)
    cut = {"input_ids": batch["input_ids"][:, :7]}  # positions 0..5 predict tokens 1..6
    ref = curvfast.collect_factors(model, [cut], fisher="empirical", progress=False)
    assert fs.tokens == ref.tokens == 3 * 6
    name = "model.layers.1.mlp.down_proj"
    assert rel(fs[name].A, ref[name].A) < 1e-6
    # G differs only through the loss, which sees the same counted targets; later positions'
    # activations cannot influence earlier ones in a causal model.
    assert rel(fs[name].G, ref[name].G) < 1e-5


def test_additive_over_batch_splits_and_padding_invariant():
    model = make("qwen2")
    b1, b2 = lm_batch(0), lm_batch(1)
    both = curvfast.collect_factors(model, [b1, b2], fisher="empirical", progress=False)
    f1 = curvfast.collect_factors(model, [b1], fisher="empirical", progress=False)
    f2 = curvfast.collect_factors(model, [b2], fisher="empirical", progress=False)
    padded = {k: F.pad(v, (0, 5)) for k, v in b1.items()}  # extra padding columns, mask 0
    fp = curvfast.collect_factors(model, [padded], fisher="empirical", progress=False)
    assert both.tokens == f1.tokens + f2.tokens and fp.tokens == f1.tokens
    for n in both:
        for attr in ("A", "G"):
            combined = (getattr(f1[n], attr) * f1.tokens + getattr(f2[n], attr) * f2.tokens) / both.tokens
            assert rel(getattr(both[n], attr), combined) < 1e-6
            assert rel(getattr(fp[n], attr), getattr(f1[n], attr)) < 1e-6


def test_true_fisher_is_seeded():
    model = make("llama")
    batches = [lm_batch(0), lm_batch(1)]
    a = curvfast.collect_factors(model, batches, fisher="true", seed=7, progress=False)
    b = curvfast.collect_factors(model, batches, fisher="true", seed=7, progress=False)
    c = curvfast.collect_factors(model, batches, fisher="true", seed=8, progress=False)
    n = "model.layers.1.mlp.up_proj"
    assert torch.equal(a[n].G, b[n].G) and torch.equal(a[n].A, b[n].A)
    assert not torch.equal(a[n].G, c[n].G)
    assert torch.equal(a[n].A, c[n].A)  # A does not depend on the targets
    assert a.meta["fisher"] == "true" and a.meta["seed"] == 7


def test_true_fisher_matches_expected_gradient_outer_product():
    """For one position, E_y[g gᵀ] under y ~ softmax has a closed form at the logits:
    G_logits = diag(p) - p pᵀ. Check the sampled G of the LM head converges to it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6, bias=False)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)
            self.out = lin
            self.config = None

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return (self.out(self.emb(input_ids)),)

    model = Head()
    ids = torch.tensor([[1, 2]]).repeat(4000, 1)  # position 0 (token 1) counted 4000 times
    fs = curvfast.collect_factors(model, [ids], modules=["out"], fisher="true", seed=0, progress=False)
    p = torch.softmax(model.out(model.emb(torch.tensor(1))).double(), -1).detach()
    expected = torch.diag(p) - torch.outer(p, p)
    assert float((fs["out"].G.double() - expected).abs().max()) < 0.03


def test_model_left_exactly_as_it_was():
    model = make("gpt2")
    model.train()
    flags = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 2 == 0)
        flags[n] = p.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curvfast.collect_factors(model, [lm_batch()], fisher="true", seed=0, progress=False)
    assert model.training
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        assert torch.equal(p, before[n])
        assert p.grad is None  # no weight gradient was ever formed
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_nan_is_reported_with_module_and_batch_and_model_restored():
    model = make("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB - 1] = float("nan")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    good = lm_batch(0)
    bad = lm_batch(1)
    bad["input_ids"][1, 2] = VOCAB - 1
    with pytest.raises(curvfast.NonFiniteError, match=r"model\.layers\.0\.mlp\.gate_proj.*batch 1"):
        curvfast.collect_factors(model, [good, bad], fisher="empirical", progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_backward_stops_below_lowest_tracked_layer():
    model = make("llama")
    calls = []
    model.model.layers[0].register_full_backward_hook(lambda *a: calls.append(1))
    curvfast.collect_factors(model, [lm_batch()], modules="mlp", layers=[1], fisher="true", seed=0,
                             progress=False)
    assert calls == []


def test_selection_and_errors():
    model = make("llama")
    assert curvfast.resolve_modules(model, "mlp_in", layers="upper") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert curvfast.resolve_modules(model, "*.down_proj") == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert curvfast.resolve_modules(model, "mlp", layers="-1:") == curvfast.resolve_modules(model, "mlp", layers=[1])
    with pytest.raises(ValueError, match="matches no"):
        curvfast.resolve_modules(model, "model.layers.*.mlp.nope")
    with pytest.raises(ValueError, match="out of range"):
        curvfast.resolve_modules(model, "mlp", layers=[5])
    with pytest.raises(ValueError, match="fisher"):
        curvfast.collect_factors(model, [lm_batch()], fisher="sampled", progress=False)
    allpad = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.zeros(2, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match="no counted positions"):
        curvfast.collect_factors(model, [allpad], progress=False)


def test_vit_cls_factors_match_reference():
    model = make("vit")
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(6, 1, 8, 8, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    fs = curvfast.collect_factors(model, [{"pixel_values": pix, "labels": labels}], modules="mlp",
                                  fisher="empirical", progress=False)
    assert fs.tokens == 6
    m64 = copy.deepcopy(model).double()
    store = {}
    for n in fs:
        def hook(mod, args, out, n=n):
            out.retain_grad()
            store[n] = (args[0], out)
        m64.get_submodule(n).register_forward_hook(hook)
    logits = m64(pixel_values=pix.double()).logits
    F.cross_entropy(logits, labels, reduction="sum").backward()
    for n, f in fs.items():
        x, y = store[n]
        A = x[:, 0].T @ x[:, 0] / 6
        G = y.grad[:, 0].T @ y.grad[:, 0] / 6
        assert rel(f.A, A.detach()) < 1e-5 and rel(f.G, G) < 1e-5


def test_conv1d_orientation():
    model = make("gpt2")
    fs = curvfast.collect_factors(model, [lm_batch()], fisher="empirical", progress=False)
    f = fs["transformer.h.0.mlp.c_fc"]
    W = weight_matrix(model.get_submodule("transformer.h.0.mlp.c_fc"))
    assert (f.d_out, f.d_in) == tuple(W.shape) == (96, 24)


def test_gradient_checkpointing_non_reentrant_gives_same_factors():
    model = make("llama")
    batches = [lm_batch(0), lm_batch(1)]
    ref = curvfast.collect_factors(model, batches, fisher="true", seed=0, progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[1].mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
    fs = curvfast.collect_factors(model, batches, fisher="true", seed=0, progress=False)
    assert len(calls) == 4  # the checkpointed layers really were recomputed in backward
    assert not model.training  # mode restored
    for n in ref:
        assert torch.allclose(fs[n].A, ref[n].A, rtol=1e-6) and torch.allclose(fs[n].G, ref[n].G, rtol=1e-5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        curvfast.collect_factors(model, batches, fisher="true", seed=0, progress=False)
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        curvfast.collect_factors(model, batches, fisher="true", seed=0, progress=False)


def test_sample_categorical_matches_the_distribution():
    from curvfast.collect import sample_categorical

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [5.0, -30.0, 0.0, 0.0]])
    draws = sample_categorical(logits.repeat_interleave(20000, 0), g).view(2, 20000)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=4).double() / 20000
        p = torch.softmax(logits[row].double(), -1)
        assert float((freq - p).abs().max()) < 0.012
    assert int(draws[1].eq(1).sum()) == 0  # probability ~1e-16 never drawn
