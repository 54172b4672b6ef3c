"""Architecture knowledge: which tensors are vocabulary-sized, tied or scaled, and how they are written as GGUF."""

from .spec import ArchSpec, GGUFSpec, arch_spec, gguf_model_types, gguf_spec, known_model_types, model_type_of_gguf

__all__ = ["ArchSpec", "GGUFSpec", "arch_spec", "gguf_model_types", "gguf_spec", "known_model_types",
           "model_type_of_gguf"]
