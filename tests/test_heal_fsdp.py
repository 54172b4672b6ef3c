"""heal --fsdp (FSDP2 over gloo on this CPU): two sharded processes give one process's losses and weights,
a stopped run resumes exactly (on the same or another process count), OUT is a normal model, and the
report says the run was sharded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import corpus, read_tensors

from tokenbridge import transplant
from tokenbridge.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def pair(models_dir, tmp_path_factory):
    """The untied tiny Qwen2 transplanted onto the metaspace tokenizer, and a training text."""
    root = tmp_path_factory.mktemp("fsdp")
    student, _ = transplant(models_dir["qwen2"], models_dir["gemma3"], root / "student", method="subword",
                            progress=False)
    text = root / "train.txt"
    text.write_text(corpus("en", 30000, 6000), encoding="utf-8")
    tied, _ = transplant(models_dir["llama"], models_dir["gemma3"], root / "tied", method="subword", progress=False)
    return {"teacher": models_dir["qwen2"], "student": student, "text": text, "tied": tied}


def _common(pair, mode: str, train: str, steps: int = 3) -> list[str]:
    args = [str(pair["student"]), "--text", str(pair["text"]), "--steps", str(steps), "--window", "160", "--quiet",
            "--lr", "1e-2", "--warmup", "1", "--mode", mode, "--train", train]
    return args + (["--teacher", str(pair["teacher"])] if mode != "sft" and mode != "embeddings" else [])


def _launch(processes: int, port: int, args: list[str]) -> subprocess.CompletedProcess:
    """``tokenbridge heal ARGS`` under torchrun (or plainly, for one process)."""
    if processes == 1:
        command = [sys.executable, "-m", "tokenbridge", "heal", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), "-m", "tokenbridge", "heal", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def _losses(out) -> list[float]:
    return [v for _, v in json.loads((out / "tokenbridge-heal.json").read_text())["losses"]]


@pytest.mark.parametrize("mode,train,port", [("sft", "all", 29561), ("alm+sft", "lora", 29562),
                                             ("embeddings", "new-rows", 29563)])
def test_two_sharded_processes_match_one(pair, tmp_path, mode, train, port):
    """The global batch is the same (2 windows: 2 on one process, 1 on each of two), so FSDP's
    reduce-scattered gradients give the unsharded run's losses and weights."""
    single = tmp_path / "single"
    assert main(["heal", *_common(pair, mode, train), "--out", str(single), "--batch-size", "2",
                 "--checkpoint-every", "0"]) == 0
    double = tmp_path / "double"
    run = _launch(2, port, [*_common(pair, mode, train), "--out", str(double), "--batch-size", "1",
                            "--checkpoint-every", "0", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-5, abs=1e-6)
    a, b = read_tensors(single), read_tensors(double)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    report = json.loads((double / "tokenbridge-heal.json").read_text())
    assert report["sharded"] is True and report["processes"] == 2
    assert json.loads((single / "tokenbridge-heal.json").read_text())["sharded"] is False
    if train == "new-rows":  # the copied rows are exactly the transplant's, on both shards
        before = read_tensors(pair["student"])
        rows = {r["target_id"] for r in json.loads((pair["student"] / "tokenbridge.json").read_text())
                ["initialised"]["input"]}
        old = [i for i in range(before["lm_head.weight"].shape[0]) if i not in rows]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(before[name][old], b[name][old]), name
            assert not torch.equal(before[name], b[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(double))  # a normal model directory
    assert model.get_input_embeddings().weight.shape[0] == a["model.embed_tokens.weight"].shape[0]


def test_tied_embeddings_stay_one_matrix_under_fsdp(pair, tmp_path):
    """A tied student (Llama): the sharded run trains one matrix, as the unsharded one does, and writes it tied."""
    tied = dict(pair, student=pair["tied"])
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["heal", *_common(tied, "sft", "all"), "--out", str(single), "--batch-size", "2",
                 "--checkpoint-every", "0"]) == 0
    run = _launch(2, 29567, [*_common(tied, "sft", "all"), "--out", str(double), "--batch-size", "1",
                             "--checkpoint-every", "0", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = read_tensors(single), read_tensors(double)
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(double))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_a_stopped_sharded_run_resumes_exactly(pair, tmp_path):
    """Stopped after step 1 and resumed on two processes: the weights of an uninterrupted run, bit for bit."""
    args = _common(pair, "alm+sft", "lora")
    whole = tmp_path / "whole"
    run = _launch(2, 29564, [*args, "--out", str(whole), "--batch-size", "1", "--checkpoint-every", "0", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    parts = tmp_path / "parts"
    run = _launch(2, 29565, [*args, "--out", str(parts), "--batch-size", "1", "--checkpoint-every", "1",
                             "--stop-after", "1", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = sorted((tmp_path / "parts.checkpoints").glob("step-*"))
    assert [c.name for c in checkpoint] == ["step-00000001"] and not parts.exists()
    state = json.loads((checkpoint[0] / "state.json").read_text())
    assert state["sharded"] == 2
    # the checkpoint is sharded: resuming without --fsdp is refused in one line
    run = _launch(1, 0, [*args, "--out", str(parts), "--batch-size", "1", "--checkpoint-every", "1", "--resume"])
    assert run.returncode == 2 and "made with --fsdp over 2 processes" in run.stderr, run.stderr[-2000:]
    run = _launch(2, 29566, [*args, "--out", str(parts), "--batch-size", "1", "--checkpoint-every", "1",
                             "--resume", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = read_tensors(whole), read_tensors(parts)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(parts) == _losses(whole)


def test_a_corrupt_sharded_checkpoint_is_refused(pair, tmp_path):
    args = _common(pair, "sft", "all", steps=2)
    run = _launch(1, 0, [*args, "--out", str(tmp_path / "out"), "--batch-size", "2", "--checkpoint-every", "1",
                         "--stop-after", "1", "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    step = next((tmp_path / "out.checkpoints").glob("step-*"))
    shard = max((step / "shards").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = _launch(1, 0, [*args, "--out", str(tmp_path / "out"), "--batch-size", "2", "--checkpoint-every", "1",
                         "--resume", "--fsdp"])
    assert run.returncode == 2 and "checkpoint is corrupt" in run.stderr, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,message", [(["--mode", "dskd"], "--fsdp cannot run --mode dskd"),
                                           (["--mode", "alm+sft", "--balance", "gradmag"], "--balance gradmag")])
def test_what_fsdp_cannot_run_is_refused(pair, tmp_path, capsys, extra, message):
    args = [str(pair["student"]), "--teacher", str(pair["teacher"]), "--text", str(pair["text"]), "--steps", "1",
            "--out", str(tmp_path / "out"), "--quiet", "--fsdp", *extra]
    assert main(["heal", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_accelerate_fsdp2_config_gives_its_settings_and_fsdp1_is_refused():
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    from tokenbridge.errors import TokenbridgeError
    from tokenbridge.heal.shard import plugin_settings

    def accelerator(plugin, kind="FSDP"):
        return SimpleNamespace(distributed_type=SimpleNamespace(value=kind), state=SimpleNamespace(fsdp_plugin=plugin))

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True, reshard_after_forward=False)
    settings = plugin_settings(accelerator(plugin))
    assert settings["reshard_after_forward"] is False and isinstance(settings["offload_policy"], CPUOffloadPolicy)
    assert plugin_settings(accelerator(plugin, kind="MULTI_GPU")) == {}
    with pytest.raises(TokenbridgeError, match="FSDP version 1"):
        plugin_settings(accelerator(FullyShardedDataParallelPlugin(fsdp_version=1)))
