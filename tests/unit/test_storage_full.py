"""A checkpoint write that meets a full disk (no space, or a file-size limit reached) fails with one
line naming the checkpoint, and leaves what was written before as it was."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

from ran import runtime
from ran.train.rundir import StorageFullError
from ran.train.trainer import Snapshot

STATE = {"model": {"w": torch.arange(64 * 1024, dtype=torch.float32)}, "step": 12}


def _full_disk(directory: Path) -> None:
    """``checkpoint.pt`` in ``directory`` leads to /dev/full: every write to it is ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this platform")
    directory.mkdir()
    (directory / runtime.CHECKPOINT_FILE).symlink_to("/dev/full")


def _size_limit():
    """A file-size limit (RLIMIT_FSIZE) of 64 KiB for this process while writing: EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    return lambda: (resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)),
                    signal.signal(signal.SIGXFSZ, previous))


@pytest.mark.parametrize("fault", ["no space", "file-size limit"])
def test_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, fault):
    kept = Snapshot(dict(STATE), "name: kept\n").write(tmp_path / "epoch=0001_step=0000012")
    target = tmp_path / "epoch=0002_step=0000024"
    restore = None
    if fault == "no space":
        _full_disk(target)
    else:
        restore = _size_limit()
    try:
        with pytest.raises(StorageFullError) as caught:
            Snapshot(dict(STATE), "name: lost\n").write(target)
    finally:
        if restore:
            restore()
    code = errno.ENOSPC if fault == "no space" else errno.EFBIG
    assert caught.value.errno == code
    assert str(caught.value) == (f"no space left writing checkpoint {target} ({os.strerror(code)}): "
                                 "free space there or set storage.path to a disk with room")
    assert isinstance(caught.value.__cause__, OSError)  # the write's own error, for -v
    state = runtime.load_checkpoint(kept.parent / "epoch=0001_step=0000012")
    assert state["step"] == 12 and torch.equal(state["model"]["w"], STATE["model"]["w"])
    assert (kept / "config.yaml").read_text() == "name: kept\n"


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    with pytest.raises(PermissionError):
        Snapshot(dict(STATE), "").write(tmp_path / "ro")
