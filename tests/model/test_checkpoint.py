"""Atomic checkpoint writes: a failed block leaves nothing behind, and a full disk is named as such."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from m1.errors import M1Error
from m1.model.checkpoint import atomic_dir


def test_a_finished_block_becomes_the_directory_and_a_failed_one_leaves_nothing(tmp_path):
    with atomic_dir(tmp_path / "ok") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "ok" / "a.txt").read_text() == "x"
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "ok", force=True) as tmp:
            (tmp / "a.txt").write_text("y")
            raise ValueError("boom")
    assert (tmp_path / "ok" / "a.txt").read_text() == "x"  # the old one is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no temporary left


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_save_onto_a_full_disk_is_one_clear_error(tmp_path):
    # /dev/full fails every write with ENOSPC: torch's zip writer then raises its own RuntimeError
    # ("file write failed" / "unexpected pos"), which must reach the user as a disk-full message
    big = {"w": torch.zeros(300_000)}
    with pytest.raises(M1Error, match=r"disk holding it is full .* MB free") as info:
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights.txt").write_text("partial")
            os.symlink("/dev/full", tmp / "optimizer.pt")
            torch.save(big, tmp / "optimizer.pt")
    assert isinstance(info.value.__cause__, RuntimeError)  # it was torch's error, named plainly
    assert not (tmp_path / "ckpt").exists() and list(tmp_path.iterdir()) == []


def test_enospc_from_a_plain_write_is_named_and_other_errors_pass_through(tmp_path):
    with pytest.raises(M1Error, match="full"):
        with atomic_dir(tmp_path / "a"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission"):
        with atomic_dir(tmp_path / "b"):
            raise OSError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with atomic_dir(tmp_path / "c"):
            raise RuntimeError("shape mismatch")
