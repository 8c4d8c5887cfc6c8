"""The privacy ledger and the checkpoint's files against a hostile or unlucky operator: two
processes on one ledger, outputs pointed at the checkpoint's files, a full disk."""

# ruff: noqa: F811 (the tiny fixture, imported from tests/test_glue_cli.py, named as arguments)
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rmt_kernels.dp import CheckpointError, attach_ledger, checkpoint_extra, load_checkpoint
from rmt_kernels.dp.checkpoint import data_path
from rmt_kernels.dp.checkpoint_file import read_checkpoint_file
from rmt_kernels.dp.ledger import ledger_path
from rmt_kernels.glue.config import GlueConfig
from rmt_kernels.training.outputs import check_outputs
from tests import dp_workers
from tests.dp_models import tiny_model
from tests.test_dp_distributed import ROOT, worker_env
from tests.test_glue_cli import run, tiny  # noqa: F401


def _hold_lock(path):
    """A second process holding the ledger lock of ``path`` (as a still-running old job)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from rmt_kernels.dp.ledger import lock_ledger
        lock_ledger({str(path)!r})
        print("held", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"held"
    return holder


def test_a_second_process_on_one_ledger_is_refused(tmp_path):
    # Today both resumes run and share the ledger: 15 steps used data, 11 charged.
    path = tmp_path / "ckpt.pt"
    holder = _hold_lock(path)
    try:
        _, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
        with pytest.raises(CheckpointError, match=f"in use by another process \\(pid {holder.pid}"):
            attach_ledger(opt, path)
        assert opt.engine.ledger is None
    finally:
        holder.kill()
        holder.wait()
    # Once the other process is gone (killed: the lock goes with it), the run may start.
    attach_ledger(opt, path)
    assert opt.engine.ledger is not None


def test_a_second_resume_of_one_checkpoint_is_refused(tmp_path):
    from rmt_kernels.dp import ledger as module
    from rmt_kernels.dp import save_checkpoint

    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    save_checkpoint(path, model, opt, loader)
    # The run that wrote it is gone (its process ended: its lock with it) ...
    module._HELD_LOCKS.pop(Path(f"{ledger_path(path)}.lock").resolve()).close()
    # ... and a first resume runs in another process: this second resume is refused before
    # it reads the ledger.
    other = _hold_lock(path)
    try:
        model2, opt2, loader2 = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
        with pytest.raises(CheckpointError, match="in use by another process"):
            load_checkpoint(path, model2, opt2, loader2)
    finally:
        other.kill()
        other.wait()


def _cfg(tmp_path, **kw) -> GlueConfig:
    return GlueConfig(task="sst2", model="m", checkpoint_dir=str(tmp_path / "ckpt"), **kw)


@pytest.mark.parametrize(
    "name",
    ["checkpoint.pt", "checkpoint.pt.ledger", "checkpoint.pt.ledger.head", "checkpoint.pt.data"],
)
def test_output_onto_a_checkpoint_file_is_refused(tmp_path, name):
    # Today --output ckpt/checkpoint.pt.ledger replaces the ledger with the JSON log.
    with pytest.raises(ValueError, match=r"--output .* is a file of --checkpoint-dir"):
        check_outputs(_cfg(tmp_path, output=str(tmp_path / "ckpt" / ".." / "ckpt" / name)))


@pytest.mark.parametrize("save", ["ckpt", "."])
def test_save_onto_the_checkpoint_folder_is_refused(tmp_path, save):
    with pytest.raises(ValueError, match=r"--save .* would replace --checkpoint-dir"):
        check_outputs(_cfg(tmp_path, save=str(tmp_path / save)))
    check_outputs(_cfg(tmp_path, save=str(tmp_path / "model"), output=str(tmp_path / "a.json")))


def test_a_full_disk_at_a_checkpoint_exits_2_with_the_previous_checkpoint_intact(
    tiny, tmp_path, monkeypatch, capsys
):
    ckpt = tmp_path / "ckpt"
    real_fsync = os.fsync
    written = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.pt.tmp-" in name:
            written.append(name)
            if len(written) == 2:  # the second checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = run(
        "train", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--steps", 3, "--batch-size", 8, "--quiet",
        "--noise-multiplier", 1, "--checkpoint-dir", ckpt, "--checkpoint-every", 1,
    )  # fmt: skip
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    path = ckpt / "checkpoint.pt"
    # The first checkpoint, and the data sidecar that belongs to it; no temporary file left.
    assert checkpoint_extra(path)["steps"] == 1
    assert read_checkpoint_file(data_path(path))["data_id"] == read_checkpoint_file(path)["data_id"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [path.name, data_path(path).name, ledger_path(path).name]
        + [f"{ledger_path(path).name}.{end}" for end in ("lock", "head")]
    )
    # The step whose checkpoint failed is in the ledger: a resume charges it.
    assert len(ledger_path(path).read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------
# Edits of the ledger itself. The run below checkpoints after 2 steps and runs 2 more before it
# "crashes": the ledger has 4 lines, the checkpoint counted 2, and an honest resume charges all 4
# (steps 2 and 3 touched data). Each attack keeps what the old count check looked at (the number
# of lines) and, on the old code, under-charges: 3 steps instead of 4.
# ---------------------------------------------------------------------------------------------

STEPS_RUN, MARK = 4, 2


def _charged(opt) -> int:
    return sum(count for *_, count in opt.engine.accountant.history)


def _crashed_run(tmp_path):
    """The checkpoint (after MARK steps) of a run whose ledger holds STEPS_RUN steps."""
    from rmt_kernels.dp import save_checkpoint

    path = tmp_path / "ckpt.pt"
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    attach_ledger(opt, path)
    for step in range(STEPS_RUN):
        if step == MARK:
            save_checkpoint(path, model, opt, loader)
        dp_workers.backward(model, dp_workers.batch_of(step, None))
        opt.step()
        opt.zero_grad()
    return path


def _resume(path):
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    load_checkpoint(path, model, opt, loader)
    return opt


def _lines(path) -> list[bytes]:
    return ledger_path(path).read_bytes().splitlines(keepends=True)


def _marker(path) -> Path:
    return Path(f"{ledger_path(path)}.head")


def _rechain(lines: list[bytes]) -> list[bytes]:
    """The lines with every chain field recomputed, as an attacker who read the code would."""
    import hashlib
    import json

    out, prev = [], hashlib.sha256(b"").hexdigest()
    for line in lines:
        record = json.loads(line)
        record["prev"] = prev
        out.append((json.dumps(record) + "\n").encode())
        prev = hashlib.sha256(out[-1]).hexdigest()
    return out


def _unchain(lines: list[bytes]) -> list[bytes]:
    """The lines without their chain field: the format before the chain."""
    import json

    return [
        (json.dumps({k: v for k, v in json.loads(line).items() if k != "prev"}) + "\n").encode()
        for line in lines
    ]


def _write(path, lines: list[bytes], forge: str = "edited") -> None:
    """Write the edited ledger: as edited, re-chained, or re-chained with its marker rewritten."""
    import hashlib
    import json

    if forge != "edited":
        lines = _rechain(lines)
    ledger_path(path).write_bytes(b"".join(lines))
    if forge == "marker too":
        last = hashlib.sha256(lines[-1]).hexdigest()
        _marker(path).write_text(json.dumps({"lines": len(lines), "last": last}))


def test_an_honest_resume_charges_every_step_that_touched_data(tmp_path):
    # The reference the attacks below are measured against (and the new files' normal life).
    path = _crashed_run(tmp_path)
    assert len(_lines(path)) == STEPS_RUN
    assert _charged(_resume(path)) == STEPS_RUN


ATTACKS = {
    # The crashed step 3's line replaced by a copy of counted step 1's: a pair already counted.
    "replaced by a counted line": lambda lines: [*lines[:3], lines[1]],
    # Step 3's line dropped and step 2's duplicated, so the count stays 4.
    "duplicated": lambda lines: [*lines[:3], lines[2]],
    # A counted line replaced by step 3's, so that step 3 after the mark looks counted.
    "counted line replaced": lambda lines: [lines[0], lines[3], lines[2], lines[3]],
}


@pytest.mark.parametrize("forge", ["edited", "re-chained", "marker too"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_ledger_line_replaced_or_duplicated_with_the_count_kept_is_refused(
    tmp_path, attack, forge
):
    # Old code: the count (4 >= 2) passes and 3 steps are charged instead of 4.
    path = _crashed_run(tmp_path)
    _write(path, ATTACKS[attack](_lines(path)), forge)
    with pytest.raises(CheckpointError, match=r"privacy ledger .*line"):
        _resume(path)


def test_a_broken_chain_names_the_line(tmp_path):
    path = _crashed_run(tmp_path)
    lines = _lines(path)
    # Line 2 (counted) edited to another step: the chain breaks at line 3.
    lines[1] = lines[1].replace(b'"step": 1', b'"step": 9')
    _write(path, lines)
    with pytest.raises(CheckpointError, match="line 3 does not follow the line before it"):
        _resume(path)


@pytest.mark.parametrize("deleted", [1, 2])
def test_the_crashed_steps_lines_deleted_are_still_charged(tmp_path, deleted):
    # Old code: the count (4 - deleted >= 2) passes and 4 - deleted steps are charged.
    path = _crashed_run(tmp_path)
    _write(path, _lines(path)[: STEPS_RUN - deleted])
    with pytest.warns(UserWarning, match=f"{deleted} line\\(s\\) after line {STEPS_RUN - deleted}"):
        assert _charged(_resume(path)) == STEPS_RUN
    # The resumed run crashes too, before its next checkpoint: a second resume of the same
    # checkpoint charges the deleted steps again (their placeholders are in the ledger now).
    assert len(_lines(path)) == STEPS_RUN
    assert _charged(_resume(path)) == STEPS_RUN


def test_a_torn_last_line_is_charged(tmp_path):
    # Old code: the torn line is cut silently and 3 steps are charged.
    path = _crashed_run(tmp_path)
    data = ledger_path(path).read_bytes()
    ledger_path(path).write_bytes(data[: len(data) - len(_lines(path)[-1]) // 2])
    with pytest.warns(UserWarning, match="line 4 is torn"):
        assert _charged(_resume(path)) == STEPS_RUN
    # Made whole as a charged placeholder (its step parsed from the fragment): a second resume
    # charges it again, and exactly once (the marker counted the same line).
    assert b'"step": 3' in _lines(path)[-1] and b'"lost": true' in _lines(path)[-1]
    assert _charged(_resume(path)) == STEPS_RUN


def test_a_last_line_without_its_newline_is_its_own_step(tmp_path):
    # A truncation of only the newline leaves a whole, chained record: it is that step's line,
    # charged (not a placeholder), and made whole again.
    path = _crashed_run(tmp_path)
    ledger_path(path).write_bytes(ledger_path(path).read_bytes()[:-1])
    assert _charged(_resume(path)) == STEPS_RUN
    assert b'"lost"' not in ledger_path(path).read_bytes()
    assert ledger_path(path).read_bytes().endswith(b"\n")


def test_a_fresh_run_does_not_drop_a_torn_first_line(tmp_path):
    # Old code: a fresh attach cuts the torn line and starts over, never charging that step.
    path = tmp_path / "ckpt.pt"
    ledger_path(path).write_bytes(b'{"step": 0, "seed_id": "ab')
    _, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    with pytest.raises(CheckpointError, match="already records 1 private steps"):
        attach_ledger(opt, path)


def test_a_deleted_marker_is_refused(tmp_path):
    # Without the marker, deleting the last line would go unseen: its absence is refused.
    # (Old code: deleting the last line and this file charges 3 steps.)
    path = _crashed_run(tmp_path)
    _write(path, _lines(path)[:-1])
    _marker(path).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"marker .* is missing"):
        _resume(path)


def test_stripping_the_chain_is_refused(tmp_path):
    # Downgrade to an unchained (old-format) ledger, marker deleted, the last line dropped:
    # refused at its first line, which has no chain field (an unchained ledger is not read).
    # (Old code: 3 charged.)
    path = _crashed_run(tmp_path)
    _write(path, _unchain(_lines(path)[:-1]))
    _marker(path).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="line 1 is not a ledger record"):
        _resume(path)


def _killed_before_checkpoint(tmp_path, steps=2):
    path = tmp_path / "ckpt.pt"
    model, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    attach_ledger(opt, path)
    for step in range(steps):
        dp_workers.backward(model, dp_workers.batch_of(step, None))
        opt.step()
        opt.zero_grad()
    return path


@pytest.mark.parametrize("line", [0, 1])
def test_an_edited_noise_multiplier_before_the_first_checkpoint_is_refused(tmp_path, line):
    # A run killed before its first checkpoint is charged with the mechanism each line records:
    # a larger noise multiplier on a line would charge it less. (Old code: charged at sigma 100.)
    path = _killed_before_checkpoint(tmp_path)
    lines = _lines(path)
    lines[line] = lines[line].replace(b'"sigma": 1.0', b'"sigma": 100.0')
    _write(path, lines)
    _, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    with pytest.raises(CheckpointError, match="line 2"):
        attach_ledger(opt, path, charge_existing=True)
    assert opt.engine.accountant.history == []


def _rewrite(path, edit) -> None:
    """Rewrite the checkpoint at ``path`` with its payload edited by ``edit``, under a valid
    header of this format version."""
    import hashlib
    import io
    import struct

    import torch

    from rmt_kernels.dp.checkpoint_file import FORMAT_VERSION, MAGIC

    state = read_checkpoint_file(path)
    edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    path.write_bytes(struct.pack("<8sIQ32s", MAGIC, FORMAT_VERSION, len(payload), digest) + payload)


def test_a_checkpoint_of_the_old_format_version_is_refused_naming_both(tmp_path):
    # Format version 1 read checkpoints without the ledger's SHA-256 (and ledgers without the
    # chain) with a warning; version 2 reads only its own files, every field present.
    import struct

    path = _crashed_run(tmp_path)
    written = path.read_bytes()
    assert struct.unpack_from("<I", written, 8) == (2,)  # the version, after the magic
    path.write_bytes(written[:8] + struct.pack("<I", 1) + written[12:])
    expected = r"format version 1; this version of rmt_kernels reads format version 2 only"
    with pytest.raises(CheckpointError, match=expected):
        checkpoint_extra(path)
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, model, opt, loader)
    assert opt.engine.steps == 0 and opt.engine.accountant.history == []
    # Guard: the same file under this version's number loads (the test can fail).
    path.write_bytes(written)
    assert _charged(_resume(path)) == STEPS_RUN


@pytest.mark.parametrize("field", ["ledger_head", "post_processors", "ledger_lines"])
def test_a_checkpoint_without_a_field_of_its_version_is_refused_naming_it(tmp_path, field):
    # The layout of a version-1 checkpoint written before the chain (no ledger_head) or before
    # post-processors kept state, under version 2's number: refused, not read with a fallback.
    path = _crashed_run(tmp_path)
    _rewrite(path, lambda state: state["engine"].pop(field))
    model, opt, loader = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    with pytest.raises(CheckpointError, match=rf"lacks engine\.{field}: not a checkpoint of"):
        load_checkpoint(path, model, opt, loader)
    assert opt.engine.steps == 0 and opt.engine.accountant.history == []


def test_a_ledger_written_before_the_chain_is_refused(tmp_path):
    # Unchained lines (the old ledger format) are never counted as this run's: a resume and a
    # restart of a run killed before its first checkpoint both refuse them.
    path = _crashed_run(tmp_path)
    _write(path, _unchain(_lines(path)))
    with pytest.raises(CheckpointError, match="line 1 is not a ledger record"):
        _resume(path)
    killed = _killed_before_checkpoint(tmp_path / "killed")
    _write(killed, _unchain(_lines(killed)))
    _, opt, _ = dp_workers.private(tiny_model(), noise=1.0, lr=0.0)
    with pytest.raises(CheckpointError, match="line 1 is not a ledger record"):
        attach_ledger(opt, killed, charge_existing=True)
    assert opt.engine.accountant.history == []
