# ruff: noqa: F811 (the tiny fixture imported from tests/test_glue_cli.py)
"""Secrets with full entropy, and nothing that determines a secret in any artifact.

torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``: a secret that goes
through it has 32 bits of entropy, and a seed scan (2^32 candidates, about a day on one core,
trivially parallel) recovers all the noise or every batch. The noise now comes from the package's
Philox stream keyed by 63 OS bits, the batches from numpy's Philox4x64 keyed by 128 OS bits, in
the native engine and the Opacus drop-in alike; and no checkpoint, ledger, data sidecar, state
dict, pickle or log holds either key in any encoding unless the run is explicitly public.

Determinism: the ``fixed_os`` fixture replaces ``secrets.randbits`` by a seeded Python generator
(full-width draws, a different value per call), so every secret of a test is known and the
byte scans give the same answer on every run (no chance match can make them flaky).
"""

from __future__ import annotations

import io
import itertools
import pickle
import random
import secrets

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels import ops
from rmt_kernels.dp import PoissonSampler
from tests.helpers import record_engine_seeds
from tests.test_glue_cli import tiny, train_tiny  # noqa: F401 (a fixture, and its helper)

opacus = pytest.importorskip("opacus")

IN, CLASSES, N, BATCH = 6, 3, 64, 8
NOISE, CLIP = 0.8, 1.0
FLIP = 1 << 40  # above bit 32, below bit 62: a difference every old site's draw kept


@pytest.fixture
def fixed_os(monkeypatch):
    """``secrets.randbits`` from a seeded generator; returns the list of (bits, value) drawn."""
    drawn: list[tuple[int, int]] = []
    source = random.Random(20240611)
    flip = {"mask": 0}

    def randbits(k: int) -> int:
        value = source.getrandbits(k) ^ (flip["mask"] & ((1 << k) - 1))
        drawn.append((k, value))
        return value

    monkeypatch.setattr(secrets, "randbits", randbits)

    class OS:
        draws = drawn

        @staticmethod
        def reset(mask: int = 0) -> None:
            """Replay the same draws, each XORed with ``mask`` (its bits below k)."""
            nonlocal source
            source = random.Random(20240611)
            flip["mask"] = mask
            drawn.clear()

    return OS


# ------------------------------------------------------------------------------------------
# Scanning bytes for a secret in every encoding
# ------------------------------------------------------------------------------------------


def encodings(secret: int) -> dict[str, bytes]:
    """The forms a secret could take in a file: decimal; hex, both cases, plain and padded;
    8-byte (16-byte for a 128-bit key) little- and big-endian; each 64-bit word (numpy's Philox
    key words) and each 32-bit word (the noise kernels' Philox key words, low and high) in
    little- and big-endian bytes."""
    width = 16 if secret >= 1 << 64 else 8
    forms = {
        "decimal": str(secret).encode(),
        "hex": f"{secret:x}".encode(),
        "HEX": f"{secret:X}".encode(),
        "hex padded": f"{secret:0{2 * width}x}".encode(),
        "HEX padded": f"{secret:0{2 * width}X}".encode(),
        "bytes LE": secret.to_bytes(width, "little"),
        "bytes BE": secret.to_bytes(width, "big"),
    }
    for bits, size in ((64, 8), (32, 4)):
        for i in range(width * 8 // bits):
            word = (secret >> (bits * i)) & ((1 << bits) - 1)
            forms[f"word{bits}[{i}] LE"] = word.to_bytes(size, "little")
            forms[f"word{bits}[{i}] BE"] = word.to_bytes(size, "big")
            if bits == 64:
                forms[f"word64[{i}] decimal"] = str(word).encode()
                forms[f"word64[{i}] hex"] = f"{word:x}".encode()
    return forms


def found(secret: int, blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(artifact, encoding) pairs where ``secret`` occurs: each form as it is, or as pickle
    protocol 2 (torch.save's) writes a ``bytes`` object (its latin-1 text, UTF-8 encoded)."""
    return [
        (name, form)
        for name, data in blobs.items()
        for form, pattern in encodings(secret).items()
        if pattern in data or pattern.decode("latin-1").encode() in data
    ]


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pickled(obj) -> bytes | None:
    """``pickle.dumps(obj)``, or None for an object that cannot be pickled (hooks, closures)."""
    try:
        return pickle.dumps(obj)
    except (TypeError, AttributeError, pickle.PicklingError):
        return None


# ------------------------------------------------------------------------------------------
# Small runs
# ------------------------------------------------------------------------------------------


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(N, IN, generator=gen), torch.randint(0, CLASSES, (N,)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def _native(secure_mode: bool = False, steps: int = 2):
    """A default native run (seed None: secret noise; the loader has no generator: secret
    sampling) of ``steps`` steps; (model, optimizer, loader)."""
    from rmt_kernels.dp import make_private

    model = _model()
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(_data(), batch_size=BATCH),
        target_delta=1e-5,
        max_grad_norm=CLIP,
        noise_multiplier=NOISE,
        accountant="rdp",
        secure_mode=secure_mode,
    )
    _train(model, opt, loader, steps)
    return model, opt, loader


def _dropin(steps: int = 2, lr: float = 0.1, **kwargs):
    """A default DenoisingPrivacyEngine run; (engine, model, optimizer, loader)."""
    from rmt_kernels.opacus import DenoisingPrivacyEngine

    engine = DenoisingPrivacyEngine(accountant="rdp")
    model = _model()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        **kwargs,
    )
    _train(model, opt, loader, steps)
    return engine, model, opt, loader


def _train(model, opt, loader, steps: int) -> list[torch.Tensor]:
    """``steps`` steps; the first input of each batch drawn."""
    batches = []
    for x, y in itertools.islice(loader, steps):  # draws no batch beyond the last step
        batches.append(x)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return batches


# ------------------------------------------------------------------------------------------
# Entropy: secrets that differ only above bit 32 give different outputs
# ------------------------------------------------------------------------------------------


def test_a_torch_generator_keeps_only_32_bits_of_its_seed():
    # The premise of the attack (so that the tests below test something): two seeds equal in
    # their low 32 bits give one stream.
    seed = 0x5DEECE66D12345
    a = torch.rand(8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, torch.rand(8, generator=torch.Generator().manual_seed(seed ^ FLIP)))


def test_sampler_keys_differing_above_bit_32_or_64_draw_other_batches():
    def batches(key):
        return list(PoissonSampler(num_samples=200, sample_rate=0.1, steps=4, key=key))

    key = 0x0123456789ABCDEF_FEDCBA9876543210
    reference = batches(key)
    # Each flip changes the membership of ~200 * 4 independent uniforms: equal batches have
    # probability far below 1e-6.
    for flip in (1 << 33, 1 << 70, 1 << 127):
        assert batches(key ^ flip) != reference, hex(flip)


def _dropin_outputs(fixed_os, mask: int):
    """The noise of the drop-in's first step (summed gradient 0: lr 0 and a zero loss) and its
    first batch, with every OS draw XORed with ``mask``."""
    fixed_os.reset(mask)
    _, model, opt, loader = _dropin(steps=0, lr=0.0)
    x, _ = next(iter(loader))
    (0 * model(x).sum()).backward()
    opt.step()
    # loss_reduction "mean": p.grad = noise / expected batch size.
    noise = [p.grad * opt.expected_batch_size for p in model.parameters()]
    return noise, x, opt


@pytest.mark.parametrize("mask", [FLIP, 1 << 62, 1 << 100])
def test_dropin_noise_and_sampling_keep_every_secret_bit(fixed_os, mask):
    # On the old code both came from torch generators seeded with secrets.randbits(63): a flip
    # above bit 32 left the noise and the batches exactly as they were.
    noise, batch, opt = _dropin_outputs(fixed_os, 0)
    assert opt.noise_seed_is_secret
    other_noise, other_batch, _ = _dropin_outputs(fixed_os, mask)
    if mask < 1 << 63:  # the noise key has 63 bits
        assert all(not torch.equal(a, b) for a, b in zip(noise, other_noise, strict=True))
    # Two independent Poisson draws of 64 examples at rate 1/8 coincide with probability
    # (q^2 + (1 - q)^2)^64 = (50/64)^64 < 2e-7.
    assert batch.shape != other_batch.shape or not torch.equal(batch, other_batch)


def test_sampling_keys_are_drawn_with_128_bits_and_noise_keys_with_63(fixed_os):
    fixed_os.reset()
    _, opt, loader = _native(steps=1)
    assert (128, loader.batch_sampler._key) in fixed_os.draws
    assert (63, opt.engine.noise_key.seed) in fixed_os.draws
    fixed_os.reset()
    _, _, opt, loader = _dropin(steps=1)
    assert (128, loader.batch_sampler._key) in fixed_os.draws
    assert (63, opt._noise_seed) in fixed_os.draws
    # Nothing narrower keys either (a draw of 62 bits or fewer would be a weaker secret).
    assert sorted({k for k, _ in fixed_os.draws}) == [63, 64, 128]  # 64: worker seeds only


def test_rmt_glue_hands_a_secret_run_no_torch_generator_to_sample_from(fixed_os):
    from rmt_kernels.glue.config import GlueConfig
    from rmt_kernels.training.privacy import sampling_generator

    # The old one was seeded with secrets.randbits(62): 32 bits of entropy. The engine (native
    # or drop-in) draws its own 128-bit key when the loader has no generator.
    fixed_os.reset()
    a = sampling_generator(GlueConfig(task="sst2"))
    fixed_os.reset(FLIP)
    b = sampling_generator(GlueConfig(task="sst2"))
    assert a is None or not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    # A run with a public --noise-seed samples reproducibly from --seed.
    public = sampling_generator(GlueConfig(task="sst2", noise_seed=5, seed=3))
    expected = torch.rand(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(4, generator=public), expected)


# ------------------------------------------------------------------------------------------
# Secret scan of every artifact
# ------------------------------------------------------------------------------------------


def _native_artifacts(tmp_path, secure_mode: bool):
    """A default native run's artifacts (checkpoint, ledger, data sidecar, state dicts,
    pickles) and its secrets (noise seed, sampling key)."""
    from rmt_kernels.dp import attach_ledger, save_checkpoint
    from rmt_kernels.dp.checkpoint import data_path
    from rmt_kernels.dp.ledger import ledger_path

    path = tmp_path / "ckpt.pt"
    model, opt, loader = _native(secure_mode=secure_mode, steps=0)
    attach_ledger(opt, path)
    _train(model, opt, loader, 2)
    save_checkpoint(path, model, opt, loader)
    blobs = {
        "checkpoint": path.read_bytes(),
        "ledger": ledger_path(path).read_bytes(),
        "data sidecar": data_path(path).read_bytes(),
        "optimizer.state_dict": saved(opt.state_dict()),
        "engine.state_dict": saved(opt.engine.state_dict()),
        "sampler.state_dict": saved(loader.batch_sampler.state_dict()),
    }
    objects = {"optimizer": opt, "engine": opt.engine, "sampler": loader.batch_sampler}
    for name, obj in objects.items():
        data = pickled(obj)
        if data is not None:
            blobs[f"pickle of {name}"] = data
    assert "pickle of sampler" in blobs
    keys = {"noise seed": opt.engine.noise_key.seed, "sampling key": loader.batch_sampler._key}
    return blobs, keys


@pytest.mark.parametrize("secure_mode", [False, True])
def test_a_native_run_writes_no_secret_anywhere(tmp_path, fixed_os, secure_mode):
    fixed_os.reset()
    blobs, keys = _native_artifacts(tmp_path, secure_mode)
    for what, secret in keys.items():
        assert not found(secret, blobs), (what, found(secret, blobs))


def test_a_dropin_run_writes_no_secret_anywhere(tmp_path, fixed_os):
    fixed_os.reset()
    engine, model, opt, loader = _dropin(steps=2, denoise={"min_dim": 1})
    path = tmp_path / "opacus.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=opt)  # Opacus's own checkpoint
    blobs = {
        "opacus checkpoint": path.read_bytes(),
        "optimizer.state_dict": saved(opt.state_dict()),
        "sampler.state_dict": saved(loader.batch_sampler.state_dict()),
    }
    for name, obj in (("optimizer", opt), ("engine", engine), ("sampler", loader.batch_sampler)):
        data = pickled(obj)
        if data is not None:
            blobs[f"pickle of {name}"] = data
    assert {"pickle of optimizer", "pickle of sampler"} <= set(blobs)
    keys = {"noise seed": opt._noise_seed, "sampling key": loader.batch_sampler._key}
    for what, secret in keys.items():
        assert not found(secret, blobs), (what, found(secret, blobs))
    # A pickled copy draws a fresh key: it never reuses the original's stream.
    copy = pickle.loads(blobs["pickle of sampler"])
    assert copy.secret and copy._key != loader.batch_sampler._key


def test_the_scan_finds_a_secret_planted_in_a_checkpoint(tmp_path, fixed_os):
    """The scan is not blind: each form of each secret, planted in a checkpoint's extra (as
    the old code stored the sampler's generator state), is found."""
    from rmt_kernels.dp import save_checkpoint

    fixed_os.reset()
    model, opt, loader = _native(steps=1)
    keys = {"noise seed": opt.engine.noise_key.seed, "sampling key": loader.batch_sampler._key}
    for what, secret in keys.items():
        for form, pattern in encodings(secret).items():
            path = tmp_path / "planted.pt"
            save_checkpoint(path, model, opt, loader, extra={"plant": pattern})
            hits = found(secret, {"checkpoint": path.read_bytes()})
            assert ("checkpoint", form) in hits, (what, form)
        # As a plain int (torch.save pickles it little-endian) and in a torch generator's
        # state (mt19937's first state word is the seed's low 32 bits: the old sampler entry).
        mt19937 = torch.Generator().manual_seed(secret % 2**64).get_state()
        plants = {"int": secret, "mt19937 state": mt19937}
        for form, plant in plants.items():
            save_checkpoint(path, model, opt, loader, extra={"plant": plant})
            assert found(secret, {"checkpoint": path.read_bytes()}), (what, form)


# ------------------------------------------------------------------------------------------
# The old 32-bit-seed attack
# ------------------------------------------------------------------------------------------


def test_the_32_bit_seed_attack_no_longer_reproduces_a_default_dropin_run(fixed_os):
    """The attack of issue 24: every secret the run drew, cut to its low 32 bits (all a torch
    generator keeps), reproduced the released noise and the batches. Each candidate is tried as
    the old code used it (Opacus's torch.normal per parameter; torch.rand < q per batch) and as
    the new streams use it (Philox noise; the keyed sampler with the key cut to 32 and 64
    bits): none reproduces anything."""
    noise, batch, opt = _dropin_outputs(fixed_os, 0)
    draws = [value for _, value in fixed_os.draws]
    x_all = _data().tensors[0]
    q = 1 / (N // BATCH)
    for value in draws:
        candidate = value % 2**32
        generator = torch.Generator().manual_seed(candidate)
        old_noise = [torch.normal(0, NOISE * CLIP, n.shape, generator=generator) for n in noise]
        assert not any(torch.allclose(a, b) for a, b in zip(old_noise, noise, strict=True))
        old_batch = x_all[torch.rand(N, generator=torch.Generator().manual_seed(candidate)) < q]
        assert old_batch.shape != batch.shape or not torch.equal(old_batch, batch)
    sampler_key = next(v for k, v in fixed_os.draws if k == 128)
    assert sampler_key >= 1 << 64 and opt._noise_seed >= 1 << 32

    def first_batch(key: int) -> torch.Tensor:
        sampler = PoissonSampler(num_samples=N, sample_rate=q, steps=1, key=key)
        return x_all[next(iter(sampler))]

    def philox_noise(seed: int) -> torch.Tensor:  # the first parameter's, at step 0
        offset = ops.noise_offset(0, 0, len(noise))
        return ops.add_gaussian_noise(torch.zeros(noise[0].shape), NOISE * CLIP, seed, offset)

    for cut in (sampler_key % 2**32, sampler_key % 2**64):
        other = first_batch(cut)
        assert other.shape != batch.shape or not torch.equal(other, batch)
    assert not torch.allclose(philox_noise(opt._noise_seed % 2**32), noise[0])
    # ... while the true keys reproduce both (the comparisons above could succeed).
    assert torch.equal(first_batch(sampler_key), batch)
    assert torch.allclose(philox_noise(opt._noise_seed), noise[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# rmt-glue's JSON log and checkpoint
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["native", "opacus"])
def test_rmt_glue_writes_no_secret_in_its_log_or_checkpoint(
    tiny, tmp_path, fixed_os, monkeypatch, engine
):
    from rmt_kernels.dp.checkpoint import data_path
    from rmt_kernels.dp.ledger import ledger_path

    seeds = record_engine_seeds(monkeypatch)
    fixed_os.reset()
    args = ["--noise-multiplier", 1, "--accountant", "rdp", "--engine", engine]
    ckpt = tmp_path / "ckpt"
    if engine == "native":
        args += ["--checkpoint-dir", ckpt]
    train_tiny(tiny, tmp_path / "log.json", *args)
    blobs = {"log": (tmp_path / "log.json").read_bytes()}
    if engine == "native":
        path = ckpt / "checkpoint.pt"
        for name, where in (("checkpoint", path), ("ledger", ledger_path(path))):
            blobs[name] = where.read_bytes()
        blobs["data sidecar"] = data_path(path).read_bytes()
        (noise,) = seeds
    else:
        # The drop-in draws only its noise key with 63 bits.
        (noise,) = [v for k, v in fixed_os.draws if k == 63]
    (sampling,) = [v for k, v in fixed_os.draws if k == 128]
    for what, secret in (("noise seed", noise), ("sampling key", sampling)):
        assert not found(secret, blobs), (what, found(secret, blobs))
