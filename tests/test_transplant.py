"""The transplant pipeline on tiny random models of several families."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import corpus, logits, read_tensors
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tokenbridge import transplant
from tokenbridge.align.token_bytes import vocabulary

FAMILIES = ["llama", "qwen2", "gemma3", "gpt2", "mistral", "bert"]
TEXT = "The Debian system uses apt to install packages. Überprüfen Sie die Konfiguration!"


@pytest.mark.parametrize("family", FAMILIES)
def test_self_transplant_is_bit_exact(models_dir, tmp_path, family):
    source = models_dir[family]
    out, report = transplant(source, source, tmp_path / "out", method="random", progress=False)
    assert report.counts["initialised"] == 0 and report.counts["unmatched_special"] == 0
    before, after = read_tensors(source), read_tensors(out)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    ids = AutoTokenizer.from_pretrained(str(source))(TEXT)["input_ids"]
    assert torch.equal(logits(source, ids), logits(out, ids))


def test_self_transplant_bf16_is_bit_exact(tok_dirs, tmp_path):
    from conftest import make_model

    source = make_model(tmp_path / "bf16", "qwen2", tok_dirs["byte_level"], dtype=torch.bfloat16)
    out, _ = transplant(source, source, tmp_path / "out", progress=False)
    before, after = read_tensors(source), read_tensors(out)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.bfloat16 for k in before)


def _permuted_tokenizer(source_dir, directory, seed=0):
    """The source tokenizer with every id permuted (specials included)."""
    spec = json.loads((source_dir / "tokenizer.json").read_text())
    size = len(spec["model"]["vocab"])
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    spec["model"]["vocab"] = {token: perm[index] for token, index in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = perm[added["id"]]
    spec["added_tokens"].sort(key=lambda a: a["id"])
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((source_dir / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return perm


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_permuted_vocabulary_gives_identical_logits(models_dir, tmp_path, family):
    source = models_dir[family]
    perm = _permuted_tokenizer(source, tmp_path / "perm")
    out, report = transplant(source, tmp_path / "perm", tmp_path / "out", method="random", progress=False)
    assert report.counts["initialised"] == 0
    source_ids = AutoTokenizer.from_pretrained(str(source))(TEXT)["input_ids"]
    target_ids = AutoTokenizer.from_pretrained(str(out))(TEXT)["input_ids"]
    assert target_ids == [perm[i] for i in source_ids]
    before, after = logits(source, source_ids), logits(out, target_ids)
    assert torch.equal(after[:, perm], before)


def test_same_seed_gives_byte_identical_files(models_dir, tok_dirs, tmp_path):
    source = models_dir["qwen2"]
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out, _ = transplant(source, tok_dirs["metaspace"], tmp_path / name, method="random", seed=seed,
                            progress=False)
        runs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert runs[0] == runs[1]
    assert runs[0]["model.safetensors"] != runs[2]["model.safetensors"]


def test_cross_family_rows(models_dir, tok_dirs, tmp_path):
    """byte-level source -> metaspace target: shared rows copied, new rows the mean of the source pieces."""
    source = models_dir["llama"]
    out, report = transplant(source, tok_dirs["metaspace_de"], tmp_path / "out", method="subword", progress=False)
    source_tok = AutoTokenizer.from_pretrained(str(source))
    target_tok = AutoTokenizer.from_pretrained(str(out))
    embed_in = read_tensors(source)["model.embed_tokens.weight"]
    embed_out = read_tensors(out)["model.embed_tokens.weight"]
    assert embed_out.shape[0] == len(target_tok)
    # Independent reference for a token's bytes: what each tokenizer decodes it to.
    source_by_text = {}
    for index in range(len(source_tok)):
        text = source_tok.decode([index])
        if "\ufffd" not in text and index not in source_tok.all_special_ids:
            source_by_text.setdefault(text, index)
    copied = dict(report.copied)
    checked = 0
    for index in range(len(target_tok)):
        if index in target_tok.all_special_ids:
            continue
        text = target_tok.convert_tokens_to_string([target_tok.convert_ids_to_tokens(index)])
        if "\ufffd" in text or text not in source_by_text:
            continue
        assert copied.get(index) == source_by_text[text], (index, text)
        assert torch.equal(embed_out[index], embed_in[source_by_text[text]])
        checked += 1
    assert checked > 100
    rows = {row["target_id"]: row for row in json.loads((out / "tokenbridge.json").read_text())["initialised"]["input"]}
    subword_rows = [r for r in rows.values() if r["how"] == "subword"]
    assert len(subword_rows) > 50
    for row in subword_rows:
        pieces = b"".join(source_tok.convert_tokens_to_string([source_tok.convert_ids_to_tokens(i)]).encode()
                          if "\ufffd" not in source_tok.decode([i]) else b"?" for i in row["source_ids"])
        token_text = target_tok.convert_tokens_to_string([target_tok.convert_ids_to_tokens(row["target_id"])])
        if b"?" not in pieces and "\ufffd" not in token_text:
            assert pieces == token_text.encode()
        expected = embed_in[row["source_ids"]].mean(dim=0)
        assert torch.allclose(embed_out[row["target_id"]], expected, atol=1e-6)
    from conftest import load_lm

    model = load_lm(out)
    ids = target_tok(TEXT, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_byte_fallback_duplicate_copies_the_produced_token(tok_dirs, models_dir, tmp_path):
    """Source SentencePiece has '+' and <0x2B>; a byte-level target's '+' copies '+', not the fallback row."""
    source = models_dir["gemma3"]
    source_vocab = vocabulary(AutoTokenizer.from_pretrained(str(source)))
    plus = [t for t in source_vocab.tokens if t.bytes == b"e"]
    assert {t.byte_fallback for t in plus} == {True, False}
    produced = next(t for t in plus if not t.byte_fallback)
    out, report = transplant(source, tok_dirs["byte_level"], tmp_path / "out", progress=False)
    target = AutoTokenizer.from_pretrained(str(out))
    assert dict(report.copied)[target.convert_tokens_to_ids("e")] == produced.id
    # ...and a byte-fallback target token keeps the byte-fallback row.
    out2, report2 = transplant(source, tok_dirs["metaspace_de"], tmp_path / "out2", progress=False)
    target2 = AutoTokenizer.from_pretrained(str(out2))
    fallback_e = next(t for t in plus if t.byte_fallback)
    assert dict(report2.copied)[target2.convert_tokens_to_ids("<0x65>")] == fallback_e.id
    assert dict(report2.copied)[target2.convert_tokens_to_ids("e")] == produced.id


def test_special_tokens_by_role_and_content(models_dir, tok_dirs, tmp_path):
    source = models_dir["llama"]  # <|endoftext|>, <|im_start|> (bos), <|im_end|> (eos, pad)
    out, report = transplant(source, tok_dirs["metaspace"], tmp_path / "out", progress=False)
    source_tok = AutoTokenizer.from_pretrained(str(source))
    target_tok = AutoTokenizer.from_pretrained(str(out))
    embed_in = read_tensors(source)["model.embed_tokens.weight"]
    embed_out = read_tensors(out)["model.embed_tokens.weight"]
    expected = {  # target special -> source token of the same role / chat role
        "<bos>": source_tok.bos_token, "<eos>": source_tok.eos_token, "<pad>": source_tok.pad_token,
        "<unk>": source_tok.unk_token, "<start_of_turn>": "<|im_start|>", "<end_of_turn>": "<|im_end|>",
    }
    matched = {s.token: s for s in report.specials}
    for target_token, source_token in expected.items():
        t, s = target_tok.convert_tokens_to_ids(target_token), source_tok.convert_tokens_to_ids(source_token)
        assert matched[target_token].source_id == s
        assert torch.equal(embed_out[t], embed_in[s]), target_token
    # <mask> has no counterpart: it is reported and gets the mean row, not another special's row.
    mask = target_tok.convert_tokens_to_ids("<mask>")
    assert report.counts["unmatched_special"] == 1
    assert torch.allclose(embed_out[mask], embed_in.mean(dim=0), atol=1e-6)
    # Every special of the target is present, with its role, and the chat template is the target's.
    assert target_tok.all_special_tokens == AutoTokenizer.from_pretrained(str(tok_dirs["metaspace"])).all_special_tokens
    assert "<start_of_turn>" in target_tok.chat_template
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == target_tok.bos_token_id
    assert config["eos_token_id"] == target_tok.eos_token_id
    assert config["pad_token_id"] == target_tok.pad_token_id
    assert config["vocab_size"] == len(target_tok)


def test_specials_never_collapse(models_dir, tmp_path):
    """Two target specials that share no content with the source stay distinct keys with their own rows."""
    source = models_dir["llama"]
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens(["<extra_a>", "<extra_b>"])
    from conftest import save_tokenizer, wrap

    target = save_tokenizer(wrap(tok, bos_token="<|im_start|>", eos_token="<|im_end|>"), tmp_path / "target")
    out, report = transplant(source, target, tmp_path / "out", progress=False)
    assert report.counts["unmatched_special"] == 2
    assert report.counts["copied_special"] == 3
    ids = {s.token: s.source_id for s in report.specials}
    assert len(set(ids.values())) == 3


def test_untied_output_rows_weight_the_first_piece(models_dir, tok_dirs, tmp_path):
    source = models_dir["qwen2"]
    out, report = transplant(source, tok_dirs["metaspace_de"], tmp_path / "out",
                             options={"output_first_piece_weight": "3"}, progress=False)
    assert not report.tied
    before, after = read_tensors(source), read_tensors(out)
    rows_in = {r.target_id: r for r in report.initialised["input"]}
    rows_out = {r.target_id: r for r in report.initialised["output"]}
    multi = [t for t, r in rows_out.items() if r.how == "subword" and len(r.source_ids) >= 2]
    assert multi
    for t in multi[:50]:
        ids = rows_out[t].source_ids
        weights = torch.tensor([3.0] + [1.0] * (len(ids) - 1))
        weights /= weights.sum()
        expected_out = (before["lm_head.weight"][ids] * weights[:, None]).sum(0)
        assert torch.allclose(after["lm_head.weight"][t], expected_out, atol=1e-6)
        assert torch.allclose(after["model.embed_tokens.weight"][t],
                              before["model.embed_tokens.weight"][rows_in[t].source_ids].mean(0), atol=1e-6)


def test_bert_masked_lm_through_the_pipeline(models_dir, tok_dirs, tmp_path):
    from transformers import AutoModelForMaskedLM

    source = models_dir["bert"]
    out, report = transplant(source, tok_dirs["wordpiece_de"], tmp_path / "out", progress=False)
    model = AutoModelForMaskedLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok)
    before, after = read_tensors(source), read_tensors(out)
    bias_name = next(n for n in ("cls.predictions.bias", "cls.predictions.decoder.bias") if n in after)
    assert after[bias_name].shape[0] == len(tok)
    for target_id, source_id in report.copied[:100]:
        assert after[bias_name][target_id] == before[bias_name][source_id]
    with torch.no_grad():
        result = model(**tok("ein [MASK] test", return_tensors="pt"))
    assert torch.isfinite(result.logits).all()


def test_mean_method_rows(models_dir, tok_dirs, tmp_path):
    source = models_dir["llama"]
    out, report = transplant(source, tok_dirs["metaspace_de"], tmp_path / "out", method="mean", progress=False)
    before, after = read_tensors(source), read_tensors(out)
    mean = before["model.embed_tokens.weight"].mean(0)
    new = [r.target_id for r in report.initialised["input"] if r.how == "mean"]
    assert new and all(torch.allclose(after["model.embed_tokens.weight"][t], mean, atol=1e-6) for t in new)


def test_random_method_statistics(models_dir, tok_dirs, tmp_path):
    """random rows follow the source rows' per-dimension mean and std (checked on many draws)."""
    from tokenbridge.init.random import random_rows

    source = torch.randn(500, 8) * torch.arange(1, 9) + torch.arange(8)
    rows = random_rows(source, 20000, torch.Generator().manual_seed(0))
    standard_error = source.std(0) / 20000 ** 0.5
    assert ((rows.mean(0) - source.mean(0)).abs() < 5 * standard_error).all()
    assert torch.allclose(rows.std(0), source.std(0), rtol=0.05)


def test_multi_shard_checkpoint(tok_dirs, tmp_path):
    """Sharded sources are written shard by shard with a matching index."""
    from conftest import make_model, load_lm
    from transformers import AutoModelForCausalLM

    single = make_model(tmp_path / "single", "qwen2", tok_dirs["byte_level"])
    model = AutoModelForCausalLM.from_pretrained(str(single))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="60KB")
    AutoTokenizer.from_pretrained(str(single)).save_pretrained(str(sharded))
    assert (sharded / "model.safetensors.index.json").is_file()
    out, _ = transplant(sharded, tok_dirs["metaspace"], tmp_path / "out", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert load_lm(out) is not None
    self_out, _ = transplant(sharded, sharded, tmp_path / "self", progress=False)
    before, after = read_tensors(sharded), read_tensors(self_out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_generation_config_eos_list_maps_by_role_and_chat_role(models_dir, tok_dirs, tmp_path):
    source = models_dir["llama"]
    copy = tmp_path / "source"
    import shutil

    shutil.copytree(source, copy)
    source_tok = AutoTokenizer.from_pretrained(str(copy))
    eos = [source_tok.convert_tokens_to_ids("<|im_end|>"), source_tok.convert_tokens_to_ids("<|endoftext|>")]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 1}))
    out, _ = transplant(copy, tok_dirs["metaspace"], tmp_path / "out", progress=False)
    target = AutoTokenizer.from_pretrained(str(out))
    generation = json.loads((out / "generation_config.json").read_text())
    # <eos> (the target's own), then <end_of_turn> (chat role of <|im_end|>); not <pad>, which shares a row.
    assert generation["eos_token_id"] == [target.eos_token_id, target.convert_tokens_to_ids("<end_of_turn>")]
    assert generation["bos_token_id"] == target.bos_token_id


def test_padded_vocabulary_is_kept(tok_dirs, tmp_path):
    """A source padded to a multiple of 64 rows keeps that habit; self-transplant stays bit-exact."""
    from conftest import make_model
    from transformers import AutoModelForCausalLM

    unpadded = make_model(tmp_path / "base", "llama", tok_dirs["byte_level"])
    model = AutoModelForCausalLM.from_pretrained(str(unpadded))
    size = len(AutoTokenizer.from_pretrained(str(unpadded)))
    padded_rows = -(-size // 64) * 64
    assert padded_rows > size
    model.resize_token_embeddings(padded_rows)
    padded = tmp_path / "padded"
    model.save_pretrained(str(padded))
    AutoTokenizer.from_pretrained(str(unpadded)).save_pretrained(str(padded))
    out, report = transplant(padded, padded, tmp_path / "self", progress=False)
    before, after = read_tensors(padded), read_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    out2, report2 = transplant(padded, tok_dirs["metaspace"], tmp_path / "cross", progress=False)
    rows = read_tensors(out2)["model.embed_tokens.weight"].shape[0]
    assert rows % 64 == 0 and rows >= report2.target_vocab_size
    assert report2.counts["padding"] == rows - report2.target_vocab_size
    assert json.loads((out2 / "config.json").read_text())["vocab_size"] == rows


def test_gemma_embed_scale_is_recorded(models_dir, tok_dirs, tmp_path):
    _, report = transplant(models_dir["gemma3"], tok_dirs["byte_level"], tmp_path / "out", progress=False)
    assert report.embed_scale == pytest.approx(48 ** 0.5)
    _, report = transplant(models_dir["llama"], tok_dirs["metaspace"], tmp_path / "out2", progress=False)
    assert report.embed_scale == 1.0


def test_unigram_with_byte_fallback(tmp_path):
    """SentencePiece Unigram (T5 / XLM-R style) with <0xNN> byte fallback: bytes, encoder and self-transplant."""
    from conftest import lines, make_model, save_tokenizer, wrap
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    trainer_tok.train_from_iterator(lines(corpus("en")), trainer)
    pieces = [(p, s) for p, s in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    fallback = [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab = pieces[:3] + fallback + pieces[3:]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    directory = save_tokenizer(wrap(tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"), tmp_path / "uni")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    vocab_view = vocabulary(tokenizer)
    assert vocab_view.family == "metaspace" and vocab_view.byte_fallback
    assert sum(t.byte_fallback for t in vocab_view.tokens) == 256
    from tokenbridge.align.encode import ByteEncoder

    encoder = ByteEncoder(vocab_view)
    for text in ["The Debian system", "日本語 café"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(vocab_view.tokens[i].bytes for i in ids) == text.encode()
        assert encoder.encode(text.encode()) == ids
    model = make_model(tmp_path / "model", "mistral", directory)
    out, report = transplant(model, model, tmp_path / "out", progress=False)
    assert report.counts["initialised"] == 0
    before, after = read_tensors(model), read_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_transplanted_qwen2_loads_the_target_tokenizer_as_written(models_dir, tok_dirs, tmp_path):
    """transformers 5 rebuilds a ``qwen2`` model's tokenizer from Qwen2's own pipeline (NFC + its regex),
    ignoring tokenizer.json; a transplanted Qwen2 carries another tokenizer, which tokenbridge loads as written."""
    from tokenbridge.load.tokenizer import load_tokenizer

    out, _ = transplant(models_dir["qwen2"], tok_dirs["metaspace"], tmp_path / "out", method="subword",
                        progress=False)
    text = corpus("en", 2000, 600) + " café ﬁ Ａ"
    expected = Tokenizer.from_file(str(tok_dirs["metaspace"] / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    assert load_tokenizer(out)(text, add_special_tokens=False)["input_ids"] == expected
