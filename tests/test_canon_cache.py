"""The canonicity analysis cached on disk: reused when it matches, rebuilt (and reported) when it does not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import corpus, make_byte_level, make_metaspace
from tokenbridge.align.token_bytes import vocabulary
from tokenbridge.bytes import canon as canon_module
from tokenbridge.bytes.canon import Canon
from tokenbridge.bytes.lm import CanonicalPrefixes
from tokenbridge.write.manifest import MANIFEST_NAME


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("canon_cache")
    return {"byte_level": AutoTokenizer.from_pretrained(str(make_byte_level(root / "bl"))),
            "other": AutoTokenizer.from_pretrained(str(make_byte_level(root / "bl2", vocab_size=380, lang="de"))),
            "metaspace": AutoTokenizer.from_pretrained(str(make_metaspace(root / "ms")))}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBRIDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "canon"


TEXT = (corpus("en", 3000, 400) + " 12345 don't  \n\n" + corpus("de", 500, 200)).encode()


def exact(tokenizer) -> None:
    """The engine's canonical encoding of TEXT (through the cache) is the tokenizer's."""
    walk = CanonicalPrefixes(tokenizer)
    expected = tokenizer(TEXT.decode(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert walk.canonical(TEXT) == expected


def entry_of(cache_dir):
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1
    return entries[0]


def same_analysis(first: Canon, second: Canon) -> None:
    for name, array in first.bpe.arrays().items():
        assert np.array_equal(array, second.bpe.arrays()[name]), name
    assert np.array_equal(first.usable, second.usable)


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_warm_start_reads_the_entry(tokenizers, cache_dir, monkeypatch, which):
    tokenizer = tokenizers[which]
    vocab = vocabulary(tokenizer)
    fresh = Canon(vocab, len(vocab))  # no cache
    assert not cache_dir.exists()
    cold = Canon(vocab, len(vocab), cache=True)
    entry = entry_of(cache_dir)
    assert (entry / MANIFEST_NAME).is_file() and (entry / "meta.json").is_file()
    for path in entry.glob("*.npy"):  # plain arrays, never pickles
        np.load(path, allow_pickle=False)
    assert {p.suffix for p in entry.iterdir()} <= {".npy", ".json"}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the analysis was rebuilt although the cache entry is good")

    monkeypatch.setattr(canon_module._BPE, "__init__", no_rebuild)
    warm = Canon(vocab, len(vocab), cache=True)
    same_analysis(fresh, cold)
    same_analysis(fresh, warm)
    exact(tokenizer)


def _flip_a_byte(entry):
    path = max(entry.glob("*.npy"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(entry):
    path = max(entry.glob("*.npy"), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate])
def test_a_damaged_entry_is_rebuilt(tokenizers, cache_dir, capsys, damage):
    tokenizer = tokenizers["byte_level"]
    vocab = vocabulary(tokenizer)
    reference = Canon(vocab, len(vocab), cache=True)
    entry = entry_of(cache_dir)
    damage(entry)
    capsys.readouterr()
    rebuilt = Canon(vocab, len(vocab), cache=True)
    assert "corrupt" in capsys.readouterr().err
    same_analysis(reference, rebuilt)
    capsys.readouterr()
    Canon(vocab, len(vocab), cache=True)  # the rewritten entry is good: read without a word
    assert "corrupt" not in capsys.readouterr().err
    exact(tokenizer)


def test_another_tokenizers_entry_is_not_trusted(tokenizers, cache_dir, capsys):
    """An entry that verifies against its own manifest but was written for another tokenizer is rebuilt."""
    mine, theirs = tokenizers["byte_level"], tokenizers["other"]
    vocab, other = vocabulary(mine), vocabulary(theirs)
    reference = Canon(vocab, len(vocab), cache=True)
    my_entry = entry_of(cache_dir)
    shutil.rmtree(my_entry)
    Canon(other, len(other), cache=True)
    their_entry = entry_of(cache_dir)
    shutil.copytree(their_entry, my_entry)  # a complete, self-consistent entry in the wrong place
    capsys.readouterr()
    rebuilt = Canon(vocab, len(vocab), cache=True)
    err = capsys.readouterr().err
    assert "corrupt" in err and "another tokenizer" in err
    same_analysis(reference, rebuilt)
    assert json.loads((my_entry / "meta.json").read_text())["key"] != json.loads(
        (their_entry / "meta.json").read_text())["key"]
    exact(mine)
    exact(theirs)


def test_a_new_format_ignores_old_entries(tokenizers, cache_dir, monkeypatch):
    tokenizer = tokenizers["byte_level"]
    vocab = vocabulary(tokenizer)
    Canon(vocab, len(vocab), cache=True)
    monkeypatch.setattr(canon_module, "CACHE_FORMAT", canon_module.CACHE_FORMAT + 1)
    Canon(vocab, len(vocab), cache=True)
    assert len([p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2
