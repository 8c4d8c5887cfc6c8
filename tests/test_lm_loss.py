"""rmt_kernels.lm_loss (issue 27 item 2): the definition against a float64 reference, Hugging
Face's loss where the two must agree, the per-example property itself, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from rmt_kernels import lm_loss, per_example_lm_loss

IGNORE = -100


def _batch(seed: int = 0, batch: int = 4, length: int = 7, vocab: int = 11):
    """Logits and labels with sequences of different lengths (right padding ignored), one of
    them wholly ignored and one with an ignored prompt."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[1, 4:] = IGNORE  # short
    labels[2] = IGNORE  # no target at all
    labels[3, :3] = IGNORE  # a masked prompt
    return logits, labels


def _reference(logits, labels, reduction: str, shift: bool) -> torch.Tensor:
    """The definition, token by token in float64: per sequence, the sum (or the mean over its
    own targets, 0 without any) of -log softmax(logits[t])[label[t']], t' = t + 1 if shift."""
    out = []
    for row_logits, row_labels in zip(logits.double(), labels, strict=True):
        terms = []
        for t in range(row_logits.shape[0] - (1 if shift else 0)):
            target = int(row_labels[t + 1 if shift else t])
            if target != IGNORE:
                terms.append(-torch.log_softmax(row_logits[t], 0)[target])
        total = torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
        if reduction == "sequence_mean" and terms:
            total = total / len(terms)
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("reduction", ["sequence_mean", "sequence_sum"])
@pytest.mark.parametrize("shift", [True, False])
def test_lm_loss_equals_a_float64_reference_of_its_definition(reduction, shift):
    logits, labels = _batch()
    expected = _reference(logits, labels, reduction, shift)
    got = per_example_lm_loss(logits, labels, reduction=reduction, shift=shift)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    mean = lm_loss(logits, labels, reduction=reduction, shift=shift)
    torch.testing.assert_close(mean, expected.mean(), rtol=1e-12, atol=1e-12)
    # float32 logits: computed in float32, within float32 rounding of the reference.
    got32 = per_example_lm_loss(logits.float(), labels, reduction=reduction, shift=shift)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


def test_an_all_ignored_sequence_contributes_zero_and_no_nan_gradient():
    logits, labels = _batch()
    logits.requires_grad_(True)
    per_example = per_example_lm_loss(logits, labels)
    assert per_example[2].item() == 0.0
    lm_loss(logits, labels).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[2] == 0).all()
    # A batch with no target at all: 0, not NaN; an empty batch: 0.
    none = torch.full_like(labels, IGNORE)
    assert lm_loss(logits, none).item() == 0.0
    assert lm_loss(logits[:0], labels[:0]).item() == 0.0


def test_lm_loss_equals_hugging_face_when_every_sequence_has_as_many_targets():
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 13, generator=gen)
    labels = torch.randint(0, 13, (3, 9), generator=gen)
    # Four targets (after the shift) in every sequence, at different places.
    labels[0, 5:] = IGNORE
    labels[1, :5] = IGNORE
    labels[2, [1, 2, 4, 6]] = IGNORE
    assert ((labels[:, 1:] != IGNORE).sum(1) == 4).all()
    torch.testing.assert_close(
        lm_loss(logits, labels), ForCausalLMLoss(logits, labels, 13), rtol=1e-6, atol=1e-6
    )
    # With unequal counts they differ: Hugging Face's is a mean over the batch's tokens.
    labels[0, 3:] = IGNORE
    assert not torch.allclose(lm_loss(logits, labels), ForCausalLMLoss(logits, labels, 13))


@pytest.mark.parametrize("reduction", ["sequence_mean", "sequence_sum"])
def test_each_examples_gradient_is_its_own_whatever_the_other_sequences(reduction):
    # The property the DP engine needs: B * d lm_loss / d logits[b] is the gradient of example
    # b's loss alone, and does not move when another sequence gets shorter or wholly ignored.
    logits, labels = _batch()

    def grads(labels):
        x = logits.clone().requires_grad_(True)
        lm_loss(x, labels, reduction=reduction).backward()
        return x.grad * len(labels)

    full = grads(labels)
    for b in range(len(labels)):
        x = logits[b : b + 1].clone().requires_grad_(True)
        lm_loss(x, labels[b : b + 1], reduction=reduction).backward()
        torch.testing.assert_close(full[b], x.grad[0], rtol=1e-12, atol=1e-15)
    for other in (labels.clone(), labels.clone()):
        other[0, 2:] = IGNORE
        moved = grads(other)
        torch.testing.assert_close(moved[1:], full[1:], rtol=0, atol=0)
        other[0] = IGNORE
        torch.testing.assert_close(grads(other)[1:], full[1:], rtol=0, atol=0)


def test_bf16_logits_are_upcast_like_hugging_face():
    logits, labels = _batch()
    got = per_example_lm_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    expected = _reference(logits.bfloat16().double(), labels, "sequence_mean", True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_definition_matches_torch_cross_entropy_without_shift():
    logits, labels = _batch()
    flat = functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    total = per_example_lm_loss(logits, labels, reduction="sequence_sum", shift=False).sum()
    torch.testing.assert_close(total, flat, rtol=1e-12, atol=1e-12)


_LOGITS = torch.zeros(2, 5, 7)
_LABELS = torch.zeros(2, 5, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": _LABELS}, TypeError, "logits must be a floating tensor"),
        ({"logits": [[0.0]]}, TypeError, "logits must be a floating tensor"),
        ({"logits": _LOGITS[0]}, ValueError, "logits must be 3-D"),
        ({"logits": _LOGITS[:, :, :0]}, ValueError, "V >= 1"),
        ({"labels": _LABELS.float()}, TypeError, "labels must be an integer tensor"),
        ({"labels": _LABELS.bool()}, TypeError, "labels must be an integer tensor"),
        ({"labels": _LABELS[:, :4]}, ValueError, r"labels must have shape logits.shape\[:2\]"),
        ({"labels": _LABELS + 7}, ValueError, r"labels must be in \[0, 7\)"),
        ({"labels": _LABELS - 1}, ValueError, r"labels must be in \[0, 7\)"),
        ({"reduction": "mean"}, ValueError, "reduction must be one of"),
        ({"reduction": None}, TypeError, "reduction must be a string"),
        ({"ignore_index": -100.0}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
        ({"shift": 1}, TypeError, "shift must be a bool"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    arguments = {"logits": _LOGITS, "labels": _LABELS, **kwargs}
    logits, labels = arguments.pop("logits"), arguments.pop("labels")
    with pytest.raises(error, match=match):
        lm_loss(logits, labels, **arguments)
    with pytest.raises(error, match=match):
        per_example_lm_loss(logits, labels, **arguments)


def test_int32_labels_and_a_custom_ignore_index_are_accepted():
    logits, labels = _batch()
    custom = labels.masked_fill(labels == IGNORE, -1).int()
    torch.testing.assert_close(
        per_example_lm_loss(logits, custom, ignore_index=-1), per_example_lm_loss(logits, labels)
    )
