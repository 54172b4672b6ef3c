"""The planner above the pipeline: ``tokenbridge adapt`` from a model and the user's text to a model on a
better tokenizer, healed and measured.

:mod:`.plan` checks the inputs and plans the stages; :mod:`.stages` runs each through tokenbridge's API
(tokenizer, method selection or transplant, heal, measure); :mod:`.run` skips on ``--resume`` the stages
whose inputs are unchanged; :mod:`.report` writes ``report.md``, ``report.json`` and the plots into OUT.
:mod:`.select` is method selection (``--method auto``).
"""

from .plan import AdaptConfig
from .run import adapt

__all__ = ["AdaptConfig", "adapt"]
