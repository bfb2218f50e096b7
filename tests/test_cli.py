"""CLI round trip on a tiny model saved to a temp dir, and bad-input handling."""
import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

import curvfast
from curvfast.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A stitch in time saves nine. "
        "All that glitters is not gold. Where there is smoke there is fire. ") * 20


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.txt").write_text(TEXT)
    ids = tok(TEXT)["input_ids"]
    with open(root / "memorized.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"input_ids": ids[i * 20:i * 20 + 20]}) + "\n")
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(root / "other")
    tok.save_pretrained(root / "other")
    return root


def run(*argv):
    return main([str(a) for a in argv])


def test_round_trip(workspace, capsys):
    w = workspace
    assert run("collect", w / "model", "--data", w / "train.txt", "--out", w / "f.safetensors", "--seq-len", 16,
               "--modules", "mlp", "--layers", "upper", "-q") == 0
    fs = curvfast.load_factors(w / "f.safetensors")
    assert sorted(fs) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert fs.meta["fisher"] == "true" and fs.tokens > 100
    assert run("eigen", w / "f.safetensors", "--out", w / "e.safetensors", "-q") == 0
    assert run("edit", w / "model", "--eigen", w / "e.safetensors", "--rho", 0.5, "--modules", "mlp_in",
               "--out", w / "edited", "-q") == 0
    report = json.loads((w / "edited" / "edit_report.json").read_text())
    assert sorted(report["modules"]) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert (w / "edited" / "tokenizer.json").exists()
    # The directory loads with from_pretrained and equals an in-memory edit.
    edited = tf.AutoModelForCausalLM.from_pretrained(w / "edited")
    ref = tf.AutoModelForCausalLM.from_pretrained(w / "model")
    es = curvfast.load_eigen(w / "e.safetensors")
    curvfast.edit_model(ref, es, rho=0.5, modules=list(report["modules"]))
    for (n, p), (_, q) in zip(edited.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(edited.model.layers[1].mlp.up_proj.weight,
                           tf.AutoModelForCausalLM.from_pretrained(w / "model").model.layers[1].mlp.up_proj.weight)
    capsys.readouterr()
    assert run("eval", w / "edited", "--memorized", w / "memorized.jsonl", "--prefix-len", 10, "--suffix-len", 10,
               "--heldout", w / "train.txt", "--seq-len", 16, "--json", w / "eval.json", "-q") == 0
    out = capsys.readouterr().out
    assert "strict" in out and "perplexity" in out
    res = json.loads((w / "eval.json").read_text())
    assert 0 <= res["recitation"]["strict"] <= 1 and res["perplexity"]["perplexity"] > 1


def test_edit_from_factors_and_overwrite_rules(workspace):
    w = workspace
    if not (w / "f.safetensors").exists():
        run("collect", w / "model", "--data", w / "train.txt", "--out", w / "f.safetensors", "--seq-len", 16, "-q")
    assert run("edit", w / "model", "--factors", w / "f.safetensors", "--rho", 0.9, "--out", w / "e2", "-q") == 0
    assert run("edit", w / "model", "--factors", w / "f.safetensors", "--rho", 0.9, "--out", w / "e2", "-q") == 2
    assert run("edit", w / "model", "--factors", w / "f.safetensors", "--rho", 0.8, "--out", w / "e2",
               "--overwrite", "-q") == 0
    assert json.loads((w / "e2" / "edit_report.json").read_text())["rho"] == 0.8


@pytest.mark.parametrize("argv, message", [
    (["collect", "{w}/missing", "--data", "{w}/train.txt", "--out", "{w}/x.safetensors"], "not found"),
    (["collect", "{w}/model", "--data", "{w}/nothing.txt", "--out", "{w}/x.safetensors"], "nothing.txt"),
    (["collect", "{w}/model", "--data", "{w}/train.txt", "--modules", "*.nope", "--out", "{w}/x.safetensors"],
     "matches no"),
    (["edit", "{w}/other", "--factors", "{w}/f.safetensors", "--out", "{w}/x"], "different model"),
    (["eigen", "{w}/train.txt", "--out", "{w}/x.safetensors"], "not a readable"),
])
def test_bad_input_one_line_nonzero_nothing_written(workspace, capsys, argv, message):
    w = workspace
    if not (w / "f.safetensors").exists():
        run("collect", w / "model", "--data", w / "train.txt", "--out", w / "f.safetensors", "--seq-len", 16, "-q")
    capsys.readouterr()
    code = run(*[a.format(w=w) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and err[-1].startswith("curvfast ")
    assert not (w / "x.safetensors").exists() and not (w / "x").exists()
    assert not [p for p in w.iterdir() if p.name.startswith(".")]


def test_rho_out_of_range_is_rejected(workspace, capsys):
    with pytest.raises(SystemExit) as e:
        run("edit", workspace / "model", "--factors", "f", "--rho", 1.5, "--out", workspace / "x")
    assert e.value.code == 2 and "rho must be in [0, 1]" in capsys.readouterr().err


def test_help_shows_examples():
    for cmd in ("collect", "eigen", "edit", "eval", "demo", "info"):
        out = subprocess.run([sys.executable, "-m", "curvfast", cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "example" in out.stdout, cmd
    out = subprocess.run([sys.executable, "-m", "curvfast", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "backends" in out.stdout
