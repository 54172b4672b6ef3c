"""Train, extend and prune tokenizers into directories; each reports compression before and after.

The CLI (``tokenbridge tokenizer train|extend|prune|bytes``), ``tokenbridge transplant
--train-tokenizer`` and ``tokenbridge transplant SOURCE bytes OUT`` call these functions.
Compression is measured with the tokstats instrument on the texts given, by the tokenizer as written
to disk (a byte tokenizer is given none: it has one token per byte).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TokenbridgeError
from ..load.tokenizer import load_tokenizer
from ..measure.texts import check_text, read_text, text_blocks
from ..write.output_dir import check_output, staged_output
from .bytes import BYTE_TOKENS, byte_tokenizer_json, check_one_token_per_byte
from .extend import extend_tokenizer
from .files import save_tokenizer, tokenizer_json
from .prune import prune_tokenizer
from .style import default_style, kept_specials, roles_of, special_token, style_of
from .train import TrainConfig, train_tokenizer

REPORT_FILE = "tokenbridge-tokenizer.json"
# What a byte tokenizer must encode one token per byte and decode back once written: every character
# below U+0300 (controls, Latin-1, the lead bytes of two-byte sequences), spaces, CJK, emoji, astral.
BYTE_PROBE = "".join(map(chr, range(1, 0x300))) + "  \n\n\t 東京 🚀 e\u0301 \U0010fffd "


@dataclass
class Compression:
    """Bytes per token of the tokenizer before (the source, if any) and after, on one text."""

    text: str
    bytes: int
    tokens_before: int | None
    tokens_after: int

    @property
    def before(self) -> float | None:
        return self.bytes / self.tokens_before if self.tokens_before else None

    @property
    def after(self) -> float:
        return self.bytes / self.tokens_after if self.tokens_after else float("nan")


@dataclass
class TokenizerReport:
    command: str  # train | extend | prune | bytes
    out: str
    source: str | None  # the --like / SOURCE tokenizer
    vocab_before: int | None
    vocab_after: int
    details: dict = field(default_factory=dict)
    compression: list[Compression] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, timings: bool = True) -> dict:
        """The report; without ``timings`` (what the output directory's file holds) the same for the same
        inputs, every time."""
        data = asdict(self)
        data["compression"] = [dict(asdict(c), bytes_per_token_before=c.before, bytes_per_token_after=c.after)
                               for c in self.compression]
        if not timings:
            del data["seconds"]
        return data


def _texts(paths: list[Path]) -> tuple[list[str], list[Path]]:
    """(names, paths) of the text files, each read through once to check that it is UTF-8 text."""
    if not paths:
        raise TokenbridgeError("give at least one --text file")
    files = [Path(p) for p in paths]
    for file in files:
        check_text(file)  # streamed: the error comes before any work, and no text is held
    return [str(p) for p in paths], files


def _compression(before, after, names: list[str], files: list[Path]) -> list[Compression]:
    """Bytes per token of ``before`` (None: no source) and ``after`` on each text file, by tokstats (streamed)."""
    from ..align.token_bytes import vocabulary
    from ..measure.tokstats import count_text

    def counts(tokenizer) -> list:
        vocab = vocabulary(tokenizer)  # seconds for a large vocabulary: once per tokenizer
        return [count_text(tokenizer, text_blocks(file), vocab) for file in files]

    old = [c.tokens for c in counts(before)] if before is not None else [None] * len(files)
    return [Compression(name, new.bytes, tokens_before, new.tokens)
            for name, new, tokens_before in zip(names, counts(after), old)]


def _publish(command: str, data: dict, out: Path, force: bool, roles: dict, chat_template: str | None,
             source, source_name: str | None, names: list[str], files: list[Path], details: dict,
             started: float, verify=None) -> TokenizerReport:
    """Write the tokenizer and its report to ``out`` (staged); ``verify(written)`` may refuse it first."""
    report = TokenizerReport(command, str(out), source_name, len(source) if source is not None else None, 0,
                             details)
    with staged_output(out, force) as tmp:
        save_tokenizer(data, tmp, roles, chat_template)
        written = load_tokenizer(tmp)
        if verify is not None:
            verify(written)
        report.vocab_after = len(written)
        report.compression = _compression(source, written, names, files) if files else []
        report.seconds = round(time.perf_counter() - started, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(report.summary(timings=False), indent=2, ensure_ascii=False)
                                       + "\n")
    return report


def train(text_paths: list[Path], out: Path, config: TrainConfig, like: Path | None = None,
          byte_fallback: bool = False, specials: list[str] = (), force: bool = False,
          progress: bool = True) -> TokenizerReport:
    """Train a tokenizer on the texts and write it to ``out``; ``like`` copies a tokenizer's conventions."""
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force, protected=[Path(p) for p in text_paths] + ([Path(like)] if like else []))
    names, files = _texts(text_paths)
    source = load_tokenizer(Path(like)) if like is not None else None
    style = style_of(source, str(like), byte_fallback or None) if source is not None \
        else default_style(byte_fallback, list(specials))
    if source is not None and specials:
        known = {a["content"] for a in style.specials}
        style.specials += [special_token(s) for s in specials if s not in known]
    data = train_tokenizer(files, config, style, progress)  # the files stream by, paragraph by paragraph
    details = {"config": asdict(config), "style": style.kind, "like": str(like) if like else None,
               "special_tokens": [a["content"] for a in style.specials]}
    return _publish("train", data, out, force, style.roles, style.chat_template, source,
                    str(like) if like else None, names, files, details, started)


def extend(source_path: Path, text_paths: list[Path], out: Path, add: int, min_frequency: int = 2,
           force: bool = False, progress: bool = True) -> TokenizerReport:
    """Append up to ``add`` tokens the texts need most to the tokenizer at ``source_path``."""
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force, protected=[Path(source_path), *map(Path, text_paths)])
    names, files = _texts(text_paths)
    texts = [read_text(file) for file in files]
    source = load_tokenizer(Path(source_path))
    data, added = extend_tokenizer(tokenizer_json(source), texts, add, min_frequency, progress)
    details = {"added": len(added), "first_ids": len(source), "new_tokens": added}
    return _publish("extend", data, out, force, roles_of(source), source.chat_template, source, str(source_path),
                    names, files, details, started)


def prune(source_path: Path, text_paths: list[Path], out: Path, keep: int, force: bool = False) -> TokenizerReport:
    """Keep ``keep`` tokens of the tokenizer at ``source_path``: those the texts need first."""
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force, protected=[Path(source_path), *map(Path, text_paths)])
    names, files = _texts(text_paths)
    texts = [read_text(file) for file in files]
    source = load_tokenizer(Path(source_path))
    pruned = prune_tokenizer(tokenizer_json(source), texts, keep)
    details = {"required": pruned.required, "needed_by_texts": pruned.needed, "kept": len(pruned.old_ids),
               "old_ids": pruned.old_ids}
    return _publish("prune", pruned.data, out, force, roles_of(source), source.chat_template, source,
                    str(source_path), names, files, details, started)


def byte_tokenizer(like: Path, out: Path, force: bool = False) -> TokenizerReport:
    """Write a byte tokenizer like ``like``'s to ``out``: the 256 bytes as ids 0..255, then its special tokens.

    The special tokens (placeholders like ``<unused17>`` left out), roles (bos, eos, pad, unk...),
    post-processor (a BOS it adds, with the new id) and chat template are ``like``'s.
    """
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force, protected=[Path(like)])
    source = load_tokenizer(Path(like))
    roles = roles_of(source)
    backend = source.backend_tokenizer
    added = [{"content": token.content, "special": token.special}
             for _, token in sorted(backend.get_added_tokens_decoder().items())]
    specials = [record["content"] for record in kept_specials(added, roles)]
    post_processor = json.loads(backend.post_processor.__getstate__()) if backend.post_processor else None
    data = byte_tokenizer_json(specials, post_processor)
    template = source.chat_template if isinstance(getattr(source, "chat_template", None), str) else None
    details = {"like": str(like), "byte_tokens": BYTE_TOKENS, "special_tokens": specials, "roles": roles,
               "chat_template": template is not None}
    return _publish("bytes", data, out, force, roles, template, source, str(like), [], [], details, started,
                    verify=lambda written: check_one_token_per_byte(written, BYTE_PROBE))


def format_report(report: TokenizerReport) -> str:
    from ..measure.tokstats import render_table

    lines = [f"wrote {report.out}: {report.command}, "
             + (f"{report.vocab_before} -> " if report.vocab_before is not None else "")
             + f"{report.vocab_after} tokens, {report.seconds:.1f} s"]
    if report.command == "bytes":
        specials = report.details["special_tokens"]
        lines.append(f"  {report.details['byte_tokens']} byte tokens (ids 0-255, one per byte) and "
                     f"{len(specials)} special tokens: {' '.join(specials)}")
    if not report.compression:
        return "\n".join(lines)
    headers = ["text", "bytes", "bytes/token before", "bytes/token after", "change"]
    rows = [[c.text, c.bytes, c.before, c.after,
             f"{(c.after / c.before - 1) * 100:+.1f}%" if c.before else None] for c in report.compression]
    lines.append(render_table(headers, rows, title="compression (bytes per token)"))
    return "\n".join(lines)
