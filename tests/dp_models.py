"""Tiny Hugging Face encoders and batches for the DP engine tests (configs built in code)."""

from __future__ import annotations

import torch

PAD = 1
VOCAB = 60


def tiny_model(kind: str = "roberta", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A 2-layer RoBERTa or BERT classifier, dropout off (so a step is deterministic)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
        attn_implementation=attn,
    )
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**common))
    return BertForSequenceClassification(BertConfig(**common))


def padded_batch(batch: int = 6, length: int = 10, seed: int = 0):
    """Token ids with right padding of varied lengths, attention mask, labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return ids, mask, labels


def per_example_grads(model, ids, mask, labels) -> list[dict[str, torch.Tensor]]:
    """Explicit per-example gradients: one forward and backward per example (the yardstick)."""
    out = []
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for b in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = model(
            input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], labels=labels[b : b + 1]
        ).loss
        loss.backward()
        out.append({n: p.grad.detach().double().clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    return out


def clipped_sum(
    grads: list[dict[str, torch.Tensor]], max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / ||g_b||) g_b, with the norm over all parameters together."""
    total = {}
    for g in grads:
        norm = torch.sqrt(sum(t.square().sum() for t in g.values()))
        factor = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for n, t in g.items():
            total[n] = total.get(n, 0) + factor * t
    return total
