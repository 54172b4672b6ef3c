"""Heal a transplanted model by training: embedding tuning, ALM cross-tokenizer distillation, fine-tuning.

Layout: ``chunks`` aligns two tokenizations of one text; ``losses`` holds the losses as pure tensor
functions; ``data`` turns text files into a deterministic stream of batches; ``params`` picks what
trains; ``train`` is the loop (Accelerate, checkpoints, resume) behind ``tokenbridge heal``.
"""

from .train import HealConfig, HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal"]
