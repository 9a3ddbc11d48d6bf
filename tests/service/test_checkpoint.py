"""Checkpoints are atomic, versioned, the last K kept; a damaged newest one falls back."""

import logging
import os
import shutil

import pytest

from service.checkpoint import CheckpointError, CheckpointStore


def test_sequence_numbers_grow_and_only_the_last_k_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for i in range(6):
        assert store.save({"i": i}) == i + 1
    assert store.sequence_numbers() == [4, 5, 6]
    assert store.load_latest() == (6, {"i": 5})
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path, keep=3)
    store.save({"n": 1})
    store.save({"n": 2})
    path = store.path(2)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "flip": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
                      "empty": b"", "garbage": b"\x80\x05not a pickle"}[damage])
    with caplog.at_level(logging.WARNING, logger="service.checkpoint"):
        assert store.load_latest() == (1, {"n": 1})
    assert "ckpt-000000000002.pkl" in caplog.text and "previous" in caplog.text
    assert store.save({"n": 3}) == 3  # numbering continues past the damaged file


def test_no_checkpoint_is_none(tmp_path):
    assert CheckpointStore(tmp_path / "new").load_latest() is None


def test_when_every_checkpoint_is_unreadable_the_start_is_refused_naming_them(tmp_path):
    # starting afresh dropped what was learned, and the consumer went on from the committed
    # offsets: the events behind them were never learned again
    store = CheckpointStore(tmp_path, keep=3)
    store.save({"n": 1})
    store.save({"n": 2})
    for seq in (1, 2):
        store.path(seq).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is unreadable: ckpt-000000000002.pkl .*"
                                              "ckpt-000000000001.pkl .*Move them away"):
        store.load_latest()


def test_a_checkpoint_directory_deleted_while_serving_is_made_again(tmp_path):
    store = CheckpointStore(tmp_path / "state" / "checkpoints")
    store.save({"n": 1})
    shutil.rmtree(tmp_path / "state")
    assert store.save({"n": 2}) == 1 and store.load_latest() == (1, {"n": 2})
