"""Blobs from Python: a round trip (bytes and files, with progress callbacks) and a corrupted
blob refused with `IntegrityError`, leaving nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

import horde
import horde.aio


def stored_blob(network, hash: str) -> Path:
    found = [p for p in network.dir.rglob(hash) if p.is_file() and p.parent.name == "blobs"]
    assert len(found) == 1, found
    return found[0]


def test_blob_round_trip_with_progress(network, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    seen: list[tuple[int, int]] = []
    hash = horde.blob_put(network.storage, data, progress=lambda done, total: seen.append((done, total)))
    assert len(hash) == 64
    assert seen and seen[-1] == (len(data), len(data))

    in_memory: list[tuple[int, int]] = []
    assert horde.blob_get(network.storage, hash, progress=lambda d, t: in_memory.append((d, t))) == data
    assert in_memory[0] == (0, len(data))
    assert in_memory[-1] == (len(data), len(data))
    got: list[tuple[int, int]] = []
    target = tmp_path / "copy.bin"
    assert horde.blob_get(network.storage, hash, target, progress=lambda d, t: got.append((d, t))) is None
    assert target.read_bytes() == data
    assert got[-1] == (len(data), len(data))

    source = tmp_path / "source.bin"
    source.write_bytes(data)
    assert horde.blob_put(network.storage, source) == hash
    assert asyncio.run(horde.aio.blob_get(network.storage, hash)) == data


def test_a_corrupted_blob_is_refused(network, tmp_path):
    data = os.urandom(2 * 1024 * 1024)
    hash = horde.blob_put(network.storage, data)
    path = stored_blob(network, hash)
    with open(path, "r+b") as file:
        file.seek(1_000_000)
        byte = file.read(1)
        file.seek(1_000_000)
        file.write(bytes([byte[0] ^ 1]))
    reached: list[tuple[int, int]] = []
    with pytest.raises(horde.IntegrityError):
        horde.blob_get(network.storage, hash, progress=lambda d, t: reached.append((d, t)))
    # The progress told how far the verified bytes went before the corrupted group.
    assert reached[0] == (0, len(data))
    assert reached[-1][0] <= 1_000_000
    target = tmp_path / "never.bin"
    with pytest.raises(horde.IntegrityError):
        horde.blob_get(network.storage, hash, target)
    assert not target.exists()
    assert not any(p.name.startswith("never.bin") for p in tmp_path.iterdir())


def test_a_progress_callback_may_call_the_sdk(network):
    # The callback runs on the SDK's runtime thread; a blocking SDK call from it must be served,
    # not wait forever for the thread it is blocking.
    data = os.urandom(1024 * 1024)
    hash = horde.blob_put(network.storage, data)
    fetched: list[bytes] = []

    def progress(done: int, total: int) -> None:
        if not fetched:
            fetched.append(horde.blob_get(network.storage, hash))

    outer: list[bytes] = []
    # On a thread of its own, so that a deadlock fails the test instead of hanging the run.
    call = threading.Thread(
        target=lambda: outer.append(horde.blob_get(network.storage, hash, progress=progress)),
        daemon=True,
    )
    call.start()
    call.join(timeout=60)
    assert not call.is_alive(), "an SDK call from a progress callback never returned"
    assert outer == [data]
    assert fetched == [data]
