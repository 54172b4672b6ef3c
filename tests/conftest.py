"""Tiny tokenizers trained here with `tokenizers`, and tiny random models built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
CHAT_TEMPLATE_IM = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
CHAT_TEMPLATE_TURN = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)


def corpus(name: str = "en", start: int = 0, size: int = 20000) -> str:
    text = (CORPORA / f"debref.{name}.txt").read_text(encoding="utf-8")
    return text[start:start + size]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE (as SmolLM2, Qwen, GPT-2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def metaspace_bpe(texts: list[str], vocab_size: int, specials: list[str], byte_fallback: bool = True) -> Tokenizer:
    """Gemma style: ' ' -> '▁' normalizer, BPE with <0xNN> byte fallback."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False)
    base.train_from_iterator(texts, trainer)
    spec = json.loads(base.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in specials + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []):
        vocab[token] = len(vocab)
    for token, _ in trained:
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=byte_fallback,
                               unk_token=None if byte_fallback else specials[0]))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return tok


def wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    """BERT style uncased WordPiece."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap(tok: Tokenizer, **special):
    """A transformers fast tokenizer around ``tok`` with roles and optional chat template."""
    from transformers import PreTrainedTokenizerFast

    chat_template = special.pop("chat_template", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save_tokenizer(fast, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


IM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TURN_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def make_byte_level(directory: Path, vocab_size: int = 420, lang: str = "en", chat: bool = True):
    tok = byte_level_bpe(lines(corpus(lang)), vocab_size, IM_SPECIALS)
    fast = wrap(tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE_IM if chat else None)
    return save_tokenizer(fast, directory)


def make_metaspace(directory: Path, vocab_size: int = 700, lang: str = "en"):
    tok = metaspace_bpe(lines(corpus(lang)), vocab_size - 256 - len(TURN_SPECIALS), TURN_SPECIALS)
    fast = wrap(tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                mask_token="<mask>", chat_template=CHAT_TEMPLATE_TURN)
    return save_tokenizer(fast, directory)


def make_wordpiece(directory: Path, vocab_size: int = 400, lang: str = "en"):
    tok = wordpiece(lines(corpus(lang)), vocab_size)
    fast = wrap(tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                mask_token="[MASK]")
    return save_tokenizer(fast, directory)


def tiny_config(family: str, vocab_size: int, tokenizer):
    """A tiny config of ``family`` whose dimensions never equal the vocabulary size."""
    from transformers import BertConfig, GPT2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **common)
    if family == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **common)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=12, sliding_window=16, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=48, n_layer=2, n_head=4, n_positions=512, **ids)
    if family == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, max_position_embeddings=512, type_vocab_size=2,
                          pad_token_id=tokenizer.pad_token_id)
    raise ValueError(family)


def make_model(directory: Path, family: str, tokenizer_dir: Path, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random model of ``family`` with the tokenizer in ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_config(family, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config).to(dtype)
    with torch.no_grad():  # make output heads and biases distinguishable from their inits
        for name, param in model.named_parameters():
            if "bias" in name and param.ndim == 1 and param.shape[0] == len(tokenizer):
                param.normal_()
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte_level": make_byte_level(root / "byte_level"),
        "byte_level_de": make_byte_level(root / "byte_level_de", vocab_size=460, lang="de", chat=False),
        "metaspace": make_metaspace(root / "metaspace"),
        "metaspace_de": make_metaspace(root / "metaspace_de", vocab_size=760, lang="de"),
        "wordpiece": make_wordpiece(root / "wordpiece"),
        "wordpiece_de": make_wordpiece(root / "wordpiece_de", vocab_size=430, lang="de"),
    }


FAMILY_TOKENIZER = {"llama": "byte_level", "qwen2": "byte_level", "mistral": "metaspace",
                    "gemma3": "metaspace", "gpt2": "byte_level", "bert": "wordpiece"}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tok_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root / family, family, tok_dirs[kind]) for family, kind in FAMILY_TOKENIZER.items()}


def load_lm(directory: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(str(directory))
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(str(directory)).eval()


def logits(directory: Path, ids: list[int]) -> torch.Tensor:
    model = load_lm(directory)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out
