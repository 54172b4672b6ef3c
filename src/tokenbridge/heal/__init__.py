"""Heal a transplanted model by training: embedding tuning, cross-tokenizer distillation (ALM and the
baselines DSKD, ULD, MinED), fine-tuning.

Layout: ``chunks`` aligns two tokenizations of one text; ``losses`` holds the losses as pure tensor
functions, ``baselines`` and ``dskd`` the baselines'; ``objectives`` registers them by the names
``--mode`` sums; ``data`` turns text files into a deterministic (optionally mixed) stream of batches;
``params`` picks what trains; ``loop`` is the one training loop (Accelerate, checkpoints, resume);
``train`` is heal's task behind ``tokenbridge heal``.
"""

from .train import HealConfig, HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal"]
