"""Generation: a model's continuation of each prompt, greedy (or beam search), up to a number
of new tokens or eos, batched with left padding."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int = 1,
    device: torch.device,
) -> list[str]:
    """The decoded continuation of each of ``prompts`` (token ids), in their order.

    Prompts of similar lengths are batched together (left-padded, the attention mask marking
    the padding, so a prompt's continuation does not depend on its batch); the model's
    training mode is restored.

    Args:
        model: a causal LM with Hugging Face's ``generate`` (a PEFT model included).
        tokenizer: decodes the new tokens (special tokens dropped) and gives eos.
        prompts: token ids, each non-empty.
        batch_size: prompts per ``generate`` call (>= 1).
        max_new_tokens: generated tokens at most (>= 1).
        num_beams: 1 for greedy decoding, more for beam search.
        device: where the model is.

    Returns:
        One stripped text per prompt.

    Raises:
        ValueError: an empty prompt, or a count below 1.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
        ("num_beams", num_beams),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if any(not p for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return texts
