"""``tokenbridge explain OUT TOKEN``: where a transplanted model's row for a token came from.

Reads ``OUT/tokenbridge.json`` (or a ``.gguf`` OUT's ``tokenbridge.provenance``).  TOKEN is a token of the target vocabulary as the
tokenizer writes it (``Ġthe``, ``▁the``), a target id with ``--id``, or any text, which
is then tokenized with OUT's tokenizer and every token explained.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TokenbridgeError
from .report import REPORT_NAME


def load_record(out: Path) -> dict:
    if Path(out).is_file() and Path(out).suffix == ".gguf":
        return _gguf_record(Path(out))
    path = Path(out) / REPORT_NAME
    if not path.is_file():
        raise TokenbridgeError(f"{out}: no {REPORT_NAME} (not a tokenbridge output directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenbridgeError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def _gguf_record(out: Path) -> dict:
    """A GGUF file's provenance: the ``tokenbridge.provenance`` string a transplant to ``.gguf`` writes."""
    from .load.gguf import read_gguf_header
    from .write.gguf import PROVENANCE_KEY

    text = read_gguf_header(out).value(PROVENANCE_KEY)
    if not isinstance(text, str):
        raise TokenbridgeError(f"{out}: no {PROVENANCE_KEY} (not written by tokenbridge transplant)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenbridgeError(f"{out}: {PROVENANCE_KEY} is not valid JSON ({error.msg})") from None


def _source_tokens(record: dict) -> list[str] | None:
    """The source tokenizer's token strings, when the source is still where the record says."""
    from .load.tokenizer import load_tokenizer
    from .load.model import resolve_source

    try:
        tokenizer = load_tokenizer(resolve_source(Path(record["source"])))
    except (TokenbridgeError, OSError):
        return None
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _target_ids(tokenizer, token: str, by_id: bool) -> list[int]:
    if by_id:
        try:
            ids = [int(part) for part in token.split(",")]
        except ValueError:
            raise TokenbridgeError(f"--id expects integer ids, got {token!r}") from None
        for i in ids:
            if not 0 <= i < len(tokenizer):
                raise TokenbridgeError(f"id {i} is outside the target vocabulary (0..{len(tokenizer) - 1})")
        return ids
    exact = tokenizer.convert_tokens_to_ids(token)
    if exact is not None and (exact != tokenizer.unk_token_id or token == tokenizer.unk_token):
        return [exact]
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TokenbridgeError(f"{token!r} is not a token of the target vocabulary and tokenizes to nothing")
    return ids


def explain(out, token: str, by_id: bool = False) -> list[dict]:
    """One entry per target token: its id, token, and for each matrix how its row was made."""
    out = Path(out)
    record = load_record(out)
    from .load.tokenizer import load_tokenizer

    target_tokenizer = load_tokenizer(out)
    ids = _target_ids(target_tokenizer, token, by_id)
    target_tokens = target_tokenizer.convert_ids_to_tokens(ids)
    source_tokens = _source_tokens(record)
    copied = {t: s for t, s in record["copied"]}
    specials = {s["target_id"]: s for s in record["specials"]}
    rows = {matrix: {row["target_id"]: row for row in entries if row["target_id"] in ids}
            for matrix, entries in record["initialised"].items()}

    def name(source_id: int) -> str | None:
        return source_tokens[source_id] if source_tokens and source_id < len(source_tokens) else None

    entries = []
    for target_id, text in zip(ids, target_tokens):
        entry = {"target_id": target_id, "token": text, "method": record["method"], "rows": {}}
        if target_id in copied:
            entry["rows"]["all"] = {"how": "copied (same bytes)", "sources": [
                {"source_id": copied[target_id], "source_token": name(copied[target_id]), "weight": 1.0}]}
        elif target_id in specials:
            match = specials[target_id]
            entry["rows"]["all"] = {"how": f"copied ({match['how']})", "sources": [
                {"source_id": match["source_id"], "source_token": match["source_token"], "weight": 1.0}]}
        else:
            for matrix, found in rows.items():
                row = found.get(target_id)
                if row is None:
                    continue
                sources = sorted(({"source_id": i, "source_token": name(i), "weight": w}
                                  for i, w in zip(row["source_ids"], row["weights"])),
                                 key=lambda s: -abs(s["weight"]))
                entry["rows"]["all" if record["tied"] else matrix] = {"how": row["how"], "sources": sources}
        entries.append(entry)
    return entries


def format_explanation(entries: list[dict], top: int = 12) -> str:
    lines = []
    for entry in entries:
        lines.append(f"target {entry['target_id']} {entry['token']!r}")
        for matrix, row in entry["rows"].items():
            label = "input and output rows" if matrix == "all" else f"{matrix} rows"
            lines.append(f"  {label}: {row['how']}" + ("" if row["sources"] else " (from no particular source row)"))
            for source in row["sources"][:top]:
                token = "" if source["source_token"] is None else f" {source['source_token']!r}"
                lines.append(f"    {source['weight']:+.4f}  source {source['source_id']}{token}")
            if len(row["sources"]) > top:
                rest = sum(abs(s["weight"]) for s in row["sources"][top:])
                lines.append(f"    ... {len(row['sources']) - top} more (total |weight| {rest:.4f})")
    return "\n".join(lines)
