"""A language-model loss that is a mean over examples: what per-example clipping needs.

The DP engine (:func:`rmt_kernels.make_private`, ``loss_reduction="mean"``, its default; and the
Opacus drop-in) assumes the batch loss is a mean over the examples b of a function of example
b's row alone (privacy invariant 7, PRIVACY.md): then row b of every layer's output gradient is
example b's own, and clipping it bounds example b's influence by C. The Hugging Face causal-LM
loss (``model(input_ids, labels=...)``) is not: it is a mean over every non-ignored token of the
whole batch, so one example's number of targets changes the weight of every other example's
gradient. :func:`lm_loss` is the per-example version: each sequence's token cross-entropies are
reduced within the sequence (their sum, or their mean over the sequence's OWN targets), then
averaged over the batch.
"""

from __future__ import annotations

import torch
from torch.nn import functional

__all__ = ["LM_LOSS_REDUCTIONS", "lm_loss", "per_example_lm_loss"]

#: The per-sequence reductions: a sequence's sum of token cross-entropies, or their mean over the
#: sequence's own non-ignored targets.
LM_LOSS_REDUCTIONS = ("sequence_sum", "sequence_mean")


def per_example_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "sequence_mean",
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """Each sequence's language-model loss: a (B,) tensor whose entry b depends on row b alone.

    Token t's loss is the cross-entropy of ``logits[b, t]`` against ``labels[b, t]`` (with
    ``shift``: of ``logits[b, t]`` against ``labels[b, t + 1]``, the next token, as Hugging
    Face's causal-LM loss shifts), computed in float32 at least (bf16/fp16 logits are upcast,
    as Hugging Face does); targets equal to ``ignore_index`` count for nothing.

    Args:
        logits: (B, T, V) floating scores over a vocabulary of V tokens.
        labels: (B, T) integer targets (int64; other integer dtypes are converted), each in
            [0, V) or equal to ``ignore_index``.
        reduction: ``"sequence_mean"`` (each sequence's mean over its own non-ignored targets; a
            sequence with none gives 0, never NaN) or ``"sequence_sum"`` (each sequence's sum).
        ignore_index: the target value that is not a target (Hugging Face's and
            ``torch.nn.functional.cross_entropy``'s -100 by default).
        shift: logits[:, :-1] predict labels[:, 1:] (a causal LM fed its own labels); False:
            logits[:, t] predict labels[:, t] (labels already aligned).

    Returns:
        A (B,) tensor, float32 (float64 for float64 logits), in the autograd graph of
        ``logits``.

    Raises:
        TypeError: ``logits`` is not a floating tensor, ``labels`` not an integer tensor,
            ``ignore_index`` not an int, ``shift`` not a bool, or ``reduction`` not a string.
        ValueError: ``logits`` is not 3-D, ``labels`` is not shaped ``logits.shape[:2]`` or is on
            another device, a label is outside [0, V) and not ``ignore_index``, or ``reduction``
            is not one of :data:`LM_LOSS_REDUCTIONS`.
    """
    _check(logits, labels, reduction, ignore_index, shift)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    batch, length, vocab = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = labels.long()
    # reduction="none": an ignored target's loss is exactly 0 and its logits get no gradient.
    token_losses = functional.cross_entropy(
        logits.reshape(batch * length, vocab).to(dtype),
        targets.reshape(batch * length),
        ignore_index=ignore_index,
        reduction="none",
    ).view(batch, length)
    sums = token_losses.sum(1)
    if reduction == "sequence_sum":
        return sums
    # Each sequence's own count of targets, never the batch's: the batch's total would couple
    # the examples. clamp: a sequence with no target has sum 0, so 0 / 1 = 0 (not 0 / 0).
    counts = (targets != ignore_index).sum(1).clamp(min=1)
    return sums / counts.to(dtype)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "sequence_mean",
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """The batch's language-model loss as the DP engine needs it: the mean over the examples b of
    :func:`per_example_lm_loss` (a function of example b's row alone).

    That is the convention of :func:`rmt_kernels.make_private`'s default
    ``loss_reduction="mean"`` (and of ``rmt-glue``'s loss): the batch loss is a mean over
    examples of a function of row b, so clipping each example's gradient bounds its influence on
    the clipped sum by C. For ``loss_reduction="sum"`` use
    ``per_example_lm_loss(...).sum()``. Use it instead of the Hugging Face default loss
    (``model(..., labels=...)``), a mean over all the batch's tokens that couples the examples
    and that the layout verification refuses:
    ``lm_loss(model(input_ids, attention_mask=mask).logits, labels)``.

    Args:
        logits: (B, T, V) floating scores (see :func:`per_example_lm_loss`).
        labels: (B, T) integer targets, ``ignore_index`` where there is none (padding, prompt).
        reduction: ``"sequence_mean"`` or ``"sequence_sum"`` (see :func:`per_example_lm_loss`).
        ignore_index: the target value that is not a target (default -100).
        shift: logits[:, :-1] predict labels[:, 1:] (default, Hugging Face's causal shift).

    Returns:
        A scalar tensor: the mean over the B examples (0, in the graph, for B = 0: an empty
        Poisson batch has no loss).

    Raises:
        TypeError, ValueError: as :func:`per_example_lm_loss`.
    """
    per_example = per_example_lm_loss(
        logits, labels, reduction=reduction, ignore_index=ignore_index, shift=shift
    )
    if per_example.numel() == 0:
        return per_example.sum()
    return per_example.mean()


def _check(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str, ignore_index: int, shift: bool
) -> None:
    """The arguments' types, shapes and values; an exception naming the one that is wrong."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor (B, T, V), got {_describe(logits)}")
    if logits.dim() != 3 or logits.shape[2] == 0:
        raise ValueError(
            f"logits must be 3-D (B, T, V) with V >= 1, got shape {list(logits.shape)}"
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise TypeError(f"labels must be an integer tensor (B, T), got {_describe(labels)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape logits.shape[:2] = {list(logits.shape[:2])}, got "
            f"{list(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device}, logits on {logits.device}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    if reduction not in LM_LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LM_LOSS_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
    # An out-of-range target is an IndexError on CPU and a device-side assert (a dead CUDA
    # context) on GPU inside cross_entropy: said here, with the argument's name.
    vocab = logits.shape[2]
    invalid = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(invalid.any()):
        bad = int(labels[invalid][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary of logits) or equal ignore_index "
            f"({ignore_index}); got {bad}"
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
