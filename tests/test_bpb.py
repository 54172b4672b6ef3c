"""Bits per byte: windows, prefix rule, and agreement with a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenbridge.errors import TokenbridgeError
from tokenbridge.measure.bpb import Scorer, byte_windows, cut_text, evaluate


@given(st.text(max_size=300), st.integers(min_value=4, max_value=64))
@settings(max_examples=200, deadline=None)
def test_windows_cover_the_text_on_character_boundaries(text, size):
    data = text.encode("utf-8")
    windows = byte_windows(data, size)
    assert b"".join(data[a:b] for a, b in windows) == data
    for a, b in windows:
        assert 0 < b - a <= size
        data[a:b].decode("utf-8")  # every window is whole characters


def test_cut_text_keeps_whole_characters():
    data = "aé日本".encode("utf-8")
    assert cut_text(data, 4) == "aé".encode("utf-8")
    assert cut_text(data, 100) == data


def write_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_bits_per_byte_equals_a_hand_computation(models_dir, tmp_path):
    """One window per file: BPB is the summed -log2 p of the tokens after BOS over the file's bytes."""
    directory = models_dir["llama"]
    text = corpus("en", 3000, 700)
    path = write_text(tmp_path, "a.txt", text)
    result = evaluate(directory, [path], window=4096, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    bits = -sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)) / math.log(2)
    score = result.files[0]
    assert score.tokens == len(ids) - 1 and score.bytes == len(text.encode("utf-8"))
    assert score.bits == pytest.approx(bits, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(bits / len(text.encode("utf-8")), rel=1e-5)
    assert "<|im_start|>" in result.prefix


def test_batched_windows_match_one_at_a_time(models_dir):
    """Padding and batching do not change a window's score."""
    directory = models_dir["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    scorer = Scorer(model, tokenizer)
    texts = [corpus("en", 100 * i, 50 + 40 * i) for i in range(6)]
    sequences = scorer.encode(texts)
    batched = scorer.nll(sequences)
    scorer.logits_budget = 1  # one window per forward pass
    single = scorer.nll(sequences)
    assert batched == pytest.approx(single, rel=1e-5)


def test_two_tokenizers_score_exactly_the_same_bytes(models_dir, tmp_path):
    """Models with different vocabularies are scored over the same byte windows."""
    text = corpus("de", 0, 5000)
    path = write_text(tmp_path, "de.txt", text)
    byte_level = evaluate(models_dir["llama"], [path], window=512, progress=False)
    metaspace = evaluate(models_dir["gemma3"], [path], window=512, progress=False)
    a, b = byte_level.files[0], metaspace.files[0]
    assert a.bytes == b.bytes == len(text.encode("utf-8")) and a.windows == b.windows
    assert a.tokens != b.tokens
    for directory in (models_dir["llama"], models_dir["gemma3"]):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        scorer = Scorer(AutoModelForCausalLM.from_pretrained(str(directory)), tokenizer)
        data = text.encode("utf-8")
        windows = [data[s:e].decode("utf-8") for s, e in byte_windows(data, 512)]
        decoded = [tokenizer.decode(ids[1:]) for ids in scorer.encode(windows)]
        assert "".join(decoded) == text


def test_prefix_falls_back_to_eos(models_dir, tmp_path):
    from tokenbridge.measure.bpb import prefix_token

    tokenizer = AutoTokenizer.from_pretrained(str(models_dir["gpt2"]))
    tokenizer.bos_token = None
    index, description = prefix_token(tokenizer)
    assert index == tokenizer.eos_token_id and "eos" in description
    tokenizer.eos_token = None
    with pytest.raises(TokenbridgeError, match="no BOS or EOS"):
        prefix_token(tokenizer)


def test_window_longer_than_the_context_is_a_clear_error(models_dir, tmp_path):
    path = write_text(tmp_path, "long.txt", corpus("en", 0, 4000))
    with pytest.raises(TokenbridgeError, match="more than the model's context"):
        evaluate(models_dir["llama"], [path], window=4000, progress=False)


def test_bad_text_files(models_dir, tmp_path, capsys):
    from tokenbridge.cli import main

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main(["eval", str(models_dir["llama"]), "--text", str(tmp_path / "latin1.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["eval", str(models_dir["llama"]), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_cli_json(models_dir, tmp_path, capsys):
    import json

    from tokenbridge.cli import main

    path = write_text(tmp_path, "en.txt", corpus("en", 0, 3000))
    assert main(["eval", str(models_dir["llama"]), "--text", str(path), "--bytes", "1000", "--window", "300",
                 "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["files"][0]["bytes"] <= 1000 and data["files"][0]["windows"] >= 4
    assert data["bits_per_byte"] > 0


def full_logits_nll(model, sequence: list[int]) -> float:
    """The plain way: the model's whole logits for one window, log_softmax in float64, the targets gathered."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].double(), dim=-1)
    return -float(logprobs[torch.arange(len(sequence) - 1), torch.tensor(sequence[1:])].sum())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3", "gpt2"])
def test_chunked_head_equals_full_logits(models_dir, family):
    """The body-then-head-in-chunks path equals a full-logits log_softmax, for windows of unequal length
    (some needing several chunks, two of equal length sharing a batch), and so does the model's own forward."""
    from tokenbridge.measure.bpb import split_head

    directory = models_dir[family]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # the soft-capped head is applied chunk by chunk too
    texts = [corpus("en", 100 * i, 30 + 70 * i) for i in range(5)] + [corpus("de", 0, 5), corpus("en", 200, 240)]
    scorer = Scorer(model, tokenizer, logits_budget=7 * len(tokenizer))  # 7 rows of logits at a time
    assert scorer.split is not None
    sequences = scorer.encode(texts)
    sequences.append(list(sequences[2]))  # equal lengths: one forward pass for both
    assert max(len(s) for s in sequences) > 3 * 7
    expected = [full_logits_nll(model, s) for s in sequences]
    assert scorer.nll(sequences) == pytest.approx(expected, rel=1e-5)
    scorer.batch_tokens = 1  # every window alone
    assert scorer.nll(sequences) == pytest.approx(expected, rel=1e-5)
    assert (scorer.lean is not None) == (family in ("llama", "qwen2", "mistral"))
    scorer.lean = None  # transformers' body, then the head in chunks
    assert scorer.nll(sequences) == pytest.approx(expected, rel=1e-5)
    scorer.split = None  # the model's own forward, its logits taken 7 rows at a time
    assert scorer.nll(sequences) == pytest.approx(expected, rel=1e-5)
    body, head, softcap = split_head(model)
    assert head is model.get_output_embeddings() and (softcap == 3.0) == (family == "gemma3")


def test_wrapped_or_unknown_models_use_their_own_forward(models_dir):
    from tokenbridge.measure.bpb import split_head

    model = AutoModelForCausalLM.from_pretrained(str(models_dir["llama"]))
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not a plain head any more
    assert split_head(model) is None
    model = AutoModelForCausalLM.from_pretrained(str(models_dir["llama"]))
    model.config.model_type = "granite"  # a head that scales its logits: not split
    assert split_head(model) is None


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_body_equals_transformers(models_dir, family):
    """The lean Llama-family body gives transformers' hidden states, batched or not, biases included."""
    from tokenbridge.measure.lean import lean_body

    model = AutoModelForCausalLM.from_pretrained(str(models_dir[family])).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    lean = lean_body(model)
    assert lean is not None
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.inference_mode():
        expected = model.model(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.allclose(lean(ids), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lean(ids[1:2, :17]), expected[1:2, :17], rtol=1e-5, atol=1e-5)


def test_lean_body_refuses_what_it_does_not_reproduce(models_dir):
    from tokenbridge.measure.lean import lean_body

    model = AutoModelForCausalLM.from_pretrained(str(models_dir["llama"]))
    model.config.hidden_act = "gelu"
    assert lean_body(model) is None
    model = AutoModelForCausalLM.from_pretrained(str(models_dir["mistral"]))
    model.config.sliding_window = 16
    assert lean_body(model) is None
    model = AutoModelForCausalLM.from_pretrained(str(models_dir["llama"]))
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)
    assert lean_body(model) is None
    for family in ("gemma3", "gpt2"):
        assert lean_body(AutoModelForCausalLM.from_pretrained(str(models_dir[family]))) is None
