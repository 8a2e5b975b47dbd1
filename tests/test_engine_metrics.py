"""The engine's evaluation metrics against values computed here, independently, on small
hand-made cases: models whose predictions are fixed tables, so that every expected number is a
few lines of plain Python (math, lists) away from the table.

Covered: the classification task's evaluate (accuracy, NLL, ECE, agreement, predictive KL, with
ensembles of members and of references), the language-model task's evaluate (token NLL,
perplexity, accuracy, agreement, predictive KL, with -100 labels and several batches) and its
cache fidelity (agreement with the cached row's most probable *token*, and KL from the cached
row renormalised)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastkd.engine.tasks import ClassificationTask, LMTask, Member

IGNORE = -100


# ------------------------------------------------------------------------------------------
# Plain-Python oracles
# ------------------------------------------------------------------------------------------


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def mean_probs(rows_of_members):
    """The ensemble's probabilities: the members' probabilities averaged, entry by entry."""
    return [sum(col) / len(col) for col in zip(*rows_of_members)]


def argmax(row):
    best = max(row)
    return row.index(best)


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ece(probs, labels, bins=15):
    """Equal-width confidence bins, right-closed: a confidence c falls in bin ceil(c * bins) - 1."""
    groups = {}
    for p, y in zip(probs, labels):
        conf = max(p)
        b = min(max(math.ceil(conf * bins) - 1, 0), bins - 1)
        groups.setdefault(b, []).append((conf, 1.0 if argmax(p) == y else 0.0))
    n = len(probs)
    return sum(len(g) / n * abs(sum(c for _, c in g) / len(g) - sum(f for f, _ in g) / len(g)) for g in groups.values())


# ------------------------------------------------------------------------------------------
# Classification: models that return a fixed row of logits per sample
# ------------------------------------------------------------------------------------------

# Five samples (one-hot inputs), four classes. Rows chosen so that members disagree, ensembles
# differ from their members, and the student's and teacher's argmax differ on some rows.
STUDENT_A = [[2.0, 0.5, 0.1, -1.0], [0.2, 1.5, 0.3, 0.0], [1.0, 1.2, 2.5, 0.1], [0.0, 0.1, 0.3, 2.2], [1.1, 0.9, -0.5, 0.2]]
STUDENT_B = [[1.0, 1.4, 0.1, -1.0], [0.2, 0.4, 1.9, 0.0], [0.5, 1.2, 2.0, 0.1], [0.3, 0.1, 0.2, 1.0], [0.2, 1.9, -0.5, 0.2]]
TEACHER_A = [[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 2.2, 1.0, 0.0], [0.5, 0.0, 0.0, 1.5], [0.0, 0.0, 0.0, 1.0]]
TEACHER_B = [[2.0, 1.0, 0.0, 0.0], [0.0, 0.5, 1.5, 0.0], [0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.2, 2.5], [1.5, 0.0, 0.0, 0.8]]
CLASS_LABELS = [0, 2, 2, 3, 1]


def table_model(rows):
    """A linear layer mapping the one-hot input of sample i to ``rows[i]``."""
    layer = nn.Linear(len(rows), len(rows[0]), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows, dtype=torch.float32).t())
    return layer


def classification_task():
    task = ClassificationTask.__new__(ClassificationTask)
    task.cfg = {"train": {"bf16": False}}
    return task.to(torch.device("cpu"))


def expected_classification(students, teachers, labels):
    ps = [mean_probs([softmax(m[i]) for m in students]) for i in range(len(labels))]
    pt = [mean_probs([softmax(m[i]) for m in teachers]) for i in range(len(labels))]
    n = len(labels)
    return {
        "accuracy": sum(argmax(p) == y for p, y in zip(ps, labels)) / n,
        "nll": -sum(math.log(p[y]) for p, y in zip(ps, labels)) / n,
        "ece": ece(ps, labels),
        "agreement": sum(argmax(a) == argmax(b) for a, b in zip(ps, pt)) / n,
        "predictive_kl": sum(kl(b, a) for a, b in zip(ps, pt)) / n,
    }


def test_the_classification_case_has_right_and_wrong_rows():
    """Else a metric computed over the wrong rows or axis could still come out right."""
    one = expected_classification([STUDENT_A], [TEACHER_A], CLASS_LABELS)
    assert 0 < one["accuracy"] < 1 and 0 < one["agreement"] < 1


@pytest.mark.parametrize("students,teachers", [
    ([STUDENT_A], [TEACHER_A]),
    ([STUDENT_A, STUDENT_B], [TEACHER_A, TEACHER_B]),  # ensembles average probabilities
    ([STUDENT_B], [TEACHER_A, TEACHER_B]),
])
def test_classification_metrics_by_hand(students, teachers):
    """Expected values from the tables above in plain Python."""
    data = SimpleNamespace(x=torch.eye(5), y=torch.tensor(CLASS_LABELS))
    members = [Member(f"s{i}", (lambda r=rows: table_model(r)), finished=True) for i, rows in enumerate(students)]
    reference = [Member(f"t{i}", (lambda r=rows: table_model(r)), finished=True) for i, rows in enumerate(teachers)]
    expected = expected_classification(students, teachers, CLASS_LABELS)
    assert expected["accuracy"] > 0 and expected["agreement"] > 0
    cache = {}
    got = classification_task().evaluate(data, members, reference, cache)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # Finished models' predictions are cached and give the same numbers again.
    assert set(cache) == {m.name for m in members + reference}
    again = classification_task().evaluate(data, members, reference, cache)
    assert again == got


def test_classification_metrics_without_a_reference():
    data = SimpleNamespace(x=torch.eye(5), y=torch.tensor(CLASS_LABELS))
    got = classification_task().evaluate(data, [Member("s", lambda: table_model(STUDENT_A))], None, {})
    expected = expected_classification([STUDENT_A], [STUDENT_A], CLASS_LABELS)
    assert set(got) == {"accuracy", "nll", "ece"}
    for key in got:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


# ------------------------------------------------------------------------------------------
# Language model: a "transformer" that embeds each token, and an identity lm_head, so that the
# logits at a position are the table row of the token there
# ------------------------------------------------------------------------------------------

VOCAB = 5
CONTEXT = 4  # positions 0..2 predict the tokens at 1..3

# WINDOWS[w] are the tokens; LM_LABELS[w] the labels (the tokens, -100 where a window is padded).
WINDOWS = [[0, 1, 2, 3], [4, 3, 2, 1], [1, 1, 0, 4], [2, 0, 3, 3], [3, 4, 4, 0]]
LM_LABELS = [[0, 1, 2, 3], [4, 3, IGNORE, 1], [1, 1, 0, 4], [2, 0, IGNORE, IGNORE], [3, 4, 4, 0]]
LM_STUDENT = [[1.0, 2.0, 0.5, 0.0, -1.0], [0.3, 0.2, 1.8, 0.1, 0.0], [0.0, 0.4, 0.1, 2.1, 0.9], [0.6, 1.5, 0.2, 0.1, 1.7], [0.2, 0.1, 0.0, 1.2, 0.4]]
LM_TEACHER = [[0.5, 2.5, 0.0, 0.0, 0.0], [0.0, 0.3, 2.2, 0.0, 0.4], [0.2, 0.0, 0.5, 1.0, 1.4], [0.0, 1.9, 0.0, 0.0, 0.6], [1.1, 0.0, 0.0, 0.9, 0.3]]


class TableLM(nn.Module):
    """GPT-2's two parts the task calls: ``transformer(input_ids=x).last_hidden_state`` and ``lm_head``."""

    def __init__(self, rows):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, VOCAB)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor(rows))
        self.transformer = self._body
        self.lm_head = nn.Identity()

    def _body(self, input_ids):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def lm_task(batch=2):
    task = LMTask.__new__(LMTask)
    task.cfg = {"train": {"bf16": False}}
    task.EVAL_BATCH = batch  # several batches: the sums are carried across them
    return task.to(torch.device("cpu"))


def positions():
    """(window, position, label) of every position that predicts a label."""
    for w, (tokens, labels) in enumerate(zip(WINDOWS, LM_LABELS)):
        for j in range(CONTEXT - 1):
            if labels[j + 1] != IGNORE:
                yield w, j, labels[j + 1]


def test_lm_metrics_by_hand():
    data = SimpleNamespace(x=torch.tensor(WINDOWS), y=torch.tensor(LM_LABELS))
    nll = correct = agree = kl_sum = 0.0
    rows = list(positions())
    for w, j, y in rows:
        q, p = softmax(LM_STUDENT[WINDOWS[w][j]]), softmax(LM_TEACHER[WINDOWS[w][j]])
        nll -= math.log(q[y])
        correct += argmax(q) == y
        agree += argmax(q) == argmax(p)
        kl_sum += kl(p, q)
    n = len(rows)
    assert n == 5 * 3 - 3 and 0 < agree < n and 0 < correct < n
    got = lm_task().evaluate(data, [Member("s", lambda: TableLM(LM_STUDENT))], [Member("t", lambda: TableLM(LM_TEACHER))], {})
    expected = {"nll": nll / n, "perplexity": math.exp(nll / n), "accuracy": correct / n, "agreement": agree / n,
                "predictive_kl": kl_sum / n}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


# The teacher cache's rows: K = 3 (token id, teacher logit) pairs per position, in an order where
# the most probable entry is never at the position equal to its token id.
K = 3


def cached_rows():
    """[windows * (C - 1), K] indices and values, one row per position of every window."""
    idx, val = [], []
    for w, tokens in enumerate(WINDOWS):
        for j in range(CONTEXT - 1):
            p = LM_TEACHER[tokens[j]]
            top = sorted(range(VOCAB), key=lambda v: -p[v])[:K]
            order = [top[1], top[2], top[0]] if (w + j) % 2 else [top[2], top[0], top[1]]
            idx.append(order)
            val.append([p[v] for v in order])
    return torch.tensor(idx), torch.tensor(val)


def test_cache_fidelity_by_hand():
    idx, val = cached_rows()
    task = lm_task()
    task.splits = SimpleNamespace(train=SimpleNamespace(x=torch.tensor(WINDOWS), y=torch.tensor(LM_LABELS)))
    task.cached_teacher = lambda ids: SimpleNamespace(
        indices=idx.view(len(WINDOWS), CONTEXT - 1, K)[ids].reshape(-1, K),
        values=val.view(len(WINDOWS), CONTEXT - 1, K)[ids].reshape(-1, K),
    )
    agree = kl_sum = 0.0
    rows = list(positions())
    positional = 0
    for w, j, _ in rows:
        r = w * (CONTEXT - 1) + j
        ids, vals = idx[r].tolist(), val[r].tolist()
        q = softmax(LM_STUDENT[WINDOWS[w][j]])
        p = softmax(vals)  # the K cached entries, renormalised
        agree += argmax(q) == ids[argmax(vals)]
        positional += argmax(q) == argmax(vals)  # what a position-for-token mix-up would count
        kl_sum += sum(pk * (math.log(pk) - math.log(q[v])) for pk, v in zip(p, ids))
    n = len(rows)
    assert 0 < agree < n and positional != agree, "the case no longer tells token ids from positions in the row"
    got = task.cache_fidelity(TableLM(LM_STUDENT))
    assert got["agreement"] == pytest.approx(agree / n, rel=1e-9)
    assert got["predictive_kl"] == pytest.approx(kl_sum / n, rel=1e-6)
    # Fewer windows than the cache holds: only the first ones count.
    first = [(w, j) for w, j, _ in rows if w < 2]
    two = task.cache_fidelity(TableLM(LM_STUDENT), windows=2)
    agree2 = sum(argmax(softmax(LM_STUDENT[WINDOWS[w][j]])) == idx[w * (CONTEXT - 1) + j].tolist()[argmax(val[w * (CONTEXT - 1) + j].tolist())]
                 for w, j in first)
    assert two["agreement"] == pytest.approx(agree2 / len(first), rel=1e-9)
