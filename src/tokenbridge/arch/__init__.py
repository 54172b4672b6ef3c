"""Architecture knowledge: which tensors are vocabulary-sized, tied or scaled."""

from .spec import ArchSpec, arch_spec, known_model_types

__all__ = ["ArchSpec", "arch_spec", "known_model_types"]
