"""All-or-nothing writes: eqkernels.atomic and every writer of the package that uses it keep
the previous file intact when the disk fills up mid-write (a patched writer raising ENOSPC),
leave no temporary file behind, and stale temporary files of dead writers are removed."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys

import pytest
import torch

from eqkernels import atomic
from eqkernels.format import read_eqk, write_eqk


class _FullDisk(io.RawIOBase):
    """A file object that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        self.room -= len(data)
        return self.f.write(data)

    def writable(self):
        return True

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        if not self.f.closed:
            self.f.flush()

    def close(self):
        if not self.closed:
            super().close()
            self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write gets `room` bytes (set on the returned dict) before ENOSPC."""
    limit = {"room": 100}
    real = os.fdopen

    def fdopen(fd, mode="r", encoding=None, newline=None):
        disk = _FullDisk(real(fd, "wb"), limit["room"])
        if "b" in mode:
            return disk
        return io.TextIOWrapper(disk, encoding=encoding or "utf-8", newline=newline)

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    return limit


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert path.read_text() == "two"
    _only(tmp_path, "a.txt")


def test_exception_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic.atomic_write(path) as f:
        f.write(b"new partial")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    _only(tmp_path, "a.bin")


def test_directory_destination_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        atomic.write_text(tmp_path, "x")


def test_full_disk_keeps_previous_eqk(tmp_path, full_disk):
    path = tmp_path / "m.eqk"
    sections = [{"a": torch.arange(64, dtype=torch.float32)}, {"b": torch.ones(300)}]
    full_disk["room"] = 1 << 30
    write_eqk(path, sections=sections, model={}, nested=True, top_bits=2)
    before = path.read_bytes()
    full_disk["room"] = len(before) - 200  # the disk fills up in the last section
    with pytest.raises(OSError) as info:
        write_eqk(path, sections=[{"a": torch.zeros(64)}, {"b": torch.zeros(300)}], model={},
                  nested=True, top_bits=2)  # fmt: skip
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert torch.equal(read_eqk(path).tensors["a"], torch.arange(64, dtype=torch.float32))
    _only(tmp_path, "m.eqk")


@pytest.mark.parametrize("room", [0, 10, 30])
def test_full_disk_keeps_previous_checkpoint_and_metrics(tmp_path, full_disk, room):
    from eqnet.run import checkpoint as ckpt

    full_disk["room"] = 1 << 30
    ckpt.save_checkpoint(tmp_path, {"epoch": 1, "model": {"w": torch.ones(50)}})
    ckpt.write_metrics(tmp_path, [{"epoch": 1, "loss": 0.5}])
    ckpt.save_json(tmp_path / "config.json", {"a": 1})
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk["room"] = room
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"epoch": 2, "model": {"w": torch.zeros(50)}})
    with pytest.raises(OSError):
        ckpt.write_metrics(tmp_path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}])
    with pytest.raises(OSError):
        ckpt.save_json(tmp_path / "config.json", {"a": 2, "b": "x" * 200})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    assert ckpt.load_checkpoint(tmp_path)["epoch"] == 1


def test_full_disk_keeps_previous_search_outputs(tmp_path, full_disk):
    from eqnet.search import pareto

    rows = [{"label": f"c{i}", "kind": "searched", "accuracy": 0.5 + i / 100, "bitops": 1e6 * (i + 1),
             "size": 100 * (i + 1), "avg_bits": 3, "avg_w_bits": 3, "avg_a_bits": 3}
            for i in range(20)]  # fmt: skip
    full_disk["room"] = 1 << 30
    pareto.write_csv(tmp_path / "pareto.csv", rows)
    pareto.plot(tmp_path / "pareto.png", rows)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert saved["pareto.png"].startswith(b"\x89PNG")
    full_disk["room"] = 64
    for write in (pareto.write_csv, pareto.plot):
        with pytest.raises(OSError):
            write(tmp_path / f"pareto.{'csv' if write is pareto.write_csv else 'png'}", rows[:3])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


def test_failed_onnx_save_keeps_previous_file(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous good model")

    def failing_save(model, target):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(onnx, "save", failing_save)
    with pytest.raises(OSError), atomic.atomic_output(path) as tmp:
        onnx.save(None, tmp)
    assert path.read_bytes() == b"previous good model"
    _only(tmp_path, "m.onnx")


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = tmp_path / f".checkpoint.pt.pid{pid}.k3j2h1{atomic.TEMP_SUFFIX}"
    live = tmp_path / f".metrics.csv.pid{os.getpid()}.abc{atomic.TEMP_SUFFIX}"
    unrelated = tmp_path / ".hidden.tmp"
    for p in (stale, live, unrelated):
        p.write_text("x")
    assert atomic.remove_stale_temps(tmp_path) == [str(stale)]
    _only(tmp_path, live.name, unrelated.name)


def test_killed_writer_leaves_a_temp_that_the_next_start_removes(tmp_path):
    code = (
        "import os, sys\n"
        "from eqkernels import atomic\n"
        "with atomic.atomic_write(sys.argv[1]) as f:\n"
        "    f.write(b'half'); f.flush(); os._exit(9)\n"
    )
    path = tmp_path / "out.bin"
    path.write_bytes(b"before")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=False)
    assert done.returncode == 9
    assert len(list(tmp_path.iterdir())) == 2  # the killed writer's temp file stays
    atomic.remove_stale_temps(tmp_path)
    _only(tmp_path, "out.bin")
    assert path.read_bytes() == b"before"
