"""The command line: a thin layer over the Python API.

Problems with the user's input print one line (``tokenbridge: error: ...``) and
exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

from . import checks
from .errors import TokenbridgeError

EXIT_USAGE = 2


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every staged output is cleaned up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``tokenbridge: error: ...``, exit 2), like every other bad input."""

    def error(self, message):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(EXIT_USAGE, f"tokenbridge: error: {command}{message} (see {self.prog} --help)\n")


def _number(integer: bool, **bounds):
    """An argparse type: a number within ``bounds`` (see :func:`tokenbridge.checks.number`), finite always."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if integer else 'a number'}") from None
        try:
            return checks.number("the value", value, integer=integer, **bounds)
        except TokenbridgeError as error:
            raise argparse.ArgumentTypeError(str(error).replace("the value must be", "must be")) from None
    parse.__name__ = "integer" if integer else "number"
    return parse


SEED = _number(True, low=0, high=checks.SEED_MAX)
POSITIVE = _number(True, low=1)
NON_NEGATIVE = _number(True, low=0)
POSITIVE_FLOAT = _number(False, low=0, low_open=True)
NON_NEGATIVE_FLOAT = _number(False, low=0)


def _options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise TokenbridgeError(f"--option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = value
    return options


def cmd_transplant(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve

    want = 2 if args.train_tokenizer else 3
    if len(args.paths) != want:
        raise TokenbridgeError("transplant takes SOURCE OUT with --train-tokenizer" if args.train_tokenizer
                               else "transplant takes SOURCE TARGET OUT (or SOURCE OUT with --train-tokenizer)")
    source, out = resolve(args.paths[0]), Path(args.paths[-1])
    # TARGET ``bytes`` is the built-in byte tokenizer, made like SOURCE's; ``./bytes`` names a path.
    byte_target = not args.train_tokenizer and args.paths[1] == "bytes"
    if not args.train_tokenizer:
        if args.vocab_size is not None or args.supertokens or args.type != "bpe":
            raise TokenbridgeError("--vocab-size, --type and --supertokens apply only with --train-tokenizer")
        if not byte_target:
            return _transplant_and_print(args, source, resolve(args.paths[1]), out)
    elif args.vocab_size is None:
        raise TokenbridgeError("--train-tokenizer needs --vocab-size")

    from .tokenizers.api import byte_tokenizer, train
    from .write.output_dir import check_output, publish_path, scratch_dir

    check_output(out, args.force, protected=[source, *map(Path, args.train_tokenizer or [])],
                 file=out.suffix == ".gguf")
    if byte_target and os.path.lexists("bytes") and not args.quiet:
        print("tokenbridge: note: TARGET bytes is the built-in byte tokenizer; write ./bytes for the path",
              file=sys.stderr)
    with scratch_dir(publish_path(out).parent, f"{out.name}.tokenizer") as tmp:
        tokenizer = tmp / "tokenizer"
        if byte_target:
            made = byte_tokenizer(source, tokenizer)
        else:
            made = train([Path(p) for p in args.train_tokenizer], tokenizer, _train_config(args), like=source,
                         progress=not args.quiet)
        made.out = f"{out} (its tokenizer)"
        if not args.json:
            _print_tokenizer_report(made, False)
        return _transplant_and_print(args, source, tokenizer, out, {"tokenizer": made.summary()})


def _transplant_and_print(args, source, target, out, extra: dict | None = None) -> int:
    from .api import transplant

    out, report = transplant(
        source, target, out, method=args.method, options=_options(args.option),
        seed=args.seed, force=args.force, allow_pickle=args.allow_pickle, progress=not args.quiet,
        gguf_type=args.gguf_type,
    )
    if args.json:
        print(json.dumps({"out": str(out), **report.summary(), **(extra or {})}, indent=2, ensure_ascii=False))
    elif report.gguf is not None:
        _print_transplant(report, out)
        _print_gguf_out(report.gguf)
        print(f"  {report.seconds:.1f} s, peak memory {report.peak_rss_mb:.0f} MB; provenance in {out} "
              "(tokenbridge.provenance)")
    else:
        _print_transplant(report, out)
        print(f"  {report.seconds:.1f} s, peak memory {report.peak_rss_mb:.0f} MB; provenance in {out}/tokenbridge.json")
    return 0


def _print_transplant(report, out) -> None:
    counts = report.counts
    print(f"wrote {out}")
    print(f"  {report.model_type}, {report.source_vocab_size} -> {report.target_vocab_size} tokens, "
          f"method {report.method}, seed {report.seed}, {'tied' if report.tied else 'untied'} embeddings")
    print(f"  copied {counts['copied']} rows by bytes and {counts['copied_special']} special tokens; "
          f"initialised {counts['initialised']} ({counts['fallback']} by fallback); "
          f"{counts['unmatched_special']} special tokens had no source counterpart")


def _print_gguf_out(gguf: dict) -> None:
    """What a .gguf OUT says about its types and its tokenizer (a GGUF source's, or an export's)."""
    for name, how in (gguf.get("tensors") or {}).items():
        print(f"  {name}: {how}")
    if "tensor_types" in gguf:  # an export of the directory transplant
        print(f"  weights {gguf['type']}: " + ", ".join(f"{n} {k}" for k, n in gguf["tensor_types"].items()))
    tokenizer = gguf.get("tokenizer") or {}
    source = f"copied from {tokenizer['copied_from']}" if tokenizer.get("copied_from") else f"pre {tokenizer.get('pre')}"
    print(f"  tokenizer {tokenizer.get('model')} ({source}), {tokenizer.get('tokens')} tokens")
    for check in tokenizer.get("checks") or []:
        print(f"  {check['reader']}: " + ("check text identical" if check["identical"]
                                          else f"differs {check['first_difference']}"))
    for note in list(gguf.get("notes") or []) + list(tokenizer.get("notes") or []):
        print(f"  note: {note}")


def _print_tokenizer_report(report, as_json: bool) -> None:
    from .tokenizers.api import format_report

    print(json.dumps(report.summary(), indent=2, ensure_ascii=False) if as_json else format_report(report))


def _train_config(args):
    from .tokenizers.train import TrainConfig

    return TrainConfig(vocab_size=args.vocab_size, model=args.type, supertokens=args.supertokens,
                       supertoken_share=args.supertoken_share, max_words=args.max_words,
                       min_frequency=args.min_frequency)


def cmd_tokenizer_train(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve
    from .tokenizers.api import train

    report = train([Path(p) for p in args.text], Path(args.out), _train_config(args),
                   like=resolve(args.like) if args.like else None, byte_fallback=args.byte_fallback,
                   specials=args.special or [], force=args.force, progress=not args.quiet)
    _print_tokenizer_report(report, args.json)
    return 0


def cmd_tokenizer_extend(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve
    from .tokenizers.api import extend

    report = extend(resolve(args.source), [Path(p) for p in args.text], Path(args.out), args.add,
                    min_frequency=args.min_frequency, force=args.force, progress=not args.quiet)
    _print_tokenizer_report(report, args.json)
    return 0


def cmd_tokenizer_prune(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve
    from .tokenizers.api import prune

    report = prune(resolve(args.source), [Path(p) for p in args.text], Path(args.out), args.keep, force=args.force)
    _print_tokenizer_report(report, args.json)
    return 0


def cmd_tokenizer_bytes(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve
    from .tokenizers.api import byte_tokenizer

    report = byte_tokenizer(resolve(args.like), Path(args.out), force=args.force)
    _print_tokenizer_report(report, args.json)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import export_gguf, format_export

    out, report = export_gguf(Path(args.model), Path(args.out), type=args.type, force=args.force,
                              progress=not args.quiet)
    print(json.dumps(report.summary(), indent=2, ensure_ascii=False) if args.json else format_export(report))
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    from .load.gguf import convert_gguf
    from .load.packaged import resolve

    out = convert_gguf(resolve(args.gguf), Path(args.out), force=args.force)
    if args.json:
        print(json.dumps({"out": str(out)}))
    else:
        print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .load.packaged import resolve
    from .measure.bpb import evaluate, format_result

    result = evaluate(resolve(args.model), [Path(p) for p in args.text], limit=args.bytes, window=args.window,
                      prefix=args.prefix, progress=not args.quiet, allow_pickle=args.allow_pickle)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0


def cmd_tokstats(args) -> int:
    from pathlib import Path

    from .measure.tokstats import format_tokstats, run_tokstats

    result = run_tokstats(args.tokenizers, [Path(p) for p in args.text],
                          reference=Path(args.reference) if args.reference else None,
                          plot=Path(args.plot) if args.plot else None)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_tokstats(result))
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from .measure.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = compare(args.source, args.target, methods, [Path(p) for p in args.text], Path(args.out),
                     limit=args.bytes, window=args.window, seed=args.seed, force=args.force,
                     keep_models=args.keep_models, progress=not args.quiet, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print((Path(args.out) / "report.md").read_text())
        print(f"wrote {args.out}/report.md, report.json, bpb.png")
    return 0


def cmd_generate(args) -> int:
    """Greedy (or sampled) continuation of a prompt with a model directory; for quick checks."""
    import torch

    from .load.model import load_causal_lm
    from .load.packaged import resolve

    model, tokenizer = load_causal_lm(resolve(args.model), allow_pickle=args.allow_pickle)
    if args.chat:
        if not tokenizer.chat_template:
            raise TokenbridgeError(f"{args.model}: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                temperature=args.temperature if args.temperature > 0 else None,
                                top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    new = output[0, inputs["input_ids"].shape[1]:]
    continuation = tokenizer.decode(new, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "continuation": continuation, "tokens": new.tolist()},
                         ensure_ascii=False))
    else:
        print(f"{args.prompt}\033[1m{continuation}\033[0m" if sys.stdout.isatty() else args.prompt + continuation)
    return 0


def cmd_methods(args) -> int:
    import dataclasses

    from .adapt.select import AutoMethodConfig
    from .init import available_methods

    rows = {name: (m.summary, m.config_cls) for name, m in available_methods().items()}
    rows["auto"] = ("try the methods the options allow, keep the best by bits per byte on held-out text",
                    AutoMethodConfig)

    def describe(field):
        if field.metadata.get("resource"):
            need = "required" if field.metadata.get("required") else f"default {field.default!r}"
            return f"{field.name}=<{field.metadata['resource']}; {need}>"
        return f"{field.name}={field.default}"

    if args.json:
        print(json.dumps({name: {"summary": summary,
                                 "options": {f.name: f.default for f in dataclasses.fields(cls)},
                                 "resources": {f.name: f.metadata["resource"] for f in dataclasses.fields(cls)
                                               if f.metadata.get("resource")}}
                          for name, (summary, cls) in rows.items()}, indent=2))
    else:
        for name, (summary, cls) in rows.items():
            print(f"{name:10s} {summary}")
            options = [describe(f) for f in dataclasses.fields(cls)]
            if options:
                print(" " * 11 + "options: " + ", ".join(options))
    return 0


def cmd_vectors(args) -> int:
    """fastText word vectors (gensim) for methods that read them (wechsel): a .bin model or a .vec file."""
    from pathlib import Path

    from .init.static_vectors import split_words, train_vectors, write_vectors
    from .measure.texts import read_text
    from .write.output_dir import staged_file

    out = Path(args.out)
    if out.exists() and not args.force:
        raise TokenbridgeError(f"{out}: exists (pass --force to replace it)")
    sequences = [words for path in args.text for words in split_words(read_text(Path(path)))]
    vectors = train_vectors(sequences, dim=args.dim, window=args.window, epochs=args.epochs,
                            min_count=args.min_count, seed=args.seed, skipgram=not args.cbow,
                            min_n=args.min_n, max_n=args.max_n,
                            buckets=args.buckets, progress=not args.quiet)
    with staged_file(out) as tmp:  # same suffix: a .gz output is written gzipped, a .bin as a fastText model
        write_vectors(tmp, vectors)
    if args.json:
        print(json.dumps({"out": str(out), "words": len(vectors.words), "dim": args.dim}))
    else:
        print(f"wrote {out}: {len(vectors.words)} words, {args.dim} dimensions")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain, format_explanation

    entries = explain(args.out, args.token, by_id=args.id)
    print(json.dumps(entries, indent=2, ensure_ascii=False) if args.json else format_explanation(entries, args.top))
    return 0


def _weights(args) -> list[float] | None:
    if args.weights is None:
        return None
    if len(args.weights) != len(args.model):
        raise TokenbridgeError(f"--weights: {len(args.weights)} given for {len(args.model)} models")
    return args.weights


def cmd_bytes_score(args) -> int:
    from pathlib import Path

    from .bytes.score import format_result, load_byte_lm, read, score

    weights = _weights(args)
    texts = read([Path(p) for p in args.text], args.bytes)
    members = [load_byte_lm(path, args.prefix, allow_pickle=args.allow_pickle) for path in args.model]
    result = score(members, texts, weights, window=args.window, progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0


def _prompt_bytes(args) -> bytes:
    """The prompt's bytes exactly as given: ``--prompt`` (as the OS passed it), ``--prompt-hex`` or ``--prompt-file``."""
    if args.prompt_hex is not None:
        try:
            return bytes.fromhex(args.prompt_hex)
        except ValueError:
            raise TokenbridgeError(f"--prompt-hex: {args.prompt_hex!r} is not hexadecimal bytes") from None
    if args.prompt_file is not None:
        from pathlib import Path

        path = Path(args.prompt_file)
        if not path.is_file():
            raise TokenbridgeError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        return path.read_bytes()
    return os.fsencode(args.prompt)  # a cut UTF-8 character arrives as surrogate escapes: its bytes, unchanged


def cmd_bytes_generate(args) -> int:
    from .bytes import ByteEnsemble
    from .bytes.score import load_byte_lm

    weights = _weights(args)
    prompt = _prompt_bytes(args)
    members = [load_byte_lm(path, args.prefix, allow_pickle=args.allow_pickle) for path in args.model]
    out = ByteEnsemble(members, weights).generate(prompt, args.max_bytes, args.temperature, args.top_p, args.seed)
    if args.json:
        print(json.dumps({"models": args.model, "weights": weights, "prompt": prompt.decode("utf-8", "replace"),
                          "prompt_hex": prompt.hex(), "continuation": out.decode("utf-8", errors="replace"),
                          "continuation_hex": out.hex(), "bytes": len(out)}, ensure_ascii=False, indent=2))
    else:
        raw = getattr(sys.stdout, "buffer", None)
        if raw is None:
            print((prompt + out).decode("utf-8", errors="replace"))
        else:  # the bytes themselves, whatever the terminal's encoding
            sys.stdout.flush()
            raw.write(prompt + out + b"\n")
            raw.flush()
    return 0


def _output_flags(parser) -> None:
    """--json, --quiet (progress bars and library chatter off) and --debug (tracebacks), for every subcommand."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or library warnings")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _allow_pickle_flag(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle checkpoints (pytorch_model.bin), read with torch.load(weights_only=True)")


def _training_flags(p, steps: int, batch_size: int, checkpoint_every: int, what: str) -> None:
    """The flags of the one training loop (heal, hypernet train)."""
    p.add_argument("--steps", type=POSITIVE, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=POSITIVE, default=batch_size,
                   help=f"windows per micro-batch per process (default {batch_size})")
    p.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    p.add_argument("--window", type=_number(True, low=16), default=1024, help="bytes per training window (default 1024)")
    p.add_argument("--warmup", type=_number(True, low=-1), default=-1, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--max-grad-norm", type=NON_NEGATIVE_FLOAT, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPUs that have it, else fp32")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=checkpoint_every, metavar="N",
                   help=f"save a resumable checkpoint in {what}.checkpoints every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help=f"continue from the checkpoint in {what}.checkpoints")
    p.add_argument("--stop-after", type=POSITIVE, metavar="K", help=f"stop after step K without writing {what}")
    p.add_argument("--force", action="store_true", help=f"replace {what} and an old run's checkpoints")


def cmd_hypernet_train(args) -> int:
    from pathlib import Path

    from .hypernet import HypernetConfig, train_hypernet
    from .load.packaged import resolve

    config = HypernetConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            window=args.window, vocab_size=args.vocab_size, tokenizer_texts=args.tokenizer_texts,
                            noise_mean=args.noise_mean, noise_sigma=args.noise_sigma, negatives=args.negatives,
                            layers=args.layers, width=args.width, heads=args.heads, max_pieces=args.max_pieces,
                            aux_weight=args.aux_weight, lr=args.lr, warmup=args.warmup,
                            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                            precision=args.precision)
    out, report = train_hypernet(resolve(args.model), [Path(p) for p in args.text], Path(args.out), config,
                                 resume=args.resume, force=args.force, progress=not args.quiet,
                                 checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
                                 allow_pickle=args.allow_pickle)
    return _print_run(args, out, report, "loss", f"{report.tokens} tokens")


def _print_run(args, out, report, what: str, tokens: str) -> int:
    """What a training command prints: its report (--json), where a stopped run's checkpoint is, or a summary."""
    if args.json:
        print(json.dumps({"out": str(out), **report.to_dict()}, indent=2))
    elif args.stop_after is not None and report.steps_done < report.config["steps"]:
        print(f"stopped after step {report.steps_done}; checkpoint in {out} (continue with --resume)")
    else:
        first, last = report.losses[0][1], report.losses[-1][1]
        resumed = f" (resumed at {report.resumed_from})" if report.resumed_from else ""
        print(f"wrote {out}")
        print(f"  {what}; {report.steps_done} steps{resumed}")
        print(f"  loss {first:.4f} at step 1 -> {last:.4f} at step {report.steps_done}; {tokens}, "
              f"{report.tokens_per_second:.0f} tokens/s on {report.device} x{report.processes}")
    return 0


def cmd_heal(args) -> int:
    from pathlib import Path

    from .heal import HealConfig, heal
    from .load.packaged import resolve

    config = HealConfig(mode=args.mode, train=args.train or "", steps=args.steps, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, window=args.window, lr=args.lr or 0.0,
                        embedding_lr=args.embedding_lr or 0.0, warmup=args.warmup,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, chunks=args.chunks,
                        temperature=args.temperature, distance=args.distance, bias_threshold=args.bias_threshold,
                        lm_weight=args.lm_weight, latents=args.latents, balance=args.balance,
                        kd_temperature=args.kd_temperature, mix=args.mix or [], eval_every=args.eval_every,
                        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed,
                        precision=args.precision)
    out, report = heal(resolve(args.student), [Path(p) for p in args.text], Path(args.out), config,
                       teacher=resolve(args.teacher) if args.teacher else None, resume=args.resume, force=args.force,
                       progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                       stop_after=args.stop_after, allow_pickle=args.allow_pickle,
                       eval_texts=[Path(p) for p in args.eval], fsdp=args.fsdp)
    code = _print_run(args, out, report, f"{report.config['mode']} loss, training {report.config['train']}",
                      f"{report.student_tokens} student tokens")
    if report.evals and not args.json:
        first, last = report.evals[0], report.evals[-1]
        print(f"  held-out bits per byte {first['all']:.4f} at step {first['step']} -> {last['all']:.4f} at step "
              f"{last['step']}" + (f" (curve: {Path(out) / 'heal-eval.png'})"
                                   if report.steps_done == report.config['steps'] else ""))
    return code


def cmd_adapt(args) -> int:
    from pathlib import Path

    from .adapt import AdaptConfig, adapt
    from .adapt.report import format_markdown

    config = AdaptConfig(tokenizer=args.tokenizer or "", method=args.method, options=_options(args.option),
                         heal_minutes=args.heal_minutes, heal_steps=args.heal_steps, heal_mode=args.heal_mode,
                         heal_batch_size=args.heal_batch_size, heal_window=args.heal_window,
                         heal_lr=args.heal_lr or 0.0, checkpoint_every=args.checkpoint_every,
                         eval=list(args.eval or []), eval_window=args.eval_window, seed=args.seed)

    def say(line: str) -> None:  # --quiet keeps only why a stage runs again
        if not args.quiet or ": running again: " in line:
            print(line, file=sys.stderr, flush=True)

    report = adapt(args.model, [Path(p) for p in args.text], Path(args.out), config, resume=args.resume,
                   force=args.force, progress=not args.quiet, allow_pickle=args.allow_pickle, say=say)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_markdown(report))
        print(f"wrote {args.out} (the healed model, report.md, report.json, "
              f"{', '.join(report['plots'].values())}); stages in {report['work']}")
    return 0


def _window_flags(parser) -> None:
    """How much of each text file is scored, and in which windows."""
    parser.add_argument("--bytes", type=POSITIVE, default=None, metavar="N", help="score the first N bytes of each file")
    parser.add_argument("--window", type=_number(True, low=4), default=2048, metavar="W",
                        help="window size in bytes (default 2048)")


def _tokenizer_training_options(p, required: bool) -> None:
    p.add_argument("--vocab-size", type=POSITIVE, required=required, metavar="N",
                   help="tokens in all, special and byte tokens included")
    p.add_argument("--type", default="bpe", choices=["bpe", "unigram"], help="the tokenizer model (default bpe)")
    p.add_argument("--supertokens", action="store_true", help="BPE: learn multi-word tokens in a second stage")
    p.add_argument("--supertoken-share", type=_number(False, low=0, high=1, low_open=True, high_open=True),
                   default=0.25,
                   help="share of the learned tokens from the supertoken stage (default 0.25)")
    p.add_argument("--max-words", type=_number(True, low=2), default=4,
                   help="most words one supertoken spans (default 4)")
    p.add_argument("--min-frequency", type=POSITIVE, default=2, help="fewest occurrences a merge needs (default 2)")


def _tokenizer_source_options(p) -> None:
    p.add_argument("source", help="tokenizer or model directory, tokenizer.json, .gguf, or packaged:NAME")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE")


def _tokenizer_output_options(p) -> None:
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    _output_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tokenbridge", description="Move a pretrained LM onto another tokenizer.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("transplant", help="give a model a new tokenizer")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SOURCE TARGET OUT, or SOURCE OUT with --train-tokenizer. SOURCE: model directory "
                        "(safetensors), .gguf file, or packaged:smollm2|gemma3; TARGET: "
                        "tokenizer directory, model directory, tokenizer.json, .gguf, packaged:NAME, or bytes (a byte "
                        "tokenizer with SOURCE's special tokens; ./bytes for a path of that name) (omitted "
                        "with --train-tokenizer); OUT: output model directory, or one GGUF file when it ends in "
                        ".gguf")
    p.add_argument("--method", default="subword", help="initialisation for new rows (see `tokenbridge methods`)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--seed", type=SEED, default=0, help="0 to 2**32-1 (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--gguf-type", metavar="TYPE",
                   help="OUT.gguf: the type of its embedding and output matrices (default: the source's; "
                        "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0)")
    _allow_pickle_flag(p)
    _output_flags(p)
    p.add_argument("--train-tokenizer", nargs="+", metavar="FILE",
                   help="train the target tokenizer on these texts, like SOURCE's (then give SOURCE OUT only)")
    _tokenizer_training_options(p, required=False)
    p.set_defaults(func=cmd_transplant)

    p = sub.add_parser("tokenizer", help="train, extend or prune a tokenizer, or make a byte tokenizer")
    inner = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    q = inner.add_parser("train", help="train a BPE or Unigram tokenizer (optionally with supertokens)")
    q.add_argument("--text", nargs="+", required=True, metavar="FILE", help="training text (UTF-8)")
    _tokenizer_training_options(q, required=True)
    q.add_argument("--byte-fallback", action="store_true",
                   help="▁ style with byte tokens <0x00>..<0xFF> (SentencePiece, Gemma) instead of byte-level")
    q.add_argument("--like", help="copy this tokenizer's conventions: byte-level or ▁ style, special tokens, "
                                  "chat template (a tokenizer or model directory, .gguf, or packaged:NAME)")
    q.add_argument("--special", action="append", metavar="TOKEN", help="an extra special token (repeatable)")
    _tokenizer_output_options(q)
    q.set_defaults(func=cmd_tokenizer_train)
    q = inner.add_parser("extend", help="append the tokens a corpus needs most, keeping every existing id")
    _tokenizer_source_options(q)
    q.add_argument("--add", type=POSITIVE, required=True, metavar="N", help="how many tokens to add (at most)")
    q.add_argument("--min-frequency", type=POSITIVE, default=2, help="fewest occurrences a new token needs")
    _tokenizer_output_options(q)
    q.set_defaults(func=cmd_tokenizer_extend)
    q = inner.add_parser("prune", help="keep the tokens a corpus needs (and every byte), renumbering ids")
    _tokenizer_source_options(q)
    q.add_argument("--keep", type=POSITIVE, required=True, metavar="N", help="vocabulary size of the result")
    _tokenizer_output_options(q)
    q.set_defaults(func=cmd_tokenizer_prune)
    q = inner.add_parser("bytes", help="a byte tokenizer (one token per byte, ids 0-255) with SOURCE's special "
                                       "tokens; `transplant SOURCE bytes OUT` uses it")
    q.add_argument("--like", required=True, metavar="SOURCE",
                   help="take the special tokens, roles, BOS and chat template from this tokenizer (a tokenizer "
                        "or model directory, tokenizer.json, .gguf, or packaged:NAME)")
    _tokenizer_output_options(q)
    q.set_defaults(func=cmd_tokenizer_bytes)

    p = sub.add_parser("export", help="write a Hugging Face model directory as one GGUF file (llama.cpp, Ollama)")
    p.add_argument("model", metavar="MODEL_DIR", help="a causal LM directory: a transplant, a healed model, ...")
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument("--type", metavar="TYPE",
                   help="the weights' type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default: the checkpoint's "
                        "own float type); norms stay f32, rows that are not whole blocks fall back to f16")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _output_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="dequantise a .gguf file into a Hugging Face directory")
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--force", action="store_true")
    _output_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="tokenizer-independent bits per byte of a causal LM")
    p.add_argument("model", help="model directory, .gguf file, or packaged:NAME")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    _window_flags(p)
    p.add_argument("--prefix", default="auto", choices=["auto", "bos", "eos"],
                   help="token prepended to every window (auto: BOS, else EOS)")
    _allow_pickle_flag(p)
    _output_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokstats", help="tokenizer statistics: compression, fertility, token premium, overlap")
    p.add_argument("tokenizers", nargs="+", metavar="TOKENIZER", help="tokenizer paths, .gguf files or packaged:NAME")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files (parallel for premiums)")
    p.add_argument("--reference", metavar="FILE", help="one of the text files: token premiums relative to it")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the premiums per language and tokenizer")
    _output_flags(p)
    p.set_defaults(func=cmd_tokstats)

    p = sub.add_parser("compare", help="transplant with several methods and compare bits per byte")
    p.add_argument("source", help="model directory, .gguf file, or packaged:NAME")
    p.add_argument("target", help="target tokenizer (as for transplant)")
    p.add_argument("--methods", required=True, help="comma-separated method names")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="REPORT_DIR")
    _window_flags(p)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--keep-models", action="store_true", help="keep the transplanted models in REPORT_DIR/models")
    p.add_argument("--force", action="store_true")
    _allow_pickle_flag(p)
    _output_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="continue a prompt with a model directory (a quick check)")
    p.add_argument("model", help="model directory, .gguf file, or packaged:NAME")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=30)
    p.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _allow_pickle_flag(p)
    _output_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bytes", help="exact byte-level probabilities: score text, generate, ensemble models")
    inner = p.add_subparsers(dest="bytes_command", required=True, parser_class=Parser)
    q = inner.add_parser("score", help="exact bits per byte of one model, or of models ensembled byte by byte")
    q.add_argument("model", nargs="+", help="model directories, .gguf files or packaged:NAME (several: an ensemble)")
    q.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    q.add_argument("--weights", nargs="+", type=NON_NEGATIVE_FLOAT, metavar="W",
                   help="ensemble weights (default: equal)")
    _window_flags(q)
    q.add_argument("--prefix", default="auto", choices=["auto", "bos", "eos"],
                   help="token the text is conditioned on (auto: BOS, else EOS)")
    _allow_pickle_flag(q)
    _output_flags(q)
    q.set_defaults(func=cmd_bytes_score)
    q = inner.add_parser("generate", help="continue a prompt byte by byte (it may end mid-word)")
    q.add_argument("model", nargs="+", help="model directories, .gguf files or packaged:NAME (several: an ensemble)")
    prompt = q.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt; its bytes are taken as the system passes them, so it may "
                                         "end inside a UTF-8 character")
    prompt.add_argument("--prompt-hex", metavar="HEX", help="the prompt as hexadecimal bytes (any bytes)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="the prompt: the file's bytes, as they are")
    q.add_argument("--max-bytes", type=POSITIVE, default=80)
    q.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    q.add_argument("--top-p", type=_number(False, low=0, high=1, low_open=True), default=1.0)
    q.add_argument("--seed", type=SEED, default=0)
    q.add_argument("--weights", nargs="+", type=NON_NEGATIVE_FLOAT, metavar="W",
                   help="ensemble weights (default: equal)")
    q.add_argument("--prefix", default="auto", choices=["auto", "bos", "eos"])
    _allow_pickle_flag(q)
    _output_flags(q)
    q.set_defaults(func=cmd_bytes_generate)

    p = sub.add_parser("heal", help="train a transplanted model: embeddings, distillation from the original "
                                    "(ALM and its baselines), or SFT")
    p.add_argument("student", help="the transplanted model directory (or .gguf / packaged:NAME)")
    p.add_argument("--teacher", help="the original model, with its own tokenizer (needed by every mode but sft and "
                                     "embeddings)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 training text files")
    p.add_argument("--mix", nargs="+", type=NON_NEGATIVE_FLOAT, metavar="W",
                   help="sample the --text files in proportion to these weights, one per file (default: every "
                        "window equally often)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--mode", default="embeddings", metavar="MODE",
                   help="the loss: sft (LM loss), alm, dskd, uld, mined, or a sum of them joined by + (alm+sft); "
                        "embeddings: sft training the embeddings (default); alm+embeddings: alm+sft with LoRA")
    p.add_argument("--train", choices=["embeddings", "new-rows", "all", "lora"],
                   help="what trains (default: embeddings for --mode embeddings, all for sft, lora for the rest)")
    _training_flags(p, steps=100, batch_size=4, checkpoint_every=50, what="OUT")
    p.add_argument("--lr", type=POSITIVE_FLOAT, help="peak learning rate (default: 1e-3 embeddings, 2e-4 lora, 3e-5 all)")
    p.add_argument("--embedding-lr", type=POSITIVE_FLOAT,
                   help="peak learning rate of the embedding matrices (and DSKD's projector) when the body trains "
                        "too (default 1e-3)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.0)
    p.add_argument("--fsdp", action="store_true",
                   help="shard the student, its gradients and optimizer state over the processes (FSDP2; launch "
                        "with torchrun or accelerate launch); checkpoints are sharded, OUT is a normal model")
    p.add_argument("--chunks", default="word", choices=["word", "token", "unbiased"],
                   help="ALM chunks: end before whitespace with space-probability debiasing (word), at every "
                        "common token boundary (token), or at the boundaries tokenkit's pair-bias test finds "
                        "bias-free, for any tokenizer pair (unbiased)")
    p.add_argument("--bias-threshold", type=NON_NEGATIVE_FLOAT, default=1e-4,
                   help="--chunks unbiased: the most probability a boundary may be biased by (default 1e-4)")
    p.add_argument("--distance", default="binary-kl", choices=["binary-kl", "binary-ce", "reverse-binary-kl", "abs"],
                   help="ALM's distance between teacher and student chunk likelihoods (default binary-kl)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=100.0, help="ALM binarisation temperature")
    p.add_argument("--latents", type=NON_NEGATIVE_FLOAT, default=0.0, metavar="W",
                   help="add hidden-state alignment at chunk ends with weight W (default 0: off)")
    p.add_argument("--balance", default="sum", choices=["sum", "gradmag"],
                   help="how summed terms combine: weighted sum, or each term's gradient scaled to unit norm "
                        "(gradmag)")
    p.add_argument("--kd-temperature", type=POSITIVE_FLOAT, default=1.0,
                   help="softmax temperature of the dskd, uld and mined distributions (default 1)")
    p.add_argument("--lm-weight", type=NON_NEGATIVE_FLOAT, default=1.0,
                   help="weight of the sft term when the mode sums it with others")
    p.add_argument("--eval", nargs="+", metavar="FILE", default=[],
                   help="held-out text scored (bits per byte) at the start, every --eval-every steps and at the end; "
                        "the curve goes into OUT as tokenbridge-heal-eval.json and heal-eval.png")
    p.add_argument("--eval-every", type=NON_NEGATIVE, default=0, metavar="N", help="score --eval every N steps")
    p.add_argument("--lora-rank", type=POSITIVE, default=16)
    p.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=32.0)
    _allow_pickle_flag(p)
    _output_flags(p)
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser(
        "adapt", help="one command: a tokenizer for your text, transplant, heal and measure, with a report",
        description="Move MODEL onto a tokenizer made for your text, heal it against the original, and measure "
                    "what it bought.  Stages (each writes to OUT.work/, the plan first, in OUT.work/plan.json): "
                    "split (without --eval the last 10% of each text, at most 1 MiB, is held out and never "
                    "trained on), tokenizer, select (--method auto: the best method on a slice of the training "
                    "text; or transplant), heal, measure, report.  OUT is the healed model with report.md, "
                    "report.json and PNG plots: tokens per file before and after, bits per byte of the original, "
                    "the zero-shot transplant and the healed model, the heal curve, time and peak memory per "
                    "stage, and a one-line verdict.  --resume continues a stopped run: stages whose inputs are "
                    "unchanged are skipped (the reason is printed for those that run again), heal resumes from "
                    "its checkpoint.",
        epilog="example: tokenbridge adapt packaged:smollm2 --text my.txt --out my-model --tokenizer train:32768 "
               "--heal-minutes 60")
    p.add_argument("model", metavar="MODEL", help="model directory, .gguf file, or packaged:NAME")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="your UTF-8 text files")
    p.add_argument("--out", required=True, metavar="OUT", help="the final model directory (work in OUT.work)")
    p.add_argument("--tokenizer", metavar="SPEC", default=None,
                   help="train:N (N tokens trained on the text, in the model tokenizer's style), extend:N (the "
                        "model's tokenizer plus up to N tokens), or a tokenizer PATH (default: train: the model "
                        "tokenizer's size)")
    p.add_argument("--method", default="auto", help="initialisation of the new rows (default auto: every method the "
                                                    "options allow is tried; see `tokenbridge methods`)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--heal-minutes", type=POSITIVE_FLOAT, default=30.0,
                   help="heal time budget in minutes (default 30), turned into a step count by timing a few steps "
                        "(held-out scoring during the heal comes on top)")
    p.add_argument("--heal-steps", type=POSITIVE, default=None, metavar="N",
                   help="heal exactly N steps instead of a time budget (reproducible)")
    p.add_argument("--heal-mode", default="alm", metavar="MODE", help="the heal loss (default alm; see tokenbridge heal --help)")
    p.add_argument("--heal-batch-size", type=POSITIVE, default=4, metavar="B", help="windows per heal step (default 4)")
    p.add_argument("--heal-window", type=_number(True, low=16), default=1024, metavar="BYTES",
                   help="bytes per heal training window (default 1024)")
    p.add_argument("--heal-lr", type=POSITIVE_FLOAT, default=None, help="heal peak learning rate (default: by "
                                                                        "what trains, as tokenbridge heal)")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=0, metavar="N",
                   help="heal checkpoint every N steps (0: a tenth of the steps)")
    p.add_argument("--eval", nargs="+", metavar="FILE", help="held-out files to measure on (default: the last part "
                                                           "of each --text, which is then not trained on)")
    p.add_argument("--eval-window", type=_number(True, low=4), default=2048, metavar="BYTES",
                   help="window of the bits-per-byte measurements (default 2048)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT.work: skip stages whose inputs are unchanged")
    p.add_argument("--force", action="store_true", help="replace OUT and start OUT.work over")
    _allow_pickle_flag(p)
    _output_flags(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("hypernet", help="train a hypernetwork that predicts a model's embeddings for any tokenizer")
    hyper = p.add_subparsers(dest="hypernet_command", required=True, parser_class=Parser)
    q = hyper.add_parser("train", help="train a hypernetwork for MODEL on sampled tokenizers (ZeTT)")
    q.add_argument("model", help="the base model: a model directory, .gguf or packaged:NAME")
    q.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 training text files")
    q.add_argument("--out", required=True, metavar="HN_DIR", help="output hypernetwork directory")
    _training_flags(q, steps=1000, batch_size=8, checkpoint_every=100, what="HN_DIR")
    q.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-4, help="peak learning rate (default 3e-4)")
    q.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.01)
    q.add_argument("--vocab-size", type=_number(True, low=257), default=32768,
                   help="pieces of every sampled tokenizer (default 32768)")
    q.add_argument("--tokenizer-texts", type=NON_NEGATIVE, default=64,
                   help="extra windows each step's tokenizer is drawn from, besides the step's own (default 64)")
    q.add_argument("--negatives", type=NON_NEGATIVE, default=2048,
                   help="tokens absent from the step added to the output softmax (default 2048)")
    q.add_argument("--layers", type=POSITIVE, default=3, help="hypernetwork layers (default 3)")
    q.add_argument("--width", type=NON_NEGATIVE, default=0, help="hypernetwork width (default: the model's)")
    q.add_argument("--heads", type=NON_NEGATIVE, default=0, help="attention heads (default: width / 64)")
    q.add_argument("--max-pieces", type=POSITIVE, default=7,
                   help="source pieces of a token the hypernetwork reads (default 7)")
    q.add_argument("--aux-weight", type=NON_NEGATIVE_FLOAT, default=0.5,
                   help="weight of the loss pulling shared tokens towards their source rows (default 0.5)")
    q.add_argument("--noise-mean", type=NON_NEGATIVE_FLOAT, default=1e-5,
                   help="median of the sampled tokenizers' score noise (default 1e-5, as ZeTT)")
    q.add_argument("--noise-sigma", type=NON_NEGATIVE_FLOAT, default=4.0,
                   help="log-normal spread of that noise (default 4, as ZeTT)")
    _allow_pickle_flag(q)
    _output_flags(q)
    q.set_defaults(func=cmd_hypernet_train)

    p = sub.add_parser("explain", help="show where a transplanted model's row for a token came from")
    p.add_argument("out", help="a directory or .gguf file written by tokenbridge transplant")
    p.add_argument("token", help="a target token (as the tokenizer writes it), an id with --id, or any text")
    p.add_argument("--id", action="store_true", help="TOKEN is a target id (or comma-separated ids)")
    p.add_argument("--top", type=POSITIVE, default=12, help="source rows listed per token (default 12)")
    _output_flags(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("vectors", help="train fastText word vectors on text (gensim), e.g. for the wechsel method")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="OUT.bin: a fastText model (with character n-grams); else a .vec text file (.vec.gz gzipped)")
    p.add_argument("--dim", type=POSITIVE, default=100)
    p.add_argument("--window", type=POSITIVE, default=5)
    p.add_argument("--epochs", type=POSITIVE, default=5)
    p.add_argument("--min-count", type=POSITIVE, default=2)
    p.add_argument("--cbow", action="store_true", help="CBOW instead of skip-gram (fastText's default)")
    p.add_argument("--min-n", type=POSITIVE, default=3, help="shortest character n-gram (default 3)")
    p.add_argument("--max-n", type=int, default=6, help="longest character n-gram; 0: none (default 6)")
    p.add_argument("--buckets", type=POSITIVE, default=2_000_000,
                   help="rows the character n-grams are hashed into (default 2000000, as fastText)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _output_flags(p)
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("methods", help="list initialisation methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods, quiet=False)
    return parser


def _quiet_libraries(quiet: bool) -> None:
    """transformers' warnings and progress bars always off: tokenbridge reports problems itself, in one
    line, and shows its own progress bars for long work; with ``--quiet`` Python warnings (numpy's among
    them) are off too."""
    import warnings

    from .load.hf import set_quiet

    set_quiet(quiet)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if quiet:
        warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def _error_line(error: BaseException) -> str:
    if isinstance(error, OSError):
        text = error.strerror or str(error) or type(error).__name__
        return f"{error.filename}: {text}" if error.filename else text
    return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command == "transplant" and not any(a.startswith("-") for a in extra):
            args.paths += extra  # OUT after the options: SOURCE --train-tokenizer FILE... --vocab-size N OUT
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, or a one-line usage error (already printed)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, _terminate)
        except (ValueError, OSError):  # not the main thread, or no such signal here
            pass
    debug = getattr(args, "debug", False)
    try:
        _quiet_libraries(getattr(args, "quiet", False))
        return args.func(args)
    except TokenbridgeError as error:
        if debug:
            traceback.print_exc()
        print(f"tokenbridge: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tokenbridge: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"tokenbridge: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # the reader went away (``| head``): nothing more to say to it
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 141
    except OSError as error:
        if debug:
            traceback.print_exc()
        print(f"tokenbridge: error: {_error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
