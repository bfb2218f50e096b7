"""Smoke test of `curvfast demo` with tiny settings (seconds, not minutes).

Checks the structure of the table and JSON, that the numbers are consistent, that the cache
is used on a second run, and that the model is left unedited between rows.
"""
import argparse
import contextlib
import io
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from curvfast import demo  # noqa: E402

TINY = dict(vocab_size=320, text_chars=20000, hidden_size=32, num_layers=2, intermediate_size=64,
            num_heads=2, seq_len=48, canaries=4, canary_len=12, exposures=10, passages=3, passage_len=12, passage_suffix=4,
            passage_exposures=5, steps=12, batch_size=4,
            warmup=2, rho=(0.7,), factor_tokens=1024, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    out = d / "r.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        first = demo.run_demo(cache_dir=str(d / "cache"), json=str(out), **TINY)
    first["stdout"] = buf.getvalue()
    second = demo.run_demo(cache_dir=str(d / "cache"), **TINY)
    return first, second, json.loads(out.read_text())


@pytest.mark.slow
def test_demo_rows_and_numbers(tiny_run):
    first, _, _ = tiny_run
    names = [r["name"] for r in first["rows"]]
    assert names == ["original", "K-FAC edit, rho=0.7", "SVD truncation, rho=0.7", "zeroed (ablation)"]
    for r in first["rows"]:
        for k in ("strict", "loose", "mean_dist"):
            assert 0.0 <= r[k] <= 1.0, (r["name"], k, r[k])
        assert r["strict"] <= r["loose"]  # d == 0 implies 1 - d/L ≥ 0.75
        assert r["n"] == TINY["canaries"]
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
        assert r["perplexity_mean_batch_exp"] > 1.0
        assert r["heldout_tokens"] > 0
        assert r["passages_n"] == TINY["passages"]
        assert 0.0 <= r["passages_strict"] <= r["passages_loose"] <= 1.0
        assert 0.0 <= r["rel_change"] <= 1.0 + 1e-6
    assert first["rows"][0]["rel_change"] == 0.0 and first["rows"][-1]["rel_change"] == pytest.approx(1.0)
    assert first["edited_modules"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    rep = first["edit_reports"]["0.7"]
    assert set(rep) == set(first["edited_modules"])
    assert all(v["kept_mass"] >= 0.7 - 1e-6 for v in rep.values())
    assert first["cached"] is False
    # the printed table has a header and one line per row, in order
    table = [l for l in first["stdout"].splitlines() if l.split() and l.split()[0] in ("model", "original", "K-FAC", "SVD", "zeroed")]
    assert [l.split()[0] for l in table] == ["model", "original", "K-FAC", "SVD", "zeroed"]
    assert "strict" in table[0] and "held-out ppl" in table[0] and "psg strict" in table[0]
    assert set(first["lm"]["kfac"]) == {"strict", "loose", "perplexity", "passages_strict", "passages_loose"}
    assert set(first["bands"]) == {"held-out text", "canaries", "natural passages"}
    assert first["factor_tokens"] == (1024 // TINY["seq_len"]) * TINY["seq_len"]  # whole rows only


@pytest.mark.slow
def test_demo_json_and_cache(tiny_run):
    first, second, from_file = tiny_run
    assert from_file["rows"] == json.loads(json.dumps(first["rows"]))
    assert set(from_file) >= {"settings", "model", "rows", "timings", "edit_reports", "cached"}
    assert second["cached"] is True
    # the cached model reproduces the trained one, and every row restored the weights
    for a, b in zip(first["rows"], second["rows"]):
        assert a["name"] == b["name"]
        assert a["strict"] == b["strict"] and a["mean_dist"] == pytest.approx(b["mean_dist"])
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_format_table_marks_perplexity_change():
    rows = [dict(name="original", strict=0.9, loose=1.0, mean_dist=0.05, perplexity=10.0),
            dict(name="edit", strict=0.1, loose=0.2, mean_dist=0.7, perplexity=10.5)]
    t = demo.format_table(rows)
    assert "+5.0%" in t and "90.0%" in t and "10.0%" in t


def test_cli_arguments_round_trip():
    p = demo.add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--rho", "0.6", "0.8", "--steps", "7", "--seed", "3", "--json", "x.json", "--retrain"])
    args.command = "demo"  # keys cli.py adds are ignored
    args.quiet = True       # except the CLI's global --quiet, which turns progress bars off
    s = demo.settings_from_args(args)
    assert not s.progress
    assert s.rho == (0.6, 0.8) and s.steps == 7 and s.seed == 3 and s.json == "x.json" and s.retrain
    with pytest.raises(TypeError, match="unknown demo settings"):
        demo.settings_from_args(None, bogus=1)
    with pytest.raises(ValueError, match="rho"):
        demo.settings_from_args(None, rho=(1.5,))


def test_training_rows_plant_every_canary_whole():
    clean = torch.arange(1000, 1300)
    can = torch.arange(10, 10 + 3 * 5).view(3, 5)
    rows = demo.training_rows(clean, can, exposures=4, rows=6, seq_len=20, eos_id=0, seed=0)
    assert rows.shape == (6, 20)
    flat = rows.tolist()
    counts = [0, 0, 0]
    for r in flat:
        for i in range(len(r) - 5):
            for c in range(3):
                if r[i] == 0 and r[i + 1:i + 6] == can[c].tolist():
                    counts[c] += 1
    assert counts == [4, 4, 4]
    # the clean text appears in order, cycled
    text = [t for r in flat for t in r if t >= 1000]
    assert text == [1000 + (i % 300) for i in range(len(text))]
    with pytest.raises(ValueError, match="do not fit"):
        demo.training_rows(clean, can, exposures=40, rows=6, seq_len=20, eos_id=0, seed=0)


def test_natural_passages_are_distinct_eos_free_windows_of_the_stream():
    stream = torch.arange(100, 400)
    stream[[50, 120, 121]] = 0
    p = demo.natural_passages(stream, 8, 10, eos_id=0, seed=0)
    assert p.shape == (8, 10) and not bool((p == 0).any())
    s = stream.tolist()
    starts = []
    for row in p.tolist():   # each passage is a contiguous window of the stream
        i = s.index(row[0])
        assert s[i:i + 10] == row
        starts.append(i)
    assert len(set(starts)) == 8 and all(abs(a - b) >= 10 for a in starts for b in starts if a != b)
    assert torch.equal(p, demo.natural_passages(stream, 8, 10, eos_id=0, seed=0))
    assert not torch.equal(p, demo.natural_passages(stream, 8, 10, eos_id=0, seed=1))
    assert demo.natural_passages(stream, 0, 10, eos_id=0, seed=0).shape == (0, 10)
    with pytest.raises(ValueError, match="fewer passages"):
        demo.natural_passages(stream, 29, 10, eos_id=0, seed=0)   # 30 windows, 2 contain EOS


def test_training_rows_plant_passages_beside_canaries():
    clean = torch.arange(1000, 1300)
    can = torch.arange(10, 10 + 2 * 6).view(2, 6)
    psg = torch.arange(500, 500 + 3 * 4).view(3, 4)
    rows = demo.training_rows(clean, can, exposures=5, rows=8, seq_len=24, eos_id=0, seed=0, passages=psg,
                              passage_exposures=3)
    flat = rows.tolist()

    def count(seq):
        seq = seq.tolist()
        return sum(r[i] == 0 and r[i + 1:i + 1 + len(seq)] == seq for r in flat for i in range(len(r) - len(seq)))

    assert [count(c) for c in can] == [5, 5] and [count(p) for p in psg] == [3, 3, 3]
    text = [t for r in flat for t in r if t >= 1000]
    assert text == [1000 + (i % 300) for i in range(len(text))]


def test_passage_pairs_follow_the_quote_protocol():
    pairs = demo.passage_pairs(torch.tensor([[5, 6, 7, 8, 9]]), suffix=2, eos_id=0)
    assert pairs == [([0, 5, 6, 7], [8, 9])]
