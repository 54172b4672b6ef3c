"""``tokenbridge hypernet train``: fit a hypernetwork to a frozen model over many sampled tokenizers.

Each step draws a tokenizer (:mod:`.sample`) from the step's text, tokenizes the step's windows with
it, predicts input and output rows for the tokens that occur plus ``negatives`` other tokens of the
sampled vocabulary, and runs the frozen model with those rows: the loss is next-token cross-entropy
over that subset of the vocabulary (ZeTT's ``n_token_subsample``), plus ZeTT's auxiliary loss pulling
the predictions for tokens the source vocabulary also has towards their source rows.  Only the
hypernetwork trains.  The loop, checkpoints, resume and Accelerate are heal's (:mod:`..heal.loop`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import checks
from ..align.encode import ByteEncoder
from ..arch.spec import arch_spec
from ..errors import TokenbridgeError
from ..heal.data import Corpus, Side, _pad
from ..heal.loop import (
    Progress,
    check_loop_settings,
    default_warmup,
    fingerprint,
    flag,
    load_checkpoint,
    make_accelerator,
    model_input,
    run_steps,
    start_checkpoints,
    text_inputs,
)
from ..load.model import check_context, context_length, load_causal_lm, resolve_source
from ..write.output_dir import check_output, staged_output
from .model import Hypernetwork, HypernetSpec, corrections, save_hypernet, subword_base, vocab_digest
from .sample import TooFewPieces, sample_tokenizer

TOKENIZER_STREAM = 7_919  # the windows a step's tokenizer is drawn from come from their own stream
MORE_TEXT_ROUNDS = 8  # times more text is drawn when a step's text has too few distinct pieces


@dataclass
class HypernetConfig:
    """Everything that decides a hypernetwork run's result (a resumed run must match it exactly).

    steps, batch_size (windows per micro-batch per process), grad_accum, window (bytes): as for heal.
    vocab_size: pieces of every sampled tokenizer; tokenizer_texts: extra windows each step's tokenizer
      is drawn from (with the step's own windows); noise_mean, noise_sigma: the log-normal the score
      noise's standard deviation is drawn from (ZeTT's defaults).
    negatives: sampled-vocabulary tokens that do not occur in the step, added to the output softmax.
    layers, width, heads, max_pieces: the hypernetwork (0: the model's width, width // 64 heads).
    aux_weight: weight of the auxiliary loss.  lr, warmup, weight_decay, max_grad_norm: AdamW and the
      schedule (linear warm-up, cosine decay to 10%).
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    window: int = 1024
    vocab_size: int = 32768
    tokenizer_texts: int = 64
    noise_mean: float = 1e-5
    noise_sigma: float = 4.0
    negatives: int = 2048
    layers: int = 3
    width: int = 0
    heads: int = 0
    max_pieces: int = 7
    aux_weight: float = 0.5
    lr: float = 3e-4
    warmup: int = -1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"

    def resolved(self) -> HypernetConfig:
        check_loop_settings(self)
        for name in ("layers", "max_pieces"):
            checks.number(flag(name), getattr(self, name), low=1, integer=True)
        for name in ("tokenizer_texts", "negatives", "width", "heads"):
            checks.number(flag(name), getattr(self, name), low=0, integer=True)
        checks.number("--vocab-size", self.vocab_size, low=257, integer=True)
        checks.number("--lr", self.lr, low=0, low_open=True)
        for name in ("noise_mean", "noise_sigma", "aux_weight", "weight_decay"):
            checks.number(flag(name), getattr(self, name), low=0)
        config = HypernetConfig(**asdict(self))
        if config.warmup < 0:
            config.warmup = default_warmup(config.steps)
        return config

    def fingerprint(self) -> str:
        return fingerprint(self)


@dataclass
class HypernetReport(Progress):
    model: str
    texts: list[str]
    config: dict
    processes: int
    device: str
    tokens: int = 0  # tokens of the sampled tokenizers that carried loss
    COUNTERS = ("tokens",)


class FrozenModel:
    """The base model as the hypernetwork's training needs it: its body, rows and head, none trainable."""

    def __init__(self, model, tokenizer, device):
        model.requires_grad_(False)
        model.eval()
        self.model = model.to(device)
        self.side = Side(tokenizer)
        self.encoder = ByteEncoder(self.side.vocab)
        size = len(self.side.vocab)
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        self.tied = head is None or head.weight.data_ptr() == embed.data_ptr()
        # CPU float32 copies (decompositions index them); the device copies feed the network.
        self.source_in = embed.detach()[:size].float().cpu()
        self.source_out = None if self.tied else head.weight.detach()[:size].float().cpu()
        self.prefix_row = embed.detach()[self.side.prefix_id].float().cpu()
        self.device_in = self.source_in.to(device)
        self.device_out = None if self.tied else self.source_out.to(device)
        config = model.config.to_dict()
        self.embed_scale = arch_spec(config["model_type"]).scale(config)
        self.softcap = config.get("final_logit_softcapping")
        self.context = context_length(model.config)
        self.device = device

    def spec(self, config: HypernetConfig, base: str = "") -> HypernetSpec:
        """The shape ``config`` asks for, for this model (named by its vocabulary matrices' SHA-256)."""
        return HypernetSpec(dim=self.source_in.shape[1], tied=self.tied,
                            vocab_sha256=vocab_digest(self.source_in, self.source_out),
                            source_vocab_size=len(self.source_in), scale=float(self.source_in.std()),
                            layers=config.layers, width=config.width, heads=config.heads,
                            max_pieces=config.max_pieces, base=base,
                            model_type=self.model.config.model_type).resolved()

    def logits(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, rows_out: torch.Tensor) -> torch.Tensor:
        hidden = self.model.get_decoder()(inputs_embeds=inputs_embeds * self.embed_scale,
                                          attention_mask=mask).last_hidden_state
        logits = hidden @ rows_out.to(hidden.dtype).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check_head(self) -> None:
        """The hypernetwork's forward (body, then rows as the head) must be the model's own."""
        ids = torch.tensor([[self.side.prefix_id] + list(range(min(8, len(self.source_in))))], device=self.device)
        with torch.no_grad():
            reference = self.model(input_ids=ids).logits[..., :len(self.source_in)].float()
            embed = self.model.get_input_embeddings().weight.float()[ids]
            out = self.source_in if self.tied else self.source_out
            ours = self.logits(embed, torch.ones_like(ids), out.to(self.device)).float()
        if not torch.allclose(reference, ours, atol=1e-3, rtol=1e-3):
            raise TokenbridgeError(f"{self.model.config.model_type}: the model's head is not a plain product with its "
                                   "output rows; hypernet training does not support this architecture")


class HypernetTask:
    """The hypernetwork's side of the training loop."""

    def __init__(self, corpus: Corpus, config: HypernetConfig, frozen: FrozenModel):
        self.corpus, self.config, self.frozen = corpus, config, frozen
        self._pieces: dict[bytes, list[int]] = {}
        rows = frozen.source_in
        self.mean_square = float((rows ** 2).sum(-1).mean()) or 1.0

    def decompose(self, piece: bytes) -> list[int]:
        found = self._pieces.get(piece)
        if found is None:
            found = self.frozen.encoder.encode(piece) or []
            if len(self._pieces) > 500_000:
                self._pieces.clear()
            self._pieces[piece] = found
        return found

    def step_tokenizer(self, step: int, texts: list[bytes]):
        """The step's tokenizer, drawn from its windows and ``tokenizer_texts`` more.  Where those hold too
        few distinct pieces for ``vocab_size`` (repetitive text), more windows are drawn, each round from a
        stream of its own, so the tokenizer always has the size asked for."""
        config = self.config
        extra: list[bytes] = []
        for round_ in range(MORE_TEXT_ROUNDS + 1):
            count = config.tokenizer_texts if round_ == 0 else max(8, config.tokenizer_texts)
            extra += [self.corpus.text(self.corpus.example(config.seed + TOKENIZER_STREAM + round_,
                                                           step * count + i))[0] for i in range(count)]
            try:
                return sample_tokenizer(extra + texts, config.vocab_size, [config.seed, step], config.noise_mean,
                                        config.noise_sigma)
            except TooFewPieces:
                if round_ == MORE_TEXT_ROUNDS:
                    raise

    def batches(self, step: int, world: int, rank: int):
        config, frozen = self.config, self.frozen
        per_step = config.batch_size * config.grad_accum * world
        texts = [self.corpus.text(self.corpus.example(config.seed, step * per_step + i))[0] for i in range(per_step)]
        tokenizer = self.step_tokenizer(step, texts)
        encoded = [tokenizer.encode(t) for t in texts]
        if frozen.context is not None:
            check_context(max(len(e) for e in encoded) + 1, frozen.context, "--window", "a training window",
                          "the model")
        seen = sorted({i for e in encoded for i in e})
        rest = np.setdiff1d(np.arange(len(tokenizer)), np.array(seen, dtype=np.int64))
        rng = np.random.default_rng([config.seed, step, 1])
        negatives = rng.choice(rest, size=min(config.negatives, len(rest)), replace=False) if len(rest) else []
        subset = sorted(set(seen) | {int(i) for i in negatives})
        position = {token: i for i, token in enumerate(subset)}
        pieces = [self.decompose(tokenizer.pieces[t]) for t in subset]
        prefix = len(subset)  # the prefix token's row sits after the subset's
        base_in = subword_base(frozen.source_in, pieces)  # the same for every micro-batch of the step
        base_out = base_in if frozen.tied else subword_base(frozen.source_out, pieces)
        shared = {"pieces": pieces, "subset": subset, "base_in": base_in, "base_out": base_out,
                  "overlap": torch.tensor([len(p) == 1 for p in pieces], dtype=torch.bool)}
        own, tokens = [], 0
        for m in range(config.grad_accum):
            for r in range(world):
                chosen = encoded[(m * world + r) * config.batch_size:(m * world + r + 1) * config.batch_size]
                tokens += sum(len(e) for e in chosen)
                if r != rank:
                    continue
                ids, mask = _pad([[prefix] + [position[t] for t in e] for e in chosen], prefix)
                loss_mask = mask.bool().clone()
                loss_mask[:, 0] = False
                own.append({"ids": ids, "mask": mask, "loss_mask": loss_mask, **shared})
        return own, {"tokens": max(1, tokens), "micro_batches": config.grad_accum * world}

    def predict(self, module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input rows, output rows and corrections for the step's subset (``[n, d]``, ``[n, d]``, ``[n, w]``)."""
        frozen, device = self.frozen, self.frozen.device
        base_in, base_out = batch["base_in"].to(device), batch["base_out"].to(device)
        correction = corrections(module, frozen.device_in, frozen.device_out, batch["pieces"])
        dim = base_in.shape[1]
        rows_in = base_in + correction[:, :dim]
        rows_out = rows_in if frozen.tied else base_out + correction[:, dim:]
        return rows_in, rows_out, correction

    def loss(self, module, batch, counts):
        frozen, device = self.frozen, self.frozen.device
        rows_in, rows_out, correction = self.predict(module, batch)
        table = torch.cat([rows_in, frozen.prefix_row.to(device)[None]])
        ids, mask = batch["ids"].to(device), batch["mask"].to(device)
        logits = frozen.logits(table[ids], mask, rows_out)
        targets = ids[:, 1:]
        scored = batch["loss_mask"].to(device)[:, 1:]
        lm = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum") / counts["tokens"]
        total = lm
        overlap = batch["overlap"].to(device)
        if self.config.aux_weight > 0 and bool(overlap.any()):
            aux = (correction[overlap][:, :rows_in.shape[1]] ** 2).sum(-1).mean() / self.mean_square
            total = total + self.config.aux_weight * aux / counts["micro_batches"]
        return total, float(total.detach())

    def count(self, report, counts):
        report.tokens += counts["tokens"]


def train_hypernet(model: Path, texts: list[Path], out: Path, config: HypernetConfig, resume: bool = False,
                   force: bool = False, progress: bool = True, checkpoint_every: int = 0,
                   stop_after: int | None = None, allow_pickle: bool = False) -> tuple[Path, HypernetReport]:
    """Train a hypernetwork for ``model`` on ``texts`` and write it to ``out`` (HN_DIR).

    Checkpoints, ``resume`` and ``stop_after`` behave as for ``heal``.
    """
    config = config.resolved()
    checks.number("checkpoint_every", checkpoint_every, low=0, integer=True)
    if stop_after is not None:
        checks.number("stop_after", stop_after, low=1, integer=True)
    out = Path(out)
    model_dir = resolve_source(Path(model))
    protected = [model_dir] + [Path(t) for t in texts]
    check_output(out, force, protected=protected)
    checkpoints, found = start_checkpoints(out, resume, force, protected)

    corpus = Corpus([Path(t) for t in texts], config.window)
    accelerator = make_accelerator(config.precision)
    device = accelerator.device
    base, tokenizer = load_causal_lm(model_dir, allow_pickle=allow_pickle)
    frozen = FrozenModel(base, tokenizer, device)
    frozen.check_head()
    spec = frozen.spec(config, str(model))
    torch.manual_seed(config.seed)
    network = Hypernetwork(spec).to(device)
    network.train()
    optimizer = torch.optim.AdamW([{"params": list(network.parameters()), "peak": config.lr}], lr=config.lr,
                                  weight_decay=config.weight_decay, foreach=False)
    run = None
    if found or checkpoint_every > 0:
        run = {"model": model_input(model, model_dir), "texts": text_inputs(corpus.paths, corpus.documents)}
    report = HypernetReport(str(model), corpus.paths, asdict(config), accelerator.num_processes, str(device))
    start = 0
    if found:
        state = load_checkpoint(found, network, optimizer, config, run, "hypernet")
        start = state["step"]
        report.restore(state["report"], start)
    network, optimizer = accelerator.prepare(network, optimizer)
    task = HypernetTask(corpus, config, frozen)
    finished = run_steps(accelerator, network, optimizer, config, task, report, start=start,
                         desc="hypernet", kind="hypernet", checkpoints=checkpoints,
                         checkpoint_every=checkpoint_every, inputs=run, stop_after=stop_after, progress=progress)
    if not finished:
        return checkpoints, report
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(network).cpu()
        with staged_output(out, force) as tmp:
            save_hypernet(tmp, trained, {"config": asdict(config), "report": report.to_dict(timings=False)})
    accelerator.wait_for_everyone()
    return out, report
