"""Import every built-in method so that it registers itself."""

from . import mean, random, subword  # noqa: F401
