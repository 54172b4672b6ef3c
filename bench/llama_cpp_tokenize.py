"""How llama.cpp tokenizes the four slices with the *original* packaged GGUFs, against their own tokenizers.

bench/gguf_out.py counts the tokens where llama.cpp's tokenization of a transplanted .gguf differs from the
target tokenizer's; this counts the same for the target models' own, unmodified GGUF files, so the two can
be told apart: a difference that the original file shows too is llama.cpp's, not the transplant's.

    python bench/llama_cpp_tokenize.py SLICES_DIR     (the slices bench/gguf_out.py wrote, e.g. WORKDIR/slices)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_out import token_differences  # noqa: E402


def main() -> int:
    from llama_cpp import Llama

    from tokenbridge.load.packaged import resolve
    from tokenbridge.load.tokenizer import load_tokenizer

    slices = Path(sys.argv[1])
    print("| model (original GGUF) | slice | its tokenizer's tokens | llama.cpp tokens | differing | first difference near |")
    print("|---|---|---:|---:|---:|---|")
    for name in ("smollm2", "gemma3"):
        gguf = resolve(f"packaged:{name}")
        llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        tokenizer = load_tokenizer(gguf)
        for stem in ("en", "de", "ja", "code"):
            text = (slices / f"{stem}.txt").read_text(encoding="utf-8")
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
            near = repr(tokenizer.decode(expected[max(0, first - 3):first + 3])) if first is not None else ""
            print(f"| {name} | {stem} | {len(expected)} | {len(got)} | {token_differences(expected, got)} | {near} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
