"""DSKD (dual-space KD with cross-model attention) against hand computations with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import corpus, load_lm

from tokenbridge.errors import TokenbridgeError
from tokenbridge.heal.dskd import DSKDProjector, DSKDView, dskd_loss, dskd_projections

B, T_S, T_T, D_S, D_T, V_S, V_T = 2, 5, 7, 8, 6, 11, 13
STUDENT_ATTENTION = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
TEACHER_ATTENTION = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]


def next_real(attention: torch.Tensor) -> torch.Tensor:
    """[B, T] attention mask -> [B, T] bool, True where the next token is real."""
    return torch.cat([attention[:, 1:], torch.zeros_like(attention[:, :1])], dim=1).bool()


def random_view(generator: torch.Generator, length: int, dim: int, vocab: int, attention: list[list[int]],
                dtype: torch.dtype = torch.float32) -> DSKDView:
    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_(True)

    return DSKDView(embeds=leaf(B, length, dim), hidden=leaf(B, length, dim), logits=leaf(B, length, vocab, scale=2.0),
                    head=leaf(vocab, dim), ids=torch.randint(vocab, (B, length), generator=generator),
                    mask=next_real(torch.tensor(attention)))


def views(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[DSKDProjector, DSKDView, DSKDView]:
    torch.manual_seed(seed)
    projector = DSKDProjector(D_S, D_T)
    generator = torch.Generator().manual_seed(seed + 1)
    student = random_view(generator, T_S, D_S, V_S, STUDENT_ATTENTION, dtype)
    teacher = random_view(generator, T_T, D_T, V_T, TEACHER_ATTENTION, dtype)
    return projector, student, teacher


# ---------------------------------------------------------------- hand-written reference


def rows(tensor: torch.Tensor) -> list:
    return tensor.detach().double().tolist()


def hand_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def flat(nested) -> list[float]:
    return [x for item in nested for x in (flat(item) if isinstance(item, list) else [item])]


def hand_linear(layer: torch.nn.Linear, vector: list[float]) -> list[float]:
    weight, bias = rows(layer.weight), rows(layer.bias)
    return [sum(w * x for w, x in zip(weight[o], vector)) + bias[o] for o in range(len(bias))]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def hand_attend(scores: list[float], values: list[list[float]]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [sum(e / total * value[k] for e, value in zip(exps, values)) for k in range(len(values[0]))]


def hand_projections(projector: DSKDProjector, student: DSKDView, teacher: DSKDView):
    """{(b, i): t2s hidden} over valid student positions, {(b, j): s2t hidden} over valid teacher positions."""
    s_emb, s_hid = rows(student.embeds), rows(student.hidden)
    t_emb, t_hid = rows(teacher.embeds), rows(teacher.hidden)
    s_mask, t_mask = student.mask.tolist(), teacher.mask.tolist()
    n_s, n_t = len(s_emb[0]) - 1, len(t_emb[0]) - 1
    t_index = [[t_emb[b][j] + t_emb[b][j + 1] for j in range(n_t)] for b in range(B)]
    key_std = hand_std(flat(t_index))
    hidden_std = hand_std(flat([t_hid[b][:n_t] for b in range(B)]))
    target_std = hand_std(flat([t_emb[b][1:] for b in range(B)]))
    scale = math.sqrt(2 * len(t_emb[0][0]))
    t2s, s2t = {}, {}
    for b in range(B):
        queries = [hand_linear(projector.query, s_emb[b][i] + s_emb[b][i + 1]) for i in range(n_s)]
        keys = [[x / key_std for x in t_index[b][j]] for j in range(n_t)]
        t_values = [hand_linear(projector.t2s, [h / hidden_std + e / target_std
                                                for h, e in zip(t_hid[b][j], t_emb[b][j + 1])]) for j in range(n_t)]
        s_values = [hand_linear(projector.s2t, s_hid[b][i]) for i in range(n_s)]
        score = [[dot(queries[i], keys[j]) / scale for j in range(n_t)] for i in range(n_s)]
        valid_s = [i for i in range(n_s) if s_mask[b][i]]
        valid_t = [j for j in range(n_t) if t_mask[b][j]]
        for i in valid_s:
            t2s[b, i] = hand_attend([score[i][j] for j in valid_t], [t_values[j] for j in valid_t])
        for j in valid_t:
            s2t[b, j] = hand_attend([score[i][j] for i in valid_s], [s_values[i] for i in valid_s])
    return t2s, s2t


def hand_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - z for x in row]


def hand_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(p || q) from logits."""
    logp, logq = hand_log_softmax(p_logits), hand_log_softmax(q_logits)
    return sum(math.exp(a) * (a - c) for a, c in zip(logp, logq))


def hand_srkl(p_logits: list[float], q_logits: list[float], skew: float) -> float:
    """KL(q || (1 - skew) p + skew q) from logits, with tokenkit's 1e-9 inside the log."""
    logp, logq = hand_log_softmax(p_logits), hand_log_softmax(q_logits)
    return sum(math.exp(c) * (c - math.log((1 - skew) * math.exp(a) + skew * math.exp(c) + 1e-9))
               for a, c in zip(logp, logq))


def set_targets_to_argmax(projector: DSKDProjector, student: DSKDView, teacher: DSKDView) -> None:
    """Make the projected argmax right at even student positions and wrong at odd ones (ids do not enter
    the projections)."""
    with torch.no_grad():
        best = dskd_projections(projector, student, teacher).t2s_logits.argmax(-1)
    for b in range(B):
        for i in range(T_S - 1):
            student.ids[b, i + 1] = best[b, i] if i % 2 == 0 else (best[b, i] + 1) % V_S


# ---------------------------------------------------------------- tests


def test_projector_init_is_lecun_normal_and_seeded():
    torch.manual_seed(3)
    first = DSKDProjector(64, 32)
    torch.manual_seed(3)
    second = DSKDProjector(64, 32)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert first.query.weight.shape == (64, 128) and first.s2t.weight.shape == (32, 64)
    assert first.t2s.weight.shape == (64, 32)
    for layer in (first.query, first.s2t, first.t2s):
        assert torch.count_nonzero(layer.bias) == 0
        std = 1 / math.sqrt(layer.in_features)
        assert abs(layer.weight.std().item() / std - 1) < 0.06
        assert layer.weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6
    assert not torch.equal(first.s2t.weight, first.t2s.weight.T)


def test_attention_matches_hand_loops():
    projector, student, teacher = views()
    got = dskd_projections(projector, student, teacher)
    assert got.t2s_hidden.shape == (B, T_S - 1, D_S) and got.t2s_logits.shape == (B, T_S - 1, V_S)
    assert got.s2t_hidden.shape == (B, T_T - 1, D_T) and got.s2t_logits.shape == (B, T_T - 1, V_T)
    t2s, s2t = hand_projections(projector, student, teacher)
    assert len(t2s) == 4 + 2 and len(s2t) == 6 + 4
    s_head, t_head = rows(student.head), rows(teacher.head)
    for (b, i), hidden in t2s.items():
        assert got.t2s_hidden[b, i].tolist() == pytest.approx(hidden, abs=1e-5)
        assert got.t2s_logits[b, i].tolist() == pytest.approx([dot(hidden, row) for row in s_head], abs=1e-4)
    for (b, j), hidden in s2t.items():
        assert got.s2t_hidden[b, j].tolist() == pytest.approx(hidden, abs=1e-5)
        assert got.s2t_logits[b, j].tolist() == pytest.approx([dot(hidden, row) for row in t_head], abs=1e-4)


@pytest.mark.parametrize("divergence", ["kl", "srkl"])
def test_terms_match_hand_loops(divergence):
    projector, student, teacher = views(seed=5)
    set_targets_to_argmax(projector, student, teacher)
    temperature, teacher_temperature, skew = 2.0, 1.5, 0.1
    terms = dskd_loss(projector, student, teacher, temperature, teacher_temperature=teacher_temperature,
                      divergence=divergence, skew_lambda=skew)
    proj = dskd_projections(projector, student, teacher)
    t2s_logits, s2t_logits = rows(proj.t2s_logits), rows(proj.s2t_logits)
    s_logits, t_logits = rows(student.logits), rows(teacher.logits)
    ids, s_mask, t_mask = student.ids.tolist(), student.mask.tolist(), teacher.mask.tolist()
    ce = ce_count = kd = kd_count = s2t = s2t_count = 0.0
    for b in range(B):
        for i in range(T_S - 1):
            if not s_mask[b][i]:
                continue
            row, target = t2s_logits[b][i], ids[b][i + 1]
            ce -= hand_log_softmax(row)[target]
            ce_count += 1
            if max(range(V_S), key=lambda v: row[v]) != target:
                continue
            p_logits = [x / (temperature * teacher_temperature) for x in row]
            q_logits = [x / temperature for x in s_logits[b][i]]
            kd += hand_kl(p_logits, q_logits) if divergence == "kl" else hand_srkl(p_logits, q_logits, skew)
            kd_count += 1
        for j in range(T_T - 1):
            if t_mask[b][j]:
                s2t += hand_kl([x / temperature for x in t_logits[b][j]], [x / temperature for x in s2t_logits[b][j]])
                s2t_count += 1
    assert (ce_count, kd_count, s2t_count) == (6, 3, 10)
    assert terms.t2s_ce.count.item() == ce_count and terms.t2s_ce.sum.item() == pytest.approx(ce, rel=1e-5)
    assert terms.t2s_kd.count.item() == kd_count and terms.t2s_kd.sum.item() == pytest.approx(kd, rel=1e-5)
    assert terms.s2t_kd.count.item() == s2t_count and terms.s2t_kd.sum.item() == pytest.approx(s2t, rel=1e-5)
    assert terms.mean_sum().item() == pytest.approx(ce / ce_count + kd / kd_count + s2t / s2t_count, rel=1e-5)


def test_no_correct_position_gives_zero_kd_term():
    projector, student, teacher = views(seed=2)
    with torch.no_grad():
        best = dskd_projections(projector, student, teacher).t2s_logits.argmax(-1)
    student.ids[:, 1:] = (best + 1) % V_S
    terms = dskd_loss(projector, student, teacher)
    assert terms.t2s_kd.count.item() == 0 and terms.t2s_kd.sum.item() == 0
    assert terms.t2s_kd.mean().item() == 0 and torch.isfinite(terms.mean_sum())


def test_gradients_reach_projector_and_student_never_teacher_or_student_head():
    projector, student, teacher = views(seed=7)
    set_targets_to_argmax(projector, student, teacher)
    dskd_loss(projector, student, teacher, 2.0).mean_sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
    for name in ("hidden", "logits"):
        assert torch.count_nonzero(getattr(student, name).grad) > 0, name
    assert student.head.grad is None  # only in the t2s logits, detached there
    assert student.embeds.grad is None  # detached by default, as DSKD's code
    for name in ("embeds", "hidden", "logits", "head"):
        assert getattr(teacher, name).grad is None, name

    projector, student, teacher = views(seed=7)
    dskd_loss(projector, student, teacher, student_embeds_grad=True).mean_sum().backward()
    assert torch.count_nonzero(student.embeds.grad) > 0 and student.head.grad is None
    assert all(getattr(teacher, name).grad is None for name in ("embeds", "hidden", "logits", "head"))

    # t2s_ce trains the projector's query and t2s only: nothing of the student, nor s2t.
    projector, student, teacher = views(seed=7)
    dskd_loss(projector, student, teacher).t2s_ce.sum.backward()
    assert projector.query.weight.grad is not None and projector.t2s.weight.grad is not None
    assert projector.s2t.weight.grad is None
    assert all(getattr(student, name).grad is None for name in ("embeds", "hidden", "logits", "head"))


def test_bfloat16_inputs_give_float32_terms_close_to_float32():
    reference = dskd_loss(*views(seed=4))
    projector, student, teacher = views(seed=4, dtype=torch.bfloat16)
    terms = dskd_loss(projector, student, teacher)
    for name in ("t2s_ce", "s2t_kd"):
        got, want = getattr(terms, name), getattr(reference, name)
        assert got.sum.dtype == torch.float32 and torch.isfinite(got.sum)
        assert got.count.item() == want.count.item()
        assert got.sum.item() == pytest.approx(want.sum.item(), rel=0.05)
    terms.mean_sum().backward()
    assert student.hidden.grad.dtype == torch.bfloat16 and projector.query.weight.grad.dtype == torch.float32


def test_bad_views_raise():
    projector, student, teacher = views()
    student.mask[0, -1] = True
    with pytest.raises(TokenbridgeError, match="last position"):
        dskd_loss(projector, student, teacher)
    projector, student, teacher = views()
    with pytest.raises(TokenbridgeError, match="teacher embeds"):
        dskd_loss(DSKDProjector(D_S, D_T + 1), student, teacher)
    with pytest.raises(TokenbridgeError, match="divergence"):
        dskd_loss(projector, student, teacher, divergence="js")
    teacher.logits = teacher.logits[..., :-1]
    with pytest.raises(TokenbridgeError, match="teacher logits"):
        dskd_loss(projector, student, teacher)


def real_view(directory, texts: list[str]) -> DSKDView:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=40)
    model = load_lm(directory)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return DSKDView(embeds=out.hidden_states[0], hidden=out.hidden_states[-1], logits=out.logits,
                    head=model.get_output_embeddings().weight.detach(), ids=batch["input_ids"],
                    mask=next_real(batch["attention_mask"]))


@pytest.mark.parametrize("student_family", ["llama", "mistral"])
def test_real_models_finite_and_projector_step_lowers_t2s_ce(models_dir, student_family):
    text = corpus("en", 0, 2000)
    texts = [text[:160], text[400:480]]  # two lengths, so the second row is padded
    teacher = real_view(models_dir["llama"], texts)
    student = real_view(models_dir[student_family], texts)
    assert not bool(teacher.mask[1].all()) and not bool(student.mask[1].all())
    torch.manual_seed(0)
    projector = DSKDProjector(student.hidden.shape[-1], teacher.hidden.shape[-1])
    terms = dskd_loss(projector, student, teacher, 2.0)
    assert torch.isfinite(terms.mean_sum())
    assert terms.t2s_ce.count.item() == student.mask.sum().item()
    assert terms.s2t_kd.count.item() == teacher.mask.sum().item()
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.1)
    before = terms.t2s_ce.mean()
    before.backward()
    optimizer.step()
    after = dskd_loss(projector, student, teacher, 2.0).t2s_ce.mean()
    assert after.item() < before.item()
