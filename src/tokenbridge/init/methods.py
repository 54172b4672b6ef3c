"""Import every built-in method so that it registers itself."""

from . import clp, focus, hypernet, mean, omp, random, subword, tokenadapt, transtok, wechsel  # noqa: F401
