"""Publish outputs atomically: build them in a sibling temp dir (or file), rename at the end.

Every temporary path tokenbridge makes is named ``.<name>.tokenbridge-<pid>.<start>-<random>``: the
process that owns it and when that process started.  One killed by SIGKILL or the OOM killer cannot
clean up after itself, so whoever next writes beside it (or looks up a cache entry there) sweeps the
temp paths whose owner is gone (:func:`sweep_orphans`).  SIGTERM is turned into an exception by the
CLI, so it gets the same cleanup as Ctrl-C.

Replacing an existing OUT (``--force``) swaps the two directories in one step
(``renameat2(RENAME_EXCHANGE)``) where the system has it; elsewhere OUT is moved aside, the new one
renamed in, and the old one put back if that fails, or by the next sweep if the process died between
the two renames.

Outputs are created with the permissions ``mkdir`` would give them (``0777 & ~umask``), not the
``0700`` of :func:`tempfile.mkdtemp`.  Before an output is published, remote-code hooks are removed
from it: ``auto_map`` entries of its configs and any ``*.py`` file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from ..errors import TokenbridgeError

TAG = ".tokenbridge-"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tokenbridge-(?P<old>old-)?(?P<pid>\d+)\.(?P<start>\d+)-[^/]*$")
_REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                        "preprocessor_config.json", "generation_config.json")


# -- ownership of temp paths ----------------------------------------------------------------------

def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}"


def _owner_alive(pid: int, start: int) -> bool:
    if pid == os.getpid():
        return start == _start_time(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _start_time(pid)
    return not (start and now and now != start)  # a reused pid started later


def umask() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def owner_prefix(name: str, old: bool = False) -> str:
    """The start of a temp path's name: ``.<name>.tokenbridge-<pid>.<start>-`` (see :func:`sweep_orphans`)."""
    return f".{name}{TAG}{'old-' if old else ''}{_owner_tag()}-"


def temp_dir(parent: Path, name: str, old: bool = False) -> Path:
    """A new directory ``parent/.<name>.tokenbridge-<owner>-<random>``, mode ``0777 & ~umask``."""
    parent = Path(parent)
    tmp = Path(tempfile.mkdtemp(prefix=owner_prefix(name, old), dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def temp_file(parent: Path, name: str, suffix: str = "") -> Path:
    """A new empty file beside ``name`` in ``parent``, named as temp dirs are, mode ``0666 & ~umask``."""
    handle, path = tempfile.mkstemp(prefix=owner_prefix(name), suffix=suffix, dir=Path(parent))
    os.close(handle)
    os.chmod(path, 0o666 & ~umask())
    return Path(path)


def apply_umask(directory: Path) -> None:
    """Give everything under ``directory`` the mode ``mkdir``/``open`` would (some writers make files 0600)."""
    mask = umask()
    for path in [Path(directory), *Path(directory).rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_orphans(parent: Path) -> list[Path]:
    """Remove temp paths in ``parent`` whose owning process is gone; returns what was removed.

    An old OUT moved aside by a replace that died before renaming the new one in is put back.
    """
    parent = Path(parent)
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and TAG in p.name]
    except OSError:
        return removed
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if match is None or _owner_alive(int(match["pid"]), int(match["start"])):
            continue
        final = parent / match["name"]
        if match["old"] and not os.path.lexists(final):
            with contextlib.suppress(OSError):
                os.rename(path, final)
                continue
        _remove(path)
        removed.append(path)
    return removed


# -- checks before any work -----------------------------------------------------------------------

def publish_path(out: Path) -> Path:
    """Where ``out`` is really written: a symbolic link to a directory is written through."""
    out = Path(out)
    if out.is_symlink():
        target = out.resolve()
        if not target.exists():
            raise TokenbridgeError(f"{out}: is a symbolic link to {target}, which does not exist")
        return target
    return out


def check_output(out: Path, force: bool, protected: list[Path] = (), allow_cache: bool = False,
                 file: bool = False) -> None:
    """Refuse an OUT that exists and is not empty (unless ``force``), that holds an input, or where
    nothing can be written.

    An OUT inside tokenbridge's cache is refused too (a cached conversion would silently resolve to
    another model); only the cache's own writers pass ``allow_cache``.  ``file``: OUT is one file
    (a ``.gguf``): an existing file is replaced only with ``force``, a directory never.
    """
    given = Path(out)
    out = publish_path(given)
    resolved = out.resolve()
    if not allow_cache:
        from ..cache import cache_root

        root = cache_root().resolve()
        if resolved == root or root in resolved.parents:
            raise TokenbridgeError(f"{given}: is inside tokenbridge's cache ({root}); write the output elsewhere")
    for path in protected:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            raise TokenbridgeError(f"{given}: the output would overwrite an input ({path})")
    if file and out.exists():
        if out.is_dir():
            raise TokenbridgeError(f"{given}: is a directory; OUT is one file")
        if not force:
            raise TokenbridgeError(f"{given}: exists (pass --force to replace it)")
    elif out.exists():
        if not out.is_dir():
            raise TokenbridgeError(f"{given}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise TokenbridgeError(f"{given}: exists and is not empty (pass --force to replace it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TokenbridgeError(f"{parent}: exists and is not a directory")
            _probe_writable(parent, given)
            break


def _probe_writable(directory: Path, out: Path) -> None:
    """Fail now, not after the work, when no temp dir can be made where OUT (or its parents) will go."""
    try:
        probe = temp_dir(directory, f"{out.name or 'out'}.probe")
    except OSError as error:
        raise TokenbridgeError(f"{out}: cannot write in {directory} ({error.strerror or error})") from None
    probe.rmdir()


# -- publishing -----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_path(new: Path, out: Path) -> None:
    """Put ``new`` where ``out`` is: a plain rename, or an atomic swap when ``out`` is a non-empty directory."""
    new, out = Path(new), Path(out)
    if not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        os.rename(new, out)  # rename(2) replaces an empty directory
        return
    if _exchange(new, out):
        _remove(new)  # now the old OUT, still under its temp name: a kill here leaves it to the sweep
        return
    old = temp_dir(out.parent, out.name, old=True)
    try:
        os.rename(out, old)  # onto the empty dir we just made
    except OSError:
        old.rmdir()
        raise
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def scrub_remote_code(directory: Path) -> None:
    """Remove what would make transformers run code from ``directory``: ``auto_map`` keys and ``*.py`` files."""
    directory = Path(directory)
    for path in directory.rglob("*.py"):
        path.unlink()
    for name in _REMOTE_CODE_CONFIGS:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _name_out(error: BaseException, tmp: Path, out: Path) -> BaseException:
    """The error with the temp dir's path replaced by OUT's, so that messages name what the user gave."""
    if isinstance(error, OSError) and error.filename and str(tmp) in str(error.filename):
        renamed = type(error)(error.errno, error.strerror, str(error.filename).replace(str(tmp), str(out)))
        return renamed
    if isinstance(error, TokenbridgeError) and str(tmp) in str(error):
        return TokenbridgeError(str(error).replace(str(tmp), str(out)))
    return error


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, out: Path):
    """On any exception (Ctrl-C and SIGTERM included) remove ``tmp`` and name ``out`` in the error instead."""
    try:
        yield
    except BaseException as error:
        _remove(tmp)
        renamed = _name_out(error, tmp, out)
        if renamed is not error:
            raise renamed from None
        raise


_DEFERRED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred():
    """Hold Ctrl-C, SIGTERM and SIGHUP while a temp path is made and its cleanup put in place, then deliver
    them: one arriving between the two would otherwise raise after the path exists but before anything
    would remove it.  Only Python-level handlers are held (a default SIGTERM ends the process, cleanup or
    not), and only on the main thread, the one Python runs them on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = {}
    for number in _DEFERRED:
        handler = signal.getsignal(number)
        if callable(handler):
            previous[number] = handler
            signal.signal(number, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            number, frame = caught[0]
            previous[number](number, frame)


@contextlib.contextmanager
def _removed_always(tmp: Path):
    try:
        yield
    finally:
        _remove(tmp)


@contextlib.contextmanager
def _guarded(make, cleanup):
    """``make()`` a temp path and enter ``cleanup(path)``, its removal, with signals held between the two
    (see :func:`_signals_deferred`)."""
    with contextlib.ExitStack() as stack:
        with _signals_deferred():
            tmp = make()
            stack.enter_context(cleanup(tmp))
        yield tmp


def _ready(parent: Path) -> Path:
    """``parent`` created (like ``mkdir -p``) and swept of dead processes' temp paths."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(parent)
    return parent


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str):
    """Yield a temp dir in ``parent`` for intermediate work, removed on the way out, success or failure.

    Made under :func:`_signals_deferred` like a staged output, so a signal cannot leave it behind; a
    process killed outright leaves it to :func:`sweep_orphans`."""
    parent = _ready(parent)
    with _guarded(lambda: temp_dir(parent, name), _removed_always) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_output(out: Path, force: bool, manifest: bool = False):
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it is removed.

    ``manifest``: record every file's checksum (:mod:`.manifest`) just before publishing (cache entries).
    """
    given = Path(out)
    out = publish_path(given)
    _ready(out.parent)
    with _guarded(lambda: temp_dir(out.parent, out.name), lambda tmp: _removed_on_failure(tmp, given)) as tmp:
        yield tmp
        scrub_remote_code(tmp)
        apply_umask(tmp)
        if manifest:
            from .manifest import write_manifest

            write_manifest(tmp)
        if out.exists() and any(out.iterdir()) and not force:
            raise TokenbridgeError(f"{given}: appeared while writing and is not empty (pass --force)")
        replace_path(tmp, out)


@contextlib.contextmanager
def staged_file(out: Path, force: bool = True):
    """Yield a temp file path beside ``out`` (same suffix); on success it replaces ``out``.

    Missing parents are created.  Without ``force`` an ``out`` that appeared while writing is not replaced.
    """
    out = Path(out)
    _ready(out.parent)
    with _guarded(lambda: temp_file(out.parent, out.name, suffix="".join(out.suffixes[-1:])),
                  lambda tmp: _removed_on_failure(tmp, out)) as tmp:
        yield tmp
        if not force and os.path.lexists(out):
            raise TokenbridgeError(f"{out}: appeared while writing (pass --force to replace it)")
        os.replace(tmp, out)
