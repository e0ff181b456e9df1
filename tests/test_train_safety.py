"""Training never loses work: --out checked before any work, an earlier run's checkpoint or head
kept unless told otherwise, checkpoints swapped in whole, Ctrl-C saves one. CPU, tiny models."""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
import torch

from parspec.train import trainer as trainer_module
from parspec.train.trainer import CHECKPOINT, Trainer, TrainingInterrupted
from tests.test_train import _cli, make_trainer, synthetic_data, tiny  # noqa: F401 (tiny is a fixture)

FILES = ("drafter.safetensors", "optimizer.safetensors", "trainer_state.json")


def _args(tiny, tmp_path, out, steps=2, *extra):
    path, _, _ = tiny
    data_path = tmp_path / "data.safetensors"
    if not data_path.exists():
        synthetic_data(384, copies=3).save(str(data_path))
    return ["--target", path, "--out", str(out), "-k", "2", "--draft-vocab-size", "160", "--data", str(data_path),
            "--steps", str(steps), "--batch-size", "3", "--heldout", "1", "--eval-every", "0",
            "--checkpoint-every", "0", "--device", "cpu", "--save-dtype", "float32", *extra]


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data generation or training started before --out was checked")

    monkeypatch.setattr("parspec.train.trainer.train_drafter", fail)
    monkeypatch.setattr("parspec.train.data.build_data", fail)


def _snapshot(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("case", ["under_a_file", "a_file", "read_only"])
def test_unwritable_out_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    if case == "under_a_file":
        out = blocker / "head"
    elif case == "a_file":
        out = blocker
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "head"
    _no_work(monkeypatch)
    rc, text = _cli(_args(tiny, tmp_path, out), capsys)
    assert rc == 2 and f"--out {out}" in text.err, text.err
    assert ("not a directory" if case != "read_only" else "not writable") in text.err


def test_earlier_run_is_kept_unless_resume_or_overwrite(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "head"
    rc, text = _cli(_args(tiny, tmp_path, out, 1, "--keep-checkpoint"), capsys)
    assert rc == 0, text.err
    before = _snapshot(out / CHECKPOINT), (out / "model.safetensors").read_bytes()
    with monkeypatch.context() as m:
        _no_work(m)
        rc, text = _cli(_args(tiny, tmp_path, out), capsys)
        assert rc == 2 and str(out) in text.err and "--resume" in text.err and "--overwrite" in text.err
        rc, text = _cli(_args(tiny, tmp_path, out, 2, "--resume", "--overwrite"), capsys)
        assert rc == 2 and "not both" in text.err
    assert (_snapshot(out / CHECKPOINT), (out / "model.safetensors").read_bytes()) == before
    # --overwrite starts over: the old checkpoint is not resumed and is gone at the end.
    rc, text = _cli(_args(tiny, tmp_path, out, 2, "--overwrite"), capsys)
    assert rc == 0, text.err
    assert "resumed" not in text.out and not (out / CHECKPOINT).exists()
    assert json.loads((out / "metrics.json").read_text())["steps_done"] == 2
    # A head with no checkpoint: --resume has nothing to continue from, so it is refused too.
    with monkeypatch.context() as m:
        _no_work(m)
        for extra in ((), ("--resume",)):
            rc, text = _cli(_args(tiny, tmp_path, out, 2, *extra), capsys)
            assert rc == 2 and "trained head" in text.err and "--overwrite" in text.err, text.err


@pytest.mark.parametrize("crash", ["after_first_file", "between_renames"])
def test_checkpoint_is_all_or_nothing(tiny, tmp_path, monkeypatch, crash):
    data = synthetic_data(384, copies=3)
    kw = dict(batch_size=2, steps=6, heldout=1, num_speculative_tokens=2)
    trainer = make_trainer(tiny, "p-eagle", tmp_path, data, **kw)
    trainer.train_step()
    trainer.train_step()
    trainer.save_checkpoint()
    ckpt = tmp_path / CHECKPOINT
    before = _snapshot(ckpt)
    trainer.train_step()
    if crash == "after_first_file":
        real_save = trainer_module.save_file
        calls = []

        def save_then_die(*args, **kwargs):
            if calls:
                raise OSError("disk full")
            calls.append(args)
            real_save(*args, **kwargs)

        monkeypatch.setattr(trainer_module, "save_file", save_then_die)
    else:
        real_replace = os.replace
        calls = []

        def replace_then_die(src, dst):
            if calls:
                raise OSError("power cut")
            calls.append(src)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    resumed = make_trainer(tiny, "p-eagle", tmp_path, data, **kw)
    assert resumed.load_checkpoint() and resumed.step == 2
    assert _snapshot(ckpt) == before
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT]  # no half-written sibling left behind
    trainer.save_checkpoint()  # and the next save goes through
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny, tmp_path, monkeypatch):
    data = synthetic_data(384, copies=3)
    kw = dict(batch_size=2, steps=5, heldout=1, num_speculative_tokens=2)
    trainer = make_trainer(tiny, "eagle3", tmp_path, data, **kw)
    real_step = Trainer.train_step

    def step_or_ctrl_c(self, *args):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", step_or_ctrl_c)
    with pytest.raises(KeyboardInterrupt) as err:
        trainer.train()
    assert isinstance(err.value, TrainingInterrupted) and err.value.step == 3
    assert err.value.checkpoint_dir == str(tmp_path / CHECKPOINT)
    monkeypatch.undo()
    resumed = make_trainer(tiny, "eagle3", tmp_path, data, **kw)
    assert resumed.load_checkpoint() and resumed.step == 3
    for (name, p), (_, q) in zip(trainer.drafter.named_parameters(), resumed.drafter.named_parameters()):
        assert torch.equal(p, q), name


def test_ctrl_c_inside_the_update_lets_it_finish(tiny, tmp_path):
    trainer = make_trainer(tiny, "p-eagle", tmp_path, steps=4, num_speculative_tokens=2)
    real_update = trainer.optimizer.step

    def update_with_ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # lands half-way through the update
        return real_update(*args, **kwargs)

    trainer.optimizer.step = update_with_ctrl_c
    # What the process started with: Python's handler, or SIG_IGN under `nohup cmd &`.
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as err:
        trainer.train()
    assert isinstance(err.value, TrainingInterrupted) and err.value.step == 1
    state = json.loads((tmp_path / CHECKPOINT / "trainer_state.json").read_text())
    assert state["step"] == 1 and len(state["metrics"]["train"]) == 1
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer's handler is gone


def test_cli_ctrl_c_exits_130_and_says_how_to_resume(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "head"
    real_step = Trainer.train_step

    def step_or_ctrl_c(self, *args):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", step_or_ctrl_c)
    rc, text = _cli(_args(tiny, tmp_path, out, 4), capsys)
    assert rc == 130
    assert f"step 2 of 4: checkpoint saved in {out / CHECKPOINT}" in text.err and "--resume" in text.err
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()
    again = shlex.split(text.err.split("resume with: ")[1].strip())
    assert again[:2] == ["parspec", "train-drafter"]
    rc, text = _cli(again[2:], capsys)
    assert rc == 0, text.err
    assert f"resumed from {out / CHECKPOINT} at step 2" in text.out
    assert json.loads((out / "metrics.json").read_text())["steps_done"] == 4
