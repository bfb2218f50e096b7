"""curvfast.data: reading local files, tokenizing, packing, batching, memorized sets."""
import json

import pytest
import torch

from curvfast.data import (Batches, load_memorized, pack, read_documents, text_batches,
                           tokenize_documents)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the quick brown fox jumps",
          "over the lazy dog again and again"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>",
                                                eos_token="<eos>", pad_token="<eos>")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_and_jsonl_documents(tmp_path, tok):
    (tmp_path / "a.txt").write_text(CORPUS[0])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": CORPUS[1]}, {"input_ids": [5, 6, 7]}])
    docs = list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert docs == [CORPUS[0], CORPUS[1], [5, 6, 7]]
    # a directory stands for its files, sorted
    assert list(read_documents(tmp_path)) == docs

    eos = tok.eos_token_id
    stream = tokenize_documents(docs, tok)
    want = _ids(tok, CORPUS[0]) + [eos] + _ids(tok, CORPUS[1]) + [eos] + [5, 6, 7, eos]
    assert stream.dtype == torch.long and stream.tolist() == want


def test_max_tokens_caps_the_stream(tok):
    stream = tokenize_documents(iter(CORPUS), tok, max_tokens=9)
    full = tokenize_documents(CORPUS, tok)
    assert stream.tolist() == full[:9].tolist()
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_documents(CORPUS, tok, max_tokens=0)


def test_pack_shapes_and_padding():
    ids = torch.arange(23)
    p = pack(ids, 5)
    assert p["input_ids"].shape == (4, 5) and p["attention_mask"].all()
    assert p["input_ids"].reshape(-1).tolist() == list(range(20))
    q = pack(ids, 5, drop_last=False, pad_id=-1)
    assert q["input_ids"].shape == (5, 5)
    assert q["input_ids"][4].tolist() == [20, 21, 22, -1, -1]
    assert q["attention_mask"][4].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="not enough tokens"):
        pack(torch.arange(3), 5)
    with pytest.raises(ValueError, match="seq_len"):
        pack(ids, 1)


def test_text_batches_are_reiterable_and_cover_the_data(tmp_path, tok):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": c} for c in CORPUS * 5])
    b = text_batches(f, tok, seq_len=6, batch_size=4)
    assert isinstance(b, Batches)
    first = list(b)
    second = list(b)
    assert len(first) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    for x in first:
        assert set(x) == {"input_ids", "attention_mask"}
        assert x["input_ids"].shape[1] == 6 and x["input_ids"].dtype == torch.long
        assert x["attention_mask"].shape == x["input_ids"].shape
    stream = tokenize_documents(CORPUS * 5, tok)
    n = (stream.numel() // 6) * 6
    assert torch.cat([x["input_ids"] for x in first]).reshape(-1).tolist() == stream[:n].tolist()
    assert b.tokens == n
    # shuffled: same rows, other order, deterministic per seed
    s1 = torch.cat([x["input_ids"] for x in text_batches(f, tok, seq_len=6, batch_size=4, shuffle=True, seed=1)])
    s2 = torch.cat([x["input_ids"] for x in text_batches(f, tok, seq_len=6, batch_size=4, shuffle=True, seed=1)])
    assert torch.equal(s1, s2)
    unshuffled = torch.cat([x["input_ids"] for x in first])
    assert sorted(map(tuple, s1.tolist())) == sorted(map(tuple, unshuffled.tolist()))
    # max_tokens
    capped = text_batches(f, tok, seq_len=6, batch_size=4, max_tokens=13)
    assert capped.tokens == 12


def test_errors_name_the_problem(tmp_path, tok):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text_batches(missing, tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        text_batches(tmp_path / "empty.txt", tok)
    _write_jsonl(tmp_path / "blank.jsonl", [])
    with pytest.raises(ValueError, match="empty"):
        text_batches(tmp_path / "blank.jsonl", tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(read_documents(tmp_path / "bad.jsonl"))
    _write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match="neither 'text' nor 'input_ids'"):
        list(read_documents(tmp_path / "nofield.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_documents(tmp_path / "x.csv"))
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize_documents(read_documents(tmp_path / "t.txt"), None)


def test_load_memorized_all_record_kinds(tmp_path, tok):
    f = _write_jsonl(tmp_path / "mem.jsonl", [
        {"input_ids": [1, 2, 3, 4]},
        {"text": CORPUS[2]},
        {"prefix": "the quick", "suffix": "brown fox"},
        {"prefix": [9, 8], "suffix": [7]},
    ])
    seqs = load_memorized(f, tok)
    assert seqs[0] == [1, 2, 3, 4]
    assert seqs[1] == _ids(tok, CORPUS[2])
    assert seqs[2] == (_ids(tok, "the quick"), _ids(tok, "brown fox"))
    assert seqs[3] == ([9, 8], [7])
    assert load_memorized(f, tok, max_sequences=2) == seqs[:2]


def test_load_memorized_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        load_memorized(tmp_path / "gone.jsonl", tok)
    _write_jsonl(tmp_path / "half.jsonl", [{"prefix": "a"}])
    with pytest.raises(ValueError, match="needs 'suffix'"):
        load_memorized(tmp_path / "half.jsonl", tok)
    _write_jsonl(tmp_path / "none.jsonl", [])
    with pytest.raises(ValueError, match="no memorized sequences"):
        load_memorized(tmp_path / "none.jsonl", tok)
    _write_jsonl(tmp_path / "badids.jsonl", [{"input_ids": [1, "x"]}])
    with pytest.raises(ValueError, match="badids.jsonl:1"):
        load_memorized(tmp_path / "badids.jsonl", tok)
