"""``adapt``: plan, then run the stages in order, skipping on ``--resume`` those whose inputs are unchanged.

``OUT.work/`` holds ``plan.json`` (written first), each stage's output and ``stages/NAME.json``: the
record a stage leaves when it finishes -- its fingerprint (a hash of its settings and of the content of
what it reads), the inputs hashed, its time and peak memory, and its result.  On ``--resume`` a stage
is skipped when its record's fingerprint is today's and its output is there; otherwise it runs again
and the runner says why (which setting or input changed, or that it never finished).  Peak memory is
the process's resident high-water mark (``VmHWM``), reset before each stage through
``/proc/self/clear_refs`` where Linux allows it (else the process's peak so far), and CUDA's
``max_memory_allocated`` when a GPU is used.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from ..errors import TokenbridgeError
from ..report import peak_rss_mb
from .plan import AdaptConfig, Plan, StageSpec, fingerprint, make_plan
from .stages import STAGES, Context, _write_json

RECORD_DIR = "stages"


class Digests:
    """Content digests of the files and directories stages read, each computed once per run
    (a stage's output is forgotten when the stage writes it)."""

    def __init__(self):
        self.known: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        key = str(path)
        if key not in self.known:
            self.known[key] = content_digest(Path(path))
        return self.known[key]

    def forget(self, path: str) -> None:
        self.known = {k: v for k, v in self.known.items() if k != path and not k.startswith(path + "/")}


def content_digest(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents; temp paths left out)."""
    import hashlib

    from ..write.manifest import file_sha256

    if not path.exists():
        return "missing"
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = item.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


def reset_peak_memory() -> bool:
    """Reset the process's peak resident memory (Linux ``clear_refs`` 5) and CUDA's; False where it cannot."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001 - memory accounting is best effort
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_gpu_mb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    except Exception:  # noqa: BLE001
        pass
    return None


def why_rerun(record: dict | None, inputs: dict, output_exists: bool) -> str | None:
    """Why a stage runs on --resume (None: it is skipped)."""
    if record is None:
        return "it did not finish in the earlier run"
    if record.get("fingerprint") == fingerprint(inputs):
        return None if output_exists else "its output is missing"
    old = record.get("inputs") or {}
    reasons = []
    before, now = _flat(old.get("settings") or {}), _flat(inputs["settings"])
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            reasons.append(f"setting {key} was {_short(before.get(key))}, now {_short(now.get(key))}")
    before, now = old.get("reads") or {}, inputs["reads"]
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            reasons.append(f"{key} changed")
    return "; ".join(reasons) or "its inputs changed"


def _flat(settings: dict, prefix: str = "") -> dict:
    """``{"config": {"steps": 2}}`` -> ``{"config.steps": 2}``, so that a reason names the setting itself."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def adapt(model, texts: list[Path], out: Path, config: AdaptConfig | None = None, resume: bool = False,
          force: bool = False, progress: bool = True, allow_pickle: bool = False, say=None) -> dict:
    """Move ``model`` onto a tokenizer for ``texts``, heal it and measure it; OUT is the healed model with
    ``report.md``/``report.json``.  Returns the report (a dict).  See :mod:`tokenbridge.adapt`."""
    config = config or AdaptConfig()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    plan = make_plan(model, [Path(t) for t in texts], out, config, force=force, resume=resume,
                     allow_pickle=allow_pickle)
    work = Path(plan.work)
    records = work / RECORD_DIR
    earlier = records.is_dir() and any(records.glob("*.json"))
    if earlier and not resume and not force:
        raise TokenbridgeError(f"{work}: holds an earlier run; pass --resume to continue it (stages whose inputs are "
                               "unchanged are skipped) or --force to start over")
    if resume and not force and out.exists() and any(out.iterdir()) and not _written_by(out, work):
        raise TokenbridgeError(f"{out}: exists and was not written by the run in {work} (pass --force to replace it)")
    if force and not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "plan.json", plan.to_dict())
    say(f"adapt: plan in {work / 'plan.json'}: " + " -> ".join(s.name for s in plan.stages))

    ctx = Context(plan, progress, allow_pickle, say)
    digests = Digests()
    for spec in plan.stages:
        _run_stage(ctx, spec, digests, records, resume and earlier)
    return json.loads((out / "report.json").read_text())


def _written_by(out: Path, work: Path) -> bool:
    """Whether OUT is the report stage's output of the run in ``work`` (so --resume may replace it)."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and Path(str(report.get("work"))).resolve() == work.resolve()


def _run_stage(ctx: Context, spec: StageSpec, digests: Digests, records: Path, resume: bool) -> None:
    """Run one stage, or skip it (``resume``: an earlier run's records are there) when its inputs are unchanged."""
    path = records / f"{spec.name}.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    inputs = spec.inputs(digests)
    ctx.fingerprint = fingerprint(inputs)
    reason = why_rerun(record, inputs, Path(spec.output).exists())
    if reason is None and resume:
        ctx.say(f"adapt: {spec.name}: inputs unchanged, skipped")
        ctx.results[spec.name] = record["result"]
        ctx.log.append({"stage": spec.name, "skipped": True, "seconds": record["seconds"],
                        "peak_rss_mb": record["peak_rss_mb"], "peak_gpu_mb": record.get("peak_gpu_mb")})
        return
    if record is not None or resume:
        ctx.say(f"adapt: {spec.name}: running again: {reason}")
    else:
        ctx.say(f"adapt: {spec.name}")
    path.unlink(missing_ok=True)
    exact = reset_peak_memory()
    started = time.perf_counter()
    result = STAGES[spec.name](ctx, spec)
    seconds = round(time.perf_counter() - started, 3)
    digests.forget(spec.output)
    entry = {"stage": spec.name, "skipped": False, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
             "peak_gpu_mb": peak_gpu_mb(), "peak_rss_is_stage": exact}
    ctx.results[spec.name] = result
    ctx.log.append(entry)
    _write_json(path, {"stage": spec.name, "fingerprint": ctx.fingerprint, "inputs": inputs, **entry,
                       "result": result})


__all__ = ["AdaptConfig", "Plan", "adapt"]
