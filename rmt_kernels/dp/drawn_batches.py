"""Rows against examples: a logical step must clip exactly the examples its loader drew.

The engine clips one row of dim 0 of the model's first tensor argument as one example (privacy
invariant 7, PRIVACY.md). The layout verification proves that the model keeps those rows apart;
it cannot know what a row *is*. A caller who flattens a batch of B sequences of T tokens before
calling the model (``model(x.view(B * T, d))`` with a per-token model and loss) hands the engine
B*T rows: each is clipped to C, and one sequence then moves the sum by up to T*C.

What the engine can know is how many examples the private data loader drew for the step:
:class:`rmt_kernels.dp.distributed.PoissonSampler` records each batch it hands out in a
:class:`DrawnBatches`, and the engine compares, at every logical step, the rows it clipped with
the size of the oldest batch not yet stepped on. Any difference is refused before the step's
gradient is released.

What this catches and what it cannot:

- a flattened batch (B*T rows against B examples), an example repeated in several rows, a batch
  stepped on twice, an extra batch the loader never drew: refused;
- a caller who builds batches by hand and never iterates the private loader is not checked (the
  sampler has drawn nothing: tests, and custom loops that do their own Poisson sampling, which
  the accountant then assumes);
- the check counts rows; it cannot tell which example a row came from: a caller who keeps B/T of
  the drawn examples and flattens those into B rows is not caught, nor one who repeats an example
  and drops another (its influence is then 2 C; documented in PRIVACY.md).

The queue, not a counter, because loaders prefetch: a DataLoader with workers (or accelerate's
one-batch look-ahead) draws several batches before the first step, and the steps consume them in
order. A new pass over the sampler forgets the batches an abandoned pass drew and never delivered.
So does a pass that draws again after another one did: a pass over the private loader nested in
a pass in progress (a loss over the training loader under ``torch.no_grad()`` in the middle of
an epoch, or ``next(iter(loader))`` to look at one batch) draws batches no step uses; when the
outer pass goes on, its next batch is the one its step clips (red team 28: the nested pass's
batches were compared with it and an honest loop was refused).
"""

from __future__ import annotations

from collections import deque


class DrawnBatches:
    """Sizes of the batches a sampler has handed out that no logical step has consumed yet."""

    def __init__(self) -> None:
        self._sizes: deque[int] = deque()
        #: Whether the sampler has ever handed out a batch (from then on every step is checked).
        self.used = False
        self._passes = 0  # passes started
        self._drawing = 0  # the pass that drew the batches in the queue

    def new_pass(self) -> int:
        """A new pass over the sampler: the previous pass's undelivered batches are gone.

        Returns:
            The pass's number, for :meth:`drawn`.
        """
        self._sizes.clear()
        self._passes += 1
        self._drawing = self._passes
        return self._passes

    def drawn(self, size: int, source: int | None = None) -> None:
        """The sampler handed out a batch of ``size`` examples, in pass ``source`` (the number
        :meth:`new_pass` returned; None: the current pass). A pass that draws after another
        pass drew forgets that pass's batches (module docstring)."""
        if source is not None and source != self._drawing:
            self._sizes.clear()
            self._drawing = source
        self._sizes.append(int(size))
        self.used = True

    def take(self) -> int | None:
        """The oldest batch's size not yet stepped on, or None when there is none."""
        return self._sizes.popleft() if self._sizes else None

    def __getstate__(self) -> dict:
        # A copy of the sampler (a pickled loader, a worker) starts with nothing pending.
        return {**self.__dict__, "_sizes": deque()}


def check_rows(rows: int, batches: DrawnBatches | None) -> None:
    """Refuse a logical step whose clipped rows are not the examples its loader drew.

    Args:
        rows: the rows of dim 0 the engine clipped in this logical step (all physical batches).
        batches: the private loader's record, or None when the loader is not the engine's
            Poisson loader (nothing to compare).

    Raises:
        RuntimeError: the counts differ, or the loader has been used and drew no batch for this
            step.
    """
    if batches is None or not batches.used:
        return
    drawn = batches.take()
    if drawn is None:
        raise RuntimeError(
            "DP engine: optimizer.step() without a new batch from the private data loader "
            f"(the step clipped {rows} rows): every logical step must be one batch the "
            "loader returned by make_private drew; a batch used for two steps, or a batch the "
            "loader did not draw, breaks the sampling the accountant assumes"
        )
    if rows != drawn:
        raise RuntimeError(
            f"DP engine: this step clipped {rows} rows but the private data loader drew "
            f"{drawn} examples for it: the rows of dim 0 of the model's first tensor argument "
            "must be the loader's examples, one row each (all physical batches together). A "
            "batch flattened before the model call (x.view(B * T, d)) is clipped per token, "
            "and one example would then move the sum by up to T * max_grad_norm; a collate_fn "
            "that drops, repeats or pads examples changes the rows too (filter the dataset "
            "before make_private instead)"
        )
