"""TokenAdapt (``tokenadapt``) and the auxiliary text embeddings, against direct computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_lm, read_tensors

import tokenbridge.init.tokenadapt  # noqa: F401 - registers the method
from tokenbridge.errors import TokenbridgeError
from tokenbridge.init.sparse import cosine_topk
from tokenbridge.init.text_embed import TextEmbedder, embed_texts
from tokenbridge.init.tokenadapt import tokenadapt_weights
from tokenbridge.pipeline import transplant

# ---- reference computations (plain Python / one text at a time) -------------------------------

def reference_embedding(model, tokenizer, text: str, max_length: int = 32) -> torch.Tensor:
    """sentence-transformers style: one text, mean of the last hidden states over the mask, unit length."""
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    mask = batch["attention_mask"][0].float()
    mean = (hidden * mask[:, None]).sum(0) / mask.sum()
    return mean / mean.norm()


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exp = [math.exp(v - top) for v in values]
    return [e / sum(exp) for e in exp]


def reference_local(token: list[float], pieces: list[list[float] | None], lengths: list[int], length: int,
                    temperature: float) -> list[float]:
    sims = [sum(a * b for a, b in zip(token, p)) if p is not None else 0.0 for p in pieces]
    semantic = softmax(sims)
    combined = [(s + n / length) / 2 for s, n in zip(semantic, lengths)]
    return softmax([c / temperature for c in combined])


def reference_global(token: list[float], keys: list[list[float]], k: int, temperature: float,
                     threshold: float) -> tuple[list[int], list[float]]:
    sims = [sum(a * b for a, b in zip(token, key)) for key in keys]
    best = sorted(range(len(keys)), key=lambda i: -sims[i])[:k]
    weights = softmax([sims[i] / temperature for i in best])
    weights = [w if sims[i] >= threshold else 0.0 for w, i in zip(weights, best)]
    total = sum(weights)
    return best, ([w / total for w in weights] if total > 0 else [0.0] * len(best))


# ---- embed_texts ---------------------------------------------------------------------------------

def test_embed_texts_equals_sentence_mean_pooling_on_minilm():
    from transformers import AutoModel, AutoTokenizer

    from tokenbridge.load.packaged import minilm_dir

    directory = minilm_dir()
    texts = ["the", " the", "Straße", " running", "tokenization", "日本", "x" * 80, "the", "?!", " def __init__",
             "cat", "dog", "carburettor"]
    got = embed_texts(directory, texts, batch_size=3)
    assert got.shape == (len(texts), 384) and got.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModel.from_pretrained(str(directory)).eval()
    for row, text in zip(got, texts):
        torch.testing.assert_close(row, reference_embedding(model, tokenizer, text), atol=2e-5, rtol=0)
    assert torch.equal(got, TextEmbedder(directory).embed(texts, batch_size=3))  # deterministic
    # the real model puts related words closer than unrelated ones
    cat, dog, carburettor = got[-3:]
    assert float(cat @ dog) > float(cat @ carburettor)


@pytest.fixture(scope="module")
def tiny_aux(tmp_path_factory, tok_dirs) -> Path:
    """A randomly initialised tiny BERT with the wordpiece tokenizer: a stand-in text embedder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = tmp_path_factory.mktemp("aux")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["wordpiece"]))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    BertModel(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def test_embed_texts_tiny_model_padding_and_order(tiny_aux):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a", "the cat sat on the mat", " the", "mat", "zebra crossing here", "a"]
    got = embed_texts(tiny_aux, texts, batch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_aux))
    model = AutoModel.from_pretrained(str(tiny_aux)).eval()
    for row, text in zip(got, texts):
        torch.testing.assert_close(row, reference_embedding(model, tokenizer, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)))
    half = embed_texts(tiny_aux, texts, dtype="bfloat16")
    assert half.dtype == torch.float32 and float((half * got).sum(dim=1).min()) > 0.99


def test_bad_aux_model_is_a_user_error(tmp_path, models_dir, tok_dirs):
    with pytest.raises(TokenbridgeError, match="no such directory"):
        embed_texts(tmp_path / "missing", ["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenbridgeError, match="cannot load"):
        embed_texts(tmp_path / "empty", ["a"])
    with pytest.raises(TokenbridgeError, match="aux_model"):
        transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "out", method="tokenadapt",
                   options={"aux_model": str(tmp_path / "missing")}, progress=False)
    with pytest.raises(TokenbridgeError, match="global_weight"):
        transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "out2", method="tokenadapt",
                   options={"global_weight": "1.5"}, progress=False)


# ---- the weights ---------------------------------------------------------------------------------

def test_weights_equal_the_direct_formulas():
    generator = torch.Generator().manual_seed(0)
    dim, sources, k, temperature = 8, 40, 3, 0.3

    def unit(*shape):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True)

    keys = unit(sources, dim)
    tokens = unit(5, dim)
    tokens[4] = keys[7] * 0.9 + unit(dim) * 0.1  # a token with an obvious nearest source
    tokens[4] /= tokens[4].norm()
    # pieces: source ids (None = piece without an auxiliary embedding); token 3 has no pieces
    piece_ids = [[1, 2, 3], [4], [5, None], [], [7, 8]]
    piece_lengths = [[2, 3, 1], [4], [3, 1], [], [1, 5]]
    token_lengths = [6, 4, 4, 3, 6]
    width = 3
    pieces = torch.zeros(5, width, dim, dtype=torch.float64)
    present = torch.zeros(5, width, dtype=torch.bool)
    lengths = torch.zeros(5, width, dtype=torch.float64)
    for n, ids in enumerate(piece_ids):
        for j, i in enumerate(ids):
            present[n, j] = True
            lengths[n, j] = piece_lengths[n][j]
            if i is not None:
                pieces[n, j] = keys[i]
    similarities, neighbours = cosine_topk(tokens, keys, k)
    similarities = similarities.double()  # the search runs in float32

    for threshold, global_weight in [(0.0, 0.3), (-1.0, 0.5), (0.25, 0.3), (2.0, 0.3)]:
        got = tokenadapt_weights(tokens, pieces, present, lengths, torch.tensor(token_lengths, dtype=torch.float64),
                                 similarities, torch.ones_like(similarities, dtype=torch.bool),
                                 temperature, threshold, global_weight)
        for n in range(5):
            token = tokens[n].tolist()
            best, global_ref = reference_global(token, keys.tolist(), k, temperature, threshold)
            assert neighbours[n].tolist() == best
            torch.testing.assert_close(got.global_[n], torch.tensor(global_ref, dtype=torch.float64))
            if piece_ids[n]:
                local_ref = reference_local(token, [keys[i].tolist() if i is not None else None for i in piece_ids[n]],
                                            piece_lengths[n], token_lengths[n], temperature)
                local_ref += [0.0] * (width - len(local_ref))
            else:
                local_ref = [0.0] * width
            torch.testing.assert_close(got.local[n], torch.tensor(local_ref, dtype=torch.float64))
            has_local, has_global = bool(piece_ids[n]), sum(global_ref) > 0
            if has_local and has_global:
                a, b = 1 - global_weight, global_weight
            else:
                a, b = float(has_local), float(has_global)
            torch.testing.assert_close(got.local_share[n], a * torch.tensor(local_ref, dtype=torch.float64))
            torch.testing.assert_close(got.global_share[n], b * torch.tensor(global_ref, dtype=torch.float64))
        if threshold > 1:  # nobody reaches the threshold: the local estimate alone (token 3: nothing)
            assert got.global_share.abs().sum() == 0
            assert float(got.local_share[3].sum()) == 0.0
    # the nearest source of token 4 is the one it was built from, and it gets the largest global weight
    assert int(neighbours[4, 0]) == 7


# ---- end to end ----------------------------------------------------------------------------------

def test_transplant_end_to_end(models_dir, tok_dirs, tiny_aux, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from tokenbridge.align.token_bytes import vocabulary
    from tokenbridge.load.tokenizer import load_tokenizer

    source_dir, target_dir = models_dir["llama"], tok_dirs["byte_level_de"]
    options = {"aux_model": str(tiny_aux), "batch_size": "7"}
    out, report = transplant(source_dir, target_dir, tmp_path / "a", method="tokenadapt", options=options,
                             seed=3, progress=False)
    load_lm(out)(torch.tensor([[1, 2, 3]]))  # loads and runs
    source = read_tensors(source_dir)["model.embed_tokens.weight"]
    rows = read_tensors(out)["model.embed_tokens.weight"]
    for target_id, source_id in report.copied:
        assert torch.equal(rows[target_id], source[source_id])

    written = json.loads((out / "tokenbridge.json").read_text())
    assert written["method"] == "tokenadapt"
    initialised = written["initialised"]["input"]
    hows = {r["how"] for r in initialised}
    assert {"tokenadapt", "tokenadapt:fallback:subword"} <= hows
    for r in initialised:
        assert r["source_ids"] and len(r["source_ids"]) == len(r["weights"])
        assert abs(sum(r["weights"]) - 1) < 1e-5
        expected = sum(w * source[i].double() for i, w in zip(r["source_ids"], r["weights"]))
        torch.testing.assert_close(rows[r["target_id"]].double(), expected, atol=1e-5, rtol=0)

    # Independently recompute a few tokens' weights: own embeddings, brute-force neighbours.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_aux))
    model = AutoModel.from_pretrained(str(tiny_aux)).eval()
    source_vocab = vocabulary(load_tokenizer(source_dir))
    target_vocab = vocabulary(load_tokenizer(target_dir))
    from tokenbridge.align.encode import ByteEncoder

    encoder = ByteEncoder(source_vocab)
    specials = set(tokenizer.all_special_ids)

    def visible(text):
        return any(i not in specials for i in tokenizer(text)["input_ids"])

    keys = [t for t in source_vocab.tokens
            if not t.special and t.bytes and not t.partial_utf8 and visible(t.bytes.decode())]
    key_vectors = [reference_embedding(model, tokenizer, t.bytes.decode()).tolist() for t in keys]
    checked = 0
    for r in initialised:
        info = target_vocab.tokens[r["target_id"]]
        pieces = encoder.encode(info.bytes)
        if r["how"] != "tokenadapt" or checked >= 4 or any(source_vocab.tokens[i].partial_utf8 for i in pieces):
            continue
        text = info.bytes.decode()
        token = reference_embedding(model, tokenizer, text).tolist()
        piece_vectors = [reference_embedding(model, tokenizer, source_vocab.tokens[i].bytes.decode()).tolist()
                         if source_vocab.tokens[i] in keys else None for i in pieces]
        lengths = [len(source_vocab.tokens[i].bytes.decode()) for i in pieces]
        local = reference_local(token, piece_vectors, lengths, len(text), 0.3)
        best, global_ = reference_global(token, key_vectors, 3, 0.3, 0.0)
        expected: dict[int, float] = {}
        for i, w in zip(pieces, local):
            expected[i] = expected.get(i, 0.0) + 0.7 * w
        for b, w in zip(best, global_):
            expected[keys[b].id] = expected.get(keys[b].id, 0.0) + 0.3 * w
        got = dict(zip(r["source_ids"], r["weights"]))
        assert got.keys() == expected.keys()
        for i, weight in got.items():
            assert abs(weight - expected[i]) < 2e-5
        checked += 1
    assert checked == 4

    again, _ = transplant(source_dir, target_dir, tmp_path / "b", method="tokenadapt", options=options, seed=3,
                          progress=False)
    for name in ("model.safetensors", "tokenbridge.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
