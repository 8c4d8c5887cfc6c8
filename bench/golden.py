"""Golden digests for a refactor: run the same private training through every public entry point
and print a digest of everything a behaviour-preserving change must leave bit-identical.

Covered: the native engine (``make_private``: Poisson batches, fused clipping and noise, the
denoiser with warm starts and its statistics, a DiSK filter, a DP-Adam stage, epsilon), its
checkpoint (saved, loaded into a fresh model, two more steps), the Opacus drop-in (plain and
ghost clipping, with denoising), and the ``rmt-glue train`` application through its Python API
(a tiny BERT and SST-2 folder written to a temporary folder: the native engine with the
post-processing chain, a checkpoint and a resume; the Opacus engine; a run calibrated to an
epsilon): its final parameters, its JSON log and its checkpoint's payload. Each value is a
SHA-256 of the tensor's bytes (or of a float's ``repr``), so a difference in the last bit shows.

Usage::

    python -m bench.golden --out before.json       # on the old code
    python -m bench.golden --out after.json        # on the new code
    python -m bench.golden --compare before.json after.json

It needs no data and no weights (a 2-layer RoBERTa and a 2-layer BERT with a word-piece
tokenizer, built in code), runs in about a minute on
2 CPU cores, and is not a test: it guards a refactor against behaviour changes the suite's
tolerances would let through.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, PAD, LENGTH, DATASET, BATCH = 60, 1, 10, 96, 16


def _digest(value) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes, or of anything else's ``repr``."""
    h = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())
    return h.hexdigest()[:16]


def _nested(prefix: str, value, out: dict[str, str]) -> None:
    """Digest every leaf of nested dicts/lists/tuples under dotted keys."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            _nested(f"{prefix}.{k}", value[k], out)
    elif isinstance(value, (list, tuple)) and any(
        isinstance(v, (torch.Tensor, dict, list, tuple)) for v in value
    ):
        for i, v in enumerate(value):
            _nested(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = _digest(value)


def _model(seed: int = 0) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
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
        attn_implementation="eager",
    )
    return RobertaForSequenceClassification(config)


def _dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (DATASET, LENGTH), generator=gen)
    lengths = torch.randint(2, LENGTH + 1, (DATASET,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    labels = torch.randint(0, 2, (DATASET,), generator=gen)
    return TensorDataset(ids, mask, labels)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


DENOISE = {"min_dim": 8, "seed": 11}


def _native(seed_model: int = 0):
    from rmt_kernels.dp import DiSKFilter, make_private

    model = _model(seed_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(
        _dataset(), batch_size=BATCH, generator=torch.Generator().manual_seed(0)
    )  # with a public noise seed the Poisson sampler is keyed by the loader's generator
    return make_private(
        model,
        optimizer,
        loader,
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=0.7,
        denoise=dict(DENOISE),
        post_processors=[DiSKFilter(kappa=0.7)],
        seed=1234,
    )


def _native_steps(model, optimizer, loader, steps: int, tag: str, out: dict[str, str]) -> None:
    batches = iter(loader)
    for step in range(steps):
        optimizer.engine.record_denoise_stats = True
        optimizer.zero_grad()
        _loss(model, next(batches)).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            if p.grad is not None:
                out[f"{tag}.step{step}.grad.{name}"] = _digest(p.grad)
        _nested(f"{tag}.step{step}.stats", optimizer.engine.take_denoise_stats(), out)
    for name, p in model.named_parameters():
        out[f"{tag}.param.{name}"] = _digest(p)
    out[f"{tag}.epsilon"] = _digest(optimizer.get_epsilon(1e-5))


def native(out: dict[str, str]) -> None:
    """``make_private`` for three steps, checkpoint, resume in a fresh model, two more steps."""
    from rmt_kernels.dp import load_checkpoint, save_checkpoint

    model, optimizer, loader = _native()
    _native_steps(model, optimizer, loader, 3, "native", out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        save_checkpoint(path, model, optimizer, loader, extra={"note": "golden"})
        saved = _payload(path.read_bytes())
        _nested("native.checkpoint", _stable(saved), out)
        model, optimizer, loader = _native(seed_model=9)
        out["native.resume.extra"] = _digest(load_checkpoint(path, model, optimizer, loader))
        _native_steps(model, optimizer, loader, 2, "native.resume", out)


def _payload(data: bytes) -> dict:
    """The checkpoint's payload (a ``torch.save`` zip after the file's own header, whose layout
    and version number a refactor may change)."""
    start = data.find(b"PK\x03\x04")
    if start < 0:
        raise ValueError("no torch.save payload in the checkpoint")
    return torch.load(io.BytesIO(data[start:]), weights_only=False)


def _stable(saved):
    """The checkpoint without what differs from run to run by design (paths, times, random ids
    drawn from the OS): everything else in it must be bit-identical."""
    volatile = ("time", "path", "pid", "host", "created", "format_version", "data_id")
    if isinstance(saved, dict):
        return {k: _stable(v) for k, v in saved.items() if not any(s in str(k) for s in volatile)}
    if isinstance(saved, (list, tuple)):
        return [_stable(v) for v in saved]
    return saved


def dropin(out: dict[str, str], mode: str) -> None:
    """The Opacus drop-in with denoising, ``mode`` "hooks" (per-example) or "ghost"."""
    from rmt_kernels.opacus import DenoisingPrivacyEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(3)
    data = TensorDataset(
        torch.randn(64, 24, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    )
    engine = DenoisingPrivacyEngine(accountant="prv")
    criterion = nn.CrossEntropyLoss()
    kwargs = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=BATCH),
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(7),
        denoise={"min_dim": 4, "seed": 5},
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = engine.make_private(
            criterion=criterion, grad_sample_mode="ghost", **kwargs
        )
    else:
        model, optimizer, loader = engine.make_private(**kwargs)
    for step, (x, y) in enumerate(list(loader)[:3]):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            out[f"dropin-{mode}.step{step}.grad.{name}"] = _digest(p.grad)
    out[f"dropin-{mode}.epsilon"] = _digest(engine.get_epsilon(1e-5))
    _nested(f"dropin-{mode}.state", optimizer.state_dict().get("rmt_denoise", {}), out)


# The ``rmt-glue train`` application: a tiny SST-2 folder and a 2-layer BERT config folder with a
# word-piece tokenizer (as tests/test_glue_cli.py's ``tiny`` fixture), so no ../shared is needed.
APP_WORDS = ["it", "'s", "movie", ".", "good", "great", "fun", "bad", "dull", "awful"]
# What a log or a checkpoint holds that differs from run to run by design (wall-clock times,
# memory) or by where the temporary folder is; ``secure_mode`` is TrainConfig's alias of the
# default that issue 26 deletes (the only logged field it removes).
APP_VOLATILE = (
    "seconds",
    "steps_per_s",
    "samples_per_s",
    "train_seconds",
    "peak_memory_mib",
    "secure_mode",
)


def _app_inputs(root: Path) -> tuple[Path, Path]:
    """(GLUE folder, model config folder) of the application's runs, written under ``root``."""
    from transformers import BertConfig, BertTokenizer

    gen = torch.Generator().manual_seed(0)
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    for split, rows in (("train", 24), ("dev", 16)):
        lines = ["sentence\tlabel"]
        for i in range(rows):
            label = i % 2
            words = APP_WORDS[4:7] if label else APP_WORDS[7:]
            picks = torch.randint(0, 3, (3,), generator=gen).tolist()
            lines.append(f"it 's {' '.join(words[k] for k in picks)} movie .\t{label}")
        (sst2 / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    config = root / "tiny-bert"
    config.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *APP_WORDS]
    (config / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(config / "vocab.txt")).save_pretrained(config)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(config)
    return root / "glue", config


def _scrub(value, root: str):
    """``value`` without ``APP_VOLATILE`` keys, the temporary folder's path as ``<tmp>``."""
    if isinstance(value, dict):
        return {k: _scrub(v, root) for k, v in value.items() if k not in APP_VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<tmp>")
    return value


def _app_run(tag: str, root: Path, out: dict[str, str], **options) -> None:
    """One ``train(GlueConfig(...))`` on the tiny inputs: digest the returned and the written
    log, the saved model's parameters and (with a checkpoint folder) the checkpoint's payload."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    from rmt_kernels.glue.config import GlueConfig
    from rmt_kernels.glue.fine_tune import train

    glue, config = root / "glue", root / "tiny-bert"
    log_path, saved = root / f"{tag}.json", root / f"{tag}-model"
    cfg = GlueConfig(
        task="sst2",
        data_dir=str(glue),
        init="random",
        config=str(config),
        batch_size=8,
        physical_batch_size=4,
        eval_every=2,
        progress=False,
        output=str(log_path),
        save=str(saved),
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # --noise-seed's "NOT private", resume notes
        log = train(cfg)
    _nested(f"{tag}.log", _scrub(log, str(root)), out)
    out[f"{tag}.log.written"] = _digest(
        json.dumps(_scrub(json.loads(log_path.read_text()), str(root)), sort_keys=True)
    )
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    for name, p in model.named_parameters():
        out[f"{tag}.param.{name}"] = _digest(p)
    if cfg.checkpoint_dir:
        payload = _payload((Path(cfg.checkpoint_dir) / "checkpoint.pt").read_bytes())
        _nested(f"{tag}.checkpoint", _scrub(_stable(payload), str(root)), out)


def app(out: dict[str, str]) -> None:
    """``rmt-glue train`` through its Python API: a native run with the post-processing chain
    (denoise, EMA filter, DP-Adam, linear schedule) checkpointed after 2 of 3 steps and resumed
    to 4; the Opacus engine (Opacus's own: the drop-in, which post-processing needs, keys its
    Poisson sampling from the OS, so its batches are not reproducible); the native engine
    calibrated to epsilon 8."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _app_inputs(root)
        chain = dict(
            noise_multiplier=1.0,
            accountant="rdp",
            noise_seed=3,
            seed=3,
            denoise=True,
            denoise_options={"min_dim": 8},
            filter="ema",
            dp_adam="bc",
            lr=1e-3,
            lr_schedule="linear",
            checkpoint_dir=str(root / "ckpt"),
            checkpoint_every=2,
        )
        _app_run("app.native", root, out, steps=3, **chain)
        _app_run("app.native.resumed", root, out, steps=4, resume=True, **chain)
        _app_run(
            "app.opacus",
            root,
            out,
            engine="opacus",
            noise_multiplier=1.0,
            accountant="rdp",
            noise_seed=5,
            steps=3,
        )
        _app_run("app.calibrated", root, out, epsilon=8.0, accountant="rdp", noise_seed=7, steps=3)


def run() -> dict[str, str]:
    torch.set_num_threads(1)  # thread count changes float reductions: fix it
    out: dict[str, str] = {}
    native(out)
    dropin(out, "hooks")
    dropin(out, "ghost")
    app(out)
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The keys whose digests differ or that only one side has."""
    keys = sorted(before.keys() | after.keys())
    return [k for k in keys if before.get(k) != after.get(k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the digests here (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        diff = compare(before, after)
        for k in diff:
            print(f"DIFFERS {k}: {before.get(k)} -> {after.get(k)}")
        print(f"{len(before)} vs {len(after)} digests, {len(diff)} differ")
        return 1 if diff else 0
    digests = run()
    text = json.dumps(digests, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{len(digests)} digests -> {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
