"""The naive way to score text, for bench/eval_limit.py: stock transformers, one window per forward pass.

Same windows and prefix as ``tokenbridge eval`` (windows of at most --window UTF-8 bytes on character
boundaries, BOS, else EOS, prepended), but nothing clever: AutoModelForCausalLM from a local directory,
one window per forward, log_softmax over the whole logits, the targets gathered.  Prints JSON.

    python bench/eval_naive.py MODEL_DIR FILE... [--window 1500]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

IMPORTED = time.perf_counter()


def windows(data: bytes, size: int) -> list[bytes]:
    out, start = [], 0
    while start < len(data):
        end = min(start + size, len(data))
        while 0 < end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        out.append(data[start:end])
        start = end
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--window", type=int, default=1500)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    files, lengths = [], []
    for path in args.files:
        data = open(path, "rb").read()
        nats, tokens = 0.0, 0
        for window in windows(data, args.window):
            ids = [prefix] + tokenizer(window.decode("utf-8"), add_special_tokens=False,
                                       split_special_tokens=True)["input_ids"]
            lengths.append(len(ids))
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1]
                logprobs = torch.log_softmax(logits, dim=-1)
                nats -= float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).double().sum())
            tokens += len(ids) - 1
        files.append({"file": path, "bytes": len(data), "tokens": tokens, "bits": nats / math.log(2)})
    done = time.perf_counter()
    total = sum(f["bytes"] for f in files)
    print(json.dumps({"bits_per_byte": sum(f["bits"] for f in files) / total, "files": files,
                      "window_lengths": lengths, "import_seconds": IMPORTED - STARTED,
                      "load_seconds": loaded - IMPORTED, "score_seconds": done - loaded,
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
