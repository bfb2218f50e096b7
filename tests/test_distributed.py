"""torch.distributed collection: 2 gloo processes on CPU equal one process."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvfast
from curvfast.distributed import assign_owners, collect_factors_distributed, load_index, save_distributed

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import lm_batch, make  # noqa: E402


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make("llama")
        batches = [lm_batch(i) for i in range(5)]  # 3 batches on rank 0, 2 on rank 1
        fs = collect_factors_distributed(model, batches, modules="mlp", fisher="true", seed=11, progress=False)
        save_distributed(fs, out_dir, "factors")
        es = curvfast.eigendecompose(fs, progress=False)
        es.meta["owners"] = fs.meta["owners"]
        save_distributed(es, out_dir, "eigen")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="spawn")
    model = make("llama")
    merged = load_index(tmp_path / "out" / "factors.index.json", "factors", model=model)
    single = curvfast.collect_factors(model, [lm_batch(i) for i in range(5)], modules="mlp", fisher="true", seed=11,
                                      progress=False)
    assert merged.tokens == single.tokens and sorted(merged) == sorted(single)
    for n in single:
        assert torch.allclose(merged[n].A, single[n].A, rtol=1e-5, atol=1e-7)
        assert torch.allclose(merged[n].G, single[n].G, rtol=1e-5, atol=1e-7)
    parts = sorted(p.name for p in (tmp_path / "out").glob("factors-rank*.safetensors"))
    assert parts == ["factors-rank00000.safetensors", "factors-rank00001.safetensors"]
    owners = merged.meta["owners"]
    assert set(owners.values()) == {0, 1}  # work is spread over both ranks
    eigen = load_index(tmp_path / "out" / "eigen.index.json", "eigen", model=model)
    result = curvfast.edit_model(model, eigen, rho=0.7)
    assert len(result.reports) == 6


def test_assign_owners_balances_cost_and_keeps_groups():
    groups = {"a": [("a.gate", 10, 4), ("a.up", 10, 4)], "b": [("b.down", 4, 10)], "c": [("c.gate", 10, 4)]}
    owner = assign_owners(groups, 2)
    assert set(owner) == {"a", "b", "c"}
    assert owner["a"] != owner["b"] or owner["a"] != owner["c"]


def test_requires_initialized_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        collect_factors_distributed(make("llama"), [lm_batch()], seed=0)


def test_torchrun_cli_collect_then_eigen_and_edit(tmp_path):
    """The CLI under torchrun (2 CPU ranks, gloo) writes parts + index that eigen/edit read."""
    import subprocess

    from curvfast.data import text_batches
    from test_cli import TEXT, make_tokenizer
    import transformers as tf

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(TEXT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29513", "-m", "curvfast", "collect", str(tmp_path / "model"), "--data",
                          str(tmp_path / "train.txt"), "--seq-len", "16", "--out", str(tmp_path / "factors"),
                          "--device", "cpu", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "factors" / "factors.index.json").exists()
    from curvfast.cli import main

    assert main(["eigen", str(tmp_path / "factors"), "--out", str(tmp_path / "e.safetensors"), "-q"]) == 0
    assert main(["edit", str(tmp_path / "model"), "--eigen", str(tmp_path / "e.safetensors"), "--rho", "0.5",
                 "--out", str(tmp_path / "edited"), "-q"]) == 0
    single = curvfast.collect_factors(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model"),
                                      text_batches(tmp_path / "train.txt", tok, seq_len=16, batch_size=8),
                                      modules="mlp_in", fisher="true", seed=0, progress=False)
    merged = curvfast.load_factors(tmp_path / "factors")
    for n in single:
        assert torch.allclose(merged[n].G, single[n].G, rtol=1e-5, atol=1e-8)
