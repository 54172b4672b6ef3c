"""Transplant a model whose weights are larger than this machine's RAM.

Builds a synthetic Llama checkpoint (random float32 weights, 7B-like shapes, sharded like a Hugging Face
checkpoint) with SmolLM2's tokenizer. It moves that checkpoint onto the Gemma-3 tokenizer with
`tokenbridge transplant` in a fresh subprocess, and reports the checkpoint size, peak RSS and wall time.
It then checks, shard by shard, that every non-vocabulary tensor was copied byte for byte. Both
directories are deleted at the end unless --keep is given.

    python bench/larger_than_ram.py [--layers 32] [--hidden 4096] [--workdir /work/bench-tmp]

It needs about 2.2x the checkpoint size in free disk space.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def build_checkpoint(directory: Path, tokenizer_dir: Path, layers: int, hidden: int, vocab: int,
                     shard_bytes: int = 2 << 30) -> int:
    """Write a random float32 Llama checkpoint in shards of about ``shard_bytes``. Returns its size in bytes."""
    intermediate = int(hidden * 2.6875)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            for proj in ("q", "k", "v", "o"):
                yield p + f"self_attn.{proj}_proj.weight", (hidden, hidden)
            yield p + "mlp.gate_proj.weight", (intermediate, hidden)
            yield p + "mlp.up_proj.weight", (intermediate, hidden)
            yield p + "mlp.down_proj.weight", (hidden, intermediate)
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    shard, shard_size, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

    for name, shape in tensors():
        value = torch.randn(shape, generator=generator) * 0.02
        size = value.numel() * 4
        if shard_size + size > shard_bytes:
            flush()
        shard[name] = value
        shard_size += size
        total += size
    flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def verify_copied(source: Path, out: Path) -> int:
    """Compare every non-vocabulary tensor byte for byte. Returns how many were compared."""
    source_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    out_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    vocab_names = {"model.embed_tokens.weight", "lm_head.weight"}
    compared = 0
    for shard in sorted(set(source_map.values())):
        names = [n for n, s in source_map.items() if s == shard and n not in vocab_names]
        with safe_open(str(source / shard), "pt") as a, safe_open(str(out / out_map[names[0]]), "pt") as b:
            for name in names:
                if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                    raise SystemExit(f"tensor {name} differs")
                compared += 1
    return compared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-tmp"))
    parser.add_argument("--method", default="subword")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()

    from tokenbridge.load.packaged import gemma3_gguf, smollm2_gguf
    from tokenbridge.load.tokenizer import tokenizer_dir

    source_tokenizer = tokenizer_dir(smollm2_gguf())
    target_tokenizer = tokenizer_dir(gemma3_gguf())
    vocab = len(json.loads((source_tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists; remove it first")
    source, out = args.workdir / "source", args.workdir / "out"
    try:
        started = time.perf_counter()
        size = build_checkpoint(source, source_tokenizer, args.layers, args.hidden, vocab)
        build_seconds = time.perf_counter() - started
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"synthetic checkpoint: {size / 2**30:.1f} GiB in {build_seconds:.0f} s; RAM {ram / 2**30:.1f} GiB",
              flush=True)
        # GNU time reports the child's own peak; ru_maxrss of children would include this process's peak,
        # which Linux carries over into a forked child.
        peak_file = args.workdir / "peak_kb"
        command = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), sys.executable, "-m", "tokenbridge",
                   "transplant", str(source), str(target_tokenizer), str(out), "--method", args.method, "--quiet"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        peak = int(peak_file.read_text().split()[-1]) / 1024
        compared = verify_copied(source, out)
        out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        numbers = {
            "checkpoint_gib": round(size / 2**30, 2), "output_gib": round(out_size / 2**30, 2),
            "ram_gib": round(ram / 2**30, 1), "layers": args.layers, "hidden": args.hidden,
            "method": args.method, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 1024, 2),
            "tensors_verified_identical": compared,
            "vocab_matrices_fp32_gib": round((2 * vocab + 2 * 262144) * args.hidden * 4 / 2**30, 2),
        }
        print(json.dumps(numbers, indent=2))
        if args.json:
            args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
