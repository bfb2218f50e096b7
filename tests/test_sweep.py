"""The layer × ρ sweep: one eigendecomposition, model restored between points and after,
points independent of their order, the best-setting rule, outputs and the CLI."""
import copy
import json

import pytest
import torch

import curvfast
from curvfast.evaluate import perplexity, recitation
from curvfast.sweep import layer_subsets, pareto_front, pick_best, sweep, write_sweep

tf = pytest.importorskip("transformers")
from tiny_models import VOCAB, make  # noqa: E402


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def setup():
    model = make("llama")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (4, 12), generator=g)} for _ in range(3)]
    eigen = curvfast.eigendecompose(curvfast.collect_factors(model, data, modules="mlp_in", fisher="true",
                                                              seed=0, progress=False), progress=False)
    memorized = [(torch.randint(3, VOCAB, (5,), generator=g).tolist(), torch.randint(3, VOCAB, (4,), generator=g).tolist())
                 for _ in range(6)]
    held = torch.randint(3, VOCAB, (4, 10), generator=g)
    return model, eigen, memorized, held


def test_sweep_restores_and_points_are_independent(setup):
    model, eigen, memorized, held = setup
    subsets = layer_subsets(model, eigen, ["0", "1", "all"])
    assert subsets["all"] == subsets["0"] + subsets["1"]
    before = _snapshot(model)
    res = sweep(model, eigen, subsets, [0.5, 0.9], memorized, held, progress=False, batch_size=4)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(p["subset"], p["rho"]) for p in res["points"]] == [(s, r) for s in ("0", "1", "all") for r in (0.5, 0.9)]
    # reversed order gives the same numbers: nothing carries over from one point to the next
    rev = sweep(model, eigen, dict(reversed(list(subsets.items()))), [0.9, 0.5], memorized, held,
                progress=False, batch_size=4)
    key = lambda p: (p["subset"], p["rho"])  # noqa: E731
    a = {key(p): p for p in res["points"]}
    for p in rev["points"]:
        assert p["strict"] == a[key(p)]["strict"] and p["perplexity"] == a[key(p)]["perplexity"]
    # one point against an independent edit of a fresh copy
    fresh = copy.deepcopy(model)
    curvfast.edit_model(fresh, eigen, rho=0.5, modules=subsets["1"])
    want_ppl = perplexity(fresh, held, progress=False)["perplexity"]
    want_rec = recitation(fresh, memorized, progress=False)
    got = a[("1", 0.5)]
    assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-12) and got["strict"] == want_rec["strict"]
    assert got["delta_ppl"] == pytest.approx(want_ppl / res["baseline"]["perplexity"] - 1)


def test_sweep_restores_on_error(setup):
    model, eigen, memorized, held = setup
    before = _snapshot(model)
    bad = [([1, 2], [3])] + [([1], [])]  # second item has an empty suffix: recitation raises mid-sweep
    with pytest.raises(ValueError):
        sweep(model, eigen, {"all": list(eigen)}, [0.5], bad, held, progress=False)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())
    with pytest.raises(KeyError, match="eigenbasis"):
        sweep(model, eigen, {"x": ["model.layers.0.mlp.down_proj"]}, [0.5], memorized, held, progress=False)
    with pytest.raises(ValueError, match="rho"):
        sweep(model, eigen, {"all": list(eigen)}, [1.5], memorized, held, progress=False)


def test_best_rule_and_pareto_hand_cases():
    pts = [{"strict": 0.5, "loose": 0.6, "perplexity": 10.0},
           {"strict": 0.1, "loose": 0.3, "perplexity": 11.5},   # over a 10% budget of base 10.0
           {"strict": 0.2, "loose": 0.4, "perplexity": 10.8},
           {"strict": 0.2, "loose": 0.3, "perplexity": 10.9},   # tie on strict, lower loose wins
           {"strict": 0.2, "loose": 0.3, "perplexity": 10.95},  # tie on both: lower ppl (index 3) wins
           {"strict": 0.6, "loose": 0.7, "perplexity": 10.5}]   # dominated by 0
    assert pick_best(pts, 10.0, 0.10) == 3
    assert pick_best(pts, 10.0, 0.20) == 1
    assert pick_best(pts, 10.0, -0.5) is None
    assert pareto_front(pts) == [0, 2, 1]


def test_write_sweep_outputs(setup, tmp_path):
    model, eigen, memorized, held = setup
    res = sweep(model, eigen, {"all": list(eigen)}, [0.5, 0.9], memorized, held, progress=False,
                max_ppl_increase=10.0)
    written = write_sweep(res, tmp_path)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data["points"]) == 2 and data["best"] is not None and "rule" in data
    md = (tmp_path / "sweep.md").read_text()
    assert "Best: layers all" in md and "Rule:" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot" in written


def test_cli_sweep(tmp_path, capsys):
    from curvfast.cli import main

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(1)

    def jsonl(path, n, L):
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": torch.randint(3, VOCAB, (L,), generator=g).tolist()}) + "\n")

    jsonl(tmp_path / "train.jsonl", 8, 40)
    jsonl(tmp_path / "mem.jsonl", 4, 12)
    jsonl(tmp_path / "held.jsonl", 4, 40)
    common = [str(tmp_path / "model"), "--memorized", str(tmp_path / "mem.jsonl"), "--heldout",
              str(tmp_path / "held.jsonl"), "--prefix-len", "8", "--suffix-len", "4", "--seq-len", "16", "-q"]
    rc = main(["sweep", *common, "--data", str(tmp_path / "train.jsonl"), "--layer-sets", "0;1;all",
               "--rho", "0.5", "0.8", "--out", str(tmp_path / "out")])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(data["points"]) == 6
    assert "Rule:" in capsys.readouterr().out
    # clear errors, exit status 2
    assert main(["sweep", *common, "--layer-sets", "0", "--out", str(tmp_path / "o2")]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    assert main(["sweep", *common, "--data", str(tmp_path / "train.jsonl"), "--layer-sets", "0",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["sweep", *common, "--data", str(tmp_path / "train.jsonl"), "--layer-sets", "7",
                 "--out", str(tmp_path / "o3")]) == 2
