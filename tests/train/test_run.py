"""Run machinery shared by distill, sft and grpo."""

from __future__ import annotations

import pytest

from m1.train.run import default_micro_batch


@pytest.mark.parametrize("rows,cuda,expect", [
    (16, False, 4), (8, False, 4), (6, False, 3), (7, False, 1), (3, False, 3), (1, False, 1),
    (16, True, 8), (12, True, 6), (64, True, 8), (5, True, 5),
])
def test_default_micro_batch_is_the_largest_divisor_under_the_cap(rows, cuda, expect):
    got = default_micro_batch(rows, cuda)
    assert got == expect and rows % got == 0


def test_first_nonfinite_names_the_first_bad_value_and_ignores_missing_ones():
    from m1.train.run import first_nonfinite

    assert first_nonfinite(loss=1.5, grad_norm=3.0) is None
    assert first_nonfinite(loss=None, grad_norm=2.0) is None  # a log line without a loss is not a divergence
    assert first_nonfinite(loss=float("nan"), grad_norm=float("inf"))[0] == "loss"
    assert first_nonfinite(loss=0.1, grad_norm=float("inf")) == ("grad norm", float("inf"))


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_at_a_trainer_checkpoint_is_one_clear_error_and_keeps_the_last_good_one(
        tiny_hybrid, tmp_path, monkeypatch):
    # the optimizer state of the step-4 checkpoint goes to /dev/full (every write fails with ENOSPC), so
    # torch.save raises its zip writer's RuntimeError, as it did when CI's disk filled
    import torch
    from transformers import Trainer

    from m1.errors import M1Error
    from m1.train.run import find_checkpoints
    from m1.train.sft import SFT_CONFIG_FILE, SFTSettings, sft, work_dir

    save = Trainer._save_optimizer_and_scheduler

    def onto_a_full_disk(self, output_dir):
        if self.state.global_step == 4:
            torch.save(self.optimizer.state_dict(), "/dev/full")
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", onto_a_full_disk)
    out = tmp_path / "sft"
    cfg = SFTSettings(model=tiny_hybrid, data="arith:steps=1,digits=1", limit=16, max_steps=6, batch_size=4,
                      learning_rate=1e-3, save_steps=2, logging_steps=1)
    with pytest.raises(M1Error, match=r"checkpoint-4 failed: the disk holding it is full"):
        sft(cfg, out, log=lambda m: None)
    ckpt, incomplete = find_checkpoints(work_dir(out), SFT_CONFIG_FILE)
    assert ckpt is not None and ckpt.name == "checkpoint-2" and not incomplete  # the partial one is gone
    assert not out.exists()
