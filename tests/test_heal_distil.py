"""Distilling a different model: a student that was never transplanted (no tokenbridge.json), with its own
architecture, width, depth and vocabulary, learns from a teacher through every distillation mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import corpus, read_tensors, tiny_config

from tokenbridge.cli import main
from tokenbridge.heal import HealConfig, heal


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def models(models_dir, tok_dirs, tmp_path_factory):
    """Student: the tiny Llama (byte-level BPE, tied, 2 layers of 48). Teacher: a Gemma-3 of 3 layers of 64
    on the metaspace tokenizer (untied, its own vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("distil")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["metaspace"]))
    config = tiny_config("gemma3", len(tokenizer), tokenizer)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 3
    config.layer_types = config.layer_types[:2] + ["full_attention"]
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    teacher = root / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(teacher))
    tokenizer.save_pretrained(str(teacher))
    text = root / "train.txt"
    text.write_text(corpus("de", 30000, 6000), encoding="utf-8")
    student = models_dir["llama"]
    assert not (student / "tokenbridge.json").exists()
    return {"student": student, "teacher": teacher, "text": text}


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("mode,train", [("alm", "all"), ("alm+sft", "lora"), ("uld", "embeddings"),
                                        ("mined", "lora"), ("dskd", "all")])
def test_a_student_that_was_never_transplanted_distils_from_another_model(models, tmp_path, mode, train):
    out, report = heal(models["student"], [models["text"]], tmp_path / "out",
                       HealConfig(mode=mode, train=train, steps=2, batch_size=2, window=200, lr=1e-2),
                       teacher=models["teacher"], progress=False)
    before, after = read_tensors(models["student"]), read_tensors(out)
    assert before.keys() == after.keys()
    changed = _changed(before, after)
    embeddings = {"model.embed_tokens.weight"}  # tied: the output matrix is the same tensor
    if train == "embeddings":
        assert changed == embeddings
    elif train == "lora":  # merged adapters on every linear layer, and the embeddings; norms untouched
        assert embeddings <= changed and any(n.endswith("q_proj.weight") for n in changed)
        assert not any("norm" in n for n in changed)
    else:
        assert changed == set(before)
    assert not (out / "tokenbridge.json").exists()  # no provenance invented for a model that had none
    saved = json.loads((out / "tokenbridge-heal.json").read_text())
    assert saved["teacher"] == str(models["teacher"]) and saved["steps_done"] == 2
    assert report.teacher_tokens > 0 and report.student_tokens > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "llama" and model.config.hidden_size == 48
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(
        str(models["student"])).get_vocab()


def test_distillation_lowers_the_alm_loss(models, tmp_path):
    _, report = heal(models["student"], [models["text"]], tmp_path / "out",
                     HealConfig(mode="alm", train="all", steps=24, batch_size=2, window=200, lr=3e-3, warmup=1),
                     teacher=models["teacher"], progress=False)
    losses = [value for _, value in report.losses]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.parametrize("extra,message", [
    (["--mode", "alm", "--train", "new-rows"], "--train new-rows needs the transplant's tokenbridge.json"),
    (["--mode", "alm", "--latents", "1"], "the student has 2 layers of width 48 and the teacher 3 of width 64"),
    (["--mode", "uld"], "--mode uld needs --teacher"),
])
def test_what_the_student_or_teacher_lacks_is_one_clear_error(models, tmp_path, capsys, extra, message):
    teacher = [] if "uld" in extra else ["--teacher", str(models["teacher"])]
    args = [str(models["student"]), *teacher, "--text", str(models["text"]), "--steps", "1", "--window", "200",
            "--out", str(tmp_path / "out"), "--quiet", *extra]
    assert main(["heal", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
