"""curvfast.evaluate against independent computations.

- Levenshtein: textbook cases and a memoized recursive definition (a different algorithm).
- recitation: a naive per-sequence greedy loop without cache on a tiny float64 Llama.
- perplexity: per-sequence float64 log-softmax without padding.
"""
import functools
import math
import random

import pytest
import torch

from curvfast.evaluate import LOOSE_THRESHOLD, perplexity, recitation, token_levenshtein

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------
# Levenshtein
# --------------------------------------------------------------------------------------
def _lev_recursive(a, b):
    """Definition of edit distance by recursion on prefixes (memoized)."""
    a, b = tuple(a), tuple(b)

    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == 0:
            return j
        if j == 0:
            return i
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@pytest.mark.parametrize("a,b,want", [
    ("kitten", "sitting", 3),
    ("flaw", "lawn", 2),
    ("", "", 0),
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("abc", "cba", 2),
    ("intention", "execution", 5),
])
def test_levenshtein_known(a, b, want):
    assert token_levenshtein([ord(c) for c in a], [ord(c) for c in b]) == want
    assert token_levenshtein([ord(c) for c in b], [ord(c) for c in a]) == want


def test_levenshtein_against_recursive_definition():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        assert token_levenshtein(a, b) == _lev_recursive(a, b), (a, b)


def test_levenshtein_accepts_tensors():
    assert token_levenshtein(torch.tensor([1, 2, 3]), [1, 3]) == 1
    with pytest.raises(ValueError, match="1-D"):
        token_levenshtein(torch.zeros(2, 2, dtype=torch.long), [1])


# --------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2)
    # float64 so that cache vs no-cache arithmetic differences cannot flip an argmax
    return transformers.LlamaForCausalLM(cfg).double().eval()


class _TableModel(torch.nn.Module):
    """next token = table[last token]; no KV cache (exercises the recompute path)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table))
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
        V = len(self.table)
        logits = torch.nn.functional.one_hot(self.table[input_ids], V).double() * 5.0
        return {"logits": logits}


def _naive_greedy(model, prefix, n):
    ids = torch.tensor([prefix])
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prefix):].tolist()


# --------------------------------------------------------------------------------------
# Recitation
# --------------------------------------------------------------------------------------
def test_recitation_matches_naive_greedy(llama):
    rng = random.Random(1)
    # mixed prefix lengths (pairs) and plain sequences; batch size that splits groups
    seqs = [[rng.randrange(3, 61) for _ in range(14)] for _ in range(5)]
    pairs = [([rng.randrange(3, 61) for _ in range(rng.choice([3, 5, 8]))],
              [rng.randrange(3, 61) for _ in range(rng.choice([4, 6]))]) for _ in range(6)]
    items = seqs + pairs
    res = recitation(llama, items, prefix_len=8, suffix_len=6, batch_size=3, progress=False,
                     return_details=True)
    assert res["n"] == len(items)
    splits = [(s[:8], s[8:14]) for s in seqs] + pairs
    for (p, s), det in zip(splits, res["details"]):
        want = _naive_greedy(llama, p, len(s))
        assert det["generated"] == want
        assert det["suffix"] == s
        assert det["distance"] == token_levenshtein(want, s)
    dists = [d["distance"] / len(d["suffix"]) for d in res["details"]]
    assert res["mean_dist"] == pytest.approx(sum(dists) / len(dists))
    # no-cache path agrees too
    res2 = recitation(llama, items, prefix_len=8, suffix_len=6, batch_size=4, progress=False,
                      return_details=True, use_cache=False)
    assert [d["generated"] for d in res2["details"]] == [d["generated"] for d in res["details"]]


def test_recitation_of_own_greedy_output_is_strict(llama):
    rng = random.Random(2)
    items = []
    for _ in range(4):
        p = [rng.randrange(3, 61) for _ in range(6)]
        items.append(p + _naive_greedy(llama, p, 5))
    res = recitation(llama, items, prefix_len=6, suffix_len=5, progress=False)
    assert res == {"strict": 1.0, "loose": 1.0, "mean_dist": 0.0, "n": 4}


def test_recitation_strict_loose_thresholds():
    V = 20
    table = [(t + 1) % V for t in range(V)]  # greedy from prefix ending in t: t+1, t+2, ...
    model = _TableModel(table)
    prefix = [0, 1, 2, 3]
    truth = [4, 5, 6, 7, 8, 9, 10, 11]  # what the model generates (L = 8)

    def corrupt(k):  # k substitutions → d = k
        s = list(truth)
        for i in range(k):
            s[i] = 19
        return (prefix, s)

    res = recitation(model, [corrupt(k) for k in range(5)], progress=False, return_details=True)
    assert [d["distance"] for d in res["details"]] == [0, 1, 2, 3, 4]
    # d/L = 0, .125, .25, .375, .5 → strict only d=0; loose iff 1 - d/L >= 0.75 (d <= 2, boundary inclusive)
    assert [d["strict"] for d in res["details"]] == [True, False, False, False, False]
    assert [d["loose"] for d in res["details"]] == [True, True, True, False, False]
    assert res["strict"] == pytest.approx(1 / 5)
    assert res["loose"] == pytest.approx(3 / 5)
    assert res["mean_dist"] == pytest.approx((0 + .125 + .25 + .375 + .5) / 5)
    assert LOOSE_THRESHOLD == 0.75


def test_recitation_never_stops_at_eos():
    V = 10
    model = _TableModel([2] * V)  # always predicts token 2 (= EOS in Llama configs)
    res = recitation(model, [([5, 6], [2] * 7)], progress=False, return_details=True)
    assert res["details"][0]["generated"] == [2] * 7
    assert res["strict"] == 1.0


def test_recitation_quote_protocol_and_errors(llama):
    seq = list(range(3, 20))
    res = recitation(llama, [seq], prefix_len=None, suffix_len=8, progress=False, return_details=True)
    assert res["details"][0]["suffix"] == seq[-8:]
    with pytest.raises(ValueError, match="sequence 0 has 5 tokens"):
        recitation(llama, [[3, 4, 5, 6, 7]], prefix_len=4, suffix_len=4, progress=False)
    empty = recitation(llama, [], progress=False)
    assert empty["n"] == 0 and math.isnan(empty["strict"])


def test_recitation_restores_training_mode(llama):
    llama.train()
    try:
        recitation(llama, [list(range(3, 13))], prefix_len=5, suffix_len=5, progress=False)
        assert llama.training
    finally:
        llama.eval()


# --------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------
@torch.no_grad()
def _manual_nll(model, seq):
    """Σ NLL (float64) and count for one unpadded sequence."""
    logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = torch.tensor(seq[1:])
    return float(-logp[torch.arange(len(tgt)), tgt].sum()), len(tgt)


def test_perplexity_matches_manual_float64(llama):
    rng = random.Random(3)
    seqs = [[rng.randrange(0, 61) for _ in range(rng.randrange(2, 20))] for _ in range(7)]
    res = perplexity(llama, seqs, batch_size=3, progress=False)
    per = [_manual_nll(llama, s) for s in seqs]
    tot = sum(n for _, n in per)
    assert res["tokens"] == tot
    assert res["nll"] == pytest.approx(sum(s for s, _ in per) / tot, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(sum(s for s, _ in per) / tot), rel=1e-6)
    # the paper's variant: mean over batches of exp(batch token-mean NLL)
    batch_exps = []
    for k in range(0, len(per), 3):
        chunk = per[k:k + 3]
        batch_exps.append(math.exp(sum(s for s, _ in chunk) / sum(n for _, n in chunk)))
    assert res["perplexity_mean_batch_exp"] == pytest.approx(sum(batch_exps) / len(batch_exps), rel=1e-6)
    assert res["batches"] == 3


def test_perplexity_respects_attention_mask(llama):
    rng = random.Random(4)
    seqs = [[rng.randrange(0, 61) for _ in range(n)] for n in (9, 4, 12)]
    L = 12
    ids = torch.full((3, L), 7, dtype=torch.long)  # junk in padding must not matter
    mask = torch.zeros((3, L), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    from_batches = perplexity(llama, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    from_lists = perplexity(llama, seqs, batch_size=2, progress=False)
    assert from_batches["tokens"] == from_lists["tokens"] == 8 + 3 + 11
    assert from_batches["perplexity"] == pytest.approx(from_lists["perplexity"], rel=1e-6)


def test_perplexity_accepts_tensor_and_skips_all_padding(llama):
    ids = torch.randint(0, 61, (5, 10), generator=torch.Generator().manual_seed(5))
    a = perplexity(llama, ids, batch_size=2, progress=False)
    b = perplexity(llama, [ids[k:k + 2] for k in range(0, 5, 2)], progress=False)
    assert a["tokens"] == b["tokens"] == 45
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-9)
    pad_batch = {"input_ids": ids[:2], "attention_mask": torch.zeros(2, 10, dtype=torch.long)}
    c = perplexity(llama, [pad_batch, {"input_ids": ids}], progress=False)
    assert c["batches"] == 1 and c["perplexity"] == pytest.approx(a["perplexity"], rel=1e-9)
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity(llama, [pad_batch], progress=False)


# --------------------------------------------------------------------------------------
# Memorized-set mining (teacher-forced argmax)
# --------------------------------------------------------------------------------------
from curvfast.evaluate import (mine_memorized, ndcg_at_10, ndcg_at_k, ndcg_from_logits,  # noqa: E402
                               noisy_label_metrics, noisy_label_metrics_from_predictions)


def _chain(table, start, n):
    out = [start]
    for _ in range(n - 1):
        out.append(int(table[out[-1]]))
    return out


def test_mine_memorized_table_model_counts_matches():
    V = 13
    table = [(3 * t + 1) % V for t in range(V)]
    model = _TableModel(table)
    good = _chain(table, 4, 9)                        # every next token follows the table
    bad_last = good[:-1] + [(good[-1] + 1) % V]       # the last suffix token is wrong
    bad_first = good[:5] + [(good[5] + 1) % V] + good[6:]  # first suffix token wrong; rest still chain
    res = mine_memorized(model, [good, bad_last, bad_first], prefix_len=5, suffix_len=4, progress=False)
    assert res["memorized"] == [True, False, False]
    # bad_first: position 5 wrong (pred from good[4] = good[5] ≠ given); position 6 is predicted
    # from the wrong token, table[good[5]+1] vs good[6]: count by hand
    want3 = (int(table[good[4]]) == bad_first[5]) + (int(table[bad_first[5]]) == bad_first[6]) \
        + (int(table[bad_first[6]]) == bad_first[7]) + (int(table[bad_first[7]]) == bad_first[8])
    assert res["matched"] == [4, 3, want3]
    assert res["fraction"] == pytest.approx(1 / 3)
    assert res["sequences"] == [(good[:5], good[5:9])]


def test_mine_memorized_sliding_windows():
    V = 11
    table = [(t + 2) % V for t in range(V)]
    seq = _chain(table, 0, 12)
    seq[7] = (seq[7] + 5) % V  # breaks the chain: windows whose suffix predicts 7 or 8 fail
    res = mine_memorized(_TableModel(table), [seq], prefix_len=3, suffix_len=2, stride=1, progress=False)
    assert res["windows"] == [(0, s) for s in range(0, 12 - 5 + 1)]
    # window at start s predicts tokens s+3, s+4; fails iff 7 or 8 is among them
    want = [not ({s + 3, s + 4} & {7, 8}) for s in range(8)]
    assert res["memorized"] == want


def test_mine_memorized_equals_strict_recitation(llama):
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 61) for _ in range(6)] for _ in range(6)]
    items = []
    for i, p in enumerate(prefixes):
        s = _naive_greedy(llama, p, 5)
        if i % 3 == 1:
            s = s[:-1] + [(s[-1] + 1) % 61]          # last token off by one
        elif i % 3 == 2:
            s = [rng.randrange(3, 61) for _ in range(5)]
        items.append((p, s))
    mined = mine_memorized(llama, items, batch_size=4, progress=False)
    rec = recitation(llama, items, batch_size=4, progress=False, return_details=True)
    assert mined["memorized"] == [d["strict"] for d in rec["details"]]
    assert mined["memorized"][0::3] == [True, True]


# --------------------------------------------------------------------------------------
# nDCG@k
# --------------------------------------------------------------------------------------
def _logits_with_order(order, V):
    """One row whose ranking is `order` first (descending), then the rest."""
    row = torch.zeros(V, dtype=torch.float64)
    for r, t in enumerate(order):
        row[t] = 100.0 - r
    return row


def test_ndcg_hand_computed():
    V = 12
    ref = _logits_with_order([5, 1, 7], V)
    new = _logits_with_order([1, 5, 9], V)
    # k = 3: reference gains 5→3, 1→2, 7→1; new list 1, 5, 9 → gains 2, 3, 0
    dcg = 2 / math.log2(2) + 3 / math.log2(3) + 0 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    got = ndcg_from_logits(ref[None], new[None], k=3)
    assert got.item() == pytest.approx(dcg / idcg, rel=1e-12)
    assert ndcg_from_logits(ref[None], ref[None], k=3).item() == pytest.approx(1.0)
    disjoint = _logits_with_order([0, 2, 3], V)
    assert ndcg_from_logits(ref[None], disjoint[None], k=3).item() == 0.0
    # swapping the top two costs more than swapping the last two
    a = _logits_with_order([1, 5, 7], V)
    b = _logits_with_order([5, 7, 1], V)
    assert ndcg_from_logits(ref[None], a[None], 3) < ndcg_from_logits(ref[None], b[None], 3)


def test_ndcg_models_against_explicit_loop(llama):
    import copy

    edited = copy.deepcopy(llama)
    with torch.no_grad():
        edited.model.layers[1].mlp.up_proj.weight.mul_(0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    res = ndcg_at_10(llama, edited, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    # explicit: per real position, gains from the original's top-10, discounts 1/log2(q+2)
    la, lb = llama(input_ids=ids, attention_mask=mask).logits, edited(input_ids=ids, attention_mask=mask).logits
    idcg = sum((10 - r) / math.log2(r + 2) for r in range(10))
    scores = []
    for b in range(3):
        for t in range(9):
            if not mask[b, t]:
                continue
            ref = la[b, t].topk(10).indices.tolist()
            new = lb[b, t].topk(10).indices.tolist()
            dcg = sum((10 - ref.index(tok)) / math.log2(q + 2) for q, tok in enumerate(new) if tok in ref)
            scores.append(dcg / idcg)
    assert res["positions"] == len(scores) == 24
    assert res["ndcg"] == pytest.approx(sum(scores) / len(scores), rel=1e-9)
    assert 0.0 < res["ndcg"] < 1.0
    assert ndcg_at_k(llama, llama, ids, k=5, progress=False)["ndcg"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# Noisy-label classifier metrics
# --------------------------------------------------------------------------------------
def test_noisy_label_metrics_hand_computed():
    true = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    noisy = torch.tensor([0, 1, 3, 3, 0, 2, 1, 0])   # rows 2, 4, 5, 7 are noisy
    pred = torch.tensor([0, 2, 3, 3, 4, 1, 1, 0])    # noisy rows: 3 (noisy), 4 (true), 1 (neither), 0 (noisy)
    m = noisy_label_metrics_from_predictions(pred, noisy, true, torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]))
    assert m["noisy"] == 4 and m["train"] == 8
    assert m["memorized"] == pytest.approx(2 / 4)
    assert m["true_label_acc"] == pytest.approx(1 / 4)
    assert m["clean_train_acc"] == pytest.approx(3 / 4)   # clean rows 0,1,3,6: pred right on 0,3,6
    assert m["val_acc"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shapes"):
        noisy_label_metrics_from_predictions(pred[:3], noisy, true)


class _PixelClassifier(torch.nn.Module):
    """logits = one-hot of the first pixel's value."""

    def __init__(self, C):
        super().__init__()
        self.C = C
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values):
        return {"logits": torch.nn.functional.one_hot(pixel_values[:, 0, 0, 0].long(), self.C).float()}


def test_noisy_label_metrics_runs_the_model():
    pred = torch.tensor([0, 2, 3, 3, 4, 1, 1, 0])
    px = torch.zeros(8, 1, 2, 2)
    px[:, 0, 0, 0] = pred.float()
    true = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    noisy = torch.tensor([0, 1, 3, 3, 0, 2, 1, 0])
    m = noisy_label_metrics(_PixelClassifier(5), px, noisy, true, px[:3], torch.tensor([0, 2, 0]), batch_size=3)
    assert m == noisy_label_metrics_from_predictions(pred, noisy, true, pred[:3], torch.tensor([0, 2, 0]))
