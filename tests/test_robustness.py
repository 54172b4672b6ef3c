"""Regression tests for the defects of issue 14 (found by trying to break the CLI), one section per defect.

GGUF files and the packaged-model assembly are in test_robustness_gguf.py, streaming text in
test_streaming.py, and killing commands part-way in test_fault_injection.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus, make_model, read_tensors
from safetensors.torch import load_file, save_file

from tokenbridge.cli import main
from tokenbridge.heal import HealConfig, heal
from tokenbridge.write import output_dir

EVIL_MARK = "TOKENBRIDGE_EVIL_MARK"


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, needle: str = ""):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("tokenbridge: error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def no_temp_left(directory: Path):
    left = [p.name for p in Path(directory).iterdir() if ".tokenbridge-" in p.name]
    assert not left, left


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(corpus("en", 30000, 6000), encoding="utf-8")
    return path


def copy(directory: Path, where: Path) -> Path:
    return Path(shutil.copytree(directory, where))


# -- 1. remote code never runs -------------------------------------------------------------------

EVIL_CODE = """import os
open(os.environ["{mark}"], "w").write(__name__)
"""


def _evil_tokenizer(source: Path, where: Path) -> Path:
    """A tokenizer directory whose tokenizer_config.json asks for its own class (auto_map), in evil.py."""
    directory = copy(source, where)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(EVIL_CODE.format(mark=EVIL_MARK) + (
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"))
    return directory


def _evil_model(source: Path, where: Path, model_type: str) -> Path:
    """A model directory whose config.json maps the auto classes to code in evil_model.py."""
    directory = copy(source, where)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    config["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil_model.py").write_text(EVIL_CODE.format(mark=EVIL_MARK) + (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"))
    return directory


@pytest.fixture
def evil(models_dir, tok_dirs, tmp_path, monkeypatch):
    """Evil directories, a marker their code would write, and stdin answering "y" to every question."""
    mark = tmp_path / "ran-remote-code"
    monkeypatch.setenv(EVIL_MARK, str(mark))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    return {
        "tokenizer": _evil_tokenizer(tok_dirs["byte_level"], tmp_path / "evil-tokenizer"),
        "model": _evil_model(models_dir["llama"], tmp_path / "evil-model", "evilllama"),
        "llama": _evil_model(models_dir["llama"], tmp_path / "evil-llama", "llama"),  # transformers has the class
        "mark": mark,
    }


def _assert_no_remote_code(directory: Path):
    assert not list(directory.rglob("*.py"))
    for name in ("config.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            assert "auto_map" not in json.loads((directory / name).read_text())


def test_remote_code_never_runs_for_any_command(evil, models_dir, tok_dirs, text, tmp_path, capsys):
    bad_tok, bad_model = evil["tokenizer"], evil["model"]
    commands = [
        ["tokstats", bad_tok, "--text", text],
        ["transplant", models_dir["llama"], bad_tok, tmp_path / "o1"],
        ["transplant", bad_model, tok_dirs["byte_level"], tmp_path / "o2"],
        ["eval", bad_model, "--text", text, "--bytes", 500],
        ["generate", bad_model, "--prompt", "Debian", "--max-new-tokens", 2],
        ["bytes", "score", bad_model, "--text", text, "--bytes", 100],
        ["bytes", "generate", bad_model, "--prompt", "Debian", "--max-bytes", 2],
        ["heal", bad_model, "--text", text, "--out", tmp_path / "o3", "--steps", 1, "--window", 200],
        ["heal", models_dir["llama"], "--teacher", bad_model, "--mode", "alm", "--text", text,
         "--out", tmp_path / "o4", "--steps", 1, "--window", 200],
        ["compare", bad_model, tok_dirs["byte_level"], "--methods", "mean", "--text", text, "--out", tmp_path / "o5"],
        ["tokenizer", "train", "--text", text, "--vocab-size", 400, "--like", bad_tok, "--out", tmp_path / "o6"],
        ["tokenizer", "extend", bad_tok, "--text", text, "--add", 10, "--out", tmp_path / "o7"],
        ["tokenizer", "prune", bad_tok, "--text", text, "--keep", 300, "--out", tmp_path / "o8"],
    ]
    for command in commands:
        code, _, err = run(capsys, *command)
        # transplant reads the source's architecture from its own table, which has no 'evilllama'
        one_line_error(code, err, "is not supported" if command[1] == bad_model and command[0] == "transplant"
                       else "never runs")
        assert not evil["mark"].exists(), command
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def test_auto_map_with_a_known_model_type_loads_transformers_own_class(evil, tok_dirs, text, tmp_path, capsys):
    code, _, err = run(capsys, "transplant", evil["llama"], tok_dirs["byte_level_de"], tmp_path / "out", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "heal", evil["llama"], "--text", text, "--out", tmp_path / "healed", "--steps", 1,
                       "--batch-size", 1, "--window", 200, "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "eval", evil["llama"], "--text", text, "--bytes", 300, "--quiet")
    assert code == 0, err
    assert not evil["mark"].exists()
    _assert_no_remote_code(tmp_path / "out")
    _assert_no_remote_code(tmp_path / "healed")


def test_remote_code_refused_in_a_real_process_with_yes_on_stdin(tok_dirs, text, tmp_path):
    evil_dir = _evil_tokenizer(tok_dirs["byte_level"], tmp_path / "evil")
    mark = tmp_path / "ran"
    result = subprocess.run([sys.executable, "-m", "tokenbridge", "tokstats", str(evil_dir), "--text", str(text)],
                            input="y\n" * 100, capture_output=True, text=True, timeout=120,
                            env={**os.environ, EVIL_MARK: str(mark)})
    assert result.returncode == 2 and not mark.exists(), result.stderr
    assert result.stderr.count("\n") == 1 and "never runs" in result.stderr


# -- 3. an id far beyond the vocabulary is an error, not a huge allocation ------------------------

def _tokenizer_with(tok_dir: Path, where: Path, edit) -> Path:
    directory = copy(tok_dir, where)
    data = json.loads((directory / "tokenizer.json").read_text())
    edit(data["model"]["vocab"])
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def test_huge_id_is_refused_without_allocating(tok_dirs, text, tmp_path):
    def huge(vocab):
        vocab[sorted(vocab, key=vocab.get)[300]] = 200_000_000

    directory = _tokenizer_with(tok_dirs["byte_level"], tmp_path / "huge", huge)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
    code = limit + ("import sys; from tokenbridge.cli import main; "
                    f"sys.exit(main(['tokstats', {str(directory)!r}, '--text', {str(text)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not contiguous" in result.stderr and "200000000" in result.stderr
    assert str(directory) in result.stderr and result.stderr.count("\n") == 1


# -- 5. non-finite floats are refused ------------------------------------------------------------

def test_non_finite_options_are_refused(models_dir, tok_dirs, text, tmp_path, capsys):
    model = models_dir["llama"]
    cases = [
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--temperature", "nan"],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--lr", "nan"],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--embedding-lr", "inf"],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--weight-decay=-inf"],
        ["bytes", "generate", model, model, "--prompt", "a", "--weights", "nan", "1"],
        ["bytes", "score", model, model, "--text", text, "--weights", "inf", "1"],
        ["bytes", "generate", model, "--prompt", "a", "--temperature", "nan"],
        ["bytes", "generate", model, "--prompt", "a", "--top-p", "nan"],
        ["generate", model, "--prompt", "a", "--temperature", "inf"],
        ["tokenizer", "train", "--text", text, "--vocab-size", 400, "--supertokens", "--supertoken-share", "nan",
         "--out", tmp_path / "o"],
        ["transplant", model, tok_dirs["metaspace"], tmp_path / "o", "-o", "output_first_piece_weight=nan"],
    ]
    for command in cases:
        code, out, err = run(capsys, *command)
        one_line_error(code, err)
        assert "finite" in err, (command, err)
        assert not out and not (tmp_path / "o").exists()


def test_non_finite_values_are_refused_by_the_api(models_dir, tmp_path):
    from tokenbridge.bytes import ByteEnsemble
    from tokenbridge.errors import TokenbridgeError

    for field in ("temperature", "lr", "lm_weight", "lora_alpha", "max_grad_norm"):
        with pytest.raises(TokenbridgeError, match="finite"):
            HealConfig(**{field: float("nan")}).resolved()
    with pytest.raises(TokenbridgeError, match="finite"):
        ByteEnsemble([object(), object()], [float("nan"), 1.0])


# -- 6. --resume checks what it resumes on -------------------------------------------------------

@pytest.fixture(scope="module")
def heal_pair(models_dir, tok_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    text = root / "train.txt"
    text.write_text(corpus("en", 30000, 8000), encoding="utf-8")
    other = make_model(root / "other-student", "llama", tok_dirs["byte_level"], seed=7)  # same shapes
    return {"student": models_dir["llama"], "other": other, "teacher": models_dir["qwen2"], "text": text,
            "root": root}


def _stopped_run(heal_pair, out: Path, mode="embeddings", teacher=None):
    config = HealConfig(mode=mode, steps=4, batch_size=1, window=200, seed=1)
    heal(heal_pair["student"], [heal_pair["text"]], out, config, teacher=teacher, progress=False,
         checkpoint_every=1, stop_after=2)
    return config


def test_resume_refuses_other_texts_students_and_teachers(heal_pair, tmp_path):
    from tokenbridge.errors import TokenbridgeError

    out = tmp_path / "out"
    config = _stopped_run(heal_pair, out, "alm", heal_pair["teacher"])
    moved = tmp_path / "moved.txt"
    shutil.copyfile(heal_pair["text"], moved)
    with pytest.raises(TokenbridgeError, match="--text .*moved.txt.*; the checkpoint was made with"):
        heal(heal_pair["student"], [moved], out, config, teacher=heal_pair["teacher"], resume=True, progress=False)
    with pytest.raises(TokenbridgeError, match="the student .* is not the one the checkpoint was made with"):
        heal(heal_pair["other"], [heal_pair["text"]], out, config, teacher=heal_pair["teacher"], resume=True,
             progress=False)
    with pytest.raises(TokenbridgeError, match="the teacher .* is not the one the checkpoint was made with"):
        heal(heal_pair["student"], [heal_pair["text"]], out, config, teacher=heal_pair["other"], resume=True,
             progress=False)
    # the same file, its content changed in place
    original = heal_pair["text"].read_bytes()
    try:
        heal_pair["text"].write_bytes(original.replace(b"Debian", b"Debjan", 1))
        with pytest.raises(TokenbridgeError, match="--text .*train.txt has changed since the checkpoint"):
            heal(heal_pair["student"], [heal_pair["text"]], out, config, teacher=heal_pair["teacher"], resume=True,
                 progress=False)
    finally:
        heal_pair["text"].write_bytes(original)
    # the same inputs resume
    _, report = heal(heal_pair["student"], [heal_pair["text"]], out, config, teacher=heal_pair["teacher"],
                     resume=True, progress=False)
    assert report.resumed_from == 2 and report.steps_done == 4


# -- 7. pickle checkpoints need --allow-pickle everywhere -----------------------------------------

@pytest.fixture
def pickled(models_dir, tmp_path) -> Path:
    directory = copy(models_dir["llama"], tmp_path / "pickled")
    tensors = read_tensors(directory)
    (directory / "model.safetensors").unlink()
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def test_pickle_needs_allow_pickle_in_every_command(pickled, text, tmp_path, capsys):
    commands = [
        ["eval", pickled, "--text", text, "--bytes", 300],
        ["generate", pickled, "--prompt", "Debian", "--max-new-tokens", 2],
        ["bytes", "score", pickled, "--text", text, "--bytes", 50],
        ["bytes", "generate", pickled, "--prompt", "De", "--max-bytes", 2],
        ["heal", pickled, "--text", text, "--out", tmp_path / "o", "--steps", 1, "--window", 200],
    ]
    for command in commands:
        code, _, err = run(capsys, *command, "--quiet")
        one_line_error(code, err, "--allow-pickle")
    assert not (tmp_path / "o").exists()
    for command in commands:
        code, _, err = run(capsys, *command, "--quiet", "--allow-pickle")
        assert code == 0, (command, err)


# -- 8. temp dirs of dead processes are swept; SIGTERM cleans up like Ctrl-C ----------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_orphans_of_dead_processes_are_swept_and_live_ones_kept(models_dir, tmp_path, capsys):
    dead = tmp_path / f".out.tokenbridge-{_dead_pid()}.12345-abc"  # a staged OUT of a killed process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    dead_file = tmp_path / f".other.tokenbridge-{_dead_pid()}.1-xyz.vec"
    dead_file.write_text("partial")
    alive = tmp_path / f".out.tokenbridge-{os.getppid()}.{_start_time(os.getppid())}-live"
    alive.mkdir()
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out", "--quiet")
    assert code == 0, err
    assert not dead.exists() and not dead_file.exists() and alive.is_dir()


def test_sigterm_gets_the_cleanup_of_ctrl_c(models_dir, tmp_path):
    import signal

    model, out = str(models_dir["llama"]), str(tmp_path / "out")
    script = (  # SIGTERM arrives while the shards are being written (as `timeout` or `docker stop` send it)
        "import os, signal, sys\n"
        "from tokenbridge import pipeline\n"
        "from tokenbridge.cli import main\n"
        "pipeline._write_shards = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
        f"code = main(['transplant', {model!r}, {model!r}, {out!r}, '--quiet'])\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr == "tokenbridge: stopped by SIGTERM\n"
    assert not (tmp_path / "out").exists()
    no_temp_left(tmp_path)


# -- 9. --force replaces OUT atomically ------------------------------------------------------------

def test_force_swaps_atomically_and_restores_on_failure(models_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old model")
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], out, "--force", "--quiet")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    no_temp_left(tmp_path)

    # where the system cannot swap: moved aside, and put back when the new one cannot be renamed in
    (out / "keep.txt").write_text("current")
    monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tokenbridge-" in os.fspath(src) and "old-" not in os.fspath(src) and os.fspath(dst) == str(out):
            raise OSError(5, "Input/output error", os.fspath(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], out, "--force", "--quiet")
    one_line_error(code, err, "Input/output error")
    assert (out / "keep.txt").read_text() == "current"
    no_temp_left(tmp_path)


def test_a_kill_between_the_two_renames_is_undone_by_the_next_run(models_dir, tmp_path, capsys):
    out = tmp_path / "out"
    aside = tmp_path / f".out.tokenbridge-old-{_dead_pid()}.7-abc"
    aside.mkdir()
    (aside / "model.safetensors").write_text("the user's model")  # OUT moved aside, then the process died
    output_dir.sweep_orphans(tmp_path)
    assert (out / "model.safetensors").read_text() == "the user's model"
    no_temp_left(tmp_path)


def test_failed_first_rename_leaves_no_old_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a")
    new = output_dir.temp_dir(tmp_path, "out")
    (new / "b").write_text("b")
    monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def failing(src, dst):
        if os.fspath(src) == str(out):
            raise OSError(1, "Operation not permitted", os.fspath(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        output_dir.replace_path(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", new.name])
    assert (out / "a").read_text() == "a"


# -- 10. OUT inside the cache ----------------------------------------------------------------------

def test_output_inside_the_cache_is_refused(models_dir, tmp_path, monkeypatch, capsys):
    from tokenbridge.load.packaged import smollm2_gguf

    cache = tmp_path / "cache"
    entry = cache / "gguf" / "0123456789abcdef01234567"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(cache))
    for command in (["transplant", models_dir["llama"], models_dir["llama"], entry, "--force"],
                    ["convert", smollm2_gguf(), entry, "--force"],
                    ["tokenizer", "prune", models_dir["llama"], "--text", models_dir["llama"] / "config.json",
                     "--keep", 300, "--out", cache / "tok"]):
        code, _, err = run(capsys, *command)
        one_line_error(code, err, "inside tokenbridge's cache")
    assert (entry / "config.json").read_text() == "{}"


# -- 11 and 17. heal checkpoints carry checksums; a damaged one is a clear error ------------------

def test_damaged_checkpoints_are_one_line_errors(heal_pair, tmp_path, capsys):
    out = tmp_path / "out"
    _stopped_run(heal_pair, out)
    step = next((tmp_path / "out.checkpoints").glob("step-*"))
    resume = ["heal", heal_pair["student"], "--text", heal_pair["text"], "--out", out, "--steps", 4,
              "--batch-size", 1, "--window", 200, "--seed", 1, "--checkpoint-every", 1, "--resume", "--quiet"]
    pristine = {p.name: p.read_bytes() for p in step.iterdir()}
    damages = {
        "trainable.safetensors": lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],  # one flipped bit
        "optimizer.safetensors": lambda b: b[: len(b) // 2],  # truncated
        "state.json": lambda b: b[:-20],  # truncated JSON
    }
    for name, damage in damages.items():
        (step / name).write_bytes(damage(pristine[name]))
        code, _, err = run(capsys, *resume)
        line = one_line_error(code, err, "the checkpoint is corrupt")
        assert name in line and "--force" in line
        (step / name).write_bytes(pristine[name])
    code, _, err = run(capsys, *resume)
    assert code == 0, err


# -- 12. two strings on one id ----------------------------------------------------------------------

def test_duplicate_id_is_refused(models_dir, tok_dirs, tmp_path, capsys):
    def duplicate(vocab):  # every id still has a token; id 300 has two
        vocab["\u0120zzqx"] = vocab[sorted(vocab, key=vocab.get)[300]]

    directory = _tokenizer_with(tok_dirs["byte_level"], tmp_path / "dup", duplicate)
    code, _, err = run(capsys, "transplant", models_dir["llama"], directory, tmp_path / "out")
    line = one_line_error(code, err, "has two tokens")
    assert "id 300" in line and str(directory) in line
    assert not (tmp_path / "out").exists()


# -- 13 and 16. safetensors headers are validated -----------------------------------------------------

def _with_header(source: Path, where: Path, edit) -> Path:
    directory = copy(source, where)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    new = edit(header)
    encoded = new if isinstance(new, bytes) else json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])
    return directory


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def test_malformed_safetensors_headers_are_one_line_errors(models_dir, tmp_path, capsys):
    llama = models_dir["llama"]
    edits = {
        "metadata": (lambda h: h.update({"__metadata__": {"format": ["pt"]}}), "__metadata__"),
        "string offsets": (lambda h: _first_tensor(h).update(
            data_offsets=[str(x) for x in _first_tensor(h)["data_offsets"]]), "data_offsets"),
        "float shape": (lambda h: _first_tensor(h).update(shape=[float(x) for x in _first_tensor(h)["shape"]]),
                        "shape"),
        "string shape": (lambda h: _first_tensor(h).update(shape="48"), "shape"),
        "deep": (lambda h: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    }
    for index, (name, (edit, needle)) in enumerate(edits.items()):
        source = _with_header(llama, tmp_path / f"m{index}", edit)
        for command in (["transplant", source, llama, tmp_path / "out"],
                        ["eval", source, "--text", source / "config.json"]):
            code, _, err = run(capsys, *command)
            one_line_error(code, err, needle)
        assert not (tmp_path / "out").exists(), name


def test_one_dimensional_embedding_is_refused(models_dir, tmp_path, capsys):
    source = copy(models_dir["llama"], tmp_path / "flat")
    tensors = read_tensors(source)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].reshape(-1)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "transplant", source, models_dir["llama"], tmp_path / "out")
    one_line_error(code, err, "expected 2 non-empty dimensions")


def test_written_metadata_is_strings_only(tmp_path):
    from tokenbridge.write.safetensors_stream import OutTensor, write_safetensors

    path = tmp_path / "x.safetensors"
    write_safetensors(path, [OutTensor.of("a", torch.ones(2))], {"format": "pt", "bad": ["pt"]})
    assert load_file(str(path))["a"].tolist() == [1.0, 1.0]


# -- 14. the training window must fit the model's context -------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])  # n_positions and max_position_embeddings, both 512
def test_heal_window_is_checked_against_the_context(models_dir, tmp_path, capsys, family):
    text = tmp_path / "long.txt"
    text.write_text(corpus("en", 0, 20000), encoding="utf-8")
    code, _, err = run(capsys, "heal", models_dir[family], "--text", text, "--out", tmp_path / "out",
                       "--window", 4096, "--steps", 1, "--quiet")
    one_line_error(code, err, "more than the student's context of 512; use a smaller --window")
    assert not (tmp_path / "out.checkpoints").exists() or not any((tmp_path / "out.checkpoints").iterdir())


# -- 15. byte prompts ----------------------------------------------------------------------------------

def test_bytes_prompt_cut_inside_a_character(models_dir, tmp_path):
    model = str(models_dir["llama"])
    command = [sys.executable, "-m", "tokenbridge", "bytes", "generate", model, "--max-bytes", "3", "--quiet"]
    cut = subprocess.run(command + ["--prompt", os.fsdecode(b"caf\xc3")], capture_output=True, timeout=120)
    assert cut.returncode == 0, cut.stderr
    hexed = subprocess.run(command + ["--prompt-hex", "636166c3"], capture_output=True, timeout=120)
    (tmp_path / "prompt").write_bytes(b"caf\xc3")
    filed = subprocess.run(command + ["--prompt-file", str(tmp_path / "prompt")], capture_output=True, timeout=120)
    assert cut.stdout.startswith(b"caf\xc3") and cut.stdout == hexed.stdout == filed.stdout


# -- 18 and 19. bad numbers are one-line errors -----------------------------------------------------

def test_bad_numeric_options_are_one_line_errors(models_dir, tmp_path, capsys):
    model, text = models_dir["llama"], models_dir["llama"] / "config.json"
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    (unloadable / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
    cases = [
        ["transplant", model, model, tmp_path / "o", "--seed", 20_000_000_000_000],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--seed", -1],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--seed", 2**70],
        ["bytes", "generate", model, "--prompt", "a", "--seed", -1],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--lora-rank", 0],
        ["eval", model, "--text", text, "--bytes", 0],
        ["eval", model, "--text", text, "--bytes", -1],
        ["bytes", "score", model, "--text", text, "--bytes", -5],
        ["generate", model, "--prompt", "a", "--max-new-tokens", -1],
        ["generate", unloadable, "--prompt", "a"],
        ["heal", model, "--text", text, "--out", tmp_path / "o", "--steps", "1.5"],
    ]
    for command in cases:
        code, out, err = run(capsys, *command)
        one_line_error(code, err)
        assert "Traceback" not in err and not out
    assert not (tmp_path / "o").exists()


def test_the_api_checks_seeds_too(models_dir, tmp_path):
    from tokenbridge import transplant
    from tokenbridge.errors import TokenbridgeError

    with pytest.raises(TokenbridgeError, match="--seed must be"):
        transplant(models_dir["llama"], models_dir["llama"], tmp_path / "o", seed=2**64)
    with pytest.raises(TokenbridgeError, match="--seed must be"):
        HealConfig(seed=-1).resolved()


# -- 20. an OUT that is a symbolic link -------------------------------------------------------------------

def test_symlinked_output_is_written_through_not_replaced(models_dir, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], link, "--quiet")
    assert code == 0, err
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], link, "--quiet")
    one_line_error(code, err, "exists and is not empty")  # the model behind the link needs --force too
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], dangling)
    one_line_error(code, err, "symbolic link")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


# -- 21. an unwritable OUT is found before the work ---------------------------------------------------

def test_unwritable_output_is_found_before_training(models_dir, text, tmp_path, monkeypatch, capsys):
    from tokenbridge.heal import train

    locked = tmp_path / "locked"
    locked.mkdir()
    real = output_dir.temp_dir

    def refuse(parent, name, old=False):
        if Path(parent) == locked:
            raise PermissionError(13, "Permission denied", str(parent))
        return real(parent, name, old)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before OUT was checked")

    monkeypatch.setattr(output_dir, "temp_dir", refuse)
    monkeypatch.setattr(train, "load_causal_lm", never)
    code, _, err = run(capsys, "heal", models_dir["llama"], "--text", text, "--out", locked / "out")
    one_line_error(code, err, "Permission denied")


# -- 23. outputs follow the umask ---------------------------------------------------------------------------

def test_outputs_follow_the_umask(models_dir, text, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out", "--quiet")
        assert code == 0, err
        code, _, err = run(capsys, "tokenizer", "train", "--text", text, "--vocab-size", 400, "--out",
                           tmp_path / "tok", "--quiet")
        assert code == 0, err
        code, _, err = run(capsys, "heal", models_dir["llama"], "--text", text, "--out", tmp_path / "healed",
                           "--steps", 1, "--batch-size", 1, "--window", 200, "--quiet")
        assert code == 0, err
    finally:
        os.umask(old)
    for directory in ("out", "tok", "healed"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o755, directory
        for file in (tmp_path / directory).iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


# -- 24. sidecar reports are deterministic ---------------------------------------------------------------

def test_sidecar_reports_are_identical_across_identical_runs(models_dir, text, tmp_path, capsys):
    files = {"tok": "tokenbridge-tokenizer.json", "healed": "tokenbridge-heal.json"}
    seen = {}
    for _ in range(2):
        code, _, err = run(capsys, "tokenizer", "train", "--text", text, "--vocab-size", 400, "--out",
                           tmp_path / "tok", "--quiet", "--force")
        assert code == 0, err
        code, _, err = run(capsys, "heal", models_dir["llama"], "--text", text, "--out", tmp_path / "healed",
                           "--steps", 2, "--batch-size", 1, "--window", 200, "--quiet", "--force")
        assert code == 0, err
        for directory, name in files.items():
            data = (tmp_path / directory / name).read_bytes()
            assert seen.setdefault(name, data) == data, name
            assert b"seconds" not in data


# -- 25. --quiet is quiet; an error is one line ------------------------------------------------------------

def test_quiet_runs_print_nothing_on_stderr(models_dir, text, tmp_path):
    model = str(models_dir["llama"])
    for command in (["transplant", model, model, str(tmp_path / "out")],
                    ["eval", model, "--text", str(text), "--bytes", "300"],
                    ["heal", model, "--text", str(text), "--out", str(tmp_path / "healed"), "--steps", "1",
                     "--window", "200"],
                    ["tokstats", model, "--text", str(text)]):
        result = subprocess.run([sys.executable, "-m", "tokenbridge", *command, "--quiet"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0 and result.stderr == "", (command, result.stderr)


def test_load_problems_are_one_line_not_a_load_report(models_dir, tmp_path):
    source = copy(models_dir["llama"], tmp_path / "missing-tensor")
    tensors = read_tensors(source)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = subprocess.run([sys.executable, "-m", "tokenbridge", "eval", str(source), "--text",
                             str(source / "config.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "missing tensor model.layers.0.mlp.up_proj.weight" in result.stderr


# -- 26. error messages name what the user gave ---------------------------------------------------------

def test_errors_name_out_not_the_temp_dir(models_dir, tmp_path, monkeypatch, capsys):
    from tokenbridge import pipeline

    def full_disk(checkpoint, replacements, directory, progress):
        raise OSError(28, "No space left on device", str(directory / "model.safetensors"))

    monkeypatch.setattr(pipeline, "_write_shards", full_disk)
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out")
    line = one_line_error(code, err, "No space left on device")
    assert f"{tmp_path / 'out' / 'model.safetensors'}:" in line and ".tokenbridge-" not in line


def test_os_errors_without_a_file_have_no_empty_slot(models_dir, tmp_path, monkeypatch, capsys):
    from tokenbridge import pipeline

    def no_file(*args, **kwargs):
        raise FileExistsError("the cache file exists with an unexpected checksum")

    monkeypatch.setattr(pipeline, "_write_shards", no_file)
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out")
    line = one_line_error(code, err, "unexpected checksum")
    assert "error: :" not in line


def test_bad_config_vocab_size_is_reported_as_the_config(models_dir, tmp_path, capsys):
    source = copy(models_dir["llama"], tmp_path / "bad-config")
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = "many"
    (source / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "tokstats", source, "--text", source / "tokenizer.json")
    line = one_line_error(code, err, "config.json")
    assert "vocab_size" in line and "tokenizer does not parse" not in line


def test_non_contiguous_ids_name_the_tokenizer(tok_dirs, tmp_path, capsys):
    def gap(vocab):
        vocab[sorted(vocab, key=vocab.get)[-1]] += 5

    directory = _tokenizer_with(tok_dirs["byte_level"], tmp_path / "gap", gap)
    code, _, err = run(capsys, "tokstats", directory, "--text", directory / "tokenizer.json")
    line = one_line_error(code, err, "not contiguous")
    assert str(directory) in line


# -- scratch dirs: intermediate work that is never published ----------------------------------------------

def _temp_entries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if output_dir.TAG in p.name]


def test_scratch_dir_is_removed_on_success_and_on_failure(tmp_path):
    with output_dir.scratch_dir(tmp_path, "work") as work:
        (work / "file").write_text("x")
        assert work.parent == tmp_path and output_dir.TAG in work.name
    assert not work.exists() and _temp_entries(tmp_path) == []
    with pytest.raises(RuntimeError), output_dir.scratch_dir(tmp_path, "work") as work:
        (work / "file").write_text("x")
        raise RuntimeError("boom")
    assert not work.exists() and _temp_entries(tmp_path) == []


def test_scratch_dir_is_removed_when_a_signal_lands_as_it_is_made(tmp_path, monkeypatch):
    """A Ctrl-C landing just after the dir is made (inside ``temp_dir``) is held until its removal is in
    place, then delivered: the dir does not outlive the interrupt."""
    import signal

    real = output_dir.temp_dir

    def interrupted(parent, name, old=False):
        made = real(parent, name, old)
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(output_dir, "temp_dir", interrupted)
    # Python's own Ctrl-C handler, whatever an earlier test or library left installed (an ignored SIGINT
    # would never interrupt anything)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), output_dir.scratch_dir(tmp_path, "work"):
            raise AssertionError("the body ran although the interrupt came first")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _temp_entries(tmp_path) == []
