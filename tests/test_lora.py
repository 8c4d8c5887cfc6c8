"""PEFT LoRA with both engines (issue 27, item 3): the native ``make_private`` and the Opacus
drop-in (``DenoisingPrivacyEngine``, hooks and certified ghost clipping).

LoRA freezes the base model and adds, beside each targeted layer, two ``nn.Linear`` factors
``lora_A`` (r x d_in) and ``lora_B`` (d_out x r): the only trainable parameters, each an
ordinary Linear weight to both engines. What is tested here:

- one private step's clipped sum equals a float64 per-example reference (each example's gradient
  of the adapters by its own backward, clipped to C over all adapters together, summed), for a
  tiny Llama (adapters on q_proj/v_proj, and on every linear layer), a BERT sequence classifier
  (every linear layer, plus the classifier head PEFT keeps trainable) and GPT-2 (its Conv1D
  ``c_attn``: PEFT's adapters are nn.Linear, the Conv1D stays frozen);
- the Opacus #820 class of bug (DP-LoRA runs whose adapters silently never moved): every adapter
  moves by exactly the private update, and each known way to lose the adapters is refused with
  an error naming the cause, never silent;
- denoising on LoRA factors (their smaller side r is below ``min_dim``): passed through
  unchanged, unless ``min_dim`` is lowered to r;
- the merged model saved and reloaded gives the same logits and holds no LoRA key.

The per-example loss is each sequence's sum of next-token cross-entropies (a function of that
sequence alone: ``rmt_kernels.per_example_lm_loss(..., reduction="sequence_sum")``), with
``loss_reduction="sum"``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("opacus")

from rmt_kernels import per_example_lm_loss  # noqa: E402
from rmt_kernels.dp import make_private  # noqa: E402
from rmt_kernels.dp.stages.options import MIN_DENOISE_DIM  # noqa: E402
from rmt_kernels.opacus import DenoisingPrivacyEngine  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*poisson_sampling=False:UserWarning"),
]

VOCAB, BATCH, SEQ, RANK = 97, 6, 10, 8
ENGINES = ["native", "hooks", "ghost"]
# The float64 reference against one private step in float32. Each per-example gradient is a
# float32 forward and backward through two layers of width 32 (relative error of order a few
# 2^-24 per operation, some 1e-6 over the depth, measured below 1e-6); Opacus's hooks clip with
# C / (norm + 1e-6), 1e-6 relative at C ~ 1; the engines' certified norms are upper bounds
# within a few float32 roundings. Measured on the 12 cases: at most 9.9e-7. A wrong clip moves
# the sum far more: per-batch clipping is 96-137% off, and leaving lora_B's norm out of the
# per-example norm (planted in the engine) fails the Llama q/v case.
REFERENCE_RTOL = 1e-5


# ------------------------------------------------------------------------------------------
# Tiny models, the per-example loss, the float64 reference
# ------------------------------------------------------------------------------------------


def _llama(target_modules, **lora_config) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return _lora(LlamaForCausalLM(config), target_modules, **lora_config)


def _bert(target_modules) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _lora(BertForSequenceClassification(config), target_modules, task_type="SEQ_CLS")


def _gpt2(target_modules) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _lora(GPT2LMHeadModel(config), target_modules, fan_in_fan_out=True)


def _lora(base: nn.Module, target_modules, **config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # Random lora_B (PEFT's default zeros it, which makes every lora_A gradient exactly 0 at the
    # first step: a test of lora_A would then test nothing).
    config.setdefault("lora_dropout", 0.0)
    lora = LoraConfig(r=RANK, lora_alpha=16, target_modules=target_modules,
                      init_lora_weights=False, **config)  # fmt: skip
    return get_peft_model(base, lora)


MODELS = {
    "llama-qv": lambda: _llama(["q_proj", "v_proj"]),
    "llama-all-linear": lambda: _llama("all-linear"),
    "bert-all-linear": lambda: _bert("all-linear"),
    "gpt2-c_attn": lambda: _gpt2(["c_attn"]),
}


class SequenceLoss:
    """The per-example loss: a sequence's sum of next-token cross-entropies (a language model)
    or its label's cross-entropy (a classifier). ``reduction`` "none" gives one loss per example,
    "sum" their sum (the interface Opacus's ghost criterion wrapper expects)."""

    def __init__(self) -> None:
        self.reduction = "sum"

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor):
        if logits.dim() == 3:
            per_example = per_example_lm_loss(logits, ids, reduction="sequence_sum")
        else:
            per_example = nn.functional.cross_entropy(logits, labels, reduction="none")
        return per_example if self.reduction == "none" else per_example.sum()


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, torch.randint(0, 3, (BATCH,), generator=gen)


def _adapters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(model: nn.Module, ids, labels) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient of the trainable parameters, in float64, by its own backward."""
    model = copy.deepcopy(model).double().eval()  # eval: the same graph as train without dropout
    params = _adapters(model)
    loss = SequenceLoss()
    loss.reduction = "none"
    grads = []
    for b in range(ids.shape[0]):
        out = model(input_ids=ids[b : b + 1]).logits
        value = loss(out, ids[b : b + 1], labels[b : b + 1]).sum()
        grads.append(
            dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))
        )
    return grads


def _norm(grad: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g**2).sum() for g in grad.values())))


def clipped_sum(grads: list[dict[str, torch.Tensor]], clip: float) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / |g_b|) g_b, the norm over all trainable parameters together (float64)."""
    factors = [min(1.0, clip / _norm(g)) for g in grads]
    return {k: sum(f * g[k] for f, g in zip(factors, grads, strict=True)) for k in grads[0]}


def _median_norm(grads) -> float:
    """A clipping norm that clips about half the examples and leaves the others alone."""
    norms = sorted(_norm(g) for g in grads)
    return (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2


# ------------------------------------------------------------------------------------------
# One private step with either engine
# ------------------------------------------------------------------------------------------


def private(engine: str, model: nn.Module, optimizer, loader, *, clip: float, noise: float = 0.0,
            **extra):  # fmt: skip
    """``(private model, optimizer, criterion, loader, scale)``: ``p.grad * scale`` is the step's
    noisy clipped sum (the native engine averages over the expected batch; Opacus with
    ``loss_reduction="sum"`` does not)."""
    if engine == "native":
        # The layout verification (several seconds on these models) runs where it is the point:
        # in the reference test, on every model kind; the other tests are about the adapters.
        extra.setdefault("verify_layout", False)
        pm, opt, dl = make_private(
            model, optimizer, loader, target_delta=1e-5, max_grad_norm=clip,
            noise_multiplier=noise, poisson_sampling=False, loss_reduction="sum", seed=1, **extra,
        )  # fmt: skip
        return pm, opt, SequenceLoss(), dl, BATCH
    kwargs = dict(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=clip, poisson_sampling=False, loss_reduction="sum", grad_sample_mode=engine,
        **extra,
    )  # fmt: skip
    dropin = DenoisingPrivacyEngine(accountant="rdp")
    if engine == "ghost":
        pm, opt, criterion, dl = dropin.make_private(criterion=SequenceLoss(), **kwargs)
        return pm, opt, criterion, dl, 1
    pm, opt, dl = dropin.make_private(**kwargs)
    return pm, opt, SequenceLoss(), dl, 1


def one_step(engine: str, model: nn.Module, *, clip: float, lr: float = 0.0, noise: float = 0.0,
             optimizer=None, **extra):  # fmt: skip
    """One private SGD step on :func:`_data`'s batch; returns (private model, optimizer, the
    step's noisy clipped sum by parameter name)."""
    ids, labels = _data()
    if optimizer is None:
        optimizer = torch.optim.SGD(_adapters(model).values(), lr=lr)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, dl, scale = private(
        engine, model, optimizer, loader, clip=clip, noise=noise, **extra
    )
    x, y = next(iter(dl))
    assert torch.equal(x, ids)  # poisson_sampling=False: the loader's one batch, in order
    opt.zero_grad()
    criterion(pm(input_ids=x).logits, x, y).backward()
    opt.step()
    return pm, opt, {n: p.grad.double() * scale for n, p in _adapters(model).items()}


def _assert_close(ours: dict, ref: dict, rtol: float = REFERENCE_RTOL) -> None:
    assert ours.keys() == ref.keys()
    diff = _norm({k: ours[k] - ref[k] for k in ref})
    assert diff <= rtol * _norm(ref), f"relative error {diff / _norm(ref):.3g}"


# ------------------------------------------------------------------------------------------
# 1. The clipped sum against the float64 per-example reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_clipped_sum_equals_the_per_example_reference(kind, engine):
    torch.manual_seed(0)
    model = MODELS[kind]()
    names = list(_adapters(model))
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)  # base frozen
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    grads = per_example_gradients(model, *_data())
    clip = _median_norm(grads)
    norms = [_norm(g) for g in grads]
    assert min(norms) < clip < max(norms)  # the clip binds for some examples only
    reference = clipped_sum(grads, clip)

    extra = {"verify_layout": True} if engine == "native" else {}
    _, _, ours = one_step(engine, model, clip=clip, lr=0.1, **extra)

    _assert_close(ours, reference)
    for n, p in model.named_parameters():  # the base never moves, nor gets a gradient
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("engine", ENGINES)
def test_lora_dropout_trains_every_adapter(engine):
    # PEFT applies lora_dropout to the adapter's input, lora_B(lora_A(dropout(x))): lora_A's rule
    # sees the dropped input, which is still example b's alone. No reference (the masks are
    # random), but every factor moves, and the released sum has norm at most B * C.
    torch.manual_seed(0)
    model = _llama(["q_proj", "v_proj"], lora_dropout=0.5)
    before = {n: p.detach().clone() for n, p in _adapters(model).items()}
    extra = {"verify_layout": True} if engine == "native" else {}
    _, _, released = one_step(engine, model, clip=1.0, lr=0.1, **extra)
    assert _norm(released) <= BATCH * 1.0 * (1 + 1e-6)
    for n, p in _adapters(model).items():
        assert (p != before[n]).any(), n


# ------------------------------------------------------------------------------------------
# 2. The Opacus #820 class: adapters silently never updated
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_every_adapter_moves_by_the_private_update(engine):
    # Noise 0 so that the expected update is known exactly: -lr * clipped sum / scale.
    torch.manual_seed(0)
    model = MODELS["llama-all-linear"]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = per_example_gradients(model, *_data())
    clip = _median_norm(grads)
    reference = clipped_sum(grads, clip)
    lr = 0.5
    one_step(engine, model, clip=clip, lr=lr)
    scale = BATCH if engine == "native" else 1
    # Every LoRA factor trains (a factor frozen by accident would be missing from the reference)
    assert {n for n in before if "lora_" in n} == set(reference)
    for n, p in model.named_parameters():
        if n in reference:
            moved = (before[n].double() - p.detach().double()) * scale / lr
            assert moved.abs().min() > 0, f"{n}: an entry did not move"
            _assert_close({n: moved}, {n: reference[n]})
        else:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("engine", ENGINES)
def test_noisy_steps_move_every_adapter(engine):
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    before = {n: p.detach().clone() for n, p in _adapters(model).items()}
    _, _, noisy = one_step(engine, model, clip=1.0, lr=0.1, noise=1.0)
    scale = BATCH if engine == "native" else 1
    for n, p in _adapters(model).items():
        # Every entry moved, by exactly the released gradient (noise std 1 per entry of the sum).
        torch.testing.assert_close(before[n] - p.detach(), 0.1 * noisy[n].float() / scale)
        assert (before[n] != p).all(), n


@pytest.mark.parametrize("engine", ENGINES)
def test_an_optimizer_built_before_get_peft_model_is_refused(engine):
    # The #820 pattern: the optimizer holds the base model's parameters (built before
    # get_peft_model froze them and added the adapters), so no step would ever update an adapter.
    # Plain Opacus runs this, adapters unchanged (0 of 8 moved, checked by hand).
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         tie_word_embeddings=False)  # fmt: skip
    base = LlamaForCausalLM(config)
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    model = _lora(base, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"does not hold .*lora_A.*update"):
        one_step(engine, model, clip=1.0, optimizer=optimizer)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_optimizer_missing_one_adapter_is_refused(engine):
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    adapters = [
        p for n, p in _adapters(model).items() if "layers.1.self_attn.v_proj.lora_B" not in n
    ]
    optimizer = torch.optim.SGD(adapters, lr=0.1)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        one_step(engine, model, clip=1.0, optimizer=optimizer)


def test_parameters_replaced_after_make_private_are_refused():
    # What lazy or meta-device materialisation, load_state_dict(assign=True) or a dtype/device
    # move with overwrite_module_params_on_conversion does: new Parameter objects, so the
    # optimizer and the engine hold the old ones. Native: refused at step, naming the cause.
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    ids, labels = _data()
    optimizer = torch.optim.SGD(_adapters(model).values(), lr=0.1)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, _, _ = private("native", model, optimizer, loader, clip=1.0)
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.float()  # same dtype, but every parameter is a new object
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)
    criterion(pm(input_ids=ids).logits, ids, labels).backward()
    with pytest.raises(RuntimeError, match=r"lora_A.*replaced after make_private"):
        opt.step()


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
def test_dropin_parameters_replaced_after_make_private_fail_loudly(engine):
    # Opacus's hooks look up per-parameter state on the new objects: an AttributeError at
    # backward (Opacus's message, not ours), never a silent step.
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    ids, labels = _data()
    optimizer = torch.optim.SGD(_adapters(model).values(), lr=0.1)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, _, _ = private(engine, model, optimizer, loader, clip=1.0)
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)
    with pytest.raises(AttributeError, match="_forward_counter"):
        criterion(pm(input_ids=ids).logits, ids, labels).backward()
        opt.step()


def test_native_cast_after_make_private_is_refused():
    # model.double() after make_private keeps the Parameter objects (their .data changes): the
    # native rules take float32/bf16/fp16 activations only, so the step is refused at backward.
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    ids, labels = _data()
    optimizer = torch.optim.SGD(_adapters(model).values(), lr=0.1)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, _, _ = private("native", model, optimizer, loader, clip=1.0)
    model.double()
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16, got Double"):
        criterion(pm(input_ids=ids).logits, ids, labels).backward()
        opt.step()


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
def test_dropin_cast_after_make_private(engine):
    # model.double() after make_private keeps the Parameter objects, so the optimizer still
    # holds them. Opacus's hooks compute per-example gradients in the parameters' dtype: the
    # step is the float64 reference (1e-7 off, from Opacus's C / (norm + 1e-6)). The certified
    # ghost norms take float32/bf16/fp16 only: refused at backward.
    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    grads = per_example_gradients(model, *_data())
    clip = _median_norm(grads)
    ids, labels = _data()
    optimizer = torch.optim.SGD(_adapters(model).values(), lr=1.0)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, _, _ = private(engine, model, optimizer, loader, clip=clip)
    model.double()
    before = {n: p.detach().clone() for n, p in _adapters(model).items()}
    if engine == "ghost":
        with pytest.raises(TypeError, match="must be float32, bfloat16 or float16, got Double"):
            criterion(pm(input_ids=ids).logits, ids, labels).backward()
        return
    criterion(pm(input_ids=ids).logits, ids, labels).backward()
    opt.step()
    moved = {n: before[n] - p.detach() for n, p in _adapters(model).items()}
    _assert_close(moved, clipped_sum(grads, clip))


def test_peft_applied_after_make_private_is_refused():
    # make_private on the base, then get_peft_model: the base is frozen behind the engine's back
    # and the adapters are new parameters it never saw. Refused at the step.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         tie_word_embeddings=False)  # fmt: skip
    base = LlamaForCausalLM(config)  # fully trainable (RMSNorm has its rule)
    ids, labels = _data()
    optimizer = torch.optim.SGD(_adapters(base).values(), lr=0.1)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=BATCH)
    pm, opt, criterion, _, _ = private("native", base, optimizer, loader, clip=1.0)
    model = _lora(pm, ["q_proj", "v_proj"])
    criterion(model(input_ids=ids).logits, ids, labels).backward()
    replaced = r"q_proj\.weight' is no longer the tensor make_private tracked.*get_peft_model"
    with pytest.raises(RuntimeError, match=replaced):
        opt.step()


# ------------------------------------------------------------------------------------------
# 3. Denoising on LoRA factors
# ------------------------------------------------------------------------------------------


def _released_with_denoise(engine: str, denoise: dict | None) -> tuple:
    """One noisy step (noise std C on the sum) with reproducible noise: the native engine's
    fixed seed, or for the drop-in a seeded noise generator (Opacus's own noise path)."""
    torch.manual_seed(0)
    model = MODELS["llama-all-linear"]()
    extra = {} if denoise is None else {"denoise": denoise}
    if engine != "native":
        extra["noise_generator"] = torch.Generator().manual_seed(7)
    _, opt, released = one_step(engine, model, clip=1.0, noise=1.0, **extra)
    return opt, released


@pytest.mark.parametrize("engine", ["native", "hooks"])
@pytest.mark.filterwarnings("ignore:.*private only if that generator:UserWarning")
def test_lora_factors_below_min_dim_are_passed_through(engine):
    # lora_A is r x d_in and lora_B d_out x r: with r = 8 < min_dim = 32 neither is a matrix the
    # denoiser touches, so denoise={} releases exactly what denoise=None does (the frozen base
    # weights get no gradient, so nothing is left to denoise).
    assert RANK < MIN_DENOISE_DIM
    _, plain = _released_with_denoise(engine, None)
    opt, denoised = _released_with_denoise(engine, {})
    for n in plain:
        assert torch.equal(plain[n], denoised[n]), n
    if engine == "native":
        assert opt.engine.denoiser.keys == frozenset()


@pytest.mark.parametrize("engine", ["native", "hooks"])
@pytest.mark.filterwarnings("ignore:.*private only if that generator:UserWarning")
def test_lora_factors_are_denoised_when_min_dim_allows(engine):
    # min_dim = r makes every factor a candidate (the native engine's default filter takes
    # nn.Linear weights, which they are; the drop-in every 2-D gradient): each released gradient
    # is shrunk, so it differs from plain DP-SGD's.
    _, plain = _released_with_denoise(engine, None)
    opt, denoised = _released_with_denoise(engine, {"min_dim": RANK, "kappa": 1.0})
    if engine == "native":
        assert opt.engine.denoiser.keys == set(plain)
    for n in plain:
        assert not torch.equal(plain[n], denoised[n]), n


# ------------------------------------------------------------------------------------------
# 4. Merged weights saved and reloaded
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_merged_model_saves_and_reloads(engine, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = MODELS["llama-qv"]()
    ids, _ = _data(seed=1)
    with torch.no_grad():
        initial = model.eval()(input_ids=ids).logits
    model.train()
    pm, opt, _ = one_step(engine, model, clip=1.0, lr=0.1, noise=1.0)
    # Back to the plain PEFT model: the native engine's hooks come off with engine.detach(); the
    # drop-in's wrapper gives its module back with to_standard_module().
    if engine == "native":
        opt.engine.detach()
        plain = pm
    else:
        plain = pm.to_standard_module()
    assert plain is model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    plain.eval()
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
    assert not torch.allclose(adapted, initial)  # the private step moved the adapters
    merged = plain.merge_and_unload()
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
    torch.testing.assert_close(expected, adapted, rtol=1e-5, atol=1e-5)  # merged = B A x added
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
