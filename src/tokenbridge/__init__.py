"""tokenbridge: move a pretrained language model onto a different tokenizer."""

from .errors import TokenbridgeError
from .export import export_gguf
from .init import available_methods
from .load.gguf import convert_gguf as convert
from .report import TransplantReport
from .api import transplant

__version__ = "0.1.0"
__all__ = ["TokenbridgeError", "TransplantReport", "available_methods", "convert", "export_gguf", "transplant",
           "__version__"]
