"""Kill transplant, the GGUF conversion and heal part-way with SIGKILL and SIGTERM (issue 14).

After every kill OUT is either complete or absent; after the next run no temp dir is left, and a rerun
(or ``heal --resume``) gives exactly the uninterrupted result.  The moment of each kill is found by
watching the file system (the staging dir appearing, a file in it growing, a checkpoint appearing), so
the kills land where they are meant to, not at a guessed time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import corpus

TEMP = ".tokenbridge-"


def tokenbridge(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "tokenbridge", *map(str, args), "--quiet"], capture_output=True,
                          text=True, timeout=timeout, env=env)


def kill_when(args, sig, trigger, env=None, timeout=600) -> int:
    """Run ``tokenbridge ARGS``, send ``sig`` as soon as ``trigger()`` holds; the exit code (negative: killed)."""
    process = subprocess.Popen([sys.executable, "-m", "tokenbridge", *map(str, args), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if trigger():
            process.send_signal(sig)
            break
        time.sleep(0.002)
    _, err = process.communicate(timeout=timeout)
    if sig == signal.SIGTERM and process.returncode not in (0, -sig):
        assert process.returncode == 128 + sig and err.decode().strip() == "tokenbridge: stopped by SIGTERM", err
    return process.returncode


def temps(directory: Path) -> list[Path]:
    return [p for p in Path(directory).iterdir() if TEMP in p.name] if Path(directory).is_dir() else []


def staged(parent: Path, name: str, file: str | None = None, size: int = 0):
    """A trigger: OUT's staging dir exists (and holds ``file`` of at least ``size`` bytes)."""
    def trigger() -> bool:
        for tmp in temps(parent):
            if tmp.name.startswith(f".{name}{TEMP}") and (file is None or (
                    (tmp / file).is_file() and (tmp / file).stat().st_size >= size)):
                return True
        return False
    return trigger


def digests(directory: Path, skip=()) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.name not in skip}


# -- transplant ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir():
    from tokenbridge.load.model import resolve_source
    from tokenbridge.load.packaged import smollm2_gguf

    return resolve_source(smollm2_gguf())  # the converted SmolLM2-135M (538 MB of float32)


@pytest.fixture(scope="module")
def transplant_reference(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    result = tokenbridge("transplant", smollm2_dir, smollm2_dir, out)
    assert result.returncode == 0, result.stderr
    return digests(out)


MOMENTS = {  # when, in a transplant of SmolLM2 onto its own tokenizer, the signal is sent
    "staging dir made": lambda parent: staged(parent, "out"),
    "mid-write": lambda parent: staged(parent, "out", "model.safetensors", 64 << 20),
    "report written": lambda parent: staged(parent, "out", "tokenbridge.json", 1),
}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_killed_transplant_leaves_out_complete_or_absent(smollm2_dir, transplant_reference, tmp_path, sig, moment):
    out = tmp_path / "out"
    kill_when(["transplant", smollm2_dir, smollm2_dir, out], sig, MOMENTS[moment](tmp_path))
    assert not out.exists() or digests(out) == transplant_reference
    if sig == signal.SIGTERM:
        assert not temps(tmp_path)  # SIGTERM gets the cleanup of Ctrl-C
    rerun = tokenbridge("transplant", smollm2_dir, smollm2_dir, out, "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert digests(out) == transplant_reference
    assert not temps(tmp_path)


def test_killed_force_replace_keeps_the_old_out_or_the_new(smollm2_dir, transplant_reference, tmp_path):
    out = tmp_path / "out"
    for trigger in (staged(tmp_path, "out", "model.safetensors", 64 << 20), staged(tmp_path, "out", "tokenbridge.json", 1)):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "old-model.txt").write_text("the user's previous model")
        kill_when(["transplant", smollm2_dir, smollm2_dir, out, "--force"], signal.SIGKILL, trigger)
        old = sorted(p.name for p in out.iterdir()) == ["old-model.txt"]
        assert old or digests(out) == transplant_reference
    rerun = tokenbridge("transplant", smollm2_dir, smollm2_dir, out, "--force")
    assert rerun.returncode == 0 and digests(out) == transplant_reference
    assert not temps(tmp_path)


# -- the GGUF conversion ------------------------------------------------------------------------------

def test_killed_gguf_conversion_and_cache_entry(smollm2_dir, tmp_path):
    from tokenbridge.load.packaged import smollm2_gguf
    from tokenbridge.write.manifest import MANIFEST_NAME

    gguf = smollm2_gguf()
    reference = digests(smollm2_dir, skip=(MANIFEST_NAME,))
    out = tmp_path / "out"
    for sig, trigger in ((signal.SIGKILL, staged(tmp_path, "out", "model.safetensors", 64 << 20)),
                         (signal.SIGTERM, staged(tmp_path, "out"))):
        kill_when(["convert", gguf, out], sig, trigger)
        assert not out.exists() or digests(out) == reference
    rerun = tokenbridge("convert", gguf, out, "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert digests(out) == reference and not temps(tmp_path)

    # the same conversion as a cache entry, reached through a command that reads the GGUF (eval: the
    # cheapest one to finish; transplant and heal go through the same cached_model_dir)
    cache = tmp_path / "cache"
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(cache)}
    entries = cache / "gguf"
    text = tmp_path / "text.txt"
    text.write_text(corpus("en", 20000, 400), encoding="utf-8")
    kill_when(["eval", gguf, "--text", text], signal.SIGKILL,
              lambda: any((t / "model.safetensors").is_file() for t in temps(entries)), env=env)
    assert temps(entries) and not any(entries.glob("[!.]*"))  # a killed conversion's staging dir is left ...
    rerun = tokenbridge("eval", gguf, "--text", text, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert not temps(entries)  # ... and swept by the next run
    (entry,) = entries.iterdir()
    assert digests(entry, skip=(MANIFEST_NAME,)) == reference


# -- heal ------------------------------------------------------------------------------------------------

HEAL = ["--steps", 8, "--batch-size", 1, "--window", 200, "--checkpoint-every", 1, "--seed", 2]


@pytest.fixture(scope="module")
def heal_setup(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("heal-reference")
    text = root / "train.txt"
    text.write_text(corpus("en", 30000, 8000), encoding="utf-8")
    out = root / "out"
    result = tokenbridge("heal", models_dir["llama"], "--text", text, "--out", out, *HEAL)
    assert result.returncode == 0, result.stderr
    return {"student": models_dir["llama"], "text": text, "reference": digests(out)}


def _checkpoint(out: Path, step: int):
    return lambda: (Path(f"{out}.checkpoints") / f"step-{step:08d}").is_dir()


def _checkpoint_being_written(out: Path, step: int):
    return lambda: any(t.name.startswith(f".step-{step:08d}{TEMP}") for t in temps(Path(f"{out}.checkpoints")))


def after(seconds: float):
    started = []

    def trigger() -> bool:
        started.append(time.monotonic())
        return started[-1] - started[0] >= seconds
    return trigger


HEAL_MOMENTS = {
    "loading": lambda out: after(1.5),
    "mid-checkpoint": lambda out: _checkpoint_being_written(out, 3),
    "after a checkpoint": lambda out: _checkpoint(out, 5),
    "writing OUT": lambda out: staged(out.parent, out.name),
}


@pytest.mark.parametrize("sig, moment", [(signal.SIGKILL, m) for m in HEAL_MOMENTS]
                         + [(signal.SIGTERM, "after a checkpoint"), (signal.SIGTERM, "writing OUT")],
                         ids=lambda x: getattr(x, "name", x))
def test_killed_heal_resumes_to_the_uninterrupted_result(heal_setup, tmp_path, sig, moment):
    out = tmp_path / "out"
    command = ["heal", heal_setup["student"], "--text", heal_setup["text"], "--out", out, *HEAL]
    kill_when(command, sig, HEAL_MOMENTS[moment](out))
    assert not out.exists() or digests(out) == heal_setup["reference"]
    checkpoints = Path(f"{out}.checkpoints")
    resumable = checkpoints.is_dir() and any(checkpoints.glob("step-*"))
    # a finished OUT is not resumed but replaced; a run with checkpoints resumes; one without starts again
    again = tokenbridge(*command, *(["--force"] if out.exists() else ["--resume"] if resumable else []))
    assert again.returncode == 0, again.stderr
    assert digests(out) == heal_setup["reference"]
    assert not temps(tmp_path) and not temps(checkpoints)
