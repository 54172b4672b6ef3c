"""Byte-level views of tokenized language models: exact next-byte probabilities, healing, ensembles."""

from .lm import ByteEnsemble, ByteLM

__all__ = ["ByteEnsemble", "ByteLM"]
