"""The ViT arm (`curvfast demo --vision`) with tiny settings: data split, noise, metrics, cache."""
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from curvfast.demo_vision import VisionSettings, load_digits_split, run_vision  # noqa: E402


def test_digits_split_noise_is_exact_and_always_wrong():
    d = load_digits_split(0.1, 0.2, seed=0)
    n = d["train_true"].numel()
    assert n + d["val_y"].numel() == 1797 and d["val_y"].numel() == round(0.2 * 1797)
    noisy = d["train_noisy"] != d["train_true"]
    assert int(noisy.sum()) == round(0.1 * n)
    assert d["train_x"].shape == (n, 1, 8, 8) and 0.0 <= float(d["train_x"].min()) and float(d["train_x"].max()) <= 1.0
    again = load_digits_split(0.1, 0.2, seed=0)
    assert all(torch.equal(d[k], again[k]) for k in d)  # seeded
    assert not torch.equal(load_digits_split(0.1, 0.2, seed=1)["train_noisy"], d["train_noisy"])


TINY = dict(hidden_size=16, num_layers=2, intermediate_size=32, num_heads=2, epochs=1, batch_size=256, warmup=2,
            progress=False)


def test_vision_arm_tiny(tmp_path, capsys):
    first = run_vision(VisionSettings(cache_dir=str(tmp_path), **TINY), log=lambda *a: None)
    assert [r["method"] for r in first["rows"]] == ["none", "kfac", "svd"]
    assert set(first["summary"]) == {"baseline", "kfac", "svd"}
    for r in first["summary"].values():
        assert set(r) == {"memorized", "true_label_acc", "val_acc"}
        assert all(0.0 <= v <= 1.0 for v in r.values())
        assert r["memorized"] + r["true_label_acc"] <= 1.0 + 1e-12  # disjoint events on the noisy set
    # fc1/fc2 of the first and last blocks
    assert len(first["edited_modules"]) == 4
    assert {m.split(".")[-1] for m in first["edited_modules"]} == {"fc1", "fc2"}
    assert first["model"]["cached"] is False
    out = capsys.readouterr().out
    assert "memorized" in out and "K-FAC edit, rho=0.75" in out
    # second run: cached model, same numbers (the edits were undone, collection is seeded)
    second = run_vision(VisionSettings(cache_dir=str(tmp_path), **TINY), log=lambda *a: None)
    assert second["model"]["cached"] is True
    for a, b in zip(first["rows"], second["rows"]):
        for k in ("memorized", "true_label_acc", "val_acc"):
            assert math.isclose(a[k], b[k], abs_tol=1e-12), (a["name"], k)
