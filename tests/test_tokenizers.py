"""Tokenizer training (BPE, Unigram, supertokens), extension and pruning."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import corpus, load_lm, make_metaspace, make_model, make_wordpiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbridge.cli import main
from tokenbridge.load.tokenizer import load_tokenizer, tokenizer_dir
from tokenbridge.tokenizers.api import extend, prune, train
from tokenbridge.tokenizers.files import backend, tokenizer_json
from tokenbridge.tokenizers.merges import learn_merges
from tokenbridge.tokenizers.prune import prune_tokenizer
from tokenbridge.tokenizers.style import BYTE_LEVEL, METASPACE, default_style
from tokenbridge.tokenizers.train import TrainConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
# Text the tokenizers never saw: other scripts, emoji, controls, NUL, astral planes, combining marks.
UNSEEN = ["Zürich → 東京 🚀 \x00\x01\x7f\u200b e\u0301 𝄞 \U0010fffd", "\t\r\n  \n\n\u3000x", "ﬁ Ⅻ ½ Ω", "<0x41> <unk>"]


def _texts(tmp_path: Path, size: int = 30000) -> list[Path]:
    paths = []
    for lang in ("en", "de"):
        path = tmp_path / f"train.{lang}.txt"
        path.write_text(corpus(lang, 5000, size), encoding="utf-8")
        paths.append(path)
    return paths


CONFIGS = {
    "bpe": (TrainConfig(800), False),
    "bpe-super": (TrainConfig(800, supertokens=True), False),
    "bpe-fallback": (TrainConfig(1100), True),
    "bpe-fallback-super": (TrainConfig(1100, supertokens=True, supertoken_share=0.4), True),
    "unigram": (TrainConfig(800, model="unigram"), False),
    "unigram-fallback": (TrainConfig(1100, model="unigram"), True),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    texts = _texts(root)
    out = {}
    for name, (config, fallback) in CONFIGS.items():
        out[name] = root / name
        train(texts, out[name], config, byte_fallback=fallback, progress=False)
    return out


def _round_trips(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids) == text


def _style_safe(kind: str):
    """Arbitrary Unicode; for ▁ styles without U+2581 itself, which the convention reads as a space."""
    if kind == METASPACE:
        return st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=60)
    return st.text(max_size=60)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trained_tokenizers_round_trip_any_text(trained, name):
    tokenizer = load_tokenizer(trained[name])  # as written: stock AutoTokenizer on the directory
    kind = METASPACE if CONFIGS[name][1] else BYTE_LEVEL
    assert len(tokenizer) == CONFIGS[name][0].vocab_size or not name.startswith("bpe-fallback")
    for text in UNSEEN + [corpus("ja", 100, 400), corpus("en", 90000, 2000)]:
        assert _round_trips(tokenizer, text), (name, text)

    @SETTINGS
    @given(_style_safe(kind))
    def check(text):
        assert _round_trips(tokenizer, text)

    check()


def test_metaspace_reads_a_literal_mark_as_a_space(trained):
    tokenizer = load_tokenizer(trained["bpe-fallback"])
    ids = tokenizer("a\u2581b", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "a b"  # documented: the ▁ convention cannot tell them apart


def test_training_is_deterministic(tmp_path):
    texts = _texts(tmp_path, 8000)
    for config in (TrainConfig(600, supertokens=True), TrainConfig(600, model="unigram")):
        train(texts, tmp_path / "a", config, progress=False, force=True)
        train(texts, tmp_path / "b", config, progress=False, force=True)
        assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_supertokens_span_words_within_the_bound(tmp_path):
    texts = _texts(tmp_path)
    plain = train(texts, tmp_path / "plain", TrainConfig(1000), progress=False)
    report = train(texts, tmp_path / "super", TrainConfig(1000, supertokens=True, max_words=3), progress=False)
    data = json.loads((tmp_path / "super" / "tokenizer.json").read_text())
    style = default_style(False)
    spans = Counter(style.words_in(token) for token in data["model"]["vocab"])
    assert spans[2] > 20 and spans[3] > 0 and max(spans) == 3
    # the first stage's merges keep their ranks: they are a prefix of the merge list
    first = [m for m in data["model"]["merges"] if style.words_in("".join(m)) < 2]
    assert data["model"]["merges"][:len(first) // 2] == first[:len(first) // 2]
    gain = [s.after / p.after for s, p in zip(report.compression, plain.compression)]
    assert min(gain) > 1.01  # fewer tokens on the training text at the same size


def _naive_merges(sequences: dict, n: int, allowed, known: set, min_count: int):
    """Reference BPE continuation: recount every pair after every merge."""
    words = {tuple(k): v for k, v in sequences.items()}
    known, out = set(known), []
    for _ in range(n):
        counts = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                if allowed(*pair) and pair[0] + pair[1] not in known:
                    counts[pair] += count
        if not counts:
            break
        pair, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_count:
            break
        out.append((pair, count))
        known.add(pair[0] + pair[1])
        merged = {}
        for word, c in words.items():
            new, i = [], 0
            while i < len(word):
                if word[i:i + 2] == pair:
                    new.append(pair[0] + pair[1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            merged[tuple(new)] = merged.get(tuple(new), 0) + c
        words = merged
    return out


@pytest.mark.parametrize("seed", range(5))
def test_learn_merges_matches_a_naive_reference(seed):
    rng = random.Random(seed)
    sequences = {}
    for _ in range(60):
        word = tuple(rng.choice("aabbcd ") for _ in range(rng.randint(1, 12)))
        sequences[word] = sequences.get(word, 0) + rng.randint(1, 5)

    def allowed(left, right):
        return "d" not in left + right or len(left + right) < 3

    fast = learn_merges(sequences, 25, allowed, {"ab"}, 2)
    assert [((m.left, m.right), m.count) for m in fast] == _naive_merges(sequences, 25, allowed, {"ab"}, 2)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Path:
    from tokenbridge.load.packaged import smollm2_gguf

    return tokenizer_dir(smollm2_gguf())


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_tokenizer, trained) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    from tokenbridge.load.packaged import gemma3_gguf

    return {"smollm2": smollm2_tokenizer, "gemma3": tokenizer_dir(gemma3_gguf()),
            "metaspace-bpe": make_metaspace(root / "metaspace"),
            "unigram-fallback": trained["unigram-fallback"], "unigram": trained["unigram"]}


@pytest.mark.parametrize("source", ["smollm2", "gemma3", "metaspace-bpe", "unigram-fallback", "unigram"])
def test_extend_keeps_ids_and_unaffected_encodings(tmp_path, sources, source):
    german = tmp_path / "de.txt"
    german.write_text(corpus("de", 60000, 40000), encoding="utf-8")
    report = extend(sources[source], [german], tmp_path / "out", 150, progress=False)
    old, new = load_tokenizer(sources[source]), load_tokenizer(tmp_path / "out")
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[token] == index for token, index in old_vocab.items())
    added = {index for token, index in new_vocab.items() if token not in old_vocab}
    assert len(added) == report.details["added"] > 50
    assert min(added) == max(old_vocab.values()) + 1 and max(added) == len(new_vocab) - 1
    compression = report.compression[0]
    assert compression.after > compression.before * 1.02
    unchanged = changed = 0
    texts = [corpus(lang, start, 40) for lang in ("de", "en", "fr", "ja") for start in range(1000, 30000, 700)]
    for text in texts + UNSEEN:
        before = old(text, add_special_tokens=False)["input_ids"]
        after = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(after) == old.decode(before)
        if added.isdisjoint(after):
            assert after == before, text
            unchanged += 1
        else:
            changed += 1
    assert unchanged > 10 and changed > 10


def test_extend_round_trips_any_text(tmp_path, sources):
    german = tmp_path / "de.txt"
    german.write_text(corpus("de", 60000, 20000), encoding="utf-8")
    extend(sources["metaspace-bpe"], [german], tmp_path / "out", 100, progress=False)
    tokenizer = load_tokenizer(tmp_path / "out")

    @SETTINGS
    @given(_style_safe(METASPACE))
    def check(text):
        assert _round_trips(tokenizer, text)

    check()


@pytest.mark.parametrize("source", ["smollm2", "gemma3", "metaspace-bpe", "unigram-fallback"])
def test_prune_keeps_corpus_encodings_and_every_byte(tmp_path, sources, source):
    text = tmp_path / "en.txt"
    text.write_text(corpus("en", 0, 30000), encoding="utf-8")
    old = load_tokenizer(sources[source])
    needed = prune_tokenizer(tokenizer_json(old), [text.read_text()], len(old)).needed
    keep = min(needed + 40, len(old))
    report = prune(sources[source], [text], tmp_path / "out", keep)
    new = load_tokenizer(tmp_path / "out")
    assert len(new) == keep
    old_ids = report.details["old_ids"]
    content = text.read_text()
    before = old(content, add_special_tokens=False)["input_ids"]
    after = new(content, add_special_tokens=False)["input_ids"]
    assert [old_ids[i] for i in after] == before
    assert [new.convert_ids_to_tokens(i) for i in after] == old.convert_ids_to_tokens(before)
    kind = BYTE_LEVEL if source == "smollm2" else METASPACE

    # Whatever the source spells, the pruned tokenizer spells.  (SmolLM2's vocabulary lacks 21 of the 256
    # byte symbols, among them the lead bytes of U+40000 and up, so it cannot spell everything itself.)
    @SETTINGS
    @given(_style_safe(kind))
    def check(text):
        assert _round_trips(new, text) or not _round_trips(old, text)

    check()
    for sample in UNSEEN:
        assert _round_trips(new, sample)


def test_prune_below_need_still_round_trips(tmp_path, smollm2_tokenizer):
    text = tmp_path / "en.txt"
    text.write_text(corpus("en", 0, 30000), encoding="utf-8")
    report = prune(smollm2_tokenizer, [text], tmp_path / "out", 600)
    assert report.vocab_after == 600 and report.compression[0].after < report.compression[0].before
    new = load_tokenizer(tmp_path / "out")
    for sample in [*UNSEEN, corpus("ja", 0, 500), text.read_text()[:3000]]:
        assert _round_trips(new, sample)


def test_pruned_smollm2_transplant_gives_identical_logits(tmp_path, smollm2_tokenizer):
    """Prune SmolLM2's vocabulary to a corpus, transplant: the same logits on that corpus, fewer rows."""
    from tokenbridge.pipeline import transplant

    model = make_model(tmp_path / "model", "llama", smollm2_tokenizer)
    text = tmp_path / "en.txt"
    text.write_text(corpus("en", 0, 20000), encoding="utf-8")
    report = prune(model, [text], tmp_path / "pruned", 3000)
    assert report.details["needed_by_texts"] <= 3000
    out, transplanted = transplant(model, tmp_path / "pruned", tmp_path / "small", progress=False)
    assert transplanted.counts["initialised"] == 0
    old_ids = torch.tensor(report.details["old_ids"])
    original, small = load_lm(model), load_lm(out)
    assert small.get_input_embeddings().weight.shape[0] == 3000 < original.get_input_embeddings().weight.shape[0]
    old_tok, new_tok = load_tokenizer(model), load_tokenizer(out)
    content = text.read_text()
    before = torch.tensor(old_tok(content)["input_ids"])
    after = torch.tensor(new_tok(content)["input_ids"])
    assert torch.equal(old_ids[after], before)  # the corpus encodes to the same tokens
    for start in (0, 1500, len(before) - 200):  # windows of the corpus's own token sequence
        with torch.no_grad():
            expected = original(before[None, start:start + 200]).logits[..., old_ids]
            got = small(after[None, start:start + 200]).logits
        assert torch.equal(got, expected)


def test_like_copies_conventions(tmp_path, smollm2_tokenizer, sources):
    texts = _texts(tmp_path, 10000)
    train(texts, tmp_path / "smol", TrainConfig(1000), like=smollm2_tokenizer, progress=False)
    source, new = load_tokenizer(smollm2_tokenizer), load_tokenizer(tmp_path / "smol")
    assert new.chat_template == source.chat_template
    assert (new.bos_token, new.eos_token, new.pad_token, new.unk_token) == \
        (source.bos_token, source.eos_token, source.pad_token, source.unk_token)
    assert set(source.all_special_tokens) <= set(new.get_vocab())
    messages = [{"role": "user", "content": "Hallo"}]
    assert new.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(messages, tokenize=False)
    from tokenbridge.load.packaged import gemma3_gguf

    meta = tokenizer_dir(gemma3_gguf())
    train(texts, tmp_path / "meta", TrainConfig(1100), like=meta, progress=False)
    source, new = load_tokenizer(meta), load_tokenizer(tmp_path / "meta")
    data = tokenizer_json(new)
    assert data["model"]["byte_fallback"] and data["normalizer"] == tokenizer_json(source)["normalizer"]
    assert new("Hallo Welt")["input_ids"][0] == new.bos_token_id  # the post-processor's BOS, id remapped
    assert source("x y")["input_ids"][0] == source.bos_token_id
    assert source.decode(source("x y")["input_ids"]) == new.decode(new("x y")["input_ids"])
    assert "<unused17>" in source.get_vocab() and "<unused17>" not in new.get_vocab()  # placeholders stay behind
    assert {"<start_of_turn>", "<end_of_turn>"} <= set(new.get_vocab())
    assert new.chat_template == source.chat_template


def test_cli_train_extend_prune_and_transplant(tmp_path, capsys, smollm2_tokenizer):
    texts = [str(p) for p in _texts(tmp_path, 10000)]
    assert main(["tokenizer", "train", "--text", *texts, "--vocab-size", "700", "--supertokens",
                 "--out", str(tmp_path / "t"), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_after"] == 700 and summary["compression"][0]["bytes_per_token_after"] > 2
    assert json.loads((tmp_path / "t" / "tokenbridge-tokenizer.json").read_text())["command"] == "train"
    assert main(["tokenizer", "prune", str(smollm2_tokenizer), "--text", texts[0], "--keep", "2000",
                 "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "bytes/token before" in printed and "49152 -> 2000 tokens" in printed
    model = make_model(tmp_path / "model", "qwen2", smollm2_tokenizer)
    assert main(["transplant", str(model), "--train-tokenizer", *texts, "--vocab-size", "800",
                 str(tmp_path / "moved"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "49152 -> 800 tokens" in printed and "bytes/token before" in printed
    moved = load_tokenizer(tmp_path / "moved")
    assert len(moved) == 800 and moved.chat_template == load_tokenizer(smollm2_tokenizer).chat_template
    assert load_lm(tmp_path / "moved").get_input_embeddings().weight.shape[0] == 800
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moved")]


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--vocab-size", "100"], "too small"),
    (["tokenizer", "train", "--vocab-size", "800", "--type", "unigram", "--supertokens"], "needs --type bpe"),
    (["tokenizer", "train", "--vocab-size", "800", "--like", "{wordpiece}"], "neither byte-level nor metaspace"),
    (["tokenizer", "extend", "{wordpiece}", "--add", "10"], "extend supports BPE and Unigram"),
    (["tokenizer", "prune", "{smollm2}", "--keep", "100"], "--keep 100 is too small"),
    (["tokenizer", "train", "--vocab-size", "800", "--text", "{missing}"], "no such file"),
    (["transplant", "{smollm2}", "{out}", "--train-tokenizer", "{text}"], "needs --vocab-size"),
    (["transplant", "{smollm2}", "{out}"], "SOURCE TARGET OUT"),
    (["transplant", "{smollm2}", "{smollm2}", "{out}", "--vocab-size", "900"], "only with --train-tokenizer"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, smollm2_tokenizer, argv, message):
    text = _texts(tmp_path, 3000)[0]
    values = {"wordpiece": str(make_wordpiece(tmp_path / "wp")), "smollm2": str(smollm2_tokenizer),
              "missing": str(tmp_path / "missing.txt"), "out": str(tmp_path / "out"), "text": str(text)}
    argv = [a.format(**values) for a in argv]
    if argv[0] == "tokenizer":
        argv += ["--out", str(tmp_path / "out")] + ([] if "--text" in argv else ["--text", str(text)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_is_refused_when_not_empty(tmp_path, capsys):
    text = _texts(tmp_path, 3000)[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert main(["tokenizer", "train", "--text", str(text), "--vocab-size", "400", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_backend_json_round_trip(trained):
    data = tokenizer_json(load_tokenizer(trained["bpe"]))
    assert json.loads(backend(data).to_str())["model"]["merges"] == data["model"]["merges"]


def test_pruned_real_smollm2_gives_identical_logits(tmp_path):
    """The real SmolLM2-135M, pruned to a corpus and transplanted: bit-identical logits on that corpus."""
    from tokenbridge.load.packaged import smollm2_gguf
    from tokenbridge.pipeline import resolve_source, transplant

    model = resolve_source(smollm2_gguf())  # the converted (cached) model directory
    text = tmp_path / "en.txt"
    text.write_text(corpus("en", 0, 12000), encoding="utf-8")
    report = prune(model, [text], tmp_path / "pruned", 4000)
    out, _ = transplant(model, tmp_path / "pruned", tmp_path / "small", progress=False)
    old_ids = torch.tensor(report.details["old_ids"])
    before = torch.tensor(load_tokenizer(model)(text.read_text())["input_ids"])
    after = torch.tensor(load_tokenizer(out)(text.read_text())["input_ids"])
    assert torch.equal(old_ids[after], before)
    original, small = load_lm(model), load_lm(out)
    assert small.get_input_embeddings().weight.shape == (4000, 576)
    for start in (0, len(before) - 256):
        with torch.no_grad():
            expected = original(before[None, start:start + 256]).logits[..., old_ids]
            got = small(after[None, start:start + 256]).logits
        assert torch.equal(got, expected)
