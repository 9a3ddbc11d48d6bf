"""Atomic, versioned checkpoints of the runtime state, the last ``keep`` of them kept.

Each file is ``ckpt-<seq>.pkl``: a magic line, the SHA-256 of the payload, then the pickled state.
It is written to a temporary file in the same directory, fsynced, renamed over its final name, and
the directory is fsynced, so a crash at any point leaves either the old set of files or the new one.
On load the newest file whose checksum matches and which unpickles is used; a corrupt newest file
falls back to the previous one with a warning.

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
>>> [store.save({"n": i}) for i in range(3)]
[1, 2, 3]
>>> store.sequence_numbers()
[2, 3]
>>> store.load_latest()
(3, {'n': 2})
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MAGIC = b"streamlearn-checkpoint v1\n"
_NAME = re.compile(r"^ckpt-(\d{12})\.pkl$")


class CheckpointError(RuntimeError):
    pass


class CheckpointStore:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, seq: int) -> Path:
        return self.directory / f"ckpt-{seq:012d}.pkl"

    def sequence_numbers(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def save(self, state: Any) -> int:
        """Write ``state`` as the next checkpoint; returns its sequence number once it is durable."""
        self.directory.mkdir(parents=True, exist_ok=True)  # (it may have been deleted while serving)
        seqs = self.sequence_numbers()
        seq = (seqs[-1] if seqs else 0) + 1
        payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        final = self.path(seq)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC)
                f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._fsync_dir()
        for old in seqs[: max(0, len(seqs) + 1 - self.keep)]:
            self.path(old).unlink(missing_ok=True)
        return seq

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, seq: int) -> Any:
        """The state of checkpoint ``seq``; ``ValueError`` if the file is damaged."""
        data = self.path(seq).read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError("not a streamlearn checkpoint (bad header)")
        digest, sep, payload = data[len(_MAGIC):].partition(b"\n")
        if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
            raise ValueError("checksum mismatch (truncated or corrupt file)")
        return pickle.loads(payload)

    def load_latest(self) -> tuple[int, Any] | None:
        """``(seq, state)`` of the newest readable checkpoint, or ``None`` when there is none.

        Raises :class:`CheckpointError` when there are checkpoints and none is readable: starting
        afresh would silently drop what was learned, and the consumer would go on from the offsets
        committed with them, so the events behind them would not be learned again either."""
        seqs = self.sequence_numbers()
        damaged = []
        for seq in reversed(seqs):
            try:
                return seq, self.read(seq)
            except Exception as exc:  # noqa: BLE001 - any damage means: try the previous one
                damaged.append(f"{self.path(seq).name} ({exc})")
                if seq != seqs[0]:
                    log.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                                self.path(seq).name, exc)
        if damaged:
            raise CheckpointError(f"every checkpoint in {self.directory} is unreadable: {'; '.join(damaged)}. "
                                  "Move them away to start afresh (what they learned is then lost)")
        return None
