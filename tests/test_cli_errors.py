"""Bad input: one line naming the problem, exit code 2, nothing left in OUT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import read_tensors

from tokenbridge.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_dir: Path, needle: str):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenbridge: error: "), err
    assert needle in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if ".tokenbridge-" in p.name]


def copy_model(models_dir, tmp_path, family="llama") -> Path:
    return Path(shutil.copytree(models_dir[family], tmp_path / f"{family}-copy"))


def test_missing_path(capsys, models_dir, tmp_path):
    code, _, err = run(capsys, "transplant", tmp_path / "nope", models_dir["llama"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "no such file or directory")


def test_truncated_safetensors(capsys, models_dir, tmp_path):
    source = copy_model(models_dir, tmp_path)
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) - 100])
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "truncated or corrupt safetensors")


def test_corrupt_safetensors_header(capsys, models_dir, tmp_path):
    source = copy_model(models_dir, tmp_path)
    data = bytearray((source / "model.safetensors").read_bytes())
    data[8:20] = b"not json !!!"
    (source / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "corrupt safetensors header")


def test_corrupt_gguf(capsys, models_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    code, _, err = run(capsys, "transplant", bad, models_dir["llama"], tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "corrupt or truncated GGUF")
    code, _, err = run(capsys, "convert", bad, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "corrupt or truncated GGUF")


def test_truncated_real_gguf(capsys, models_dir, tmp_path):
    from tokenbridge.load.packaged import smollm2_gguf

    truncated = tmp_path / "smollm2-truncated.gguf"
    with open(smollm2_gguf(), "rb") as handle:
        truncated.write_bytes(handle.read(4 * 1024 * 1024))
    code, _, err = run(capsys, "transplant", models_dir["llama"], truncated, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "corrupt or truncated GGUF")


def test_tokenizer_that_does_not_parse(capsys, models_dir, tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "tokenizer.json").write_text("{ this is not a tokenizer")
    code, _, err = run(capsys, "transplant", models_dir["llama"], target / "tokenizer.json", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "tokenizer does not parse")


def test_empty_target_vocabulary(capsys, models_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    code, _, err = run(capsys, "transplant", models_dir["llama"], tmp_path / "tokenizer.json", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "vocabulary is empty")


def test_model_without_input_embeddings(capsys, models_dir, tmp_path):
    from safetensors.torch import save_file

    source = copy_model(models_dir, tmp_path)
    tensors = read_tensors(source)
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "no input embeddings")


def test_unknown_architecture(capsys, models_dir, tmp_path):
    source = copy_model(models_dir, tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "mystery"
    (source / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "architecture 'mystery' is not supported")


def test_unlisted_vocabulary_sized_tensor(capsys, models_dir, tmp_path):
    from safetensors.torch import save_file

    source = copy_model(models_dir, tmp_path)
    tensors = read_tensors(source)
    tensors["model.extra_vocab_bias"] = torch.zeros(tensors["model.embed_tokens.weight"].shape[0])
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "model.extra_vocab_bias")


def test_existing_output_needs_force(capsys, models_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], out)
    assert code == 2 and "exists and is not empty" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "user data"
    code, _, _ = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], out, "--force", "--quiet")
    assert code == 0 and not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], empty, "--quiet")
    assert code == 0 and (empty / "model.safetensors").is_file()


def test_output_inside_source_is_refused(capsys, models_dir, tmp_path):
    source = copy_model(models_dir, tmp_path)
    code, _, err = run(capsys, "transplant", source, source, source, "--force")
    assert code == 2 and "would overwrite an input" in err
    assert (source / "model.safetensors").is_file()


def test_pickle_checkpoint_refused_unless_allowed(capsys, models_dir, tmp_path):
    source = copy_model(models_dir, tmp_path)
    tensors = read_tensors(source)
    (source / "model.safetensors").unlink()
    torch.save(tensors, source / "pytorch_model.bin")
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "--allow-pickle")
    code, _, err = run(capsys, "transplant", source, source, tmp_path / "out", "--allow-pickle", "--quiet")
    assert code == 0, err
    after = read_tensors(tmp_path / "out")
    assert all(torch.equal(tensors[k], after[k]) for k in after)
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


def test_write_failing_midway_leaves_nothing(capsys, models_dir, tmp_path, monkeypatch):
    import tokenbridge.pipeline as pipeline

    real = pipeline.write_safetensors

    def fail_after_header(path, tensors, metadata=None, on_tensor=None):
        real(path, tensors[:1], metadata, on_tensor)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "write_safetensors", fail_after_header)
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out", "--quiet")
    assert_clean_failure(code, err, tmp_path / "out", "No space left on device")


def test_bad_method_option(capsys, models_dir, tmp_path):
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out",
                       "--method", "subword", "-o", "nonsense=1")
    assert_clean_failure(code, err, tmp_path / "out", "has no option 'nonsense'")
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], tmp_path / "out",
                       "--method", "magic")
    assert_clean_failure(code, err, tmp_path / "out", "unknown method 'magic'")


def test_real_process_exit_code_and_no_traceback(models_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tokenbridge", "transplant", str(tmp_path / "missing"),
                             str(models_dir["llama"]), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, "-m", "tokenbridge", "--debug", "transplant", str(tmp_path / "missing"),
                            str(models_dir["llama"]), str(tmp_path / "out")], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_json_output(capsys, models_dir, tok_dirs, tmp_path):
    code, out, _ = run(capsys, "transplant", models_dir["llama"], tok_dirs["metaspace"], tmp_path / "out",
                       "--json", "--quiet")
    assert code == 0
    data = json.loads(out)
    assert data["counts"]["initialised"] > 0 and data["method"] == "subword"
    assert data["out"] == str(tmp_path / "out")


def test_missing_output_parents_are_created(capsys, models_dir, tmp_path):
    out = tmp_path / "new" / "nested" / "model"
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], out, "--quiet")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "transplant", models_dir["llama"], models_dir["llama"], blocker / "model")
    assert code == 2 and "exists and is not a directory" in err
