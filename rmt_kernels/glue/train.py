"""The fine-tuning loop: a GLUE task, a Hugging Face encoder, DP-SGD (ours or Opacus's) or not,
periodic evaluation, and a JSON log.

One logical step = one batch drawn by the (Poisson) data loader, split into physical batches of
at most ``physical_batch_size`` examples; each is forwarded and backpropagated, then one
``optimizer.step()`` (Opacus's ``signal_skip_step`` protocol for the physical batches before the
last, which both engines speak).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import torch
from torch.nn import functional

from rmt_kernels.glue.data import Encoded, encode, load_split
from rmt_kernels.glue.pooling import use_mean_pooling
from rmt_kernels.glue.tasks import Task, get_task

# Files of which at least one makes a folder a tokenizer (fast, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Evaluation runs without per-example state, so it can take larger batches than training.
EVAL_BATCH_FACTOR = 4
# The privacy budget when neither --epsilon nor --noise-multiplier is given: a common choice in
# the DP fine-tuning literature (Li et al. 2022, Yu et al. 2022 report GLUE at epsilon 3 and 8).
DEFAULT_EPSILON = 8.0
# Defaults of the optimisation flags a resume inherits from its checkpoint when not given.
DEFAULT_LR = 5e-4  # a DP-SGD value; non-private fine-tuning wants ~5e-5
DEFAULT_OPTIMIZER = "adamw"
DEFAULT_WEIGHT_DECAY = 0.0
# Noise keys are signed 64-bit integers in the ops.
NOISE_SEED_LIMIT = 2**63


@dataclass
class TrainConfig:
    """Everything a run depends on (the ``config`` of the JSON log). See ``rmt-glue train -h``."""

    task: str
    data_dir: str | None = None
    model: str | None = None
    init: str = "pretrained"
    config: str | None = None
    dp: bool = True
    engine: str = "native"
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    # The noise seed is secret (from the OS) unless noise_seed is given: then the noise is
    # reproducible and the run is not private. secure_mode is the default, kept as an alias.
    secure_mode: bool = False
    noise_seed: int | None = None
    batch_size: int = 64
    physical_batch_size: int | None = None
    epochs: float | None = None
    steps: int | None = None
    # None: the default (DEFAULT_*) for a new run, the checkpointed run's for a resume.
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    max_length: int = 128
    train_size: int | None = None
    eval_size: int | None = None
    eval_every: int = 0
    seed: int = 0
    denoise: bool = False
    denoise_options: dict = field(default_factory=dict)
    freeze_embeddings: bool = False
    pooling: str = "cls"
    device: str | None = None
    output: str | None = None
    save: str | None = None
    progress: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def check(self) -> None:
        """Raise ValueError on options that cannot go together (before any data is read)."""
        get_task(self.task)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        physical = self.physical_batch_size
        if physical is not None and (physical < 1 or self.batch_size % physical):
            raise ValueError(
                f"--physical-batch-size {physical} must divide --batch-size {self.batch_size}"
            )
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"--init must be 'pretrained' or 'random', got {self.init!r}")
        if self.init == "random" and (self.config is None or self.model is not None):
            raise ValueError("--init random builds the model from --config DIR (and not --model)")
        if self.init == "pretrained" and self.model is None:
            raise ValueError("give --model (a folder or a hub name), or --init random --config DIR")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"--pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.engine not in ("native", "opacus"):
            raise ValueError(f"--engine must be 'native' or 'opacus', got {self.engine!r}")
        if not self.dp and (self.denoise or self.epsilon is not None):
            raise ValueError("--no-dp trains without privacy: --epsilon and --denoise need DP")
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give --epsilon or --noise-multiplier, not both")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"--epsilon must be > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        if self.secure_mode and (not self.dp or self.engine != "native"):
            raise ValueError("--secure-mode is for DP with --engine native")
        if self.noise_seed is not None:
            if not self.dp:
                raise ValueError("--noise-seed keys the DP noise: it does not go with --no-dp")
            if self.secure_mode:
                raise ValueError(
                    "--noise-seed makes the noise public, --secure-mode keeps it secret: give one"
                )
            if not 0 <= self.noise_seed < NOISE_SEED_LIMIT:
                raise ValueError(f"--noise-seed must be in [0, 2**63), got {self.noise_seed}")
        if not self.dp and self.noise_multiplier is not None:
            raise ValueError("--no-dp trains without noise: --noise-multiplier needs DP")
        if self.epsilon is not None and not math.isfinite(self.epsilon):
            raise ValueError(
                f"--epsilon must be a finite number > 0, got {self.epsilon} (no privacy: "
                "--no-dp; no noise: --noise-multiplier 0)"
            )
        if self.noise_multiplier is not None and not (
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(
                f"--noise-multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(
                f"--max-grad-norm must be a finite number > 0, got {self.max_grad_norm}"
            )
        if self.epochs is not None and not math.isfinite(self.epochs):
            raise ValueError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number >= 0, got {self.lr}")
        if self.weight_decay is not None and not (
            self.weight_decay >= 0 and math.isfinite(self.weight_decay)
        ):
            raise ValueError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if self.optimizer not in (None, "adamw", "sgd"):
            raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.eval_every < 0:
            raise ValueError(
                f"--eval-every must be >= 0 (0: at the end only), got {self.eval_every}"
            )
        parse_device(self.device)
        if (self.checkpoint_dir or self.resume) and not (self.dp and self.engine == "native"):
            raise ValueError("--checkpoint-dir / --resume are for DP with --engine native")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir (the run to resume)")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir (where to write)")
        if _distributed_env() and not (self.dp and self.engine == "native"):
            raise ValueError("torchrun (several processes) is for DP with --engine native")
        if self.engine == "opacus" and self.denoise and _denoising_privacy_engine() is None:
            raise ValueError(
                "--engine opacus --denoise needs rmt_kernels.opacus.DenoisingPrivacyEngine, "
                "which this installation lacks; use --engine native for denoising"
            )


def parse_device(text: str | None) -> torch.device:
    """The device of ``--device`` (default: cuda when available).

    Raises:
        ValueError: not a device name, not cpu or cuda, or a GPU this machine does not have.
    """
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {text!r} is not a device (expected cpu, cuda or cuda:N)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: only cpu and cuda (cuda:N) are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: no CUDA GPU is usable here (this PyTorch build has no CUDA, or "
                "no GPU is visible); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def _check_writable_folder(folder: Path, flag: str, what: Path) -> None:
    """Create ``folder`` if needed and write a probe file in it (ValueError naming ``flag``)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".rmt-write-probe-{os.getpid()}", "wb") as probe:
            probe.write(b"x")
        (folder / f".rmt-write-probe-{os.getpid()}").unlink()
    except OSError as err:
        raise ValueError(
            f"{flag} {what}: cannot write in {folder} ({err.strerror or err})"
        ) from None


def check_outputs(cfg: TrainConfig) -> None:
    """Raise ValueError now, before any training, if an output of the run cannot be written."""
    if cfg.output:
        out = Path(cfg.output)
        if out.is_dir():
            raise ValueError(f"--output {out} is a folder; give a file name")
        _check_writable_folder(out.parent, "--output", out)
    if cfg.save:
        save = Path(cfg.save)
        if save.exists() and not save.is_dir():
            raise ValueError(f"--save {save} is a file; give a folder")
        _check_writable_folder(save.parent, "--save", save)
    if cfg.checkpoint_dir:
        folder = Path(cfg.checkpoint_dir)
        _check_writable_folder(folder, "--checkpoint-dir", folder)


def finite_or_none(value: float | None) -> float | None:
    """``value``, or None when it is infinite or NaN (an epsilon without noise)."""
    return value if value is None or math.isfinite(value) else None


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no Infinity/NaN:
    an infinite epsilon, a diverged loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value, flag: str = "--output") -> None:
    """Write ``value`` as strict JSON (non-finite floats as null) to ``path``, atomically: a
    temporary file in the same folder, then a rename, so a crash leaves the old file or the new.

    Raises:
        ValueError: the file cannot be written (naming ``flag``).
    """
    path = Path(path)
    text = json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write it ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _save_model_atomically(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a sibling temporary folder, then renamed into place, so a crash
    never leaves half a model in ``--save``."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as err:
        raise ValueError(f"--save {folder}: cannot write it ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _encoded_digest(data: Encoded) -> str:
    """SHA-256 of a tokenized split: what the model is fed (text, subset, tokenizer, length)."""
    digest = hashlib.sha256()
    for rows in (data.input_ids, data.token_type_ids or []):
        digest.update(json.dumps([list(row) for row in rows]).encode())
    digest.update(f"pad:{data.pad_token_id}".encode())
    digest.update(f"{data.labels.dtype}".encode())
    digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_settings(cfg: TrainConfig, model, physical: int, device: torch.device) -> dict:
    """What the computation of a step depends on besides the data and the privacy settings
    (those the checkpoint checks itself), by flag: a resume whose settings differ cannot replay
    the lost steps for free. Public values only (no data, no seed): stored in the checkpoint."""
    config = json.loads(_unwrap(model).config.to_json_string())
    config.pop("_name_or_path", None)  # where it was read from, not what it computes
    return {
        "--task": cfg.task,
        "--max-length": cfg.max_length,
        "--train-size": cfg.train_size,
        "--seed": cfg.seed,
        "--pooling": cfg.pooling,
        "--freeze-embeddings": cfg.freeze_embeddings,
        "--physical-batch-size": physical,
        "--optimizer": cfg.optimizer,
        "--lr": cfg.lr,
        "--weight-decay": cfg.weight_decay,
        "--device": device.type,
        "model config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        # Plain strings: torch's version is a str subclass torch.load(weights_only) refuses.
        "versions": {k: str(v) for k, v in versions().items() if k in ("torch", "transformers")},
    }


def _distributed_env() -> bool:
    """Whether torchrun (or a launcher like it) started several processes."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _init_distributed(device: torch.device) -> tuple[int, torch.device]:
    """Join torchrun's process group (gloo on CPUs, nccl on GPUs); this rank and its device."""
    import os

    import torch.distributed as dist

    if not _distributed_env():
        return 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


def _denoising_privacy_engine():
    """``rmt_kernels.opacus.DenoisingPrivacyEngine`` where the tree has it, else None."""
    try:
        from rmt_kernels.opacus import DenoisingPrivacyEngine
    except ImportError:
        return None
    return DenoisingPrivacyEngine


def load_tokenizer(path: str):
    """The tokenizer of a model or config folder (or hub name).

    Raises:
        ValueError: a local folder without tokenizer files.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {path}: {err}") from err


def build_model(cfg: TrainConfig, task: Task):
    """(model, tokenizer): pretrained weights with a fresh head, or a random init from a config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = cfg.model if cfg.init == "pretrained" else cfg.config
    kwargs = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    if source is not None and not Path(source).exists() and Path(source).is_absolute():
        raise ValueError(f"model folder {source} does not exist")
    tokenizer = load_tokenizer(source)
    try:
        if cfg.init == "pretrained":
            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        else:
            config = AutoConfig.from_pretrained(source, **kwargs)
            model = AutoModelForSequenceClassification.from_config(config)
    except OSError as err:
        raise ValueError(f"could not load a model from {source}: {err}") from err
    if cfg.pooling == "mean" or getattr(model.config, "rmt_pooling", None) == "mean":
        use_mean_pooling(model)
    if cfg.freeze_embeddings:
        embeddings = getattr(model.base_model, "embeddings", None)
        if embeddings is None:
            raise ValueError(f"--freeze-embeddings: {type(model).__name__} has no embeddings")
        embeddings.requires_grad_(False)
    return model, tokenizer


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Mean cross-entropy, or mean squared error for the regression task."""
    if task.is_regression:
        return functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return functional.cross_entropy(logits.float(), labels)


def _forward(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def _shared_positions(model) -> bool:
    """Whether the model's position embeddings read one (1, T) row of positions shared by the
    batch (BERT) rather than per-example ones (RoBERTa derives them from each example's padding,
    so its position embedding has a padding_idx). Opacus's per-sample gradients need a (B, T)
    input there."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    return isinstance(positions, torch.nn.Embedding) and positions.padding_idx is None


@torch.no_grad()
def evaluate(model, data: Encoded, task: Task, batch_size: int, device) -> dict[str, float]:
    """The task's metrics and the mean loss on ``data``."""
    was_training = model.training
    model.eval()
    predictions: list[float | int] = [0] * len(data)
    total_loss = 0.0
    # Batches of similar lengths pad less; predictions go back to their examples' places.
    order = data.by_length(range(len(data)))
    for start in range(0, len(data), batch_size):
        chunk = order[start : start + batch_size]
        batch = data.batch(chunk)
        logits = _forward(model, batch, device)
        labels = batch["labels"].to(device)
        total_loss += loss_fn(logits, labels, task).item() * len(labels)
        if task.is_regression:
            values = logits.squeeze(-1).float().cpu().tolist()
        else:
            values = logits.argmax(-1).cpu().tolist()
        for i, value in zip(chunk, values, strict=True):
            predictions[i] = value
    model.train(was_training)
    metrics = task.score(predictions, data.labels.tolist())
    metrics["eval_loss"] = total_loss / max(1, len(data))
    return metrics


def versions() -> dict[str, str | None]:
    """Versions of what a result depends on."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "opacus": version("opacus"),
        "datasets": version("datasets"),
        "rmt_kernels": version("rmt-kernels"),
    }


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's resident high-water mark on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _subset(dataset, size: int | None, seed: int, flag: str = "--train-size"):
    if size is None:
        return dataset
    if size < 1:
        raise ValueError(f"{flag} must be >= 1, got {size}")
    if size > len(dataset):
        raise ValueError(f"{flag} {size} is above the {len(dataset)} examples of the split")
    if size == len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.select(sorted(order[:size].tolist()))


class _Indices(torch.utils.data.Dataset):
    """Example indices: loaders (Poisson ones included) sample these and the loop pads the
    examples itself, so an empty Poisson batch is just an empty index tensor."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        # A tuple: Opacus's DPDataLoader reads the fields of an example to shape empty batches.
        return (torch.tensor(i),)


def _calibrate(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that spends ``--epsilon`` over the run (Opacus's search)."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier reaches epsilon={epsilon} at delta={delta:.3g} over {steps} "
            f"steps at sampling rate {sample_rate:.4g} (Opacus: {err}); raise --epsilon, or use "
            "fewer steps or a smaller batch"
        ) from err
    # Opacus's search stops at the first sigma whose epsilon is below the target, and for tiny
    # targets the accountants' numerics report epsilon <= 0 there: no real calibration.
    accountant_check = create_accountant(mechanism=accountant)
    accountant_check.history = [(sigma, sample_rate, steps)]
    achieved = accountant_check.get_epsilon(delta=delta)
    if not 0 < achieved <= epsilon * (1 + 1e-6):
        raise ValueError(
            f"no noise multiplier reaches epsilon={epsilon} at delta={delta:.3g} over {steps} "
            f"steps at sampling rate {sample_rate:.4g}: Opacus's search ended at noise "
            f"multiplier {sigma:.4g}, where the {accountant} accountant reports epsilon "
            f"{achieved:.3g}; raise --epsilon"
        )
    return sigma


def train(cfg: TrainConfig) -> dict:
    """Run one fine-tuning; return (and write to ``cfg.output``) the JSON log.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: the process group is joined,
    each rank Poisson-samples its shard of the data, and rank 0 alone evaluates, logs, saves and
    writes checkpoints (other ranks return a log without evaluations).
    """
    cfg.check()
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    device = parse_device(cfg.device)
    rank, device = _init_distributed(device)
    if rank != 0:  # one log, one progress bar, one saved model: rank 0's
        cfg = replace(cfg, output=None, save=None, progress=False)
    check_outputs(cfg)
    checkpoint, resumed, restart = _checkpoint_state(cfg)
    cfg = _resolve_optimisation(cfg, resumed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    train_ds = _subset(load_split(task, "train", cfg.data_dir), cfg.train_size, cfg.seed)
    eval_ds = _subset(
        load_split(task, "validation", cfg.data_dir), cfg.eval_size, cfg.seed, "--eval-size"
    )
    model, tokenizer = build_model(cfg, task)
    model.to(device).train()
    train_data = encode(train_ds, tokenizer, cfg.max_length, cfg.progress)
    eval_data = encode(eval_ds, tokenizer, cfg.max_length, cfg.progress)
    n = len(train_data)
    delta = cfg.delta if cfg.delta is not None else 1 / n**1.1
    physical = cfg.physical_batch_size or cfg.batch_size

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    # The batch sampling must be as secret as the noise (amplification by sampling assumes
    # nobody knows which examples a batch holds): --seed orders the data only without DP or
    # with a public --noise-seed.
    public = not cfg.dp or cfg.noise_seed is not None
    loader = torch.utils.data.DataLoader(
        _Indices(n),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed if public else secrets.randbits(62)),
    )
    steps_per_epoch = len(loader)
    sample_rate = 1 / steps_per_epoch
    total_steps = cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch))
    if resumed is not None and resumed["steps"] >= total_steps:
        raise ValueError(
            f"--resume: the run in {cfg.checkpoint_dir} already ran {resumed['steps']} steps and "
            f"this one asks for {total_steps}: give more --steps (or --epochs) to continue it"
        )

    noise_multiplier = None
    privacy_engine = None
    if cfg.dp:
        noise_multiplier = cfg.noise_multiplier
        if noise_multiplier is None:
            target = cfg.epsilon if cfg.epsilon is not None else DEFAULT_EPSILON
            noise_multiplier = _calibrate(target, delta, sample_rate, total_steps, cfg.accountant)
        denoise = _denoise_options(cfg)
        if cfg.engine == "native":
            from rmt_kernels.dp import make_private

            with warnings.catch_warnings():
                # The CLI says it itself, in its own words, below (and in the log).
                warnings.filterwarnings("ignore", message="make_private: seed=")
                model, optimizer, loader = make_private(
                    model,
                    optimizer,
                    loader,
                    target_delta=delta,
                    max_grad_norm=cfg.max_grad_norm,
                    noise_multiplier=noise_multiplier,
                    denoise=denoise,
                    # The noise key: secret (from the OS, never written) unless --noise-seed.
                    seed=cfg.noise_seed,
                    secure_mode=cfg.noise_seed is None,
                    accountant=cfg.accountant,
                )
        else:
            engine_class = _denoising_privacy_engine() if cfg.denoise else None
            if engine_class is None:
                from opacus import PrivacyEngine

                engine_class = PrivacyEngine
            privacy_engine = engine_class(accountant=cfg.accountant)
            extra = {"denoise": denoise} if cfg.denoise else {}
            # Opacus draws its noise from this generator (without one, from the global RNG
            # that --seed seeded): secret unless --noise-seed.
            noise_seed = cfg.noise_seed if cfg.noise_seed is not None else secrets.randbits(63)
            model, optimizer, loader = privacy_engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator(device).manual_seed(noise_seed),
                **extra,
            )

    expand_positions = privacy_engine is not None and _shared_positions(_unwrap(model))
    spent: dict[int, float] = {}

    def epsilon() -> float | None:
        """Privacy spent after ``step`` steps (cached: Opacus's PRV accountant takes ~0.2 s)."""
        if not cfg.dp:
            return None
        if step not in spent:
            if noise_multiplier == 0 and step > 0:
                spent[step] = float("inf")  # no noise, no privacy (the accountants divide by 0)
            elif privacy_engine is not None:
                spent[step] = float(privacy_engine.get_epsilon(delta))
            else:
                spent[step] = optimizer.get_epsilon(delta)
        return spent[step]

    # Private: DP with noise, keyed by a secret seed. A public --noise-seed lets anyone with the
    # log regenerate the noise and subtract it, whatever epsilon the accountant reports.
    private = cfg.dp and cfg.noise_seed is None and bool(noise_multiplier)
    if cfg.dp and cfg.noise_seed is not None:
        warnings.warn(
            f"--noise-seed {cfg.noise_seed}: the noise is reproducible from the log, so this run "
            "is NOT private (epsilon is what a secret seed would give; for experiments only)",
            stacklevel=2,
        )
    log = {
        "task": task.name,
        "main_metric": task.main_metric,
        # null: no finite guarantee (--no-dp, or no noise); strict JSON has no Infinity.
        "epsilon": None,
        "private": private,
        "delta": delta if cfg.dp else None,
        "noise_multiplier": noise_multiplier,
        # Denoise options as the op receives them (unset ones take the op's defaults).
        "config": {**asdict(cfg), "denoise_options": _denoise_options(cfg)},
        "derived": {
            "train_examples": n,
            "eval_examples": len(eval_data),
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "sample_rate": sample_rate,
            "physical_batch_size": physical,
            "trainable_parameters": sum(p.numel() for p in params),
            "device": str(device),
        },
        "versions": versions(),
        "evals": [],
        "peak_memory_mib": None,
    }

    def write_log() -> None:
        if cfg.output:
            write_json(cfg.output, log)

    seconds, samples, losses, step = 0.0, 0, [], 0
    settings = run_settings(cfg, model, physical, device)
    # Names the data, its preprocessing and the computation for the checkpoint's replay rule;
    # kept out of the checkpoint itself (rmt_kernels/dp/checkpoint.py: a hash of the data).
    data_fingerprint = hashlib.sha256(
        json.dumps([_encoded_digest(train_data), settings], sort_keys=True).encode()
    ).hexdigest()
    if checkpoint is not None:
        from rmt_kernels.dp import attach_ledger, load_checkpoint

        if resumed is not None:
            old_settings = resumed["extra"].get("settings")
            changed = [k for k, v in settings.items() if old_settings and old_settings.get(k) != v]
            if changed:
                warnings.warn(
                    f"--resume: {', '.join(changed)} differ from the checkpointed run's: the "
                    "steps it lost cannot be replayed for free (they are charged, the noise is "
                    "re-keyed)",
                    stacklevel=2,
                )
            # The step counter, accountant (with the ledger's lost steps), the sampler's
            # position (public seeds) come back; the log goes on where the checkpoint left it.
            extra = load_checkpoint(
                checkpoint, model, optimizer, loader, data_fingerprint=data_fingerprint
            )
            step, seconds, samples = extra["step"], extra["seconds"], extra["samples"]
            # Honour --lr / --weight-decay (the checkpoint's unless given): never silently
            # continue with values other than the log's.
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
            if rank == 0:  # the one log
                log["evals"] = extra["evals"]
        else:
            attach_ledger(optimizer, checkpoint, charge_existing=restart)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=step, desc=f"{task.name}", disable=not cfg.progress, unit="step"
    )
    postfix: dict[str, str] = {}
    eval_batch = physical * EVAL_BATCH_FACTOR
    while step < total_steps:
        for (indices,) in loader:
            evaluating = step + 1 == total_steps or (
                cfg.eval_every and (step + 1) % cfg.eval_every == 0
            )
            # Per-layer kept rank and shrunk-to-noisy norm ratio, on evaluation steps only (the
            # SVDs run with the evaluation, outside the timed step).
            engine = getattr(optimizer, "engine", None) if privacy_engine is None else None
            if engine is not None:
                engine.record_denoise_stats = bool(evaluating)
            start = time.perf_counter()
            batch_loss = _logical_step(
                model,
                optimizer,
                indices,
                train_data,
                task,
                physical,
                device,
                cfg,
                privacy_engine,
                expand_positions,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            samples += len(indices)
            step += 1
            if batch_loss is not None:
                losses.append(batch_loss)
            bar.update(1)
            postfix["loss"] = f"{batch_loss:.4f}" if batch_loss is not None else "-"
            postfix["samples/s"] = f"{samples / seconds:.1f}"
            # Epsilon about 20 times a run: each accountant call costs a fraction of a second.
            if cfg.dp and (step % max(1, total_steps // 20) == 0 or step == total_steps):
                postfix["eps"] = f"{epsilon():.3g}"
            bar.set_postfix(postfix, refresh=False)
            # Rank 0 alone evaluates and logs (the other ranks' models are identical).
            if rank == 0 and (
                step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            ):
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "seconds": seconds,
                    "samples": samples,
                    "samples_per_s": samples / seconds if seconds else None,
                    "epsilon": finite_or_none(epsilon()),
                    "train_loss": sum(losses) / len(losses) if losses else None,
                }
                losses = []
                record.update(evaluate(model, eval_data, task, eval_batch, device))
                if engine is not None:
                    stats = engine.take_denoise_stats()
                    if stats:
                        record["denoise"] = stats
                log["evals"].append(record)
                log["epsilon"] = record["epsilon"]
                log["peak_memory_mib"] = peak_memory_mib(device)
                bar.write(
                    f"step {step}: {task.main_metric} {record[task.main_metric]:.4f}"
                    + (f", epsilon {epsilon():.3g}" if cfg.dp else "")
                )
                write_log()
            if checkpoint is not None and (
                step == total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            ):
                from rmt_kernels.dp import save_checkpoint

                state = {"step": step, "seconds": seconds, "samples": samples}
                optimisation = {"optimizer": cfg.optimizer, "lr": cfg.lr}
                save_checkpoint(
                    checkpoint,
                    model,
                    optimizer,
                    loader,
                    {
                        **state,
                        "evals": log["evals"],
                        "config": {**optimisation, "weight_decay": cfg.weight_decay},
                        "settings": settings,
                    },
                    data_fingerprint=data_fingerprint,
                )
            if step == total_steps:
                break
    bar.close()
    if _distributed_env():
        import torch.distributed as dist

        dist.destroy_process_group()
    if cfg.save:
        _save_model_atomically(_unwrap(model), tokenizer, Path(cfg.save))
    return log


def _checkpoint_state(cfg: TrainConfig) -> tuple[Path | None, dict | None, bool]:
    """(checkpoint file, what to resume or None, whether to restart a run killed before its
    first checkpoint with its ledger's steps charged), decided before anything is built."""
    if not cfg.checkpoint_dir:
        return None, None, False
    from rmt_kernels.dp import checkpoint_extra
    from rmt_kernels.dp.checkpoint import PrivacyLedger, ledger_path

    path = Path(cfg.checkpoint_dir) / "checkpoint.pt"
    if path.exists():
        if not cfg.resume:
            raise ValueError(
                f"{path} exists: continue that run with --resume, or use another folder"
            )
        return path, checkpoint_extra(path), False
    lost = len(PrivacyLedger(ledger_path(path)).entries())
    if lost:
        # Its steps touched the data: start over in its place, with them charged.
        warnings.warn(
            f"{cfg.checkpoint_dir} holds {lost} step(s) of a run killed before its first "
            "checkpoint: starting over, with those steps charged",
            stacklevel=2,
        )
        return path, None, True
    if cfg.resume:
        warnings.warn(f"nothing to resume in {cfg.checkpoint_dir}: starting the run", stacklevel=2)
    return path, None, False


def _resolve_optimisation(cfg: TrainConfig, resumed: dict | None) -> TrainConfig:
    """--optimizer, --lr, --weight-decay: given, else the checkpointed run's, else the default.
    A resume cannot change the optimizer (its state is the checkpoint's); a new --lr or
    --weight-decay is honoured, and said."""
    old = ((resumed or {}).get("extra") or {}).get("config") or {}
    if cfg.optimizer is not None and old.get("optimizer") not in (None, cfg.optimizer):
        raise ValueError(
            f"--resume: the checkpointed run trains with --optimizer {old['optimizer']}, whose "
            f"state cannot continue as --optimizer {cfg.optimizer}: resume without --optimizer, "
            "or start a new run"
        )
    resolved = {}
    for name, flag, default in (
        ("optimizer", "--optimizer", DEFAULT_OPTIMIZER),
        ("lr", "--lr", DEFAULT_LR),
        ("weight_decay", "--weight-decay", DEFAULT_WEIGHT_DECAY),
    ):
        given = getattr(cfg, name)
        resolved[name] = given if given is not None else old.get(name, default)
        if given is not None and old.get(name) is not None and old[name] != given:
            warnings.warn(
                f"--resume: {flag} {given} replaces the checkpointed run's {old[name]}",
                stacklevel=2,
            )
    return replace(cfg, **resolved)


def _denoise_options(cfg: TrainConfig) -> dict | None:
    if not cfg.denoise:
        return None
    return {k: v for k, v in cfg.denoise_options.items() if v is not None}


def _unwrap(model):
    """The Hugging Face model inside Opacus's GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def _logical_step(
    model, optimizer, indices, data, task, physical, device, cfg, privacy_engine, expand_positions
) -> float | None:
    """Forward/backward each physical batch of ``indices``, then one optimizer step; the mean
    loss (None for an empty Poisson batch)."""
    # Physical batches of similar lengths pad less. The logical batch, hence the clipped sum and
    # everything private about the step, does not depend on how it is cut into physical ones.
    order = torch.tensor(data.by_length(indices), dtype=torch.long)
    chunks = list(order.split(physical)) if len(indices) else []
    total = 0.0
    if not chunks and privacy_engine is not None:
        # An empty Poisson batch must still be a (noise-only) step: skipping it would reveal
        # that it was empty. Opacus reads per-sample gradients, which only a backward makes, and
        # an encoder cannot run on zero examples: hand it zero per-sample gradients.
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    for j, chunk in enumerate(chunks):
        batch = data.batch(chunk)
        if expand_positions:
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(
                batch["input_ids"]
            )
        logits = _forward(model, batch, device)
        loss = loss_fn(logits, batch["labels"].to(device), task)
        if len(chunk):
            total += loss.item() * len(chunk)
        if not cfg.dp:
            # Mean over the logical batch: weight each physical batch by its share.
            (loss * (len(chunk) / len(indices))).backward()
        else:
            # The DP engines take each physical batch's mean loss (loss_reduction="mean") and
            # divide the clipped sum by the expected logical batch size themselves.
            loss.backward()
        if cfg.dp and j < len(chunks) - 1:
            optimizer.signal_skip_step(True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(indices) if len(indices) else None


def evaluate_saved(
    task_name: str,
    model_dir: str,
    data_dir: str | None,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    eval_size: int | None = None,
    device: str | None = None,
) -> dict:
    """Metrics of a saved model (``train --save DIR``) on the task's validation split."""
    task = get_task(task_name)
    cfg = TrainConfig(task=task.name, model=model_dir)
    model, tokenizer = build_model(cfg, task)
    dev = parse_device(device)
    model.to(dev)
    data = encode(
        _subset(load_split(task, "validation", data_dir), eval_size, 0, "--eval-size"),
        tokenizer,
        max_length,
    )
    metrics = evaluate(model, data, task, batch_size, dev)
    return {
        "task": task.name,
        "model": model_dir,
        "examples": len(data),
        "metrics": metrics,
        "versions": versions(),
    }


__all__ = ["TrainConfig", "build_model", "evaluate", "evaluate_saved", "load_tokenizer", "train"]
