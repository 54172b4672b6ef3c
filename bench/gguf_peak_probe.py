"""Peak RSS between the stages of a GGUF-to-GGUF transplant (issue 18): which stage sets the peak.

    python bench/gguf_peak_probe.py [SOURCE TARGET]     (default packaged:smollm2 packaged:gemma3)

Wraps the stages of ``transplant_gguf._from_gguf`` (build_vocab, tokenizer_block, write_gguf,
transformers_check) and prints the process's peak and current RSS before and after each.
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path


def rss(tag: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    now = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 // 2**20
    print(f"{tag}: peak {peak} MB, now {now} MB", flush=True)


def wrapped(module, name: str, label: str) -> None:
    original = getattr(module, name)

    def probe(*args, **kwargs):
        rss(f"before {label}")
        result = original(*args, **kwargs)
        rss(f"after {label}")
        return result
    setattr(module, name, probe)


def main() -> int:
    import tokenbridge.pipeline as pipeline
    import tokenbridge.transplant_gguf as transplant_gguf
    import tokenbridge.write.gguf as gguf_writer
    import tokenbridge.write.gguf_tokenizer as gguf_tokenizer
    from tokenbridge.api import transplant
    from tokenbridge.load.packaged import resolve

    source, target = (sys.argv[1:3] + ["packaged:smollm2", "packaged:gemma3"][len(sys.argv[1:3]):])
    wrapped(pipeline, "build_vocab", "build_vocab")  # imported inside _from_gguf, so patched at its source
    wrapped(transplant_gguf, "tokenizer_block", "tokenizer_block")
    wrapped(gguf_writer, "write_gguf", "write_gguf")
    wrapped(gguf_tokenizer, "transformers_check", "transformers_check")
    rss("start")
    with tempfile.TemporaryDirectory() as scratch:
        transplant(resolve(source), resolve(target), Path(scratch) / "out.gguf", method="subword", force=True,
                   progress=False)
    rss("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
