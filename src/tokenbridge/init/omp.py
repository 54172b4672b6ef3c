"""``omp`` (mergekit tokensurgeon): sparse codes found in a donor by orthogonal matching pursuit.

A *donor* model already uses the target tokenizer.  For every new target token ``t`` the donor's
row ``donor[t]`` is written as a ``k``-sparse combination of the donor rows of the overlapping
tokens (the ordinary tokens source and target share) by orthogonal matching pursuit; the same
coefficients applied to the *source* rows of those tokens give the new row.  Input rows are coded
in the donor's input embeddings, output rows in its output head (its input embeddings when the
donor is tied, and then both matrices share one code).

Selection rule as mergekit's ``batch_omp`` (``mergekit/tokensurgeon/omp.py``): at each step the
not yet chosen atom with the largest ``|<residual, atom>|`` joins (atoms are not normalised), and
the coefficients are the least-squares fit of the target on the chosen atoms.  Unlike mergekit, a
token stops early, with fewer than ``k`` atoms, when its residual has vanished or when the atom
picked next is a linear combination of those already chosen (mergekit would add it with a clamped
norm); so no atom is picked twice and no system is singular.  A token whose donor row is zero has
nothing to code and gets the mean source row (reported as a fallback).

Exact OMP over every overlapping token costs ``~2 k d N`` flops per token (``N`` overlapping
tokens), too much for a 200k-token vocabulary.  With ``pool > 0`` a token is pursued only among
``pool`` candidates chosen by one matmul with all atoms (screening, see :class:`Screen`), by
Batch-OMP (Rubinstein, Zibulevsky & Elad 2008): from the pool's Gram matrix and the initial
correlations, with the Cholesky factor of the chosen atoms' Gram matrix grown one row per step;
the steps never touch ``d``-sized vectors.  ``pool=0`` runs exact OMP over all overlapping tokens.

Screening by the raw correlations ``|<target, atom>|`` keeps the atoms that share the embeddings'
common directions with the target; exact OMP removes those directions in its first steps and then
mostly picks other atoms (on Gemma-3's embeddings, 8% of its picks were in that pool of 256).
The screen therefore scores atoms after centring and removing the donor rows' ``screen_rank``
main principal directions: on 256 Gemma-3 tokens (k=64, 46k atoms) the mean relative residual
was 0.37 exact, 0.65 with raw screening and 0.48 with this screen (pool 256, rank 32).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import TokenbridgeError
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource

GATHER_FLOATS = 1 << 22  # bound on the pool rows gathered at once for the Gram matrices (16 MiB in float32)
COMBINE_BATCH = 256  # new rows assembled from source rows at a time


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


class _GramSpace:
    """Pursuit inside per-token candidate pools, from their Gram matrices ``[B, P, P]``.

    Keeps ``basis [B, k, P]``: row ``j`` holds ``<candidate, q_j>`` for every candidate, ``q_j`` the
    ``j``-th orthonormal direction of the chosen atoms' span (``G[:, I] L^-T``).
    """

    def __init__(self, gram: torch.Tensor, basis: torch.Tensor):
        self.gram = gram
        self.rows = torch.arange(gram.shape[0], device=gram.device)
        self.basis = basis  # [B, steps, P]; row t is written at step t before it is read

    def norm2(self, chosen: torch.Tensor) -> torch.Tensor:
        return self.gram[self.rows, chosen, chosen]

    def coordinates(self, chosen: torch.Tensor, t: int) -> torch.Tensor:
        """``[B, t]``: the chosen atom in the orthonormal directions so far (``L^-1 G[I, chosen]``)."""
        return self.basis[self.rows, :t, chosen]

    def extend(self, chosen, coords, scale, keep, t) -> torch.Tensor:
        """Add the new direction; return ``<candidate, q_t>`` for every candidate ``[B, P]``."""
        column = self.gram[self.rows, chosen]  # G symmetric: row = column
        if t:
            column = column - torch.bmm(coords.unsqueeze(1), self.basis[:, :t]).squeeze(1)
        column = column * (keep / scale).unsqueeze(1)
        self.basis[:, t] = column
        return column


class _AtomSpace:
    """Exact pursuit over all atoms ``[N, d]``: orthonormal directions kept as ``d``-vectors ``[B, k, d]``."""

    def __init__(self, atoms: torch.Tensor, norms2: torch.Tensor, batch: int, steps: int, out: torch.Tensor):
        self.atoms = atoms
        self.norms2 = norms2
        self.directions = torch.zeros((batch, steps, atoms.shape[1]), dtype=atoms.dtype, device=atoms.device)
        self.picked = None
        self.out = out  # [B, N], reused for every step's correlations

    def norm2(self, chosen: torch.Tensor) -> torch.Tensor:
        return self.norms2[chosen]

    def coordinates(self, chosen: torch.Tensor, t: int) -> torch.Tensor:
        self.picked = self.atoms[chosen]  # [B, d]
        return torch.bmm(self.directions[:, :t], self.picked.unsqueeze(2)).squeeze(2)

    def extend(self, chosen, coords, scale, keep, t) -> torch.Tensor:
        direction = self.picked
        if t:
            direction = direction - torch.bmm(coords.unsqueeze(1), self.directions[:, :t]).squeeze(1)
        direction = direction * (keep / scale).unsqueeze(1)
        self.directions[:, t] = direction
        return torch.mm(direction, self.atoms.T, out=self.out)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run many small tensor ops (the pursuit's steps, a ``d x d`` eigh) on one CPU thread.

    Split across threads, each small op waits for every thread, which on a CPU shared with other
    work costs far more than it gains (a 576 x 576 eigh: 0.14 s on one thread, 4 s on two).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pursue(correlations: torch.Tensor, target_norms2: torch.Tensor, steps: int, space) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """OMP from the initial correlations ``[B, P]``; ``space`` supplies atom geometry.

    Gram-Schmidt on the chosen atoms, kept implicitly: at step ``t`` the chosen atom ``a`` has
    coordinates ``w = L^-1 G[I, a]`` in the orthonormal directions ``q_1..q_t`` of the chosen span
    and distance ``s = sqrt(|a|^2 - |w|^2)`` from it; ``[w, s]`` is row ``t`` of the Cholesky
    factor ``L`` of ``G[I, I]``.  With ``q = (a - sum w_j q_j) / s`` the target's new coordinate is
    ``z_t = <x, q> = <residual, a> / s``, every correlation drops by ``z_t <candidate, q>`` and
    ``|residual|^2`` by ``z_t^2``.  The coefficients solve ``L^T c = z`` once at the end.

    Returns ``(positions [B, steps], coefficients [B, steps])``; unused slots (a token that
    stopped early) have position -1 and coefficient 0 and come after the used ones.
    """
    batch, _ = correlations.shape
    dtype, device = correlations.dtype, correlations.device
    tol = 100 * torch.finfo(dtype).eps  # relative: a vanished residual, a dependent atom
    rows = torch.arange(batch, device=device)
    alpha = correlations.clone()  # <residual, candidate>
    taken = torch.zeros(alpha.shape, dtype=torch.bool, device=device)
    positions = torch.full((batch, steps), -1, dtype=torch.int64, device=device)
    chol = torch.zeros((batch, steps, steps), dtype=dtype, device=device)  # L, L L^T = G[I, I]
    z = torch.zeros((batch, steps), dtype=dtype, device=device)  # L^-1 <target, atoms I>
    residual2 = target_norms2.clone()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(steps):
        done |= residual2 <= tol * target_norms2
        chosen = alpha.abs().masked_fill_(taken, -1.0).argmax(dim=1)
        coords = space.coordinates(chosen, t)
        norm2 = space.norm2(chosen)
        rest2 = norm2 - (coords * coords).sum(dim=1)
        done |= rest2 <= tol * norm2
        keep = (~done).to(dtype)
        scale = torch.where(done, torch.ones_like(rest2), rest2).sqrt()
        zt = alpha[rows, chosen] * keep / scale
        alpha.addcmul_(zt.unsqueeze(1), space.extend(chosen, coords, scale, keep, t), value=-1.0)
        residual2 -= zt * zt
        chol[:, t, :t] = coords * keep.unsqueeze(1)
        chol[:, t, t] = scale
        z[:, t] = zt
        positions[:, t] = torch.where(done, -1, chosen)
        taken[rows, chosen] |= ~done
    coefficients = torch.linalg.solve_triangular(chol.mT, z.unsqueeze(2), upper=True).squeeze(2)
    return positions, coefficients


@dataclass(frozen=True)
class Screen:
    """How a token's pool is chosen: by ``|<P(target - mean), atom - mean>|``.

    ``P`` removes the ``directions [r, d]`` (orthonormal): the atoms' main principal directions.
    OMP's first steps take those directions out of the residual, and the atoms it picks afterwards
    are those that match what is left; raw correlations ``|<target, atom>|`` (``Screen`` None)
    rank atoms by the shared directions instead, and the pool misses most of what exact OMP picks.
    """

    mean: torch.Tensor  # [d]
    directions: torch.Tensor  # [r, d]

    def scores(self, targets: torch.Tensor, atoms: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N]`` screening scores of ``atoms [N, d]`` for ``targets [B, d]`` (into ``out``)."""
        probe = targets - self.mean
        probe = probe - (probe @ self.directions.T) @ self.directions
        return torch.addmm((probe @ self.mean).unsqueeze(1), probe, atoms.T, beta=-1.0, out=out).abs_()


def principal_screen(atoms: torch.Tensor, rank: int, chunk: int = 8192) -> Screen | None:
    """A :class:`Screen` from the mean and the ``rank`` main principal directions of ``atoms [N, d]``.

    ``rank`` 0 gives None (raw correlations); it is capped at ``d - 1``.
    """
    rank = min(rank, atoms.shape[1] - 1)
    if rank <= 0 or atoms.shape[0] < 2:
        return None
    dtype = _work_dtype(atoms)
    mean = atoms.to(dtype).mean(dim=0)
    scatter = torch.zeros((atoms.shape[1], atoms.shape[1]), dtype=dtype, device=atoms.device)
    for begin in range(0, atoms.shape[0], chunk):
        centred = atoms[begin:begin + chunk].to(dtype) - mean
        scatter.addmm_(centred.T, centred)
    with _one_thread(atoms.device):  # a small problem; threaded, it can take seconds on a busy CPU
        _, vectors = torch.linalg.eigh(scatter.double())  # ascending eigenvalues
    return Screen(mean, vectors[:, -rank:].T.contiguous().to(dtype))


def screen(targets: torch.Tensor, atoms: torch.Tensor, pool: int, how: Screen | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, pool]`` indices of each target's pool of atoms, ascending per row.

    ``how`` None: the atoms with the largest ``|<target, atom>|``; else ``how.scores``.  ``out``:
    an optional ``[B, N]`` buffer for the scores.
    """
    scores = torch.mm(targets, atoms.T, out=out).abs_() if how is None else how.scores(targets, atoms, out)
    return scores.topk(pool, dim=1, sorted=False).indices.sort(dim=1).values


class _Buffers:
    """The large per-batch tensors, allocated once per :func:`batch_omp` call and reused.

    A fresh allocation of tens of MB costs page faults about as dear as filling it.
    """

    def __init__(self, batch: int, size: int, pool: int, steps: int, d: int, dtype, device, exact: bool):
        def empty(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        self.scores = empty(batch, size)  # screening scores, or the exact pursuit's per-step correlations
        if not exact:
            self.gather = max(1, min(batch, GATHER_FLOATS // (pool * d)))  # tokens whose pool rows are gathered at once
            self.rows = empty(self.gather * pool, d)
            self.gram = empty(batch, pool, pool)
            self.basis = empty(batch, steps, pool)


def _pool_codes(targets: torch.Tensor, atoms: torch.Tensor, k: int, pool: int, how: Screen | None,
                buffers: _Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    batch, d = targets.shape
    steps = min(k, pool)
    candidates = screen(targets, atoms, pool, how, buffers.scores[:batch])
    gram = buffers.gram[:batch]
    correlations = torch.empty((batch, pool), dtype=targets.dtype, device=targets.device)
    for begin in range(0, batch, buffers.gather):
        ids = candidates[begin:begin + buffers.gather]
        rows = torch.index_select(atoms, 0, ids.reshape(-1), out=buffers.rows[:ids.numel()]).view(len(ids), pool, d)
        torch.bmm(rows, rows.mT, out=gram[begin:begin + len(ids)])
        correlations[begin:begin + len(ids)] = torch.bmm(rows, targets[begin:begin + len(ids)].unsqueeze(2)).squeeze(2)
    with _one_thread(targets.device):
        positions, coefficients = _pursue(correlations, (targets * targets).sum(dim=1), steps,
                                          _GramSpace(gram, buffers.basis[:batch]))
    indices = torch.where(positions >= 0, candidates.gather(1, positions.clamp(min=0)), -1)
    return indices, coefficients


def _exact_codes(targets: torch.Tensor, atoms: torch.Tensor, norms2: torch.Tensor, k: int, buffers: _Buffers):
    steps = min(k, atoms.shape[0])
    out = buffers.scores[:targets.shape[0]]
    space = _AtomSpace(atoms, norms2, targets.shape[0], steps, out)
    return _pursue(targets @ atoms.T, (targets * targets).sum(dim=1), steps, space)


def batch_omp(targets: torch.Tensor, atoms: torch.Tensor, k: int, pool: int = 256, batch: int = 256,
              how: Screen | None = None, ids: torch.Tensor | None = None,
              on_batch: Callable[[int], object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``targets [M, d]`` in ``atoms [N, d]`` by orthogonal matching pursuit.

    ``k``: atoms per target at most; ``pool``: each target is pursued among its ``pool`` atoms of
    largest screening score (``how``, see :func:`screen`; 0, or ``pool >= N``: among all atoms,
    exact OMP); ``batch``: targets at a time (memory per CPU thread ``~batch * (N + pool *
    (pool + k))`` floats).  ``ids``: code only ``targets[ids]`` (gathered a batch at a time);
    ``on_batch(n)`` is called as each batch of ``n`` targets is done.  Runs on the tensors'
    device, in float64 for float64 input, else float32; on a CPU, whole batches run in parallel
    on single threads.

    Returns ``(indices [M, k'], coefficients [M, k'])``, ``k' = min(k, pool or N)``: chosen atoms
    in the order chosen, then -1 / 0 for unused slots; ``targets[i] ~= sum_j coefficients[i, j] *
    atoms[indices[i, j]]`` over the used slots.
    """
    dtype = _work_dtype(targets)
    count, size = (targets.shape[0] if ids is None else len(ids)), atoms.shape[0]
    exact = pool <= 0 or pool >= size
    width = min(k, size if exact else pool)
    indices = torch.full((count, width), -1, dtype=torch.int64, device=targets.device)
    coefficients = torch.zeros((count, width), dtype=dtype, device=targets.device)
    if not count or not width:
        return indices, coefficients
    atoms = atoms.to(dtype)
    norms2 = (atoms * atoms).sum(dim=1) if exact else None
    starts = range(0, count, batch)
    workers = min(torch.get_num_threads(), len(starts)) if targets.device.type == "cpu" and not exact else 1
    spare = queue.SimpleQueue()  # one set of buffers per worker
    for _ in range(workers):
        spare.put(_Buffers(min(batch, count), size, pool, width, atoms.shape[1], dtype, targets.device, exact))

    def code(begin: int) -> None:
        buffers = spare.get()
        block = targets[begin:begin + batch] if ids is None else targets[ids[begin:begin + batch]]
        block = block.to(dtype)
        if exact:
            found = _exact_codes(block, atoms, norms2, k, buffers)
        elif workers > 1:
            with _one_thread(targets.device):
                found = _pool_codes(block, atoms, k, pool, how, buffers)
        else:
            found = _pool_codes(block, atoms, k, pool, how, buffers)
        indices[begin:begin + batch], coefficients[begin:begin + batch] = found
        spare.put(buffers)
        if on_batch is not None:
            on_batch(len(block))

    if workers == 1:
        for begin in starts:
            code(begin)
    else:  # on a CPU, whole batches in parallel, each on one thread: no per-op thread handoffs
        with ThreadPoolExecutor(workers) as executor:
            list(executor.map(code, starts))
    return indices, coefficients


def combine_atoms(indices: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor,
                  batch: int = COMBINE_BATCH) -> torch.Tensor:
    """``out[i] = sum_j coefficients[i, j] * rows[indices[i, j]]`` over slots with ``indices >= 0``.

    ``indices``/``coefficients [M, k]``, ``rows [N, d]`` -> ``[M, d]`` in ``rows``' dtype.
    """
    count, width = indices.shape
    out = torch.zeros((count, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    picked = torch.empty((min(batch, count) * width, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    for begin in range(0, count, batch):
        ids = indices[begin:begin + batch].to(torch.int64)
        weights = torch.where(ids >= 0, coefficients[begin:begin + batch].to(rows.dtype), 0)
        block = torch.index_select(rows, 0, ids.clamp(min=0).reshape(-1), out=picked[:ids.numel()])
        out[begin:begin + batch] = torch.bmm(weights.unsqueeze(1), block.view(len(ids), width, -1)).squeeze(1)
    return out


@dataclass
class OmpConfig:
    donor: str = resource("a model that already uses the target tokenizer")
    k: int = 64  # overlapping tokens (atoms) per new token, at most
    pool: int = 256  # candidates per new token, chosen by screening; 0 = all overlapping tokens (exact OMP, slow)
    screen_rank: int = 32  # principal directions of the donor rows left out when screening; 0 = raw correlations
    batch: int = 256  # new tokens pursued at a time; memory per CPU thread ~ batch * (N + pool * (pool + k)) floats


@dataclass
class OmpState:
    """What ``fn`` needs: codes per matrix, or the donor output rows to code lazily."""

    new_ids: torch.Tensor  # int64 [m], ascending: the context's new tokens
    overlap_source: torch.Tensor  # int64 [N]: source ids of the atoms
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # matrix -> (indices, coefs)
    donor_output: torch.Tensor | None = None  # an untied donor's output head, coded chunk by chunk
    output_atoms: torch.Tensor | None = None  # its overlapping rows
    output_screen: Screen | None = None

    def __post_init__(self):
        self.source_names = self.overlap_source.tolist()  # Python ints for the provenance lists


def prepare_omp(context: TransplantContext, config: OmpConfig) -> OmpState:
    from .resources import load_vocab_matrices

    if config.k < 1:
        raise TokenbridgeError(f"omp: k={config.k} must be at least 1")
    if config.pool < 0:
        raise TokenbridgeError(f"omp: pool={config.pool} must be 0 (all overlapping tokens) or more")
    if config.screen_rank < 0:
        raise TokenbridgeError(f"omp: screen_rank={config.screen_rank} must be 0 or more")
    if config.batch < 1:
        raise TokenbridgeError(f"omp: batch={config.batch} must be at least 1")
    if not context.overlap_target.numel():
        raise TokenbridgeError("omp: the source and target vocabularies share no ordinary tokens to combine")
    donor = load_vocab_matrices(config.donor, "donor", expect=context.target)
    input_rows, output_rows = donor.input, donor.output
    del donor
    state = OmpState(torch.tensor([t.id for t in context.new_tokens], dtype=torch.int64), context.overlap_source)
    atoms = input_rows[context.overlap_target]
    state.codes["input"] = _code_rows(input_rows, state.new_ids, atoms, _screen_for(atoms, config), config,
                                      context.progress)
    del input_rows, atoms
    if output_rows is None or context.source_tied:  # tied donor, or no output rows to build: same codes
        state.codes["output"] = state.codes["input"]
        del output_rows
    else:  # coded chunk by chunk, only if the pipeline asks for output rows (an untied source)
        state.donor_output = output_rows
        state.output_atoms = output_rows[context.overlap_target]
        state.output_screen = _screen_for(state.output_atoms, config)
    return state


def _screen_for(atoms: torch.Tensor, config: OmpConfig) -> Screen | None:
    exact = config.pool == 0 or config.pool >= atoms.shape[0]
    return None if exact else principal_screen(atoms, config.screen_rank)


def _code_rows(rows: torch.Tensor, ids: torch.Tensor, atoms: torch.Tensor, how: Screen | None, config: OmpConfig,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``rows[ids]`` in ``atoms``, kept as int32 / float32 on the CPU."""
    bar = tqdm(total=len(ids), desc="omp: donor codes", unit="tok", mininterval=1.0, disable=not progress)
    indices, coefficients = batch_omp(rows, atoms, config.k, config.pool, config.batch, how, ids, bar.update)
    bar.close()
    return indices.to("cpu", torch.int32), coefficients.to("cpu", torch.float32)


def _chunk_codes(state: OmpState, matrix: str, ids: torch.Tensor, config: OmpConfig):
    if matrix == "output" and state.donor_output is not None:
        return _code_rows(state.donor_output, ids, state.output_atoms, state.output_screen, config)
    indices, coefficients = state.codes[matrix]
    where = torch.searchsorted(state.new_ids, ids).clamp(max=len(state.new_ids) - 1)
    if not torch.equal(state.new_ids[where], ids):
        raise AssertionError("omp: asked for a token that prepare did not code")
    return indices[where], coefficients[where]


@register("omp", OmpConfig, "sparse code of the token's donor row in the overlapping tokens' donor rows, "
          "applied to their source rows (orthogonal matching pursuit, mergekit tokensurgeon)", prepare=prepare_omp)
def omp(inputs: MethodInputs, config: OmpConfig) -> MethodResult:
    state: OmpState = inputs.prepared
    ids = torch.tensor([t.id for t in inputs.new_tokens], dtype=torch.int64)
    indices, coefficients = _chunk_codes(state, inputs.matrix, ids, config)
    indices = indices.to(torch.int64)
    source_ids = torch.where(indices >= 0, state.overlap_source[indices.clamp(min=0)], -1)
    rows = combine_atoms(source_ids, coefficients, inputs.source_rows)
    used = (indices >= 0).sum(dim=1).tolist()
    fallback = [n == 0 for n in used]
    if any(fallback):
        rows[torch.tensor(fallback)] = inputs.source_rows.mean(dim=0)
    # provenance: one shared int object per source id (a 200k-token transplant lists 13M of them)
    names = state.source_names
    source_lists = [[names[j] for j in row[:n]] for row, n in zip(indices.tolist(), used)]
    return MethodResult(rows, source_lists, [w[:n] for w, n in zip(coefficients.tolist(), used)], fallback)
