"""`tokenbridge adapt` (issue 21): plan, stages skipped on --resume, resume after a kill, held-out text, errors."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import corpus, make_byte_level, make_model

from tokenbridge.adapt.report import verdict
from tokenbridge.adapt.stages import FAULT_VARIABLE, InjectedFault
from tokenbridge.cli import main

MARKER = "QXZJ-HELD-OUT-MARKER-7741"
WEIGHTS = ("model.safetensors", "config.json", "tokenizer.json")
TINY = ["--tokenizer", "train:500", "-o", "candidates=mean,subword", "-o", "window=512", "-o", "holdout_bytes=2048",
        "--heal-steps", "4", "--heal-batch-size", "2", "--heal-window", "200", "--checkpoint-every", "1",
        "--eval-window", "512"]
STAGES = ["split", "tokenizer", "select", "heal", "measure", "report"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digests(directory: Path, names=WEIGHTS) -> dict[str, str]:
    return {n: hashlib.sha256((Path(directory) / n).read_bytes()).hexdigest() for n in names}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer, and a German text whose held-out tail carries MARKER."""
    root = tmp_path_factory.mktemp("adapt")
    model = make_model(root / "model", "llama", make_byte_level(root / "tok"))
    body = corpus("de", 0, 24000)
    cut = int(len(body) * 0.96)
    text = root / "de.txt"
    text.write_text(body[:cut] + f" {MARKER} " + body[cut:], encoding="utf-8")
    return {"root": root, "model": model, "text": text}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main([str(a) for a in adapt_args(setup, out, "--quiet")]) == 0
    return out


def adapt_args(setup, out, *extra):
    return ["adapt", setup["model"], "--text", setup["text"], "--out", out, *TINY, *extra]


def test_out_holds_the_healed_model_and_its_report(reference):
    report = json.loads((reference / "report.json").read_text())
    [row] = report["files"]
    assert row["label"] == "de.txt (held out)"
    assert row["tokens_before"] > 0 and row["tokens_after"] > 0
    assert row["saved"] == pytest.approx(1 - row["tokens_after"] / row["tokens_before"], abs=1e-6)
    for name in ("bpb_original", "bpb_transplant", "bpb_healed"):
        assert 0 < row[name] < 20
    assert report["method"]["chosen"] in ("mean", "subword") and set(report["method"]["scores"]) == {"mean", "subword"}
    assert [e["step"] for e in report["heal"]["evals"]][0] == 0 and report["heal"]["evals"][-1]["step"] == 4
    assert [s["stage"] for s in report["stages"]] == STAGES[:-1]  # the report stage is writing the report
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in report["stages"])
    same = f"same quality at {row['saved'] * 100:.1f}% fewer tokens"
    assert report["verdict"] == same or "still lost" in report["verdict"]
    markdown = (reference / "report.md").read_text()
    assert report["verdict"] in markdown and "zero-shot transplant" in markdown and "| heal |" in markdown
    for plot in report["plots"].values():
        width, height = png_size(reference / plot)
        assert width >= 640 and 1.3 <= width / height <= 1.8
    for name in WEIGHTS:
        assert (reference / name).is_file()
    plan = json.loads((Path(f"{reference}.work") / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == STAGES
    assert plan["candidates"] and plan["heal"]["mode"] == "alm" and plan["eval_files"]
    healed = json.loads((reference / "tokenbridge-heal.json").read_text())
    assert healed["steps_done"] == 4


def test_held_out_text_is_in_no_training_input(setup, reference):
    work = Path(f"{reference}.work")
    plan = json.loads((work / "plan.json").read_text())
    assert MARKER in setup["text"].read_text()
    [held] = plan["eval_files"]
    assert MARKER in Path(held).read_text()
    trains_on = {f for stage in plan["stages"] for f in stage["trains_on"]}
    assert trains_on == {s["train"] for s in plan["split"]}
    for path in trains_on:
        assert MARKER not in Path(path).read_text()
        assert Path(path).parent == work / "split" / "train"
    assert all(Path(s["train"]).read_bytes() + Path(s["heldout"]).read_bytes() == setup["text"].read_bytes()
               for s in plan["split"])
    # what each training stage really read: heal's texts, the selection's text, the tokenizer's corpus
    assert set(json.loads((reference / "tokenbridge-heal.json").read_text())["texts"]) == trains_on
    selection = json.loads((work / "transplant" / "tokenbridge.json").read_text())["selection"]
    assert set(selection["text"]) == trains_on
    tokenizer = json.loads((work / "tokenizer" / "tokenbridge-tokenizer.json").read_text())
    assert {c["text"] for c in tokenizer["compression"]} == trains_on
    vocab = json.loads((work / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not [t for t in vocab if "QXZJ" in t or "7741" in t]


def test_unchanged_stages_are_skipped_and_changed_ones_rerun_with_the_reason(setup, reference, tmp_path, capsys):
    out = tmp_path / "out"
    args = adapt_args(setup, out)
    assert run(capsys, *args, "--quiet")[0] == 0
    before = digests(out)
    assert before == digests(reference)  # the same inputs, the same weights
    code, printed, err = run(capsys, *args, "--resume", "--json")
    assert code == 0, err
    for stage in STAGES:
        assert f"adapt: {stage}: inputs unchanged, skipped" in err
    assert json.loads(printed)["verdict"] and digests(out) == before
    steps = args.index("--heal-steps")
    args[steps + 1] = "3"
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0, err
    for stage in ("split", "tokenizer", "select"):
        assert f"adapt: {stage}: inputs unchanged, skipped" in err
    assert "adapt: heal: running again: setting config.steps was 4, now 3" in err
    assert "adapt: measure: running again: healed changed" in err
    assert "adapt: report: running again: healed changed" in err
    assert json.loads((out / "report.json").read_text())["heal"]["steps"] == 3


@pytest.fixture
def fault(monkeypatch):
    def inject(where):
        if where is None:
            monkeypatch.delenv(FAULT_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(FAULT_VARIABLE, where)
    return inject


def test_a_run_stopped_in_every_stage_resumes_to_the_uninterrupted_weights(setup, reference, tmp_path, fault,
                                                                          capsys):
    from tokenbridge.adapt import AdaptConfig, adapt

    out = tmp_path / "out"
    config = AdaptConfig(tokenizer="train:500", options={"candidates": "mean,subword", "window": "512",
                                                         "holdout_bytes": "2048"},
                         heal_steps=4, heal_batch_size=2, heal_window=200, checkpoint_every=1, eval_window=512)
    said = []
    for number, where in enumerate(["split", "tokenizer", "select", "heal:2", "measure", "report"]):
        fault(where)
        with pytest.raises(InjectedFault):
            adapt(setup["model"], [setup["text"]], out, config, resume=number > 0, progress=False, say=said.append)
        assert not out.exists() or where == "report"
    fault(None)
    adapt(setup["model"], [setup["text"]], out, config, resume=True, progress=False, say=said.append)
    assert digests(out) == digests(reference)
    assert "adapt: heal: resuming from step-00000002" in said
    assert "adapt: report: running again: it did not finish in the earlier run" in said
    assert not [p for p in tmp_path.rglob("*") if ".tokenbridge-" in p.name]


def test_a_run_killed_during_heal_resumes_to_the_uninterrupted_weights(setup, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tokenbridge", *map(str, adapt_args(setup, out)), "--quiet"]
    checkpoint = Path(f"{out}.work") / "heal" / "model.checkpoints" / "step-00000002"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and not checkpoint.is_dir():
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert digests(out) == digests(reference)


def _bad(setup, tmp_path, case):
    out = tmp_path / "out"
    text = setup["text"]
    small = tmp_path / "small.txt"
    small.write_text("kurz " * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["--text", text, "--out", out, "--heal-steps", "1"]
    pickled = tmp_path / "pickled"
    if case == "pickle without --allow-pickle":
        import shutil

        import torch
        from safetensors.torch import load_file

        shutil.copytree(setup["model"], pickled)
        torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
        (pickled / "model.safetensors").unlink()
    return {
        "pickle without --allow-pickle": ["adapt", pickled, *base],
        "no model": ["adapt", tmp_path / "nope", *base],
        "no text": ["adapt", setup["model"], "--text", tmp_path / "none.txt", "--out", out],
        "empty text": ["adapt", setup["model"], "--text", empty, "--out", out],
        "too little text": ["adapt", setup["model"], "--text", small, "--out", out],
        "bad tokenizer size": ["adapt", setup["model"], *base, "--tokenizer", "train:many"],
        "bad tokenizer path": ["adapt", setup["model"], *base, "--tokenizer", tmp_path / "missing-tok"],
        "unknown method": ["adapt", setup["model"], *base, "--method", "nonsense"],
        "unknown heal mode": ["adapt", setup["model"], *base, "--heal-mode", "nonsense"],
        "bad candidate": ["adapt", setup["model"], *base, "-o", "candidates=nonsense"],
        "zero minutes": ["adapt", setup["model"], *base, "--heal-minutes", "0"],
        "out is the model": ["adapt", setup["model"], "--text", text, "--out", setup["model"]],
    }[case]


BAD = ["pickle without --allow-pickle", "no model", "no text", "empty text", "too little text", "bad tokenizer size", "bad tokenizer path",
       "unknown method", "unknown heal mode", "bad candidate", "zero minutes", "out is the model"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, capsys, case):
    code, printed, err = run(capsys, *_bad(setup, tmp_path, case))
    assert code == 2 and printed == ""
    assert err.startswith("tokenbridge: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
    assert not [p for p in tmp_path.iterdir() if ".tokenbridge-" in p.name]


def test_an_existing_out_or_earlier_run_is_refused_without_force(setup, reference, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, *adapt_args(setup, out))
    assert code == 2 and "exists and is not empty (pass --force" in err
    code, _, err = run(capsys, *adapt_args(setup, out, "--resume"))
    assert code == 2 and "was not written by the run" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not Path(f"{out}.work").exists()
    code, _, err = run(capsys, *adapt_args(setup, reference))
    assert code == 2 and "exists and is not empty" in err


def test_named_method_extend_eval_files_and_a_time_budget(setup, tmp_path, capsys):
    """--method NAME (the transplant stage), --tokenizer extend:N, --eval (no hold-out) and --heal-minutes."""
    out = tmp_path / "out"
    held = tmp_path / "eval.txt"
    held.write_text(corpus("de", 30000, 3000), encoding="utf-8")
    args = ["adapt", setup["model"], "--text", setup["text"], "--out", out, "--tokenizer", "extend:40",
            "--method", "subword", "--heal-mode", "sft", "--heal-minutes", "0.02", "--heal-batch-size", "1",
            "--heal-window", "200", "--eval", held, "--eval-window", "512"]
    code, printed, err = run(capsys, *args, "--json")
    assert code == 0, err
    report = json.loads(printed)
    assert [s["stage"] for s in report["stages"]] == ["split", "tokenizer", "transplant", "heal", "measure"]
    assert report["method"]["chosen"] == "subword" and report["tokenizer"]["step"] == "extend"
    assert [f["label"] for f in report["files"]] == ["eval.txt"] and not report["held_out"]
    budget = json.loads((Path(f"{out}.work") / "heal" / "budget.json").read_text())
    assert budget["steps"] >= 1 and report["heal"]["steps"] == budget["steps"]
    assert report["tokenizer"]["vocab_after"] > report["tokenizer"]["vocab_before"]
    train = Path(f"{out}.work") / "split" / "train" / "0-de.txt"
    assert train.read_bytes() == setup["text"].read_bytes()  # with --eval nothing of --text is held out
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0 and "adapt: heal: inputs unchanged, skipped" in err and "timing" not in err


def test_verdict_says_what_is_lost():
    rows = [{"label": "a", "tokens_before": 100, "tokens_after": 75, "bpb_original": 1.0, "bpb_healed": 1.019},
            {"label": "b", "tokens_before": 100, "tokens_after": 75, "bpb_original": 2.0, "bpb_healed": 1.9}]
    assert verdict(rows) == "same quality at 25.0% fewer tokens"
    rows[1]["bpb_healed"] = 2.2
    assert verdict(rows) == ("at 25.0% fewer tokens, still lost: b +10.0% bits per byte (more than 2% above the "
                             "original)")


def test_method_selection_sits_above_the_pipeline(models_dir, tok_dirs, tmp_path):
    """No module below the planner imports it (the pipeline <-> auto circle is gone); auto goes through the API."""
    import tokenbridge
    from tokenbridge.api import transplant
    from tokenbridge.errors import TokenbridgeError
    from tokenbridge.pipeline import transplant as pipeline_transplant

    package = Path(tokenbridge.__file__).parent
    above = {"tokenbridge.adapt", "tokenbridge.api", "tokenbridge.cli", "tokenbridge", "tokenbridge.__main__"}
    for path in package.rglob("*.py"):
        parts = ("tokenbridge",) + path.relative_to(package).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if any(module == a or module.startswith(a + ".") for a in above - {"tokenbridge"}) or module == "tokenbridge":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # another module's escape sequences are not this test's business
            tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imported = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")[:len(module.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(anchor + ([base] if base else []))
                imported = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            for name in imported:
                assert not any(name == a or name.startswith(a + ".") for a in
                               ("tokenbridge.adapt", "tokenbridge.api", "tokenbridge.auto")), (module, name)
    assert not (package / "auto.py").exists()
    assert tokenbridge.transplant is transplant
    with pytest.raises(TokenbridgeError, match="above the pipeline"):
        pipeline_transplant(models_dir["llama"], tok_dirs["byte_level_de"], tmp_path / "o", method="auto")
    assert not (tmp_path / "o").exists()
    assert os.environ.get(FAULT_VARIABLE) is None
