"""The hypernetwork (ZeTT): sampled tokenizers, the residual form, the loss, training, resume, the method."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import corpus, read_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbridge import transplant
from tokenbridge.cli import main
from tokenbridge.explain import explain
from tokenbridge.heal.data import Corpus
from tokenbridge.hypernet import HypernetConfig, train_hypernet
from tokenbridge.hypernet.model import Hypernetwork, load_hypernet, save_hypernet
from tokenbridge.hypernet.sample import pretokens, sample_tokenizer
from tokenbridge.hypernet.train import FrozenModel, HypernetTask
from tokenbridge.load.model import load_causal_lm

TEXTS = [corpus("en", 30000, 6000).encode(), corpus("de", 30000, 6000).encode(), corpus("ja", 30000, 3000).encode()]
SMALL = dict(steps=4, batch_size=2, window=256, vocab_size=1024, tokenizer_texts=6, negatives=64, lr=1e-3)


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sampled():
    return sample_tokenizer(TEXTS, 2000, seed=[0, 1])


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hn-text") / "text.txt"
    path.write_text(corpus("en", 30000, 12000) + corpus("de", 30000, 12000), encoding="utf-8")
    return path


# -- sampled tokenizers -----------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_sampled_tokenizers_spell_every_text(sampled, value):
    data = value.encode("utf-8")
    assert sampled.decode(sampled.encode(data)) == data
    assert b"".join(pretokens(data)) == data


def test_sampled_tokenizers_spell_invalid_utf8(sampled):
    data = b"\xff\xfe abc \xe3\x81"
    assert sampled.decode(sampled.encode(data)) == data


def test_sampled_tokenizers_are_deterministic_and_of_the_size_asked(sampled):
    again = sample_tokenizer(TEXTS, 2000, seed=[0, 1])
    assert again.pieces == sampled.pieces and again.scores == sampled.scores
    assert len(sampled) == 2000 and len(set(sampled.pieces)) == 2000
    assert sampled.pieces[:256] == [bytes([b]) for b in range(256)]
    other = sample_tokenizer(TEXTS, 2000, seed=[0, 2], noise_mean=1.0)
    assert other.pieces != sampled.pieces and len(other) == 2000
    assert len(sample_tokenizer(TEXTS, 700, seed=3)) == 700
    data = TEXTS[0][:2000]
    assert len(sampled.encode(data)) < len(data) / 2  # it compresses the text it was drawn from


def test_sampled_tokenizer_errors():
    from tokenbridge.errors import TokenbridgeError

    with pytest.raises(TokenbridgeError, match="too few"):
        sample_tokenizer([b"ab ab"], 1000, seed=0)
    with pytest.raises(TokenbridgeError, match="more than 256"):
        sample_tokenizer(TEXTS, 256, seed=0)


# -- the residual form and the method ---------------------------------------------------------------

def untrained(model_dir: Path, out: Path) -> Path:
    """A freshly initialised hypernetwork for ``model_dir`` (its correction is exactly zero)."""
    frozen = FrozenModel(*load_causal_lm(model_dir), "cpu")
    torch.manual_seed(0)
    out.mkdir(parents=True)
    save_hypernet(out, Hypernetwork(frozen.spec(HypernetConfig(layers=2))), {})
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied
def test_untrained_hypernetwork_is_subword_bit_for_bit(models_dir, tok_dirs, tmp_path, family):
    hn = untrained(models_dir[family], tmp_path / "hn")
    sub, _ = transplant(models_dir[family], tok_dirs["byte_level_de"], tmp_path / "subword", method="subword",
                        progress=False)
    hyp, report = transplant(models_dir[family], tok_dirs["byte_level_de"], tmp_path / "hypernet",
                             method="hypernet", options={"hypernet": str(hn)}, progress=False)
    assert report.counts["initialised"] > 50
    a, b = read_tensors(sub), read_tensors(hyp)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_self_transplant_with_a_hypernetwork_is_bit_exact(models_dir, tmp_path):
    hn = untrained(models_dir["llama"], tmp_path / "hn")
    with torch.no_grad():  # a non-zero correction, so that exactness is not the residual form's doing
        network, _ = load_hypernet(hn)
        for param in network.parameters():
            param.normal_()
        save_hypernet(hn, network, {})
    out, report = transplant(models_dir["llama"], models_dir["llama"], tmp_path / "self", method="hypernet",
                             options={"hypernet": str(hn)}, progress=False)
    assert report.counts["initialised"] == 0
    a, b = read_tensors(models_dir["llama"]), read_tensors(out)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_hypernetwork_of_another_model_is_a_one_line_error(models_dir, tok_dirs, tmp_path, capsys):
    hn = untrained(models_dir["llama"], tmp_path / "hn")
    capsys.readouterr()
    code, _, err = run(capsys, "transplant", models_dir["qwen2"], tok_dirs["byte_level_de"], tmp_path / "out",
                       "--method", "hypernet", "-o", f"hypernet={hn}")
    assert code == 2 and "trained for another model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "transplant", models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "out",
                       "--method", "hypernet", "-o", f"hypernet={tmp_path}")
    assert code == 2 and "not a hypernetwork directory" in err
    (hn / "hypernet.safetensors").write_bytes(b"junk")
    code, _, err = run(capsys, "transplant", models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "out",
                       "--method", "hypernet", "-o", f"hypernet={hn}")
    assert code == 2 and "hypernet.safetensors" in err


# -- the loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_loss_is_a_plain_forward_pass_with_the_predicted_rows(models_dir, text, family):
    """The training loss equals the model's own forward pass with the predicted matrices substituted in
    (the subset's rows plus the prefix row), and only the hypernetwork gets gradients."""
    model_dir = models_dir[family]
    config = HypernetConfig(**{**SMALL, "aux_weight": 0.0, "vocab_size": 800}).resolved()
    model, tokenizer = load_causal_lm(model_dir)
    frozen = FrozenModel(model, tokenizer, "cpu")
    torch.manual_seed(0)
    network = Hypernetwork(frozen.spec(HypernetConfig(layers=2)))
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.05)
    task = HypernetTask(Corpus([text], config.window), config, frozen)
    own, counts = task.batches(0, 1, 0)
    [batch] = own
    loss, value = task.loss(network, batch, counts)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(p.grad is None for p in frozen.model.parameters())

    with torch.no_grad():
        rows_in, rows_out, _ = task.predict(network, batch)
        plain, _ = load_causal_lm(model_dir)
        n = len(batch["subset"])
        width = plain.get_input_embeddings().weight.shape[0]
        table_in = torch.zeros((width, rows_in.shape[1]))
        table_in[:n] = rows_in
        table_in[n] = frozen.prefix_row
        plain.get_input_embeddings().weight.copy_(table_in)
        if not frozen.tied:
            table_out = torch.zeros_like(table_in)
            table_out[:n] = rows_out
            plain.get_output_embeddings().weight.copy_(table_out)
        ids, mask = batch["ids"], batch["mask"]
        logits = plain(input_ids=ids, attention_mask=mask).logits[:, :-1, :n]
        scored = batch["loss_mask"][:, 1:]
        expected = F.cross_entropy(logits[scored], ids[:, 1:][scored], reduction="sum") / counts["tokens"]
    assert abs(value - float(expected)) < 1e-4 * max(1.0, abs(float(expected)))


def test_auxiliary_loss_pulls_shared_tokens_to_their_source_rows(models_dir, text):
    config = HypernetConfig(**SMALL).resolved()
    model, tokenizer = load_causal_lm(models_dir["llama"])
    frozen = FrozenModel(model, tokenizer, "cpu")
    network = Hypernetwork(frozen.spec(HypernetConfig(layers=1)))
    task = HypernetTask(Corpus([text], config.window), config, frozen)
    [batch], counts = task.batches(0, 1, 0)
    assert batch["overlap"].any() and not batch["overlap"].all()
    _, without = task.loss(network, batch, counts)  # zero correction: no auxiliary loss
    with torch.no_grad():
        network.out.bias.fill_(0.5)
    config_no_aux = HypernetConfig(**{**SMALL, "aux_weight": 0.0}).resolved()
    plain = HypernetTask(task.corpus, config_no_aux, frozen)
    _, lm_only = plain.loss(network, batch, counts)
    _, both = task.loss(network, batch, counts)
    assert both > lm_only and without != both


# -- training, resume, the command line --------------------------------------------------------------

def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_resume_is_bit_identical_and_the_same_seed_gives_the_same_files(models_dir, text, tmp_path):
    config = HypernetConfig(**{**SMALL, "steps": 5, "grad_accum": 2})
    whole, report = train_hypernet(models_dir["llama"], [text], tmp_path / "whole", config, progress=False)
    assert report.steps_done == 5 and report.tokens > 0 and len(report.losses) == 5
    again, _ = train_hypernet(models_dir["llama"], [text], tmp_path / "again", config, progress=False)
    assert digests(whole) == digests(again)
    stopped, report = train_hypernet(models_dir["llama"], [text], tmp_path / "resumed", config, progress=False,
                                     checkpoint_every=2, stop_after=3)
    assert report.steps_done == 3 and not (tmp_path / "resumed").exists()
    resumed, report = train_hypernet(models_dir["llama"], [text], tmp_path / "resumed", config, progress=False,
                                     resume=True, checkpoint_every=2)
    assert report.resumed_from == 2 and report.steps_done == 5
    a, b = read_tensors(whole), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(float(t.abs().sum()) > 0 for n, t in a.items() if n.startswith("out."))  # it trained
    record = json.loads((whole / "hypernet.json").read_text())
    assert record["report"]["losses"] == json.loads((resumed / "hypernet.json").read_text())["report"]["losses"]
    assert record["spec"]["base"] == str(models_dir["llama"]) and len(record["spec"]["vocab_sha256"]) == 64


def test_resume_refuses_other_settings_and_a_heal_checkpoint(models_dir, text, tmp_path):
    from tokenbridge.errors import TokenbridgeError

    config = HypernetConfig(**SMALL)
    train_hypernet(models_dir["llama"], [text], tmp_path / "hn", config, progress=False, checkpoint_every=2,
                   stop_after=2)
    with pytest.raises(TokenbridgeError, match="other settings"):
        train_hypernet(models_dir["llama"], [text], tmp_path / "hn", HypernetConfig(**{**SMALL, "lr": 2e-3}),
                       progress=False, resume=True)
    with pytest.raises(TokenbridgeError, match="earlier run"):
        train_hypernet(models_dir["llama"], [text], tmp_path / "hn", config, progress=False)
    from tokenbridge.heal import HealConfig, heal

    heal(models_dir["llama"], [text], tmp_path / "healed", HealConfig(steps=2, batch_size=2, window=200),
         progress=False, checkpoint_every=1, stop_after=1)
    (tmp_path / "hn2.checkpoints").symlink_to(tmp_path / "healed.checkpoints")
    with pytest.raises(TokenbridgeError, match="not a tokenbridge hypernet checkpoint"):
        train_hypernet(models_dir["llama"], [text], tmp_path / "hn2", config, progress=False, resume=True)


def test_cli_trains_transplants_and_explains(models_dir, tok_dirs, text, tmp_path, capsys):
    hn = tmp_path / "hn"
    code, out, _ = run(capsys, "hypernet", "train", models_dir["llama"], "--text", text, "--out", hn, "--steps", 3,
                       "--batch-size", 2, "--window", 256, "--vocab-size", 1024, "--tokenizer-texts", 6,
                       "--negatives", 64, "--layers", 1, "--json", "--quiet")
    assert code == 0
    report = json.loads(out)
    assert report["steps_done"] == 3 and report["tokens"] > 0 and report["out"] == str(hn)
    code, _, err = run(capsys, "hypernet", "train", models_dir["llama"], "--text", text, "--out", hn, "--quiet")
    assert code == 2 and "--force" in err
    code, _, err = run(capsys, "hypernet", "train", models_dir["llama"], "--text", text, "--out", tmp_path / "x",
                       "--vocab-size", 100)
    assert code == 2 and "--vocab-size" in err
    target = tmp_path / "target"
    code, _, _ = run(capsys, "transplant", models_dir["llama"], tok_dirs["byte_level_de"], target, "--method",
                     "hypernet", "-o", f"hypernet={hn}", "--quiet")
    assert code == 0
    record = json.loads((target / "tokenbridge.json").read_text())
    new = [r for r in record["initialised"]["input"] if r["how"].startswith("hypernet:")]
    assert len(new) == record["counts"]["initialised"] - record["counts"]["fallback"] > 0
    [entry] = explain(target, str(new[0]["target_id"]), by_id=True)
    assert entry["rows"]["all"]["how"].startswith("hypernet:") and entry["rows"]["all"]["sources"]


def test_accelerate_two_processes_match_one(models_dir, text, tmp_path):
    """DDP on two CPU processes (Accelerate over gloo): the weights of one process with the same global batch."""
    common = [str(models_dir["llama"]), "--text", str(text), "--steps", "2", "--window", "256", "--quiet",
              "--vocab-size", "1024", "--tokenizer-texts", "6", "--negatives", "64", "--layers", "1",
              "--checkpoint-every", "0"]
    single = tmp_path / "single"
    assert main(["hypernet", "train", *common, "--out", str(single), "--batch-size", "2"]) == 0
    double = tmp_path / "double"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                "-m", "tokenbridge", "hypernet", "train"]
    done = subprocess.run(launcher + common + ["--out", str(double), "--batch-size", "1"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((double / "hypernet.json").read_text())["report"]
    one = json.loads((single / "hypernet.json").read_text())["report"]
    assert two["processes"] == 2 and one["processes"] == 1 and two["tokens"] == one["tokens"]
    assert [v for _, v in two["losses"]] == pytest.approx([v for _, v in one["losses"]], rel=1e-5)
    a, b = read_tensors(single), read_tensors(double)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name


def test_repetitive_text_draws_more_text_for_the_tokenizer(models_dir, tmp_path):
    """A step whose windows hold too few distinct pieces for the vocabulary draws more windows (a run
    died on repetitive code before this); the tokenizer still has the size asked for."""
    varied = tmp_path / "varied.txt"
    varied.write_text(corpus("en", 30000, 20000), encoding="utf-8")
    dull = tmp_path / "dull.txt"
    dull.write_text("ab ab ab\n" * 3000, encoding="utf-8")
    config = HypernetConfig(**{**SMALL, "vocab_size": 3000, "tokenizer_texts": 1}).resolved()
    model, tokenizer = load_causal_lm(models_dir["llama"])
    task = HypernetTask(Corpus([dull, varied], config.window), config, FrozenModel(model, tokenizer, "cpu"))
    for step in range(4):
        texts = [task.corpus.text(task.corpus.example(config.seed, step * 2 + i))[0] for i in range(2)]
        assert len(task.step_tokenizer(step, texts)) == 3000
    lonely = HypernetTask(Corpus([dull], config.window), config, task.frozen)
    from tokenbridge.errors import TokenbridgeError

    with pytest.raises(TokenbridgeError, match="too few for a vocabulary of 3000"):
        lonely.step_tokenizer(0, [b"ab ab"])
