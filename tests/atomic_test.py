"""Atomic writes: durable (fsync), normal permissions, and an interrupted save at any
moment leaves the previous adapter loadable."""

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import klora
from klora import atomic
from tests.conftest import randomize_adapters, sequence_output, tiny_bert, token_inputs

ATOMIC = os.path.join(os.path.dirname(__file__), "..", "klora", "atomic.py")


def test_files_get_normal_permissions_and_are_synced(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "m.json", {"a": 1})
        with atomic.atomic_directory(tmp_path / "d") as directory:
            (open(os.path.join(directory, "f"), "w")).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "f").st_mode) == 0o644
    assert len(synced) >= 5  # the file and its folder, the folder's file, the folder, its parent
    assert sorted(os.listdir(tmp_path)) == ["d", "m.json"]  # no temporary left


def test_directory_replacement_keeps_other_files(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "a").write_text("old")
    with atomic.atomic_directory(target) as directory:
        with open(os.path.join(directory, "a"), "w") as f:
            f.write("new")
    assert (target / "a").read_text() == "new" and (target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch, exchange):
    backbone = tiny_bert()
    weights = backbone.get_weights()
    klora.apply(backbone, rank=2, seed=1)
    randomize_adapters(backbone)
    x = token_inputs(backbone)
    expected = sequence_output(backbone, x)
    klora.save_adapter(backbone, tmp_path / "adapter")
    randomize_adapters(backbone, seed=9)
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    calls = []
    rename = os.rename

    def crash(source, target):  # the disk fills up when the new folder moves in
        calls.append(source)
        if "new-" in os.fspath(source):
            raise OSError(28, "No space left on device")
        return rename(source, target)

    monkeypatch.setattr(os, "rename", crash)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: crash(a, b))
    with pytest.raises(OSError, match="No space"):
        klora.save_adapter(backbone, tmp_path / "adapter")
    monkeypatch.undo()
    fresh = tiny_bert()
    fresh.set_weights(weights)
    if os.path.isdir(tmp_path / "adapter"):
        klora.load_adapter(fresh, tmp_path / "adapter")
    else:  # the fallback moved the previous adapter aside: it is complete there
        aside = [p for p in os.listdir(tmp_path) if ".old-" in p]
        klora.load_adapter(fresh, tmp_path / aside[0])
    np.testing.assert_array_equal(sequence_output(fresh, x), expected)
    assert not [p for p in os.listdir(tmp_path) if ".new-" in p]


WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
print("ready", flush=True)
i = 0
while True:
    i += 1
    with atomic.atomic_directory(sys.argv[2]) as d:
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(str(i))
        with open(os.path.join(d, "adapter_model.safetensors"), "w") as f:
            f.write(f"{i}," * 5000)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_killed_writers_leave_a_complete_folder(tmp_path):
    """A process killed at random moments while saving over and over: the folder always
    holds one complete save (both files from the same one)."""
    target = tmp_path / "adapter"
    rng = np.random.default_rng(0)
    saves = set()
    for _ in range(15):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, ATOMIC, str(target)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        config = (target / "adapter_config.json").read_text()
        weights = (target / "adapter_model.safetensors").read_text()
        assert weights == f"{config}," * 5000  # both files of one save
        saves.add(config)
    assert len(saves) > 10  # the writers were killed at different saves
