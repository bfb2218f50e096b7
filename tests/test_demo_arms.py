"""`curvfast demo --compare` (K-FAC vs SVD vs BalancedSubnet on a held-out canary split) and
`curvfast report`, with tiny settings."""
import contextlib
import io
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from curvfast import demo  # noqa: E402
from curvfast.cli import main  # noqa: E402

TINY = dict(vocab_size=320, text_chars=20000, hidden_size=32, num_layers=2, intermediate_size=64,
            num_heads=2, seq_len=48, canaries=4, canary_len=12, exposures=10, passages=3, passage_len=12, passage_suffix=4,
            passage_exposures=5, steps=12, batch_size=4,
            warmup=2, rho=(0.7, 0.9), factor_tokens=1024, progress=False,
            compare=True, bsn_p=(0.05, 0.2), bsn_epochs=1, bsn_retain_rows=4, svd_rho=(0.9, 0.5))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    d = tmp_path_factory.mktemp("arms")
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        res = demo.run_demo(cache_dir=str(d / "cache"), json=str(d / "r.json"), **TINY)
    return res, json.loads((d / "r.json").read_text()), buf.getvalue(), d


def test_split_is_a_partition():
    f, h = demo.split_canaries(64, 0)
    assert sorted(f + h) == list(range(64)) and len(f) == len(h) == 32
    assert demo.split_canaries(64, 0) == (f, h) and demo.split_canaries(64, 1) != (f, h)


def test_operating_point_is_the_mildest_edit_that_reaches_the_bar():
    base = {"strict": 0.9, "perplexity": 10.0}
    rows = [{"rho": 0.6, "strict": 0.0, "perplexity": 12.0}, {"rho": 0.8, "strict": 0.05, "perplexity": 11.0},
            {"rho": 0.9, "strict": 0.5, "perplexity": 10.2}]
    assert demo.operating_point(rows, base)["rho"] == 0.8       # 0.05 ≤ 0.1 × 0.9, lower ppl than 0.6
    none = [{"rho": 0.9, "strict": 0.5, "perplexity": 10.2}, {"rho": 0.8, "strict": 0.3, "perplexity": 11.0},
            {"rho": 0.7, "strict": 0.3, "perplexity": 10.5}]
    assert demo.operating_point(none, base)["rho"] == 0.7       # lowest strict, then lower ppl


def test_compare_arm_structure(compared):
    res, js, out, _ = compared
    comp = js["comparison"]
    assert sorted(comp["forget"] + comp["heldout"]) == list(range(TINY["canaries"]))
    assert set(js["lm"]) == {"baseline", "kfac", "svd", "bsn"}
    for v in js["lm"].values():
        assert 0.0 <= v["strict"] <= v["loose"] <= 1.0 and v["perplexity"] > 1.0
    # everything scored on the held-out half only
    for r in comp["matched"] + comp["svd"] + comp["bsn"] + comp["kfac"]:
        assert r["n"] == len(comp["heldout"])
    # the matched K-FAC row is the operating point; the baselines were picked at the closest perplexity
    assert comp["matched"][1] == demo.operating_point(comp["kfac"], comp["matched"][0])
    for r in comp["matched"] + comp["kfac"]:
        assert r["passages_n"] == TINY["passages"]   # passages: all scored, none trained on
    target = comp["target_perplexity"]
    for key, rows in (("svd", comp["svd"]), ("bsn", comp["bsn"])):
        best = min(abs(r["perplexity"] / target - 1) for r in rows)
        assert abs(js["lm"][key]["perplexity"] / target - 1) == pytest.approx(best)
    assert "At matched perplexity" in out
    # the unedited model is the same before and after the comparison (undo between settings)
    assert js["lm"]["baseline"]["perplexity"] == pytest.approx(js["rows"][0]["perplexity"], rel=1e-12)
    assert set(js["bands"]) == {"held-out text", "canaries", "natural passages"} and js["spectra"]


def test_report_from_demo_json(compared, capsys):
    _, _, _, d = compared
    assert main(["report", str(d / "r.json"), "--out", str(d / "rep"), "-q"]) == 0
    md = (d / "rep" / "report.md").read_text()
    assert "matched perplexity" in md and "curvature band" in md and "passages strict" in md
    pytest.importorskip("matplotlib")
    for name in ("recitation_vs_rho.png", "matched.png", "spectra.png", "bands.png"):
        assert (d / "rep" / name).read_bytes()[:4] == b"\x89PNG", name
    # exists → refuse without --overwrite; not-a-result → one-line error
    assert main(["report", str(d / "r.json"), "--out", str(d / "rep")]) == 2
    (d / "bad.json").write_text(json.dumps({"x": 1}))
    assert main(["report", str(d / "bad.json"), "--out", str(d / "rep2")]) == 2
    assert "neither demo results" in capsys.readouterr().err
