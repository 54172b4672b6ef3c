"""`tokenbridge explain` and the `auto` method."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import corpus
from transformers import AutoTokenizer

from tokenbridge.align.encode import ByteEncoder
from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.adapt.select import split_text
from tokenbridge.cli import main
from tokenbridge.explain import explain
from tokenbridge.measure.bpb import evaluate
from tokenbridge.api import transplant


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_new_copied_and_text(models_dir, tok_dirs, tmp_path, capsys):
    out, report = transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "out", progress=False)
    source_tok = AutoTokenizer.from_pretrained(str(models_dir["llama"]))
    target_tok = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level_de"]))
    encoder = ByteEncoder(vocabulary(source_tok))
    target_vocab = vocabulary(target_tok)
    new_id = report.initialised["input"][0].target_id
    token = target_tok.convert_ids_to_tokens(new_id)

    [entry] = explain(out, token)
    row = entry["rows"]["all"]
    assert row["how"] == "subword"
    pieces = encoder.encode(target_vocab.tokens[new_id].bytes)
    assert sorted(s["source_id"] for s in row["sources"]) == sorted(pieces)
    assert [s["source_token"] for s in row["sources"]] == source_tok.convert_ids_to_tokens(
        [s["source_id"] for s in row["sources"]])
    assert abs(sum(s["weight"] for s in row["sources"]) - 1) < 1e-5

    target_id, source_id = report.copied[0]
    [copied] = explain(out, str(target_id), by_id=True)
    assert copied["rows"]["all"]["sources"][0]["source_id"] == source_id
    assert copied["rows"]["all"]["how"].startswith("copied")

    text = "Paketverwaltung"
    entries = explain(out, text)
    assert [e["target_id"] for e in entries] == target_tok(text, add_special_tokens=False)["input_ids"]

    code, printed, _ = run(capsys, "explain", out, token)
    assert code == 0 and f"target {new_id}" in printed and "subword" in printed
    code, printed, _ = run(capsys, "explain", out, str(new_id), "--id", "--json")
    assert code == 0 and json.loads(printed)[0]["target_id"] == new_id


def test_explain_errors(models_dir, tmp_path, capsys):
    code, _, err = run(capsys, "explain", tmp_path, "x")
    assert code == 2 and "tokenbridge.json" in err
    out, _ = transplant(models_dir["llama"], models_dir["llama"], tmp_path / "self", progress=False)
    code, _, err = run(capsys, "explain", out, "999999", "--id")
    assert code == 2 and "outside the target vocabulary" in err


def test_split_text_holds_out_the_end_on_a_character_boundary(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("é" * 3000, encoding="utf-8")  # 6000 bytes of two-byte characters
    train, held = split_text([path], 1001)
    assert train + held == path.read_bytes()
    assert len(held) in (1000, 1001) and held.decode("utf-8") and train.decode("utf-8")


def test_auto_keeps_the_best_candidate(models_dir, tok_dirs, tmp_path):
    text = tmp_path / "de.txt"
    text.write_text(corpus("de", 30000, 6000), encoding="utf-8")
    out, report = transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "auto", method="auto",
                             options={"text": str(text), "holdout_bytes": "2048",
                                      "candidates": "mean,random,subword", "window": "512"}, progress=False)
    selection = report.selection
    assert set(selection["scores"]) == {"mean", "random", "subword"}
    # Independent check: transplant each candidate on its own and score the same held-out bytes.
    _, held = split_text([text], 2048)
    held_file = tmp_path / "held.txt"
    held_file.write_bytes(held)
    scores = {}
    for method in ("mean", "random", "subword"):
        model, _ = transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / method, method=method,
                              progress=False)
        scores[method] = evaluate(model, [held_file], window=512, progress=False).bits_per_byte
        assert abs(scores[method] - selection["scores"][method]["bits_per_byte"]) < 1e-5
    assert selection["chosen"] == min(scores, key=scores.get) == report.method
    record = json.loads((out / "tokenbridge.json").read_text())
    assert record["selection"]["chosen"] == report.method
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".auto-") or ".tokenbridge-" in p.name]


def test_auto_errors(models_dir, tok_dirs, tmp_path, capsys):
    target = tok_dirs["byte_level_de"]
    code, _, err = run(capsys, "transplant", models_dir["llama"], target, tmp_path / "o", "--method", "auto")
    assert code == 2 and "-o text=" in err
    small = tmp_path / "small.txt"
    small.write_text("zu kurz")
    code, _, err = run(capsys, "transplant", models_dir["llama"], target, tmp_path / "o", "--method", "auto",
                       "-o", f"text={small}")
    assert code == 2 and "too little" in err
    text = tmp_path / "t.txt"
    text.write_text(corpus("de", 30000, 5000), encoding="utf-8")
    code, _, err = run(capsys, "transplant", models_dir["llama"], target, tmp_path / "o", "--method", "auto",
                       "-o", f"text={text}", "-o", "nonsense=1")
    assert code == 2 and "no method takes it" in err
    code, _, err = run(capsys, "transplant", models_dir["bert"], tok_dirs["wordpiece_de"], tmp_path / "o",
                       "--method", "auto", "-o", f"text={text}")
    assert code == 2 and "causal LM" in err
    assert not Path(tmp_path / "o").exists()


def test_vectors_command(tmp_path, capsys):
    from collections import Counter

    from tokenbridge.init.static_vectors import read_vectors, split_words

    text = tmp_path / "de.txt"
    text.write_text(corpus("de", 0, 20000), encoding="utf-8")
    out = tmp_path / "de.vec"
    code, printed, _ = run(capsys, "vectors", "--text", text, "--out", out, "--dim", "16", "--epochs", "1",
                           "--min-count", "3", "--quiet", "--buckets", "1000")
    assert code == 0, printed
    vectors = read_vectors(out)
    counts = Counter(w for line in split_words(text.read_text(encoding="utf-8")) for w in line)
    assert sorted(vectors.words) == sorted(w for w, c in counts.items() if c >= 3)
    assert vectors.vectors.shape == (len(vectors.words), 16)
    code, _, err = run(capsys, "vectors", "--text", text, "--out", out)
    assert code == 2 and "--force" in err
    gz = tmp_path / "de.vec.gz"
    assert run(capsys, "vectors", "--text", text, "--out", gz, "--dim", "4", "--epochs", "1", "--quiet",
               "--buckets", "1000")[0] == 0
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and read_vectors(gz).vectors.shape[1] == 4
    model = tmp_path / "de.bin"  # a fastText model: counts and character n-grams
    assert run(capsys, "vectors", "--text", text, "--out", model, "--dim", "4", "--epochs", "1", "--quiet",
               "--min-count", "3", "--buckets", "1000", "--cbow")[0] == 0
    binary = read_vectors(model)
    assert sorted(binary.words) == sorted(vectors.words) and binary.counts == [counts[w] for w in binary.words]
    assert binary.lookup(["Konfigurationsdateienx"])[2].all()  # an unseen word: its n-gram vector
    code, _, err = run(capsys, "vectors", "--text", text, "--out", tmp_path / "x.vec", "--min-n", "5", "--max-n",
                       "3", "--quiet")
    assert code == 2 and "n-grams" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["de.bin", "de.txt", "de.vec", "de.vec.gz"]
