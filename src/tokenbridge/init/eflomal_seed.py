"""eflomal with a seed: the same alignment for the same seed, every run.

eflomal's sampler takes its state from ``/dev/urandom`` and has no seed option.  It runs as its own
binary, so tokenbridge gives it a seed from outside: a small preloaded library (compiled once with the
system's C compiler, the one eflomal's own build needed, and cached) answers the binary's one read of
``/dev/urandom`` with the seed, and one OpenMP thread keeps the samplers' sums in one order.  Every other
file the binary opens is opened as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..cache import cache_root, staged_entry, usable_entry
from ..errors import TokenbridgeError

SEED_VARIABLE = "TOKENBRIDGE_EFLOMAL_SEED"
LIBRARY = "seed.so"

# fopen of /dev/urandom, while SEED_VARIABLE is set, reads 8 bytes of the seed; everything else is fopen.
SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long long seed_state[4];

static FILE *seeded(const char *path) {
    const char *seed = getenv("%(variable)s");
    if (seed == NULL || path == NULL || strcmp(path, "/dev/urandom") != 0) return NULL;
    unsigned long long value = strtoull(seed, NULL, 10);
    for (int i = 0; i < 4; i++) {  /* splitmix64: a well-mixed state from a small seed */
        value += 0x9E3779B97F4A7C15ULL;
        unsigned long long z = value;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        seed_state[i] = z ^ (z >> 31);
    }
    return fmemopen(seed_state, sizeof seed_state, "rb");
}

FILE *fopen(const char *path, const char *mode) {
    static FILE *(*next)(const char *, const char *) = NULL;
    FILE *file = seeded(path);
    if (file != NULL) return file;
    if (next == NULL) next = (FILE *(*)(const char *, const char *))dlsym(RTLD_NEXT, "fopen");
    return next(path, mode);
}

FILE *fopen64(const char *path, const char *mode) {
    static FILE *(*next)(const char *, const char *) = NULL;
    FILE *file = seeded(path);
    if (file != NULL) return file;
    if (next == NULL) next = (FILE *(*)(const char *, const char *))dlsym(RTLD_NEXT, "fopen64");
    return next(path, mode);
}
""" % {"variable": SEED_VARIABLE}


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise TokenbridgeError("transtok: eflomal needs a C compiler (cc, gcc or clang) to be given a seed; install "
                           "one (e.g. apt-get install build-essential)")


def seed_library() -> Path:
    """The preloaded library, compiled once into the cache (checked on every use, rebuilt if damaged)."""
    entry = cache_root() / "eflomal-seed" / hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    if usable_entry(entry):
        return entry / LIBRARY
    compiler = _compiler()
    with staged_entry(entry) as tmp:
        (tmp / "seed.c").write_text(SOURCE, encoding="utf-8")
        done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp / LIBRARY), str(tmp / "seed.c"),
                               "-ldl"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise TokenbridgeError(f"transtok: {compiler} could not build eflomal's seed library ({first})")
    return entry / LIBRARY


@contextlib.contextmanager
def seeded(seed: int):
    """Within: eflomal binaries started from this process draw their sampler state from ``seed``."""
    library = seed_library()
    saved = {name: os.environ.get(name) for name in ("LD_PRELOAD", SEED_VARIABLE, "OMP_NUM_THREADS")}
    preload = " ".join(p for p in (str(library), saved["LD_PRELOAD"]) if p)
    os.environ.update({"LD_PRELOAD": preload, SEED_VARIABLE: str(int(seed)), "OMP_NUM_THREADS": "1"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
