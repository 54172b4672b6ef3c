"""Tokenizer-independent bits per byte.

The text is cut into windows of at most ``window`` UTF-8 bytes, on character
boundaries, before any tokenizer sees it, so every model is scored over exactly
the same bytes whatever its vocabulary.  Each window is tokenized by the model's
own tokenizer (special-token strings in the text count as text) and one prefix
token is prepended: the tokenizer's BOS, or its EOS where it has no BOS (GPT-2
style), the same rule for every model.  Every token of the window is then
predicted, the first one from the prefix alone, so the negative log-likelihood
covers all of the window's bytes:

    bits per byte = sum over windows of NLL(window tokens | prefix) / ln 2  /  total UTF-8 bytes
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TokenbridgeError
from ..load.model import check_context, context_length, load_causal_lm  # noqa: F401 (re-exported)
from .lean import lean_body
from .texts import read_text

DEFAULT_WINDOW = 2048
LOGITS_BUDGET = 1 << 23  # float32 logits elements computed at once (32 MiB)


def _boundary_at_or_before(data: bytes, index: int) -> int:
    """The largest UTF-8 character boundary of ``data`` that is at most ``index``."""
    while 0 < index < len(data) and (data[index] & 0xC0) == 0x80:
        index -= 1
    return index


def cut_text(data: bytes, limit: int | None) -> bytes:
    """The first ``limit`` bytes of ``data``, moved back to a UTF-8 character boundary."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TokenbridgeError(f"--bytes must be a positive whole number of bytes, not {limit!r}")
    if limit is None or limit >= len(data):
        return data
    return data[:_boundary_at_or_before(data, limit)]


def byte_windows(data: bytes, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``data`` in order, each at most ``size`` bytes, on character boundaries."""
    if size < 4:
        raise TokenbridgeError("the window must be at least 4 bytes (one UTF-8 character)")
    windows = []
    start = 0
    while start < len(data):
        end = _boundary_at_or_before(data, min(start + size, len(data)))
        windows.append((start, end))
        start = end
    return windows


def prefix_token(tokenizer, rule: str = "auto") -> tuple[int, str]:
    """The token prepended to every window: ``auto`` = BOS, else EOS; or ``bos``/``eos`` explicitly."""
    candidates = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    if rule == "auto":
        order = ["bos", "eos"]
    elif rule in candidates:
        order = [rule]
    else:
        raise TokenbridgeError(f"unknown prefix rule {rule!r} (auto, bos or eos)")
    for name in order:
        if candidates[name] is not None:
            index = int(candidates[name])
            return index, f"{tokenizer.convert_ids_to_tokens(index)} (id {index}, the tokenizer's {name})"
    raise TokenbridgeError("the tokenizer has no BOS or EOS token to condition the first token of a window on")


@dataclass
class FileScore:
    """Bits per byte of one file."""

    file: str
    bytes: int
    tokens: int
    windows: int
    bits: float
    seconds: float

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(bits_per_byte=self.bits_per_byte, bytes_per_token=self.bytes_per_token,
                    tokens_per_second=self.tokens_per_second)
        return data


@dataclass
class EvalResult:
    model: str
    prefix: str
    window_bytes: int
    files: list[FileScore] = field(default_factory=list)

    @property
    def bits_per_byte(self) -> float:
        total = sum(f.bytes for f in self.files)
        return sum(f.bits for f in self.files) / total if total else float("nan")

    def by_file(self) -> dict[str, FileScore]:
        return {f.file: f for f in self.files}

    def to_dict(self) -> dict:
        return {"model": self.model, "prefix": self.prefix, "window_bytes": self.window_bytes,
                "bits_per_byte": self.bits_per_byte, "files": [f.to_dict() for f in self.files]}


# Model types whose causal-LM logits are exactly ``lm_head(base_model(ids).last_hidden_state)``, then (the
# Gemma 2/3 families) ``final_logit_softcapping`` when the config sets it: the scorer runs the body itself
# and the head chunk by chunk, so the full-vocabulary logits of a window never exist at once.  Any other model
# (or a wrapped one: PEFT, FSDP, a replaced head) is scored through its own forward instead.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2",
                              "phi3", "olmo2", "smollm3"})
SOFTCAPPED_TYPES = frozenset({"gemma2", "gemma3_text"})
BATCH_TOKENS = 4096  # positions per forward pass when several windows have the same length


def split_head(model):
    """``(body, head, softcap)`` when ``model``'s logits are ``head(body(...).last_hidden_state)`` (then
    soft-capped by ``softcap`` when it is not None), else None."""
    cls = type(model)
    if not cls.__module__.startswith("transformers.models.") or not cls.__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    config = model.config
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", model)
    if type(head) is not torch.nn.Linear or body is model:
        return None
    softcap = getattr(config, "final_logit_softcapping", None) if config.model_type in SOFTCAPPED_TYPES else None
    return body, head, softcap


def token_nll(logits: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = logsumexp(logits[i]) - logits[i, targets[i]]`` (float32), i.e. ``-log_softmax`` at the target."""
    logits = logits.float()
    torch.logsumexp(logits, dim=-1, out=out)
    out.sub_(logits.gather(1, targets[:, None])[:, 0])


class Scorer:
    """Scores windows of text with one causal LM and its tokenizer.

    The Llama family's body runs as :mod:`.lean` (same results, fewer kernels).  Windows are run without
    padding or attention masks: those of the same token length share a forward pass
    (at most ``BATCH_TOKENS`` positions), any other one runs alone.  The output head and the log-softmax are
    applied to at most ``logits_budget`` float32 logits at a time (rows of the batch), and only each target's
    ``logsumexp - logit`` is kept.
    """

    def __init__(self, model, tokenizer, prefix: str = "auto", logits_budget: int = LOGITS_BUDGET,
                 batch_tokens: int = BATCH_TOKENS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefix_id, self.prefix = prefix_token(tokenizer, prefix)
        self.logits_budget = logits_budget
        self.batch_tokens = batch_tokens
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.context = context_length(model.config)
        self.split = split_head(model)
        self.lean = lean_body(model) if self.split is not None else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [[self.prefix_id] + list(ids) for ids in encoded]

    def _batches(self, sequences: list[list[int]]):
        """Lists of indices of ``sequences``: equal lengths only, longest first."""
        by_length: dict[int, list[int]] = {}
        for index, sequence in enumerate(sequences):
            by_length.setdefault(len(sequence), []).append(index)
        for length in sorted(by_length, reverse=True):
            members = by_length[length]
            size = max(1, self.batch_tokens // length)
            if self.split is None:  # the model's own forward makes the batch's full logits
                size = min(size, max(1, self.logits_budget // (length * self.vocab)))
            for start in range(0, len(members), size):
                yield members[start:start + size]

    def _window_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-position ``-ln p(ids[:, t + 1] | ids[:, :t + 1])`` for a batch of unpadded windows, float32."""
        batch, length = ids.shape
        targets = ids[:, 1:].reshape(-1)
        out = torch.empty(targets.shape[0], dtype=torch.float32)
        rows = max(1, self.logits_budget // self.vocab)
        if self.split is None:
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            for start in range(0, targets.shape[0], rows):
                token_nll(logits[start:start + rows], targets[start:start + rows], out[start:start + rows])
            return out.view(batch, length - 1)
        body, head, softcap = self.split
        if self.lean is not None:
            hidden = self.lean(ids)[:, :-1]
        else:
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for start in range(0, targets.shape[0], rows):
            logits = head(hidden[start:start + rows])
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            token_nll(logits, targets[start:start + rows], out[start:start + rows])
        return out.view(batch, length - 1)

    def nll(self, sequences: list[list[int]]) -> list[float]:
        """Sum of ``-ln p(token | previous)`` over every token after the prefix, per sequence (nats)."""
        longest = max(len(s) for s in sequences)
        check_context(longest, self.context)
        result = [0.0] * len(sequences)
        with torch.inference_mode():
            for members in self._batches(sequences):
                if len(sequences[members[0]]) < 2:  # a window of no tokens (only the prefix) costs nothing
                    continue
                ids = torch.tensor([sequences[index] for index in members], dtype=torch.long)
                losses = self._window_nll(ids).double().sum(dim=1)
                for row, index in enumerate(members):
                    result[index] = float(losses[row])
        return result

    def score_file(self, name: str, data: bytes, window: int) -> FileScore:
        spans = byte_windows(data, window)
        texts = [data[a:b].decode("utf-8") for a, b in spans]
        started = time.perf_counter()
        sequences = self.encode(texts)
        nats = self.nll(sequences) if sequences else []
        seconds = time.perf_counter() - started
        tokens = sum(len(s) - 1 for s in sequences)
        return FileScore(name, len(data), tokens, len(spans), sum(nats) / math.log(2), seconds)


def read_texts(paths: list[Path], limit: int | None) -> dict[str, bytes]:
    """``{path: the first limit bytes of the file}`` for UTF-8 text files."""
    return {str(path): cut_text(read_text(Path(path)).encode("utf-8"), limit) for path in paths}


def evaluate(model_path, text_paths: list[Path], limit: int | None = None, window: int = DEFAULT_WINDOW,
             prefix: str = "auto", progress: bool = True, allow_pickle: bool = False) -> EvalResult:
    """Bits per byte of a causal LM on each file (the first ``limit`` bytes of each)."""
    texts = read_texts(text_paths, limit)
    byte_windows(b"", window)  # the window is checked before the model is loaded
    model, tokenizer = load_causal_lm(model_path, allow_pickle=allow_pickle)
    scorer = Scorer(model, tokenizer, prefix)
    result = EvalResult(str(model_path), scorer.prefix, window)
    for name, data in tqdm(texts.items(), desc="scoring", unit="file", disable=not progress):
        result.files.append(scorer.score_file(name, data, window))
    return result


def format_result(result: EvalResult) -> str:
    lines = [f"{result.model}: {result.bits_per_byte:.4f} bits per byte",
             f"  windows of at most {result.window_bytes} bytes; prepended {result.prefix} to every window",
             f"  {'file':40s} {'bytes':>8s} {'tokens':>7s} {'bytes/tok':>9s} {'BPB':>7s} {'tok/s':>7s}"]
    for f in result.files:
        lines.append(f"  {Path(f.file).name:40s} {f.bytes:8d} {f.tokens:7d} {f.bytes_per_token:9.3f} "
                     f"{f.bits_per_byte:7.4f} {f.tokens_per_second:7.0f}")
    return "\n".join(lines)
