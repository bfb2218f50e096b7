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


def test_vision_sweep_covers_the_grid_and_restores_the_model(tmp_path):
    from curvfast.demo_vision import _prepare, format_vision_sweep, sweep_vision
    from curvfast.evaluate import noisy_label_metrics

    s = VisionSettings(cache_dir=str(tmp_path), **TINY)
    sw = sweep_vision(s, layer_sets=("first", "all"), rhos=(0.5, 1.0), log=lambda *a: None)
    assert [(p["layers"], p["rho"]) for p in sw["points"]] == [("first", 0.5), ("first", 1.0), ("all", 0.5),
                                                                ("all", 1.0)]
    assert [p["blocks"] for p in sw["points"]] == [[0], [0], [0, 1], [0, 1]]
    for p in sw["points"]:
        if p["rho"] == 1.0:   # keeping all the curvature mass is the identity edit
            assert p["rel_change"] < 1e-5
            for k in ("memorized", "true_label_acc", "val_acc"):
                assert math.isclose(p[k], sw["baseline"][k], abs_tol=1e-12)
        else:
            assert p["rel_change"] > 1e-3
    # the cached model, measured afresh, matches the sweep's baseline: nothing was left edited
    model, data, _ = _prepare(s, lambda *a: None)
    again = noisy_label_metrics(model, data["train_x"], data["train_noisy"], data["train_true"], data["val_x"],
                                data["val_y"])
    assert all(math.isclose(again[k], sw["baseline"][k], abs_tol=1e-12) for k in ("memorized", "val_acc"))
    text = format_vision_sweep(sw)
    assert text.count("\n") == 2 + 1 + len(sw["points"])


def test_best_vision_point_rule():
    from curvfast.demo_vision import best_vision_point

    base = {"memorized": 0.8, "val_acc": 0.90}
    pts = [{"memorized": 0.1, "val_acc": 0.85}, {"memorized": 0.3, "val_acc": 0.885},
           {"memorized": 0.3, "val_acc": 0.89}, {"memorized": 0.5, "val_acc": 0.95}]
    assert best_vision_point(pts, base) is pts[2]      # 0.85 drops > 2 points; tie on 0.3 → higher val
    assert best_vision_point(pts[:1], base) is None
