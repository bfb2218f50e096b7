"""Memory planner: passes under a budget, and multi-pass collection equals one pass."""
import pytest
import torch

import curvfast
from curvfast.plan import collect_planned, input_groups, parse_bytes, plan_collection

from tiny_models import lm_batch, make


def test_groups_share_inputs():
    model = make("llama")
    names = curvfast.resolve_modules(model, "mlp")
    groups = input_groups(model, names)
    assert [g.modules for g in groups] == [
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.down_proj"],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"], ["model.layers.1.mlp.down_proj"]]
    assert groups[0].nbytes == 4 * (24**2 + 2 * 40**2)


def test_plan_splits_under_budget_and_multipass_equals_single_pass():
    model = make("llama")
    names = curvfast.resolve_modules(model, "mlp")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    one = plan_collection(model, names)
    assert len(one.passes) == 1
    tight = plan_collection(model, names, budget=model_bytes + 4 * (24**2 + 2 * 40**2) + 10)
    assert len(tight.passes) == 4 and "passes" in tight.describe(tokens=10**6, factor_tflops=100)
    assert [g.layer for g in tight.passes[0]] == [1]  # upper layers first: shallow backward
    batches = [lm_batch(i) for i in range(3)]
    multi = collect_planned(model, batches, tight, fisher="true", seed=5, progress=False)
    single = curvfast.collect_factors(model, batches, modules=names, fisher="true", seed=5, progress=False)
    assert multi.meta["passes"] == 4 and sorted(multi) == sorted(single)
    for n in single:
        assert torch.equal(multi[n].A, single[n].A) and torch.equal(multi[n].G, single[n].G)
    with pytest.raises(ValueError, match="re-iterable"):
        collect_planned(model, iter(batches), tight, progress=False)


def test_plan_errors_and_units():
    model = make("llama")
    names = curvfast.resolve_modules(model, "mlp")
    with pytest.raises(ValueError, match="exceed the budget"):
        plan_collection(model, names, budget=1000)
    assert parse_bytes("1.5GB") == int(1.5 * 2**30) and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_host_accumulators_give_the_same_factors():
    model = make("llama")
    batches = [lm_batch(i) for i in range(2)]
    a = curvfast.collect_factors(model, batches, fisher="true", seed=1, accumulator_device="cpu", progress=False)
    b = curvfast.collect_factors(model, batches, fisher="true", seed=1, progress=False)
    for n in a:
        assert torch.allclose(a[n].G, b[n].G, rtol=1e-6) and torch.allclose(a[n].A, b[n].A, rtol=1e-6)


def test_packed_accumulators_equal_full_and_resume(tmp_path):
    model = make("llama")
    batches = [lm_batch(i) for i in range(3)]
    full = curvfast.collect_factors(model, batches, fisher="true", seed=2, progress=False)
    packed = curvfast.collect_factors(model, batches, fisher="true", seed=2, packed_accumulators=True,
                                      progress=False)
    for n in full:
        assert torch.allclose(packed[n].A, full[n].A, rtol=1e-6, atol=1e-9)
        assert torch.allclose(packed[n].G, full[n].G, rtol=1e-6, atol=1e-9)
        assert torch.equal(packed[n].A, packed[n].A.T)

    def interrupted():
        for i, b in enumerate(batches):
            if i == 2:
                raise KeyboardInterrupt
            yield b

    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(KeyboardInterrupt):
        curvfast.collect_factors(model, interrupted(), fisher="true", seed=2, packed_accumulators=True,
                                 checkpoint=ckpt, checkpoint_every=1, progress=False)
    resumed = curvfast.collect_factors(model, batches, fisher="true", seed=2, packed_accumulators=True,
                                       checkpoint=ckpt, progress=False)
    for n in full:
        assert torch.equal(resumed[n].G, packed[n].G)


def test_pack_round_trip():
    from curvfast.packed import pack_lower, unpack_lower

    M = torch.randn(7, 7)
    M = M + M.T
    v = pack_lower(M)
    assert v.numel() == 28 and torch.equal(v[:3], torch.tensor([M[0, 0], M[1, 0], M[1, 1]]))
    assert torch.equal(unpack_lower(v, 7), M)
    with pytest.raises(ValueError, match="expected 28"):
        unpack_lower(v[:-1], 7)
