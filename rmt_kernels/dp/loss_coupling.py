"""The layout verification's view of a loss computed inside the model, and of ignore indices.

Per-example clipping bounds one example's influence by C only when the batch loss is a sum or a
mean over the examples b of a function of row b (privacy invariant 7, PRIVACY.md). A loss whose
normalisation depends on the whole batch breaks that: the Hugging Face token-level losses
(``model(input_ids, labels=...)`` of a causal-LM, masked-LM or token-classification head) divide
the sum of every token's loss by the batch's count of non-ignored targets, so one example's
number of targets scales every other example's gradient. Two things here serve
:mod:`rmt_kernels.dp.layout_verification`, which checks a loss the model returns (a scalar in its
output, as Hugging Face's ``.loss``):

- the integer inputs it perturbs keep their ignore indices (:func:`ignore_sentinel`,
  :func:`perturb_ids`): a label of -100 randomised into [-100, max] was an invalid class
  (``IndexError: Target -44 is out of bounds``), and its "all targets ignored" run, where the
  rows S of every integer input holding an ignore index are set to it, shows a normalisation by
  the batch's count of targets;
- :func:`hugging_face_token_losses` names the Hugging Face heads that were called with labels and
  compute their default token-level loss, which the verification refuses outright (a batch whose
  sequences all have the same number of targets would not show the coupling by behaviour).

The fix the refusals name is :func:`rmt_kernels.lm_loss` (rmt_kernels/lm_loss.py).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rmt_kernels.dp.capture import LayoutError

# What the refusals tell the user to do instead.
LM_LOSS_FIX = (
    "Use a per-example loss: rmt_kernels.lm_loss(model(input_ids, attention_mask=mask).logits, "
    "labels) (each sequence's mean over its own targets, then the mean over examples), or for a "
    "Hugging Face model `model.loss_function = lambda logits, labels, vocab_size, **kw: "
    "rmt_kernels.lm_loss(logits, labels)`"
)

# Hugging Face's loss types whose default loss is a mean over the batch's tokens.
_TOKEN_LEVEL_LOSS_TYPES = ("ForCausalLM", "ForMaskedLM", "ForTokenClassification")


def loss_outputs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The losses among a model's output tensors: the 0-dim floating ones in the autograd graph
    (Hugging Face's ``.loss``; a model returning its own loss)."""
    return [t for t in tensors if t.dim() == 0 and t.is_floating_point() and t.requires_grad]


def ignore_sentinel(t: torch.Tensor) -> int | None:
    """The ignore index an integer input holds: its most frequent negative entry (-100 for
    Hugging Face labels), or None when it has none (or is not an integer tensor)."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        return None
    negative = t[t < 0]
    if negative.numel() == 0:
        return None
    return int(negative.mode().values)


def perturb_ids(
    t: torch.Tensor, index: torch.Tensor, shape: tuple, generator: torch.Generator
) -> bool:
    """Give rows ``index`` of the integer tensor ``t`` (in place) new ids the model can take:
    each non-negative entry another value in [lo, hi], the range of the tensor's non-negative
    entries (the shift is non-zero mod the range, so every such entry changes); a negative entry
    (an ignore index, -100 in Hugging Face labels) stays. Returns False, with ``t`` untouched,
    when the non-negative entries hold fewer than two values (the caller copies a partner's
    rows).

    On a tensor without negative entries this is the verification's original draw, bit for bit
    (the same generator calls)."""
    valid = t[t >= 0]
    if valid.numel() == 0:
        return False
    lo, hi = int(valid.min()), int(valid.max())
    if hi <= lo:
        return False
    shift = torch.randint(1, hi - lo + 1, shape, generator=generator)
    rows = t[index]
    moved = (rows - lo + shift.to(t.device, t.dtype)) % (hi - lo + 1) + lo
    t[index] = torch.where(rows < 0, rows, moved)
    return True


def loss_gradients(losses: list[torch.Tensor], leaves: list) -> list[torch.Tensor | None]:
    """Every tracked layer's output gradient (None where unused) from ``losses``, through the
    capture's recording leaves (layer name, leaf, output-gradient slot) of the same run; the
    graph is kept (the verification's cotangent backward runs on it next)."""
    if not leaves:
        return []
    for _, _, slot in leaves:
        slot[0] = None
    torch.autograd.grad(
        losses, [leaf for _, leaf, _ in leaves], allow_unused=True, retain_graph=True
    )
    return [slot[0] for _, _, slot in leaves]


@contextmanager
def hugging_face_token_losses(model: nn.Module) -> Iterator[list[str]]:
    """While the block runs, list (in the yielded list) the Hugging Face heads in ``model``
    called with labels whose loss is Hugging Face's default token-level one (causal LM, masked
    LM, token classification: the mean over all the batch's targets, or their sum over
    ``num_items_in_batch``). A head whose ``loss_function`` was replaced is not listed."""
    found: list[str] = []
    handles = []
    for name, module in _token_loss_heads(model):

        def seen(module, args, kwargs, name=name) -> None:
            if _called_with_labels(module, args, kwargs) and name not in found:
                found.append(name)

        handles.append(module.register_forward_pre_hook(seen, with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def refuse_hugging_face_token_loss(heads: list[str]) -> None:
    """Raise for the heads :func:`hugging_face_token_losses` found.

    Raises:
        LayoutError: ``heads`` is not empty.
    """
    if heads:
        where = ", ".join(repr(h or "the model") for h in heads)
        raise LayoutError(
            f"DP engine: the model's loss is Hugging Face's default token-level loss ({where} "
            "called with labels=): a mean over every target token of the whole batch, so one "
            "example's number of targets changes the weight of every other example's gradient "
            "and clipping per example no longer bounds its influence by max_grad_norm. "
            f"{LM_LOSS_FIX}"
        )


def refuse_coupling_arguments(kwargs: dict) -> None:
    """Refuse the Hugging Face keyword arguments of a training forward that couple the examples
    in a way no perturbation of the verification can show (it changes values, never the batch's
    shape, and never an argument computed outside the model). Checked by name at every training
    forward (red team 27):

    - ``num_items_in_batch``: Hugging Face's count of the batch's target tokens (the Trainer
      passes it to the model's forward and loss function). A loss divided by it is a mean over
      the batch's tokens; a head whose ``loss_function`` was replaced by one dividing by it
      passed, and one example moved the clipped sum by 1.68 C.
    - a left-padded ``attention_mask`` (a 0 before a 1 in some row): each example's positions and
      the pad position predicting its first token then depend on the batch's padded length, i.e.
      on the longest other example: one example moved the clipped sum of 12 others by 3.9 C
      (GPT-2) and 2.6 C (Llama). Right padding leaves every example's rows its own.

    Raises:
        LayoutError: naming the argument.
    """
    if kwargs.get("num_items_in_batch") is not None:
        raise LayoutError(
            "DP engine: the model was called with num_items_in_batch, Hugging Face's count of "
            "the batch's target tokens: a loss divided by it is a mean over the batch's tokens, "
            "so one example's length changes the weight of every other example's gradient. Do "
            f"not pass it. {LM_LOSS_FIX}"
        )
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point():
        return
    real = mask != 0
    # A 1 at or after each position of the row (a reversed running maximum).
    later_real = real.flip(1).cummax(1).values.flip(1)
    if bool((~real & later_real).any()):
        raise LayoutError(
            "DP engine: the attention_mask of this training batch is left-padded (a 0 before a "
            "1 in a row): each example's positions, and the padding position that predicts its "
            "first token, then depend on the batch's padded length, i.e. on the other examples' "
            "lengths, and clipping per example no longer bounds one example's influence. Pad "
            "on the right for training (tokenizer.padding_side = 'right')"
        )


def coupled_loss_error(rows: str, ignored: bool) -> LayoutError:
    """The refusal of a loss the model returns whose gradient on other examples' rows moved
    when examples ``rows`` changed (``ignored``: had all their targets set to the ignore
    index)."""
    how = "had every target set to the ignore index" if ignored else "changed"
    return LayoutError(
        f"DP engine: the loss the model returns couples the examples: when examples {rows} "
        f"{how}, the gradient of the loss on the other examples' rows changed. The batch loss "
        "must be a sum or a mean over examples of a function of example b's row alone; a mean "
        "over the batch's tokens (Hugging Face's labels= loss, or a sum divided by the batch's "
        "count of targets or of attention-mask ones) lets one example's length weigh every "
        f"other's gradient. {LM_LOSS_FIX}"
    )


def _token_loss_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Hugging Face modules in ``model`` whose loss function is a token-level default."""
    if "transformers" not in sys.modules:  # no Hugging Face model can be in it
        return []
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    token_losses = {LOSS_MAPPING[k] for k in _TOKEN_LEVEL_LOSS_TYPES if k in LOSS_MAPPING}
    heads = []
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        replaced = vars(module).get("_loss_function")
        loss_type = getattr(module, "loss_type", None)
        # A head's loss_type names its loss (Hugging Face's own lookup); None (a base model,
        # or a head named otherwise, such as GPT2LMHeadModel) defaults to the causal-LM loss,
        # and is listed only if called with labels (a base model takes none).
        default = LOSS_MAPPING.get(loss_type, LOSS_MAPPING.get("ForCausalLM"))
        if (replaced if replaced is not None else default) in token_losses:
            heads.append((name, module))
    return heads


def _called_with_labels(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("labels") is not None:
        return True
    if not args:
        return False
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return False
    return bound.arguments.get("labels") is not None
