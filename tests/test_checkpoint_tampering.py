"""Edited version-2 checkpoints (resealed under a valid header, the ledger left as it is): every
field that decides what is charged or which noise is drawn is either cross-checked against the
privacy ledger and refused, or charged. tests/test_ledger_attacks.py edits the ledger; these edit
the checkpoint: the accountant's history (emptied, its noise raised, its rate lowered: the run
resumed reporting a fraction of the epsilon it spent; now refused), the step counter, and fields
that were already safe (the ledger mark,
the stream id, the sampler position, the data fingerprint, a post-processor's state)."""

from __future__ import annotations

import shutil

import pytest
import torch

from rmt_kernels.dp import CheckpointError, ResumeWarning, load_checkpoint
from rmt_kernels.dp.checkpoint import data_path
from rmt_kernels.dp.checkpoint_file import read_checkpoint_file
from tests import dp_workers
from tests.dp_models import tiny_model
from tests.test_ledger_attacks import MARK, STEPS_RUN, _charged, _resume, _rewrite
from tests.test_ledger_attacks import _crashed_run as _run_and_crash


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """One crashed run's folder (checkpoint after MARK steps, ledger of STEPS_RUN): each test
    edits a copy (a run takes seconds)."""
    folder = tmp_path_factory.mktemp("crashed")
    path = _run_and_crash(folder)
    return path


def _copy(crashed, tmp_path):
    for file in crashed.parent.iterdir():
        if not file.name.endswith(".lock"):
            shutil.copy(file, tmp_path / file.name)
    return tmp_path / crashed.name


pytestmark = [
    pytest.mark.filterwarnings("ignore:.*seed.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]


def _load(path):
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    return model, opt, loader, lambda: load_checkpoint(path, model, opt, loader)


def _untouched(opt) -> bool:
    return opt.engine.steps == 0 and opt.engine.accountant.history == []


HISTORY_EDITS = {
    # Every counted step forgotten: the resumed run reported the lost steps' epsilon only.
    "emptied": lambda h: [],
    # One counted step forgotten.
    "one step fewer": lambda h: [(s, q, n - 1) for s, q, n in h],
    # The counted steps at a hundred times the noise (epsilon about 0 for them).
    "noise raised": lambda h: [(s * 100, q, n) for s, q, n in h],
    # The counted steps at a hundredth of the sampling rate.
    "rate lowered": lambda h: [(s, q / 100, n) for s, q, n in h],
}


@pytest.mark.parametrize("edit", list(HISTORY_EDITS))
def test_an_edited_accountant_history_is_refused(crashed, tmp_path, edit):
    path = _copy(crashed, tmp_path)
    history = read_checkpoint_file(path)["engine"]["accountant"]["history"]
    assert sum(n for *_, n in history) == MARK  # the premise: one entry per counted line

    def forge(state):
        accountant = state["engine"]["accountant"]
        accountant["history"] = HISTORY_EDITS[edit](accountant["history"])

    _rewrite(path, forge)
    _, opt, _, load = _load(path)
    with pytest.raises(CheckpointError, match=r"accountant"):
        load()
    assert _untouched(opt)


def test_a_lowered_step_counter_under_a_secret_seed_is_charged(tmp_path):
    # The counter edited back to 0: a secret seed is never written, so the resume draws a new
    # one; steps 0 and 1 run again under a new stream and are charged, with the 4 of the ledger.
    # (Under a public seed the edit replays counted steps' noise on other batches, uncharged:
    # such a run is not private anyway, PRIVACY.md invariants 3 and 9; not refused.)
    from rmt_kernels.dp import save_checkpoint

    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0, seed=None)
    for step in range(STEPS_RUN):
        if step == MARK:
            save_checkpoint(path, model, opt, loader)
        dp_workers.backward(model, dp_workers.batch_of(step, None))
        opt.step()
        opt.zero_grad()
    _rewrite(path, lambda state: state["engine"].update(steps=0))
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0, seed=None)
    with pytest.warns(ResumeWarning):
        load_checkpoint(path, model, opt, loader)
    assert opt.engine.steps == 0 and _charged(opt) == STEPS_RUN
    for step in range(MARK):
        dp_workers.backward(model, dp_workers.batch_of(step, None))
        opt.step()
    assert _charged(opt) == STEPS_RUN + MARK


def test_a_raised_step_counter_is_charged(crashed, tmp_path):
    # Skipping ahead draws noise no step used: nothing reused, every step that ran is charged.
    path = _copy(crashed, tmp_path)
    _rewrite(path, lambda state: state["engine"].update(steps=10))
    assert _charged(_resume(path)) == STEPS_RUN


@pytest.mark.parametrize(
    "edit",
    [
        lambda state: state["engine"].update(ledger_lines=MARK - 1),
        lambda state: state["engine"].update(ledger_head="0" * 64),
        lambda state: state["engine"].update(ledger_lines=MARK + 5),
    ],
    ids=["mark lowered", "head replaced", "mark past the end"],
)
def test_an_edited_ledger_mark_is_refused(crashed, tmp_path, edit):
    path = _copy(crashed, tmp_path)
    _rewrite(path, edit)
    _, opt, _, load = _load(path)
    with pytest.raises(CheckpointError):
        load()
    assert _untouched(opt)


def test_an_edited_stream_id_and_sampler_position_are_charged(crashed, tmp_path):
    # The stream id of a public seed is its hash, not the field; a sampler moved back re-draws
    # other batches under the same public key: the lost steps are charged either way.
    path = _copy(crashed, tmp_path)
    _rewrite(path, lambda state: state["engine"].update(seed_id="f" * 16))
    assert _charged(_resume(path)) == STEPS_RUN
    (tmp_path / "b").mkdir()
    path = _copy(crashed, tmp_path / "b")

    _rewrite(path, lambda state: state["ranks"][0]["sampler"].update(position=0))
    assert _charged(_resume(path)) >= STEPS_RUN


def test_an_edited_data_fingerprint_is_charged(crashed, tmp_path):
    # The sidecar's id edited to another: the data cannot be verified, re-keyed and charged.
    path = _copy(crashed, tmp_path)
    _rewrite(path, lambda state: state.update(data_id="0" * 32))
    with pytest.warns(ResumeWarning, match="cannot be verified"):
        assert _charged(_resume(path)) == STEPS_RUN
    assert data_path(path).exists()


def test_an_edited_post_processor_state_of_another_shape_is_refused(crashed, tmp_path):
    path = _copy(crashed, tmp_path)
    _rewrite(path, lambda state: state["engine"]["post_processors"].append({"m": torch.ones(1)}))
    _, opt, _, load = _load(path)
    with pytest.raises(CheckpointError, match="post-processor states"):
        load()
    assert _untouched(opt)


def test_an_edited_noise_multiplier_charges_the_lost_steps_at_the_one_they_ran_with(
    crashed, tmp_path
):
    # The fingerprint's noise multiplier edited to the resumed run's (5, against the 1 the
    # crashed run's steps 2 and 3 ran with): they were charged at 5, a fraction of their cost.
    from opacus.accountants import RDPAccountant

    path = _copy(crashed, tmp_path)
    _rewrite(path, lambda state: state["fingerprint"]["privacy"].update(noise_multiplier=5.0))
    model, opt, loader = dp_workers.private(tiny_model(), noise=5.0, lr=0.0)
    load_checkpoint(path, model, opt, loader)
    honest = RDPAccountant()
    for _ in range(STEPS_RUN):
        honest.step(noise_multiplier=1.0, sample_rate=opt.engine.sample_rate)
    assert opt.engine.accountant.history == honest.history
