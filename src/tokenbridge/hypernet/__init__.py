"""Zero-shot tokenizer transfer with a learned hypernetwork (ZeTT), in PyTorch.

Layout: ``sample`` draws the tokenizers a hypernetwork trains on; ``model`` is the hypernetwork and
its directory format; ``train`` is its task in heal's training loop (``tokenbridge hypernet train``).
The transplant method that uses a trained hypernetwork is ``init/hypernet.py`` (``--method hypernet``).
"""

from .train import HypernetConfig, HypernetReport, train_hypernet

__all__ = ["HypernetConfig", "HypernetReport", "train_hypernet"]
