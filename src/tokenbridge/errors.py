"""User-facing errors.

Every problem caused by the user's input (a missing path, a corrupt file, an
unsupported architecture) is raised as :class:`TokenbridgeError`.  The CLI turns
it into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""


class TokenbridgeError(Exception):
    """A problem with the user's input, reported as one line."""
