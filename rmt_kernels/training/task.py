"""What the training loop (``rmt_kernels.training.loop``) asks of an application: its data, its
model, its loss and its metrics, as a small protocol.

An application is a folder beside ``rmt_kernels/glue/``: its options (a ``TrainConfig``
subclass), a class implementing :class:`TrainingTask` for one run, and its command line. The loop
owns everything else: privacy, the post-processing chain, the schedule, checkpoints and resume,
the JSON log, torchrun.

The loop samples example *indices* (``rmt_kernels.training.loop.ExampleIndices``): a Poisson
batch may be empty, and the loop never touches an example itself. The application turns indices
into tensors in :meth:`TrainingTask.loss` and :meth:`TrainingTask.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from rmt_kernels.training.config import TrainConfig


class TrainingTask(Protocol):
    """One run's application side. ``build`` is called once, first; the other methods after it.

    Attributes:
        name: the log's ``task`` (and the progress bar's label).
        main_metric: the metric of :meth:`evaluate` the log and ``compare`` lead with.
    """

    name: str
    main_metric: str

    def build(self, cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Sized, Sized]:
        """(model on ``device`` in training mode, training data, evaluation data) for the run's
        options ``cfg`` (the application's ``TrainConfig`` subclass, with the optimisation flags
        resolved; the global generator seeded with ``cfg.seed``). The data are whatever
        :meth:`loss` and :meth:`evaluate` read; their ``len`` is their example count.

        Raises:
            ValueError: missing or malformed data, a model that cannot be loaded.
        """
        ...

    def made_private(self, model: torch.nn.Module, opacus: bool) -> None:
        """Called once with the model as the DP engine returned it (``opacus``: Opacus's
        per-sample machinery wraps it), before the first step: adapt what :meth:`loss` feeds it
        (e.g. per-example position ids for Opacus). Nothing to do is fine."""
        ...

    def order(self, data: Sized, indices: torch.Tensor) -> list[int]:
        """The examples ``indices`` of the training data in the order the loop cuts them into
        physical batches (e.g. by length, so that a physical batch pads little). The logical
        batch, hence everything private about the step, does not depend on the order."""
        ...

    def loss(
        self, model: torch.nn.Module, data: Sized, indices: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The mean loss of the examples ``indices`` of ``data`` (one physical batch, never
        empty), on ``device``, with its graph: the loop calls ``backward`` on it."""
        ...

    def evaluate(
        self, model: torch.nn.Module, data: Sized, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """The metrics (``main_metric`` among them) and ``eval_loss`` of ``model`` on the
        evaluation data, without gradients; the model's training mode is restored."""
        ...

    def digest(self, data: Sized) -> str:
        """A hash of the training data as the model is fed it (text, subset, preprocessing): a
        resume replays its lost steps for free only on the same data."""
        ...

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        """The application's options a step's computation depends on, by flag, and the
        model's identity (``rmt_kernels.training.fingerprint.model_config_digest``): public
        values, stored in the checkpoint and compared at a resume."""
        ...

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the trained model (and what loads it, e.g. a tokenizer) to ``folder``,
        atomically (``rmt_kernels.training.outputs``).

        Raises:
            ValueError: the folder cannot be written.
        """
        ...
