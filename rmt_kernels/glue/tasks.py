"""GLUE task specifications (files, columns, labels) and their metrics, as GLUE defines them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def accuracy(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Fraction of predictions equal to the label."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p == 1 and y == 1)
    fp = sum(1 for p, y in pairs if p == 1 and y != 1)
    fn = sum(1 for p, y in pairs if p != 1 and y == 1)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_correlation(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of binary predictions (0 when it is undefined, as
    scikit-learn returns for a constant prediction)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p == 1 and y == 1)
    tn = sum(1 for p, y in pairs if p != 1 and y != 1)
    fp = sum(1 for p, y in pairs if p == 1 and y != 1)
    fn = sum(1 for p, y in pairs if p != 1 and y == 1)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (0 when either side is constant)."""
    n = len(x)
    if n != len(y) or n == 0:
        raise ValueError("pearson needs two sequences of the same, non-zero length")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(_ranks(x), _ranks(y))


Metric = Callable[[Sequence, Sequence], float]


@dataclass(frozen=True)
class Task:
    """One GLUE task: where its files are, which columns hold what, how it is scored.

    Attributes:
        name: the CLI's name (``sst2``), also the hub's config name of ``glue``.
        folder: the task's folder in a GLUE directory (``SST-2``).
        text_columns: one column (single sentence) or two (a sentence pair).
        label_column: the label's column.
        labels: label strings in class order (``label_names[i]`` is class ``i``); empty for the
            regression task (STS-B).
        files: split name -> file name inside ``folder``.
        columns: column names of a file without a header line (CoLA); None when it has one.
        metrics: metric name -> function(predictions, labels); ``main_metric`` is the first.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    metrics: dict[str, Metric]
    files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"}
    )
    columns: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Outputs of the model's head: 1 for regression."""
        return 1 if self.is_regression else len(self.labels)

    @property
    def main_metric(self) -> str:
        return next(iter(self.metrics))

    def score(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        """Every metric of the task on (predictions, labels)."""
        return {name: float(fn(predictions, labels)) for name, fn in self.metrics.items()}


_ACC = {"accuracy": accuracy}
_F1_ACC = {"f1": f1, "accuracy": accuracy}
_NLI2 = ("entailment", "not_entailment")

# Label order as the hub's ``glue`` dataset numbers them, so models and logs agree across
# local and hub data.
TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), _ACC),
        Task(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("0", "1"),
            {"matthews_correlation": matthews_correlation},
            columns=("source", "label", "original_label", "sentence"),
        ),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, _ACC),
        Task("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), _ACC),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), _F1_ACC),
        Task(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            (),
            {"pearson": pearson, "spearman": spearman},
        ),
        Task("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, _ACC),
        Task(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            _ACC,
            files={"train": "train.tsv", "validation": "dev_matched.tsv"},
        ),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), _F1_ACC),
    ]
}


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive; ``sst-2`` and ``sts-b`` work too).

    Raises:
        ValueError: no such task, with the list of known ones.
    """
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]
