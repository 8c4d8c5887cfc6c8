"""E2E's generation metrics: corpus BLEU (sacrebleu, every reference of a meaning
representation at once) and ROUGE-L (rouge-score's F-measure, the best over the references,
averaged over the meaning representations)."""

from __future__ import annotations

from collections.abc import Sequence


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses for {len(references)} reference groups: one each"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"reference group(s) {empty[:5]} are empty: each needs one reference")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100, sacrebleu's default 13a tokenization) of ``hypotheses[i]`` against
    all of ``references[i]``.

    Args:
        hypotheses: one generated text per meaning representation.
        references: the references of each (any number >= 1 each).

    Returns:
        sacrebleu's ``corpus_bleu`` score.

    Raises:
        ValueError: the two lengths differ, nothing to score, or a group has no reference.
    """
    import sacrebleu

    _check(hypotheses, references)
    # sacrebleu reads references as streams (stream k: every hypothesis's k-th reference), a
    # None where a hypothesis has fewer references.
    streams = [
        [refs[k] if k < len(refs) else None for refs in references]
        for k in range(max(len(refs) for refs in references))
    ]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over ``hypotheses`` of ROUGE-L's F-measure (0-1) against the best of each one's
    references (rouge-score's ``score_multi``, without stemming).

    Raises:
        ValueError: the two lengths differ, nothing to score, or a group has no reference.
    """
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return sum(scores) / len(scores)


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu": ..., "rouge_l": ...}`` of :func:`bleu` and :func:`rouge_l`."""
    return {"bleu": bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}
