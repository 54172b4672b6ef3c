"""``wechsel`` (Minixhofer et al., 2022): place target tokens among source tokens through aligned word vectors.

WECHSEL moves a model to a tokenizer of another language with two sets of static word vectors,
one per language, and a bilingual dictionary:

1. Each tokenizer's tokens get vectors in their language's word-vector space.  With plain word
   vectors (WECHSEL's variant without fastText subword information), a token's vector is the
   frequency-weighted mean of the vectors of the words whose tokenization contains it; every word
   is tokenized alone and after a space (``word`` and `` word``), so that both the word-start
   (``Ġ``/``▁``) and the bare form of a piece are found.  A token that is itself a word is among
   those words.  Tokens no word contains get no vector (they fall back to ``subword``).
2. The source space is rotated onto the target space with orthogonal Procrustes, fitted on the
   dictionary pairs that have vectors on both sides (each pair also tried lower-cased and
   title-cased, as WECHSEL does).
3. Each new target token takes its ``neighbors`` most cosine-similar source tokens and the
   weights ``softmax(similarity / temperature)``; its row is that weighted sum of source rows.

The vectors are fastText's (read with gensim): a ``.bin`` model such as the published ``cc.de.300.bin``
or a ``.vec`` text file.  A ``.bin`` holds word counts (the default weights) and character n-grams:
a dictionary word it does not list gets fastText's n-gram vector, so it still counts in the
Procrustes fit.  Word frequencies are not in the ``.vec`` format; files written by word2vec and
fastText list words most frequent first, so a ``.vec`` word's weight is Zipf's estimate ``1 / rank``.
When the two languages' vectors have different sizes, the larger are reduced to the smaller size
by PCA (:mod:`.pca`, as ``fasttext.util.reduce_model`` reduces fastText models), before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..align.token_bytes import Vocabulary
from ..errors import TokenbridgeError
from .combine import Combination, apply_combination
from .pca import pca, project
from .registry import MethodInputs, MethodResult, TransplantContext, register, resource
from .sparse import cosine_topk
from .static_vectors import WordVectors, read_vectors


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``W [d, d]`` minimising ``||source @ W - target||_F``.

    ``source``/``target [n, d]``: paired rows.  Closed form (Schönemann, 1966): with
    ``source^T target = U S V^T``, ``W = U V^T``.
    """
    if source.shape != target.shape or source.ndim != 2:
        raise ValueError(f"procrustes: shapes {tuple(source.shape)} and {tuple(target.shape)}")
    u, _, vh = torch.linalg.svd(source.double().T @ target.double())
    return (u @ vh).to(source.dtype)


def token_vectors(pieces: list[list[int]], vectors: torch.Tensor, weights: torch.Tensor, vocab_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token vectors as weighted means of the vectors of the words that contain them.

    ``pieces[i]``: the token ids of word ``i`` (repeats count once); ``vectors [n, d]``; ``weights [n]``
    (> 0).  Returns ``(rows [vocab_size, d], found [vocab_size] bool)``:
    ``rows[t] = sum_{i: t in pieces[i]} weights[i] * vectors[i] / sum_{i: t in pieces[i]} weights[i]``,
    zero where no word contains ``t``.
    """
    token_ids, word_ids = [], []
    for word, ids in enumerate(pieces):
        for token in sorted(set(ids)):
            token_ids.append(token)
            word_ids.append(word)
    tokens = torch.tensor(token_ids, dtype=torch.int64)
    words = torch.tensor(word_ids, dtype=torch.int64)
    w = weights.double()[words]
    sums = torch.zeros((vocab_size, vectors.shape[1]), dtype=torch.float64)
    sums.index_add_(0, tokens, vectors.double()[words] * w[:, None])
    mass = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, tokens, w)
    found = mass > 0
    rows = torch.zeros((vocab_size, vectors.shape[1]), dtype=torch.float32)
    rows[found] = (sums[found] / mass[found, None]).float()
    return rows, found


def nearest_sources(target: torch.Tensor, source: torch.Tensor, k: int, temperature: float, chunk: int = 2048
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each target row's ``k`` most cosine-similar source rows and their softmax weights.

    ``target [m, d]``, ``source [s, d]`` -> ``(indices [m, k], weights [m, k], similarities [m, k])`` with
    ``k`` cut to ``s``, neighbours by descending similarity, ``weights = softmax(similarities / temperature)``.
    """
    sims, indices = cosine_topk(target.float(), source.float(), k, chunk)
    weights = torch.softmax(sims.double() / temperature, dim=1).float()
    return indices, weights, sims


def read_dictionary(path) -> list[tuple[str, str]]:
    """``source_word<TAB>target_word`` lines (or two fields separated by spaces); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise TokenbridgeError(f"dictionary {path}: no such file")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise TokenbridgeError(f"dictionary {path}: not UTF-8 text ({error.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) != 2 or not all(fields):
            raise TokenbridgeError(f"dictionary {path}: line {number}: expected 'source_word<TAB>target_word', "
                                   f"got {line[:60]!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise TokenbridgeError(f"dictionary {path}: no word pairs")
    return pairs


def dictionary_rows(pairs: list[tuple[str, str]], source: dict[str, int], target: dict[str, int]
                    ) -> tuple[list[int], list[int]]:
    """Row pairs for the dictionary entries found in both vocabularies.

    As WECHSEL, each side is also tried lower-cased and title-cased; every combination found is a pair
    (each distinct pair of rows once, in dictionary order).
    """
    seen: set[tuple[int, int]] = set()
    source_rows, target_rows = [], []
    for source_word, target_word in pairs:
        for a in dict.fromkeys((source_word, source_word.lower(), source_word.title())):
            for b in dict.fromkeys((target_word, target_word.lower(), target_word.title())):
                if a in source and b in target and (source[a], target[b]) not in seen:
                    seen.add((source[a], target[b]))
                    source_rows.append(source[a])
                    target_rows.append(target[b])
    return source_rows, target_rows


def word_weights(wv: WordVectors, weighting: str) -> torch.Tensor:
    """``[n]`` weights of the words: corpus counts when known, else Zipf's ``1 / rank``; or all ones."""
    if weighting == "uniform":
        return torch.ones(len(wv), dtype=torch.float64)
    if weighting != "frequency":
        raise TokenbridgeError(f"wechsel: weighting={weighting!r}; use 'frequency' or 'uniform'")
    if any(c > 0 for c in wv.counts):
        return torch.tensor(wv.counts, dtype=torch.float64).clamp(min=1e-3)
    return 1.0 / torch.arange(1, len(wv) + 1, dtype=torch.float64)


def word_pieces(vocab: Vocabulary, words: list[str], batch: int = 8192) -> list[list[int]]:
    """The ordinary (non-special) token ids of each word, tokenized alone and after a space."""
    special = {t.id for t in vocab.tokens if t.special}
    out = []
    for begin in range(0, len(words), batch):
        chunk = words[begin:begin + batch]
        alone = vocab.backend.encode_batch(chunk, add_special_tokens=False)
        spaced = vocab.backend.encode_batch([" " + w for w in chunk], add_special_tokens=False)
        for a, b in zip(alone, spaced):
            out.append([i for i in a.ids + b.ids if i not in special and i < len(vocab)])
    return out


@dataclass
class WechselConfig:
    """WECHSEL's resources and options (defaults as in the paper)."""

    source_vectors: str = resource("fastText word vectors of the source model's language: a .bin model "
                                   "(e.g. cc.en.300.bin, with subword n-grams) or a .vec text file")
    target_vectors: str = resource("fastText word vectors of the target tokenizer's language, .bin or .vec")
    dictionary: str = resource("bilingual dictionary, one 'source_word<TAB>target_word' pair per line")
    neighbors: int = 10  # source tokens combined into each new token (WECHSEL's k)
    temperature: float = 0.1  # softmax temperature over the neighbours' cosine similarities
    max_words: int = 0  # read only the first (most frequent) words of each vector file; 0 reads all
    weighting: str = "frequency"  # words containing a token: "frequency" (counts, else 1/rank) or "uniform"


def dictionary_space(wv: WordVectors, words: list[str]) -> tuple[torch.Tensor, dict[str, int], int]:
    """``wv``'s rows, then rows for the dictionary ``words`` it lists in no casing (as written, lower- or
    title-cased) but can give n-gram vectors (a ``.bin``), each as written.  Returns
    ``(matrix [n + extra, d], word -> row, extra)``."""
    index = wv.index()
    missing = list(dict.fromkeys(w for w in words if not any(v in index for v in (w, w.lower(), w.title()))))
    extra, found, _ = wv.lookup(missing) if missing and wv.ngrams is not None else (None, None, None)
    if extra is None or not bool(found.any()):
        return wv.vectors, index, 0
    kept = [w for w, f in zip(missing, found.tolist()) if f]
    for k, word in enumerate(kept):
        index[word] = len(wv) + k
    return torch.cat([wv.vectors, extra[found]]), index, len(kept)


def same_size(source: torch.Tensor, target: torch.Tensor, source_words: int, target_words: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both spaces at the smaller of their two sizes: the larger is projected on its principal directions,
    fitted on its first ``*_words`` rows (the words of the file, not the n-gram rows after them)."""
    if source.shape[1] > target.shape[1]:
        components, mean = pca(source[:source_words], target.shape[1])
        return project(source, components, mean), target
    if target.shape[1] > source.shape[1]:
        components, mean = pca(target[:target_words], source.shape[1])
        return source, project(target, components, mean)
    return source, target


def wechsel_combination(source_words: WordVectors, target_words: WordVectors, pairs: list[tuple[str, str]],
                        source: Vocabulary, target: Vocabulary, new_ids: list[int], config: WechselConfig
                        ) -> Combination:
    """The weights of every new target token (``new_ids``) that some target word contains."""
    source_matrix, source_index, _ = dictionary_space(source_words, [a for a, _ in pairs])
    target_matrix, target_index, _ = dictionary_space(target_words, [b for _, b in pairs])
    source_matrix, target_matrix = same_size(source_matrix, target_matrix, len(source_words), len(target_words))
    source_rows, target_rows = dictionary_rows(pairs, source_index, target_index)
    if not source_rows:
        raise TokenbridgeError(f"wechsel: none of the {len(pairs)} dictionary pairs has vectors in both languages")
    rotation = procrustes(source_matrix[source_rows], target_matrix[target_rows])
    aligned = source_matrix[:len(source_words)] @ rotation  # linear, so the same as rotating the token vectors

    source_vectors, source_found = token_vectors(word_pieces(source, source_words.words), aligned,
                                                 word_weights(source_words, config.weighting), len(source))
    target_vectors, target_found = token_vectors(word_pieces(target, target_words.words),
                                                 target_matrix[:len(target_words)],
                                                 word_weights(target_words, config.weighting), len(target))
    candidates = torch.tensor([t.id for t in source.tokens if source_found[t.id] and not t.special],
                              dtype=torch.int64)
    placed = [i for i in new_ids if target_found[i]]
    combination = Combination()
    if candidates.numel() == 0 or not placed:
        return combination
    indices, weights, _ = nearest_sources(target_vectors[placed], source_vectors[candidates],
                                          config.neighbors, config.temperature)
    for row, target_id in enumerate(placed):
        combination.add(target_id, candidates[indices[row]].tolist(), weights[row].tolist())
    return combination


def prepare_wechsel(context: TransplantContext, config: WechselConfig) -> Combination:
    if config.neighbors < 1 or config.temperature <= 0 or config.max_words < 0:
        raise TokenbridgeError("wechsel: neighbors must be >= 1, temperature > 0 and max_words >= 0")
    if config.weighting not in ("frequency", "uniform"):
        raise TokenbridgeError(f"wechsel: weighting={config.weighting!r}; use 'frequency' or 'uniform'")
    pairs = read_dictionary(config.dictionary)
    limit = config.max_words or None
    source_words = read_vectors(config.source_vectors, limit=limit)
    target_words = read_vectors(config.target_vectors, limit=limit)
    return wechsel_combination(source_words, target_words, pairs, context.source, context.target,
                               [t.id for t in context.new_tokens], config)


@register("wechsel", WechselConfig, "WECHSEL: nearest source tokens in aligned bilingual word-vector spaces",
          prepare=prepare_wechsel)
def wechsel(inputs: MethodInputs, config: WechselConfig) -> MethodResult:
    return apply_combination(inputs, inputs.prepared, "wechsel")
