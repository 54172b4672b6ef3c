"""compare: every method transplanted and scored on the same bytes as the original."""

from __future__ import annotations

import json

import pytest
from conftest import corpus

from tokenbridge import transplant
from tokenbridge.errors import TokenbridgeError
from tokenbridge.measure.bpb import evaluate
from tokenbridge.measure.compare import compare


@pytest.fixture()
def texts(tmp_path):
    paths = []
    for lang in ("en", "de"):
        path = tmp_path / f"debref.{lang}.txt"
        path.write_text(corpus(lang, 9000, 1500), encoding="utf-8")
        paths.append(path)
    return paths


def test_compare_report(models_dir, tok_dirs, texts, tmp_path):
    source = models_dir["llama"]
    report = compare(source, tok_dirs["metaspace_de"], ["mean", "subword"], texts, tmp_path / "report",
                     window=400, progress=False)
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "bpb.png"}
    assert (out / "bpb.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "report.json").read_text()) == report
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["original"]["files"]["debref.en.txt"]["ratio"] == 1.0
    # Independent path: transplant in this process, score it, compare with the report's numbers.
    model, _ = transplant(source, tok_dirs["metaspace_de"], tmp_path / "check", method="subword", progress=False)
    direct = evaluate(model, texts, window=400, progress=False)
    assert rows["subword"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-9)
    original = evaluate(source, texts, window=400, progress=False)
    en = rows["subword"]["files"]["debref.en.txt"]
    assert en["ratio"] == pytest.approx(direct.files[0].bits_per_byte / original.files[0].bits_per_byte)
    for row in report["rows"][1:]:
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0
        assert sum(f["bytes"] for f in row["files"].values()) == sum(len(p.read_bytes()) for p in texts)
    markdown = (out / "report.md").read_text()
    best = min(("mean", "subword"), key=lambda m: rows[m]["bits_per_byte"])
    best_line = next(line for line in markdown.splitlines() if line.startswith(f"| {best} |"))
    assert best_line.count("**") >= 2


def test_compare_refuses_unknown_method_and_existing_output(models_dir, tok_dirs, texts, tmp_path):
    with pytest.raises(TokenbridgeError, match="unknown method"):
        compare(models_dir["llama"], tok_dirs["metaspace"], ["nope"], texts, tmp_path / "r", progress=False)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    with pytest.raises(TokenbridgeError, match="not empty"):
        compare(models_dir["llama"], tok_dirs["metaspace"], ["mean"], texts, tmp_path / "r", progress=False)
