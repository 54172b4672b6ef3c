"""How tokenbridge calls into transformers: quietly, never running a directory's code, errors in one line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import TokenbridgeError


def first_line(error: BaseException) -> str:
    """An exception as one line: its message's lines joined, or its type's name."""
    text = " ".join(part.strip() for part in str(error).strip().splitlines() if part.strip())
    return text or type(error).__name__


_QUIET = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: what libraries print while loading (progress bars that ignore their logging) is dropped too."""
    global _QUIET
    _QUIET = bool(quiet)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings (load reports, config notes) off: tokenbridge reports problems itself.

    Under ``--quiet`` (:func:`set_quiet`) whatever they still write to stderr (the GGUF dequantiser's own
    progress bar) is dropped as well.
    """
    import io
    import warnings

    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if _QUIET:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        logging.set_verbosity(before)


def load_config(directory: Path):
    """``config.json`` of a model directory as a transformers config, or a one-line error naming the file."""
    from transformers import AutoConfig

    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise TokenbridgeError(f"{directory}: not a model directory (no config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenbridgeError(f"{path}: does not parse as JSON ({error})") from None
    if not isinstance(raw, dict):
        raise TokenbridgeError(f"{path}: not a JSON object")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds
        raise TokenbridgeError(f"{path}: {remote_code_hint(error) or first_line(error)}") from None


def remote_code_hint(error: BaseException, what: str = "model") -> str | None:
    """What to say when transformers refused to load because only the directory's own code could (else None)."""
    if "trust_remote_code" in str(error) or "custom code" in str(error):
        return ("asks for its own Python code (auto_map) and transformers has no class of its own for it; "
                f"tokenbridge never runs a {what}'s code")
    return None
