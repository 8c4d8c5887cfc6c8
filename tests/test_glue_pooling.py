"""``--pooling mean``: the head reads the mean of the real tokens' states, whatever the padding,
saved models pool the same way, and models without a BERT-style pooler are refused."""

from __future__ import annotations

import pytest
import torch

from rmt_kernels.glue.pooling import MaskedMeanPooler, use_mean_pooling
from tests.dp_models import tiny_model


def _tiny_bert():
    return tiny_model("bert").eval()


def test_mean_over_real_tokens_only():
    states = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    pooler = MaskedMeanPooler()
    pooler.mask = mask
    got = pooler(states)
    for b, n in enumerate((5, 2, 1)):
        torch.testing.assert_close(got[b], states[b, :n].mean(0))
    pooler.mask = None  # no mask: every token counts
    torch.testing.assert_close(pooler(states), states.mean(1))
    assert not list(pooler.parameters())


def test_padding_does_not_change_the_logits():
    model = use_mean_pooling(_tiny_bert())
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = (padded_ids != 0).long()
    padded = model(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)
    # The first token's pooler would give other logits: the head really reads the mean.
    cls = _tiny_bert()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(cls, short, atol=1e-3)


def test_saved_model_pools_the_same_way(tmp_path):
    from transformers import BertForSequenceClassification

    from rmt_kernels.glue.config import TrainConfig
    from rmt_kernels.glue.model import build_model
    from rmt_kernels.glue.tasks import get_task

    model = use_mean_pooling(_tiny_bert())
    model.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(60)) + "\n")
    loaded, _ = build_model(TrainConfig(task="sst2", model=str(tmp_path)), get_task("sst2"))
    assert isinstance(loaded.base_model.pooler, MaskedMeanPooler)
    assert isinstance(loaded, BertForSequenceClassification)
    ids = torch.tensor([[2, 7, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    loaded.eval()
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).logits,
        model(input_ids=ids, attention_mask=mask).logits,
    )


def test_a_model_without_a_bert_pooler_is_refused():
    with pytest.raises(ValueError, match="no BERT-style pooler"):
        use_mean_pooling(tiny_model("roberta"))
