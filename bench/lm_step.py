"""One DP step of a decoder language model, side by side: non-private AdamW, Opacus hooks,
Opacus ghost clipping, ours, ours + denoise. Two stacks, random init (no decoder weights are
obtainable offline), synthetic tokens, the per-example loss ``rmt_kernels.lm_loss``:

- ``gpt2``: GPT-2-small shapes (d 768, 12 heads, vocab 50257, Conv1D projections, input and
  output embeddings tied), fewer layers on a CPU;
- ``llama``: a Llama-style stack at the same width (RMSNorm, SwiGLU MLP 2048, rotary positions,
  grouped-query attention with 4 key/value heads, vocab 32000, untied head);

each fully fine-tuned (``full``) and with PEFT LoRA r = 8 on the attention projections, base
frozen (``lora``).

``python -m bench.lm_step [--models gpt2 llama] [--modes full lora] [--layers 2] [--batch 8]
[--length 128] [--steps 3]``

Each (model, mode, method) runs in its own process (peak memory as in ``bench.dp_step``). A
method that refuses the model (a layer it has no per-example rule for) is a row with its error:
refusing is the right answer for a layer an engine cannot clip, and the table says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.dp_step import MAX_GRAD_NORM, NOISE_MULTIPLIER, measure_in_subprocesses, table
from bench.memory import peak_mib, reset_peak
from bench.report import machine_description

METHODS = ["non-private", "opacus hooks", "opacus ghost", "ours", "ours + denoise"]
MODELS = ("gpt2", "llama")
MODES = ("full", "lora")
LORA_RANK = 8
# Which projections get LoRA adapters: the attention's, as Hu et al. (2021) do.
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def build_model(name: str, layers: int) -> torch.nn.Module:
    """A randomly initialised decoder of the named family (configs in code: no files)."""
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=768, n_head=12, n_layer=layers, vocab_size=50257)
        return GPT2LMHeadModel(config)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_attention_heads=12,
            num_key_value_heads=4,
            num_hidden_layers=layers,
            vocab_size=32000,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def with_lora(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` with PEFT LoRA adapters of rank 8 on the attention projections, base frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS[name],
        fan_in_fan_out=name == "gpt2",  # GPT-2's Conv1D stores its weight as (in, out)
    )
    return get_peft_model(model, config)


def run_method(
    method: str, model_name: str, mode: str, layers: int, batch: int, length: int, steps: int
) -> dict:
    """Time ``steps`` steps of ``method`` (after 2 warm-up steps) in this process."""
    from torch.utils.data import DataLoader, TensorDataset

    from rmt_kernels import lm_loss

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_name, layers)
    if mode == "lora":
        model = with_lora(model, model_name)
    model = model.to(device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    loader = DataLoader(TensorDataset(ids), batch_size=batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    counted = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
    }

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, ids, reduction="sequence_mean")

    try:
        if method in ("opacus hooks", "opacus ghost"):
            from opacus import PrivacyEngine

            engine = PrivacyEngine()
            kw = dict(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                poisson_sampling=False,
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
            )
            if method == "opacus ghost":
                criterion = torch.nn.CrossEntropyLoss()
                model, optimizer, criterion, loader = engine.make_private(
                    **kw, criterion=criterion, grad_sample_mode="ghost"
                )

                def loss_of(logits: torch.Tensor) -> torch.Tensor:
                    # Opacus's ghost criterion takes the flattened tokens and the logits' shape
                    # and reduces each sequence to its own mean (its loss_reduction "mean").
                    shifted, targets = logits[:, :-1], ids[:, 1:]
                    return criterion(
                        shifted.reshape(-1, vocab), targets.reshape(-1), shape=shifted.shape
                    )
            else:
                model, optimizer, loader = engine.make_private(**kw)
        elif method.startswith("ours"):
            from rmt_kernels.dp import make_private

            model, optimizer, loader = make_private(
                model,
                optimizer,
                loader,
                target_delta=1e-5,
                max_grad_norm=MAX_GRAD_NORM,
                noise_multiplier=NOISE_MULTIPLIER,
                poisson_sampling=False,
                seed=0,
                denoise={} if method == "ours + denoise" else None,
            )
    except (TypeError, ValueError, NotImplementedError) as err:
        # The engine's refusal of a layer it cannot clip (the first line names the module).
        return {"method": method, "refused": str(err).splitlines()[0][:160], **counted}

    def step():
        loss = loss_of(model(input_ids=ids).logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        step()
    except (TypeError, ValueError, NotImplementedError) as err:
        # Opacus finds an unsupported layer at the first backward, not at make_private.
        return {"method": method, "refused": str(err).splitlines()[0][:160], **counted}
    except RuntimeError as err:
        if not method.startswith("opacus"):
            raise  # ours must never crash on a model it accepted: the benchmark fails
        # Opacus crashing inside its per-sample machinery (not a refusal): say so.
        first = str(err).splitlines()[0][:160]
        return {"method": method, "failed": f"RuntimeError: {first}", **counted}
    step()
    sync()
    reset_peak()  # the peak below is the steps' own
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_mib()
    return {"method": method, "median_s": statistics.median(times), "peak_mib": peak, **counted}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_step", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="also write the tables to this file")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:  # child process: one model, one mode
        result = run_method(
            args.method,
            args.models[0],
            args.modes[0],
            args.layers,
            args.batch,
            args.length,
            args.steps,
        )
        print(json.dumps(result))
        return ""
    sections = [
        f"Measured {machine_description()}; median of {args.steps} steps after 2 warm-up steps, "
        f"each method in its own process; B = {args.batch}, T = {args.length}, "
        f"{args.layers} layers, synthetic tokens, noise multiplier {NOISE_MULTIPLIER}."
    ]
    for model_name in args.models:
        for mode in args.modes:
            shape = ["--layers", str(args.layers), "--batch", str(args.batch)]
            shape += ["--length", str(args.length), "--steps", str(args.steps)]
            results = measure_in_subprocesses(
                "bench.lm_step", METHODS, [*shape, "--models", model_name, "--modes", mode]
            )
            first = results[0]
            what = "full fine-tuning" if mode == "full" else f"LoRA r = {LORA_RANK}"
            sections.append(
                f"### One DP step: {model_name}, {what}, {first['params'] / 1e6:.1f}M parameters, "
                f"{first['trainable'] / 1e6:.2f}M trainable\n\n" + table(results, args.batch)
            )
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
