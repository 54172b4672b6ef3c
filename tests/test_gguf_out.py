"""GGUF out (issue 18): ``tokenbridge export`` and ``transplant ... OUT.gguf``.

Tiny random models (built here from configs, width 64 so most rows are whole quantisation blocks,
FFN width 80 so ``ffn_down`` is not and falls back to F16) are exported, read back by transformers'
own GGUF loader (``gguf_file=``) and compared with the Hugging Face model: logits, tokenizers.
GGUF sources for the GGUF-to-GGUF transplant are made with the export itself (q8_0, q4_0).

Measured logit errors (max |GGUF - HF| / max |HF| over 40 tokens), against the bounds asserted. A
type's step is the worst error of one weight relative to the largest weight of its block (f16: of the
weight itself): f16 2^-11, q8_0 1/254 (rounding to 255 levels), q4_0 1/16 (16 levels).

=========================  ==================  ===================================================
                           measured            bound
=========================  ==================  ===================================================
export f32                 0 (all four)        1e-5: the same float32 weights, permuted back exactly
export f16                 3.5e-4 .. 1.1e-3    16 steps = 7.8e-3 (every matrix rounded)
export q8_0                9.1e-3 .. 2.6e-2    16 steps = 6.3e-2
GGUF transplant q8_0       2.6e-3 .. 3.4e-3    4 steps = 1.6e-2 (only the new rows are quantised;
GGUF transplant q4_0       3.8e-2 .. 6.4e-2    4 steps = 0.25   the rest is the same dequantised source)
=========================  ==================  ===================================================
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPORA, corpus, tiny_config

from tokenbridge.cli import main
from tokenbridge.load.gguf import read_gguf_header
from tokenbridge.load.tokenizer import load_tokenizer

# The worst error of one weight, relative to the largest weight of its block (f16: of itself).
STEP = {"f32": 0.0, "f16": 2.0 ** -11, "q8_0": 1 / 254, "q4_0": 1 / 16}
# An export quantises every matrix (some fifteen of them, their errors adding up through the layers): 16 steps.
BOUNDS = {kind: max(1e-5, 16 * step) for kind, step in STEP.items()}
# A GGUF-to-GGUF transplant quantises only the new rows of the embedding (and head): 4 steps.
TRANSPLANT_BOUNDS = {kind: 4 * step for kind, step in STEP.items()}
FAMILIES = {"llama": "byte_level", "qwen2": "byte_level", "mistral": "metaspace", "gemma3": "metaspace"}
VOCAB = ("token_embd.weight", "output.weight")


def texts() -> dict[str, str]:
    code = (CORPORA / "code.python.txt").read_text(encoding="utf-8")[20000:21500]
    return {"en": corpus("en", 20000, 1500), "de": corpus("de", 20000, 1500), "ja": corpus("ja", 20000, 600),
            "code": code, "emoji": "Emoji 🚀 👍🏽 👨‍👩‍👧 🇩🇪 ❤️ done",
            "control": "bell\x07 esc\x1b[0m del\x7f nul-free \x01\x02 tab\tcr\r\nend  "}


@contextlib.contextmanager
def cache_at(path: str | None):
    before = os.environ.get("TOKENBRIDGE_CACHE")
    if path is None:
        os.environ.pop("TOKENBRIDGE_CACHE", None)
    else:
        os.environ["TOKENBRIDGE_CACHE"] = path
    try:
        yield before
    finally:
        if before is None:
            os.environ.pop("TOKENBRIDGE_CACHE", None)
        else:
            os.environ["TOKENBRIDGE_CACHE"] = before


USER_CACHE = os.environ.get("TOKENBRIDGE_CACHE")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """The tiny GGUF sources are dequantised into tokenbridge's cache: a private one, not the user's."""
    with cache_at(str(tmp_path_factory.mktemp("cache"))):
        yield


def make_tiny(directory: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random ``family`` model with every weight (norms included) perturbed away from its init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_config(family, len(tokenizer), tokenizer)
    config.hidden_size, config.intermediate_size = 64, 80
    # llama.cpp's gemma3 scales attention by 1/sqrt(head_dim): query_pre_attn_scalar (256) must be head_dim
    config.head_dim = 256 if family == "gemma3" else 16
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny(root / f"tiny-{family}", family, tok_dirs[kind]) for family, kind in FAMILIES.items()}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, out: Path, needle: str) -> None:
    """Exit 2, one ``tokenbridge: error:`` line naming the problem, no OUT and no temp file beside it."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len([line for line in lines if "tokenbridge:" in line]) == 1 and lines[-1].startswith(
        "tokenbridge: error: "), err
    assert needle in lines[-1], lines[-1]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tokenbridge-" in p.name]


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def hf_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def relative_error(reference, other, ids: list[int]) -> float:
    with torch.no_grad():
        a = reference(torch.tensor([ids])).logits[0]
        b = other(torch.tensor([ids])).logits[0]
    assert a.shape == b.shape
    return float((a - b).abs().max() / a.abs().max())


def sample_ids(directory: Path, n: int = 40) -> list[int]:
    return load_tokenizer(directory)(corpus("en", 3000, 400), add_special_tokens=False)["input_ids"][:n]


# -- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_export_logits_match_the_hf_model(tmp_path, capsys, tiny, family, kind):
    out = tmp_path / "model.gguf"
    code, stdout, err = run(capsys, "export", tiny[family], out, "--type", kind, "--quiet")
    assert code == 0, err
    header = read_gguf_header(out)
    types = {info.name: info.type.name for info in header.tensors.values()}
    assert all(t == "F32" for n, t in types.items() if n.endswith("norm.weight"))
    if kind == "q8_0":  # rows of 80 are not whole blocks of 32: F16, as llama.cpp falls back
        assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
        assert "F16" in stdout
    assert ("output.weight" in types) == (family in ("qwen2", "mistral"))  # tied: no output.weight
    error = relative_error(hf_model(tiny[family]), gguf_model(out), sample_ids(tiny[family]))
    print(f"export {family} {kind}: relative logit error {error:.2e}")
    assert error <= BOUNDS[kind], error


def test_export_writes_llama_cpp_conventions(tmp_path, tiny):
    """The hyperparameters and transforms llama.cpp reads, checked against the checkpoint itself."""
    from safetensors.torch import load_file

    from tokenbridge.export import export_gguf, permute_qk

    _, report = export_gguf(tiny["gemma3"], tmp_path / "g.gguf", type="f32", progress=False)
    header = read_gguf_header(tmp_path / "g.gguf")
    value = header.value
    assert value("general.architecture") == "gemma3" and value("general.file_type") == 0
    assert (value("gemma3.embedding_length"), value("gemma3.block_count"), value("gemma3.feed_forward_length")) == (64, 2, 80)
    assert (value("gemma3.attention.head_count"), value("gemma3.attention.head_count_kv")) == (4, 2)
    assert value("gemma3.attention.key_length") == 256 and value("gemma3.attention.sliding_window") == 16
    assert value("gemma3.rope.freq_base") == 1e6
    weights = load_file(str(tiny["gemma3"] / "model.safetensors"))
    # Gemma's norms are stored as 1 + w; its embeddings unscaled (llama.cpp multiplies by sqrt(width))
    norm = header.read("blk.0.attn_norm.weight")
    assert np.allclose(norm, weights["model.layers.0.input_layernorm.weight"].numpy() + 1, atol=0)
    assert np.array_equal(header.read("token_embd.weight"), weights["model.embed_tokens.weight"].numpy())
    assert report.architecture == "gemma3" and report.tokenizer["model"] == "llama"

    export_gguf(tiny["llama"], tmp_path / "l.gguf", type="f32", progress=False)
    header = read_gguf_header(tmp_path / "l.gguf")
    weights = load_file(str(tiny["llama"] / "model.safetensors"))
    assert header.value("llama.rope.dimension_count") == 16 and header.value("llama.vocab_size") == 420
    q = weights["model.layers.1.self_attn.q_proj.weight"].numpy()
    k = weights["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert np.array_equal(header.read("blk.1.attn_q.weight"), permute_qk(q, 4))
    assert np.array_equal(header.read("blk.1.attn_k.weight"), permute_qk(k, 2))
    # the permutation interleaves the two rotary halves of every head: row 2i of a head is row i
    assert np.array_equal(permute_qk(q, 4)[16 * 2 + 2 * 3], q[16 * 2 + 3])
    assert np.array_equal(permute_qk(q, 4)[16 * 2 + 2 * 3 + 1], q[16 * 2 + 8 + 3])


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_export_tokenizer_round_trips_in_transformers(tmp_path, tiny, tok_dirs, kind):
    """The tokenizer transformers rebuilds from the file's metadata encodes like the target tokenizer."""
    from tokenbridge.export import export_gguf

    family = "llama" if kind == "byte_level" else "gemma3"  # transformers reads ▁-style vocabularies of gemma3
    out = tmp_path / "model.gguf"
    _, report = export_gguf(tiny[family], out, progress=False)
    assert all(check["identical"] for check in report.tokenizer["checks"]), report.tokenizer
    target, rebuilt = load_tokenizer(tok_dirs[kind]), gguf_tokenizer(out)
    for name, text in texts().items():
        assert rebuilt(text, add_special_tokens=False)["input_ids"] == target(text, add_special_tokens=False)[
            "input_ids"], name
    assert rebuilt.chat_template == target.chat_template
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (target.bos_token_id, target.eos_token_id)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory, tok_dirs) -> dict[str, Path]:
    """Tokenizers made by ``tokenbridge tokenizer train --like``: byte-level and ▁ style."""
    root = tmp_path_factory.mktemp("like")
    text = root / "train.txt"
    text.write_text(corpus("en", 0, 30000) + corpus("de", 0, 20000), encoding="utf-8")
    out = {}
    for kind, size in (("byte_level", 700), ("metaspace", 900)):
        out[kind] = root / kind
        assert main(["tokenizer", "train", "--text", str(text), "--vocab-size", str(size), "--like",
                     str(tok_dirs[kind]), "--out", str(out[kind]), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_tokenizer_trained_like_works_as_gguf(tmp_path, capsys, tiny, trained_like, kind):
    """A transplant onto a ``train --like`` tokenizer, to .gguf: logits as the directory transplant, its
    tokenizer rebuilt by transformers encoding like the trained one."""
    family = "llama" if kind == "byte_level" else "gemma3"
    out = tmp_path / "t.gguf"
    code, _, err = run(capsys, "transplant", tiny[family], trained_like[kind], out, "--quiet")
    assert code == 0, err
    target, rebuilt = load_tokenizer(trained_like[kind]), gguf_tokenizer(out)
    for name, text in texts().items():
        assert rebuilt(text, add_special_tokens=False)["input_ids"] == target(text, add_special_tokens=False)[
            "input_ids"], name
    code, _, err = run(capsys, "transplant", tiny[family], trained_like[kind], tmp_path / "dir", "--quiet")
    assert code == 0, err
    error = relative_error(hf_model(tmp_path / "dir"), gguf_model(out), sample_ids(tmp_path / "dir"))
    assert error <= BOUNDS["f32"], error


def _with_pre_tokenizer(source: Path, directory: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(source, directory)
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = pre_tokenizer
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return directory


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
REGEX_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize("pre_tokenizer, expected", [
    (REGEX_BYTES, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, REGEX_BYTES]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [_split(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
        BYTES]}, "qwen2"),
])
def test_pre_tokenizer_is_mapped_to_the_one_llama_cpp_has(tmp_path, tok_dirs, pre_tokenizer, expected):
    """SmolLM2's digits-then-GPT-2, Qwen2's regex: each named as llama.cpp names it, checked on the text."""
    from tokenbridge.write.gguf_tokenizer import tokenizer_metadata

    tokenizer = load_tokenizer(_with_pre_tokenizer(tok_dirs["byte_level"], tmp_path / "t", pre_tokenizer))
    written = tokenizer_metadata(tokenizer, len(tokenizer))
    assert (written.model, written.pre) == ("gpt2", expected)
    assert written.checks[0].identical


def test_unmatched_pre_tokenizer_is_refused_with_the_reason(tmp_path, capsys, tiny, tok_dirs):
    """A pre-tokenizer llama.cpp has no name for (whitespace split, then bytes): one line, nothing written."""
    target = _with_pre_tokenizer(tok_dirs["byte_level"], tmp_path / "ws", {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, BYTES]})
    out = tmp_path / "out.gguf"
    code, _, err = run(capsys, "transplant", tiny["llama"], target, out, "--quiet")
    assert_refused(code, err, out, "matches none of llama.cpp's")
    assert "nearest" in err


def test_other_tokenizers_are_refused(tmp_path, tok_dirs):
    """WordPiece, and ▁-style BPE without byte tokens (llama.cpp fails on an unknown character)."""
    from conftest import lines, metaspace_bpe, save_tokenizer, wrap

    from tokenbridge.errors import TokenbridgeError
    from tokenbridge.write.gguf_tokenizer import tokenizer_metadata

    wordpiece = load_tokenizer(tok_dirs["wordpiece"])
    with pytest.raises(TokenbridgeError, match="WordPiece tokenizer cannot be written as GGUF"):
        tokenizer_metadata(wordpiece, len(wordpiece))
    plain = metaspace_bpe(lines(corpus("en")), 300, ["<unk>", "<s>", "</s>"], byte_fallback=False)
    directory = save_tokenizer(wrap(plain, unk_token="<unk>", bos_token="<s>", eos_token="</s>"), tmp_path / "nofb")
    tokenizer = load_tokenizer(directory)
    with pytest.raises(TokenbridgeError, match="without byte tokens"):
        tokenizer_metadata(tokenizer, len(tokenizer))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_export_refuses_an_architecture_llama_cpp_is_not_given(tmp_path, capsys, models_dir, family):
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, "export", models_dir[family], out)
    assert_refused(code, err, out, f"architecture {family!r} cannot be written as GGUF")


def test_export_refuses_a_config_llama_cpp_computes_differently(tmp_path, capsys, models_dir):
    """conftest's gemma3 has head_dim 12 but query_pre_attn_scalar 256: llama.cpp would scale by 1/sqrt(12)."""
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, "export", models_dir["gemma3"], out)
    assert_refused(code, err, out, "query_pre_attn_scalar 256")


def test_export_bad_input(tmp_path, capsys, tiny):
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, "export", tiny["llama"], out, "--type", "q4_k")
    assert_refused(code, err, out, "--type q4_k: a GGUF type gguf-py cannot quantise to; supported: f32, f16, bf16, "
                                   "q8_0, q5_1, q5_0, q4_1, q4_0")
    code, _, err = run(capsys, "export", tiny["llama"], out, "--type", "int3")
    assert_refused(code, err, out, "not a GGUF type")
    code, _, err = run(capsys, "export", tiny["llama"], tmp_path / "m.bin")
    assert_refused(code, err, tmp_path / "m.bin", "must end in .gguf")
    code, _, err = run(capsys, "export", tmp_path / "missing", out)
    assert_refused(code, err, out, "no such file or directory")
    # an existing OUT is kept without --force, replaced with it
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "export", tiny["llama"], out, "--quiet")
    assert code == 2 and "exists (pass --force to replace it)" in err and out.read_bytes() == b"keep me"
    assert main(["export", str(tiny["llama"]), str(out), "--force", "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    # a directory OUT is never replaced
    (tmp_path / "d.gguf").mkdir()
    code, _, err = run(capsys, "export", tiny["llama"], tmp_path / "d.gguf", "--force")
    assert code == 2 and "is a directory" in err


def test_export_keeps_a_transplants_provenance(tmp_path, capsys, tiny, tok_dirs):
    code, _, err = run(capsys, "transplant", tiny["llama"], tok_dirs["byte_level_de"], tmp_path / "t", "--quiet")
    assert code == 0, err
    code, stdout, err = run(capsys, "export", tmp_path / "t", tmp_path / "t.gguf", "--json")
    assert code == 0 and json.loads(stdout)["provenance"]
    record = json.loads(read_gguf_header(tmp_path / "t.gguf").value("tokenbridge.provenance"))
    assert record == json.loads((tmp_path / "t" / "tokenbridge.json").read_text(encoding="utf-8"))


# -- transplant to .gguf --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny) -> dict[tuple[str, str], Path]:
    """Quantised GGUF sources made by the export: llama (tied) and qwen2 (untied), q8_0 and q4_0."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family in ("llama", "qwen2"):
        for kind in ("q8_0", "q4_0"):
            out[family, kind] = root / f"{family}-{kind}.gguf"
            assert main(["export", str(tiny[family]), str(out[family, kind]), "--type", kind, "--quiet"]) == 0
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_transplant_copies_every_other_tensor_byte_for_byte(tmp_path, capsys, sources, tok_dirs, family, kind):
    source = sources[family, kind]
    out = tmp_path / "out.gguf"
    code, stdout, err = run(capsys, "transplant", source, tok_dirs["byte_level_de"], out, "--quiet")
    assert code == 0, err
    assert "(tokenbridge.provenance)" in stdout
    before, after = read_gguf_header(source), read_gguf_header(out)
    assert list(before.tensors) == list(after.tensors)
    for name, info in before.tensors.items():
        if name in VOCAB:
            assert after.tensors[name].type == info.type  # written in the type the source used
            assert after.tensors[name].shape == (460, 64)
        else:
            assert after.tensors[name].type == info.type and after.tensors[name].shape == info.shape
            assert after.read(name).tobytes() == before.read(name).tobytes(), name
    assert ("output.weight" in after.tensors) == (family == "qwen2")
    # every key but the tokenizer's (and the vocabulary size) is the source's, byte for byte
    changed = {k for k in before.values if k.startswith("tokenizer.")} | {"llama.vocab_size"}
    for key in before.values:
        if key not in changed:
            assert after.raw(key) == before.raw(key), key
    if family == "llama":
        assert after.value("llama.vocab_size") == 460
    target = load_tokenizer(tok_dirs["byte_level_de"])
    tokens = after.value("tokenizer.ggml.tokens")
    assert tokens == target.convert_ids_to_tokens(list(range(len(target))))
    record = json.loads(after.value("tokenbridge.provenance"))
    assert record["target_vocab_size"] == 460 and record["gguf"]["tensors"]["token_embd.weight"].startswith(kind.upper())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_onto_its_own_tokenizer_is_the_same_file(tmp_path, capsys, sources, kind):
    """TARGET is the source itself: every tensor, and its tokenizer metadata, as they were."""
    source = sources["qwen2", kind]
    out = tmp_path / "own.gguf"
    code, _, err = run(capsys, "transplant", source, source, out, "--quiet")
    assert code == 0, err
    before, after = read_gguf_header(source), read_gguf_header(out)
    for name in before.tensors:
        assert after.read(name).tobytes() == before.read(name).tobytes(), name
    assert [k for k in after.values if k != "tokenbridge.provenance"] == list(before.values)
    for key in before.values:
        assert after.raw(key) == before.raw(key), key


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_transplant_logits_match_the_directory_transplant(tmp_path, capsys, sources, tok_dirs, family, kind):
    """Same source, same target, same method: the .gguf and the directory differ only by the quantised new rows."""
    source = sources[family, kind]
    for out in (tmp_path / "out.gguf", tmp_path / "dir"):
        code, _, err = run(capsys, "transplant", source, tok_dirs["byte_level_de"], out, "--quiet")
        assert code == 0, err
    error = relative_error(hf_model(tmp_path / "dir"), gguf_model(tmp_path / "out.gguf"), sample_ids(tmp_path / "dir"))
    print(f"gguf transplant {family} {kind}: relative logit error against the directory transplant {error:.2e}")
    assert error <= TRANSPLANT_BOUNDS[kind], error
    assert gguf_tokenizer(tmp_path / "out.gguf")(texts()["de"])["input_ids"] == load_tokenizer(tmp_path / "dir")(
        texts()["de"])["input_ids"]


def test_gguf_type_rewrites_the_vocabulary_matrices(tmp_path, capsys, sources, tok_dirs):
    out = tmp_path / "f16.gguf"
    code, stdout, err = run(capsys, "transplant", sources["qwen2", "q4_0"], tok_dirs["byte_level_de"], out,
                            "--gguf-type", "f16", "--quiet")
    assert code == 0, err
    header = read_gguf_header(out)
    assert header.tensors["token_embd.weight"].type.name == "F16" and header.tensors["output.weight"].type.name == "F16"
    assert header.tensors["blk.0.attn_q.weight"].type.name == "Q4_0"
    assert "F16 (--gguf-type)" in stdout


def test_unwritable_source_types_take_the_next_more_precise_type():
    """gguf-py dequantises K-quants but cannot quantise to them: the next writable type up in bits per weight."""
    from gguf import GGMLQuantizationType as Q

    from tokenbridge.transplant_gguf import vocab_tensor_type
    from tokenbridge.write.gguf import bits_per_weight, nearest_writable

    assert nearest_writable(Q.Q4_K) == Q.Q4_1 and nearest_writable(Q.Q5_K) == Q.Q5_1
    assert nearest_writable(Q.Q6_K) == Q.Q8_0 and nearest_writable(Q.Q2_K) == Q.Q4_0
    assert nearest_writable(Q.Q8_0) == Q.Q8_0
    for kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ4_NL):
        assert bits_per_weight(nearest_writable(kind)) > bits_per_weight(kind)
    kind, how = vocab_tensor_type(Q.Q6_K, None, "token_embd.weight", (1000, 640))
    assert kind == Q.Q8_0 and "Q6_K cannot be written by gguf-py" in how


def test_directory_source_to_gguf(tmp_path, capsys, tiny, tok_dirs):
    """A model directory SOURCE with a .gguf OUT: the directory transplant, exported (--gguf-type its weights)."""
    out = tmp_path / "dir-source.gguf"
    code, stdout, err = run(capsys, "transplant", tiny["mistral"], tok_dirs["metaspace_de"], out, "--gguf-type",
                            "q8_0", "--quiet")
    assert code == 0, err
    assert "weights q8_0" in stdout
    # transformers rebuilds a llama-architecture ▁ vocabulary with a prefix space llama.cpp does not add: said so
    assert "transformers: differs" in stdout
    assert read_gguf_header(out).value("tokenizer.ggml.add_space_prefix") is False
    assert not [p for p in tmp_path.iterdir() if ".tokenbridge-" in p.name]
    # tokenbridge's own reader takes the tokenizer the file carries whole, so its eval is not misled
    target, ours = load_tokenizer(tok_dirs["metaspace_de"]), load_tokenizer(out)
    for name, text in texts().items():
        assert ours(text)["input_ids"] == target(text)["input_ids"], name
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (target.bos_token, target.eos_token, target.unk_token)
    assert ours.chat_template == target.chat_template


def test_a_stale_embedded_tokenizer_is_not_trusted(tmp_path, tok_dirs):
    """A tokenizer.huggingface.json that does not spell the file's token list is ignored (the ggml keys win)."""
    from types import SimpleNamespace

    from tokenbridge.load.gguf import embedded_tokenizer

    data = json.loads((tok_dirs["byte_level"] / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [a["content"] for a in sorted(data["added_tokens"], key=lambda a: a["id"]) if a["id"] >= len(tokens)]
    values = {"tokenizer.huggingface.json": json.dumps(data), "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.eos_token_id": 0}
    header = SimpleNamespace(value=lambda key, default=None: values.get(key, default))
    assert embedded_tokenizer(header) is not None
    values["tokenizer.ggml.tokens"] = tokens[:5] + ["changed"] + tokens[6:]
    assert embedded_tokenizer(header) is None
    values["tokenizer.huggingface.json"] = "{not json"
    assert embedded_tokenizer(header) is None


def test_explain_reads_a_gguf_out(tmp_path, capsys, sources, tok_dirs):
    out = tmp_path / "out.gguf"
    assert main(["transplant", str(sources["llama", "q8_0"]), str(tok_dirs["byte_level_de"]), str(out), "--quiet"]) == 0
    capsys.readouterr()
    code, stdout, err = run(capsys, "explain", out, "0", "--id", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["target_id"] == 0


def test_transplant_to_gguf_bad_input(tmp_path, capsys, sources, tok_dirs, tiny):
    source, target = sources["llama", "q8_0"], tok_dirs["byte_level_de"]
    out = tmp_path / "out.gguf"
    code, _, err = run(capsys, "transplant", source, target, out, "--gguf-type", "q6_k")
    assert_refused(code, err, out, "--gguf-type q6_k: a GGUF type gguf-py cannot quantise to")
    code, _, err = run(capsys, "transplant", source, target, tmp_path / "dir", "--gguf-type", "q8_0")
    assert_refused(code, err, tmp_path / "dir", "--gguf-type applies only to a .gguf OUT")
    code, _, err = run(capsys, "transplant", source, target, out, "--method", "auto")
    assert_refused(code, err, out, "--method auto with a .gguf OUT needs a model directory SOURCE")
    code, _, err = run(capsys, "transplant", source, target, source, "--force")
    assert code == 2 and "would overwrite an input" in err
    out.write_bytes(b"keep")
    code, _, err = run(capsys, "transplant", source, target, out, "--quiet")
    assert code == 2 and "exists (pass --force" in err and out.read_bytes() == b"keep"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[:-100])
    code, _, err = run(capsys, "transplant", truncated, target, tmp_path / "t.gguf")
    assert_refused(code, err, tmp_path / "t.gguf", "corrupt or truncated GGUF file")


@pytest.mark.real
def test_spm_emulation_agrees_with_gemma3s_own_scores():
    """An independent reference for the ▁-style emulation: llama.cpp's own metadata for Gemma 3 (scores
    from its SentencePiece model, written by llama.cpp's converter) against the Hugging Face tokenizer."""
    from tokenbridge.load.packaged import gemma3_gguf
    from tokenbridge.write.gguf_tokenizer import spm_encode

    with cache_at(USER_CACHE):  # the packaged file and its tokenizer, where the other real tests keep them
        path = gemma3_gguf()
        tokenizer = load_tokenizer(path)
    header = read_gguf_header(path)
    tokens, scores = header.value("tokenizer.ggml.tokens"), header.value("tokenizer.ggml.scores")
    kinds = header.value("tokenizer.ggml.token_type")
    ids = {token: i for i, token in enumerate(tokens)}
    specials = {token: i for i, (token, kind) in enumerate(zip(tokens, kinds)) if kind in (2, 3, 4)}
    for name in ("en", "de", "code"):
        text = texts()[name]
        got = spm_encode(text, ids, scores, header.value("tokenizer.ggml.add_space_prefix"), specials)
        assert got == tokenizer(text, add_special_tokens=False)["input_ids"], name


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path, tok_dirs):
    """Llama 3's rope scaling: llama.cpp divides each frequency by ``rope_freqs.weight``; checked against
    the scaling rule written out here (Llama 3.1's: wavelengths past the original context are stretched)."""
    import math

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tokenbridge.export import export_gguf

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dirs["byte_level"]))
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=rope, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False)
    factors = read_gguf_header(tmp_path / "m.gguf").read("rope_freqs.weight")
    expected = []
    for i in range(0, 16, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / 16)
        low, high = 64 / rope["low_freq_factor"], 64 / rope["high_freq_factor"]
        if wavelength < high:
            expected.append(1.0)
        elif wavelength > low:
            expected.append(rope["factor"])
        else:
            smooth = (64 / wavelength - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            expected.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    assert np.allclose(factors, expected, rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0


@pytest.mark.real
def test_a_gguf_targets_tokenizer_is_carried_whole(tmp_path, capsys, tiny):
    """TARGET SmolLM2's GGUF, the body a Gemma-3: the target's tokenizer keys are copied as they are, and
    the tokenizer itself rides along (tokenizer.huggingface.json), because transformers rebuilds a tokenizer
    from the ggml keys by the body's architecture (here SmolLM2's byte-level BPE would grow a <mask>)."""
    from tokenbridge.load.packaged import smollm2_gguf

    target = smollm2_gguf()
    source = tmp_path / "gemma3.gguf"
    assert main(["export", str(tiny["gemma3"]), str(source), "--type", "q8_0", "--quiet"]) == 0
    out = tmp_path / "out.gguf"
    code, _, err = run(capsys, "transplant", source, target, out, "--method", "mean", "--quiet")
    assert code == 0, err
    before, after = read_gguf_header(target), read_gguf_header(out)
    assert after.architecture == "gemma3" and "tokenizer.huggingface.json" not in before.values
    for key in before.values:
        if key.startswith("tokenizer."):
            assert after.raw(key) == before.raw(key), key
    expected, ours = load_tokenizer(target), load_tokenizer(out)
    assert len(ours) == len(expected) == 49152
    for name, text in texts().items():
        assert ours(text)["input_ids"] == expected(text)["input_ids"], name
    assert (ours.bos_token, ours.eos_token) == (expected.bos_token, expected.eos_token)
    assert ours.chat_template == expected.chat_template
