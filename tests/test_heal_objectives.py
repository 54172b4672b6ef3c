"""Heal's objectives as one registry: every mode at its minimum for the teacher, gradients only into what
trains, exact resume; ALM's distances and latents, GradMag, mixed text, held-out evaluation, the CLI."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus, load_lm, read_tensors

from tokenbridge import transplant
from tokenbridge.cli import main
from tokenbridge.errors import TokenbridgeError
from tokenbridge.heal import HealConfig, heal
from tokenbridge.heal.data import Corpus, Side, alm_batch
from tokenbridge.heal.losses import ALM_DISTANCES, latent_loss
from tokenbridge.heal.params import select_trainable
from tokenbridge.heal.train import HealModule, step_terms
from tokenbridge.load.tokenizer import load_tokenizer
from tokenbridge.measure.bpb import evaluate

TEACHER_MODES = ["alm", "alm+sft", "dskd", "uld", "mined"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def pair(models_dir, tmp_path_factory):
    """The untied tiny Qwen2 (byte-level) transplanted onto the metaspace tokenizer; a training and a held-out text."""
    root = tmp_path_factory.mktemp("objectives")
    student, _ = transplant(models_dir["qwen2"], models_dir["gemma3"], root / "student", method="subword",
                            progress=False)
    text, code = root / "train.en.txt", root / "train.de.txt"
    text.write_text(corpus("en", 30000, 6000), encoding="utf-8")
    code.write_text(corpus("de", 30000, 3000), encoding="utf-8")
    held = root / "held.txt"
    held.write_text(corpus("en", 2000, 1500), encoding="utf-8")
    return {"teacher": models_dir["qwen2"], "student": student, "texts": [text, code], "held": held}


def _terms(mode, student_model, teacher_model, student_side, teacher_side, texts, extras=None, resources=None,
           **settings):
    config = HealConfig(mode=mode, **settings).resolved()
    batch = alm_batch(texts, [32] * len(texts), teacher_side, student_side, config.chunks, pairs=config.needs("pairs"))
    counts = {"student_tokens": batch["student_tokens"], "teacher_tokens": batch["teacher_tokens"],
              "teacher_positions": int(batch["teacher_mask"][:, 1:].sum()), "real_chunks": batch["real_chunks"],
              "pairs": batch.get("pairs", 1), "micro_batches": 1}
    return step_terms(config, batch, student_model, teacher_model, student_side, teacher_side, counts, extras,
                      resources)


def _resources(mode, side_a, side_b):
    from tokenbridge.heal.baselines import cached_mined_mapping

    if "mined" not in mode:
        return {}
    return {"mined": torch.as_tensor(cached_mined_mapping(side_a.vocab, side_b.vocab), dtype=torch.long)}


# -- every mode at the teacher -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["alm", "uld", "mined", "alm+latents"])
def test_distillation_is_zero_for_the_teacher_and_positive_after_perturbing(models_dir, mode):
    """Student = teacher (same weights, same tokenizer): every distillation term is 0; a perturbed body is not."""
    teacher = load_lm(models_dir["llama"])
    student = load_lm(models_dir["llama"])
    side = Side(load_tokenizer(models_dir["llama"]))
    texts = [corpus("en", 100, 300).encode(), corpus("de", 5000, 200).encode()]
    settings = {"latents": 1.0} if mode == "alm+latents" else {}
    name = mode.split("+")[0]
    resources = _resources(name, side, side)
    with torch.no_grad():
        terms = _terms(name, student, teacher, side, side, texts, resources=resources, **settings)
        assert all(abs(float(t)) < 1e-6 for t in terms), [float(t) for t in terms]
        weight = student.model.layers[0].mlp.down_proj.weight
        weight.add_(0.05 * torch.randn_like(weight))
        terms = _terms(name, student, teacher, side, side, texts, resources=resources, **settings)
        assert all(float(t) > 0 for t in terms), [float(t) for t in terms]


def test_binary_ce_is_smallest_at_the_teacher():
    """binary-ce is not 0 at equality but at its minimum there: the teacher's binary entropy."""
    teacher = torch.tensor([-0.3, -2.0, -40.0, -400.0], dtype=torch.float64)
    at = ALM_DISTANCES["binary-ce"](teacher, teacher, 100.0)
    p = torch.exp(teacher / 100.0 - 1e-6)
    assert torch.allclose(at, -(p * torch.log(p) + (1 - p) * torch.log1p(-p)))
    for shift in (-1.0, -0.1, 0.1, 1.0):
        moved = (teacher + shift).clamp(max=-1e-3)
        assert bool((ALM_DISTANCES["binary-ce"](teacher, moved, 100.0) >= at - 1e-12).all())


@pytest.mark.parametrize("name", ["binary-kl", "reverse-binary-kl", "abs"])
def test_divergences_are_zero_only_at_equality(name):
    teacher = torch.tensor([-0.3, -2.0, -40.0], dtype=torch.float64)
    assert float(ALM_DISTANCES[name](teacher, teacher, 100.0).abs().max()) < 1e-12
    assert bool((ALM_DISTANCES[name](teacher, teacher - 0.5, 100.0) > 0).all())


def test_reverse_binary_kl_and_abs_equal_their_formulas():
    t = torch.tensor([-0.7, -3.0], dtype=torch.float64)
    s = torch.tensor([-1.2, -2.5], dtype=torch.float64)
    for temperature in (1.0, 100.0):
        pt, ps = torch.exp(t / temperature - 1e-6), torch.exp(s / temperature - 1e-6)
        reverse = ps * torch.log(ps / pt) + (1 - ps) * torch.log((1 - ps) / (1 - pt))
        assert torch.allclose(ALM_DISTANCES["reverse-binary-kl"](t, s, temperature), reverse)
    assert torch.allclose(ALM_DISTANCES["abs"](t, s, 100.0), (t - s).abs())


def test_latent_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 6, 4, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(2)]
    t_end, s_end = torch.tensor([[1, 3, 5], [2, 4, 0]]), torch.tensor([[1, 2, 4], [3, 4, 0]])
    weight = torch.tensor([[0.2, 0.3, 0.1], [0.25, 0.15, 0.0]], dtype=torch.float64)
    expected = 0.0
    for t_layer, s_layer in zip(teacher, student):
        real = [(b, c) for b in range(2) for c in range(3) if weight[b, c] > 0]
        scale = sum(float(t_layer[b, t_end[b, c]].square().mean()) for b, c in real) / len(real)
        expected += sum(float(weight[b, c]) * float((s_layer[b, s_end[b, c]] - t_layer[b, t_end[b, c]]).square().mean())
                        / (scale + 1e-8) for b, c in real)
    assert float(latent_loss(teacher, student, t_end, s_end, weight)) == pytest.approx(expected / 2, rel=1e-6)


# -- what trains -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uld", "mined", "dskd+sft", "alm+sft"])
def test_gradients_reach_only_what_the_mode_trains(pair, mode):
    from tokenbridge.heal.objectives import OBJECTIVES

    config = HealConfig(mode=mode).resolved()
    assert config.train == "lora"
    student = select_trainable(load_lm(pair["student"]), "lora", pair["student"])
    student.train()
    teacher = load_lm(pair["teacher"])
    teacher.requires_grad_(False)
    extras = {n: OBJECTIVES[n].extra(student, teacher) for n, _ in config.terms() if OBJECTIVES[n].extra}
    module = HealModule(student, extras)
    s_side, t_side = Side(load_tokenizer(pair["student"])), Side(load_tokenizer(pair["teacher"]))
    texts = [corpus("en", 300, 400).encode(), corpus("de", 900, 300).encode()]
    sum(_terms(mode, module, teacher, s_side, t_side, texts, module.extras, _resources(mode, s_side, t_side))).backward()
    base = student.get_base_model()
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    for name, param in module.named_parameters():
        expected = "lora_" in name or param is embed or param is head or name.startswith("extras.")
        assert param.requires_grad == expected, name
        if not expected:
            assert param.grad is None, name
        elif "lora_A" not in name:  # LoRA's B starts at zero, so A's first gradient is zero too
            assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
    assert all(p.grad is None for p in teacher.parameters())
    assert ("dskd" in mode) == any(n.startswith("extras.dskd.") for n, _ in module.named_parameters())


# -- exact resume, every mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,extra", [("uld", {}), ("mined", {}), ("dskd", {}), ("alm+sft", {"balance": "gradmag"}),
                                        ("alm", {"latents": 0.5, "distance": "binary-ce", "chunks": "token"}),
                                        ("alm", {"chunks": "unbiased", "distance": "reverse-binary-kl"})])
def test_resume_is_exact_for_every_mode(pair, tmp_path, mode, extra):
    config = HealConfig(mode=mode, steps=4, batch_size=2, window=160, lr=5e-3, seed=2, mix=[2.0, 1.0], **extra)
    texts = pair["texts"]
    whole, _ = heal(pair["student"], texts, tmp_path / "whole", config, teacher=pair["teacher"], progress=False)
    heal(pair["student"], texts, tmp_path / "resumed", config, teacher=pair["teacher"], progress=False,
         checkpoint_every=2, stop_after=3)
    resumed, report = heal(pair["student"], texts, tmp_path / "resumed", config, teacher=pair["teacher"],
                           progress=False, resume=True, checkpoint_every=2)
    assert report.resumed_from == 2
    a, b = read_tensors(whole), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    before = read_tensors(pair["student"])
    assert not torch.equal(a["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    losses = json.loads((whole / "tokenbridge-heal.json").read_text())["losses"]
    assert json.loads((resumed / "tokenbridge-heal.json").read_text())["losses"] == losses
    assert all(math.isfinite(v) for _, v in losses)


# -- GradMag -------------------------------------------------------------------------------------------


def test_gradmag_sums_unit_norm_gradients_of_each_term():
    from tokenbridge.heal.loop import _accumulate_terms, _set_balanced_grads

    class One:
        num_processes = 1

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    bias = torch.nn.Parameter(torch.randn(3))
    x = [torch.randn(5, 4), torch.randn(5, 4)]

    def terms(batch):
        out = batch @ weight.T + bias
        return [100.0 * out.square().mean(), 0.01 * out.sin().sum()]

    buffers = []
    for batch in x:  # two micro-batches
        _accumulate_terms(buffers, terms(batch), [weight, bias], 1)
    _set_balanced_grads(One(), buffers, [weight, bias])
    expected_w, expected_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for k in range(2):
        gw, gb = torch.autograd.grad(sum(terms(b)[k] for b in x), [weight, bias])
        norm = torch.sqrt(gw.square().sum() + gb.square().sum())
        expected_w += gw / norm
        expected_b += gb / norm
    assert torch.allclose(weight.grad, expected_w, atol=1e-6) and torch.allclose(bias.grad, expected_b, atol=1e-6)


# -- mixed text --------------------------------------------------------------------------------------------


def test_mix_samples_files_in_proportion_without_repeats(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus("en", 0, 20000), encoding="utf-8")
    b.write_text(corpus("de", 0, 5000), encoding="utf-8")
    mixed = Corpus([a, b], 100, mix=[1.0, 3.0])
    draws = [mixed.example(4, i) for i in range(9000)]
    share = collections.Counter(w.document for w in draws)[1] / len(draws)
    assert share == pytest.approx(0.75, abs=0.02)
    assert [Corpus([a, b], 100, mix=[1.0, 3.0]).example(4, i) for i in range(8999, 0, -577)] == draws[8999:0:-577]
    # each file's windows all come once before any comes twice
    for document in (0, 1):
        own = [w for w in draws if w.document == document]
        size = sum(1 for w in mixed.windows if w.document == document)
        assert len(set(own[:size])) == size and set(own[:size]) == {w for w in mixed.windows if w.document == document}
    only_b = Corpus([a, b], 100, mix=[0.0, 1.0])
    assert {only_b.example(0, i).document for i in range(300)} == {1}
    for weights, message in (([1.0], "one per file"), ([0.0, 0.0], "not all 0"), ([-1.0, 1.0], "non-negative")):
        with pytest.raises(TokenbridgeError, match=message):
            Corpus([a, b], 100, mix=weights)


# -- held-out evaluation ------------------------------------------------------------------------------------


def test_eval_curve_scores_held_out_text_and_survives_resume(pair, tmp_path):
    config = HealConfig(mode="embeddings", steps=4, batch_size=2, window=200, lr=2e-2, eval_every=2)
    out, report = heal(pair["student"], pair["texts"][:1], tmp_path / "out", config, progress=False,
                       eval_texts=[pair["held"]])
    assert [e["step"] for e in report.evals] == [0, 2, 4]
    start = evaluate(pair["student"], [pair["held"]], window=200, progress=False).bits_per_byte
    end = evaluate(out, [pair["held"]], window=200, progress=False).bits_per_byte
    assert report.evals[0]["all"] == pytest.approx(start, rel=1e-5)
    assert report.evals[-1]["all"] == pytest.approx(end, rel=1e-5)
    assert json.loads((out / "tokenbridge-heal-eval.json").read_text()) == report.evals
    assert (out / "heal-eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heal(pair["student"], pair["texts"][:1], tmp_path / "resumed", config, progress=False, eval_texts=[pair["held"]],
         checkpoint_every=2, stop_after=3)
    _, resumed = heal(pair["student"], pair["texts"][:1], tmp_path / "resumed", config, progress=False,
                      eval_texts=[pair["held"]], checkpoint_every=2, resume=True)
    assert [e["step"] for e in resumed.evals] == [0, 2, 4]
    assert [e["all"] for e in resumed.evals] == pytest.approx([e["all"] for e in report.evals], rel=1e-9)


# -- the command line ---------------------------------------------------------------------------------------


def test_cli_refuses_bad_objective_settings(pair, tmp_path, capsys):
    student, text, teacher = str(pair["student"]), str(pair["texts"][0]), str(pair["teacher"])
    base = ["heal", student, "--text", text, "--out", str(tmp_path / "o"), "--quiet"]
    cases = [
        (["--mode", "alm+kd", "--teacher", teacher], "'kd' is not an objective"),
        (["--mode", "sft+sft"], "names an objective twice"),
        (["--mix", "1", "2"], "2 weights for 1 --text files"),
        (["--eval-every", "5"], "--eval-every needs --eval"),
        (["--mode", "sft", "--latents", "1"], "has no teacher"),
        (["--mode", "uld"], "needs --teacher"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tokenbridge: error:") and message in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()
    assert main(base + ["--mode", "uld", "--teacher", teacher, "--steps", "2", "--batch-size", "1", "--window", "128",
                        "--eval", str(pair["held"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["mode"] == "uld" and [e["step"] for e in result["evals"]] == [0, 2]
    assert np.isfinite(result["losses"][-1][1])


@pytest.mark.parametrize("mode,extra,port", [("uld", ["--balance", "gradmag"], 29541),
                                             ("alm+sft", ["--balance", "gradmag"], 29542),
                                             ("dskd", [], 29543)])
def test_two_processes_match_one(pair, tmp_path, mode, extra, port):
    """DDP over gloo gives the weights of one process with the same global batch, GradMag's per-term gradients
    included.  DSKD's std normalisation and its t2s_kd mean are per micro-batch (as in tokenkit), so its
    result depends on how the batch is split: there the two runs must agree on the first loss only."""
    import subprocess
    import sys

    common = [str(pair["student"]), "--teacher", str(pair["teacher"]), "--text", str(pair["texts"][0]), "--steps", "2",
              "--window", "160", "--quiet", "--lr", "1e-2", "--checkpoint-every", "0", "--mode", mode, *extra]
    single = tmp_path / "single"
    assert main(["heal", *common, "--out", str(single), "--batch-size", "2"]) == 0
    double = tmp_path / "double"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "tokenbridge", "heal"]
    run = subprocess.run(launcher + common + ["--out", str(double), "--batch-size", "1"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((single / "tokenbridge-heal.json").read_text())
    two = json.loads((double / "tokenbridge-heal.json").read_text())
    assert two["processes"] == 2
    if mode == "dskd":
        assert two["losses"][0][1] == pytest.approx(one["losses"][0][1], rel=0.05)
        return
    assert [v for _, v in two["losses"]] == pytest.approx([v for _, v in one["losses"]], rel=1e-4)
    a, b = read_tensors(single), read_tensors(double)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name
