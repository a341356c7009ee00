"""Read a real offline W&B run back from disk, as a user would see it after ``wandb sync``.

wandb 0.31 ships no reader for ``run-*.wandb`` but ships its protobufs. The file is a
LevelDB-style log: a 7-byte header (``:W&B``, 0xBEE1, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block tail too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        elif length == 0:
            break


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    run_dir: Path | None = None

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def series(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]

    def tables(self) -> dict[str, dict]:
        """Tables written as JSON under files/media/table/, by logged key (the newest per key)."""
        root, out = self.run_dir / "files" / "media" / "table", {}
        for path in sorted(root.rglob("*.table.json"), key=lambda p: p.stat().st_mtime):
            stem = re.sub(r"_\d+_[0-9a-f]+$", "", path.name[: -len(".table.json")])
            out[str(path.parent.relative_to(root) / stem)] = json.loads(path.read_text())
        return out


def read_run(save_dir: str | Path, wait_s: float = 30.0) -> OfflineRun:
    """The newest offline run under ``save_dir`` (its ``wandb/offline-run-*`` folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = sorted(Path(save_dir).rglob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no offline W&B run under {save_dir}")
    run_dir = runs[-1]
    # wandb.finish() can return before wandb-core has written the file out (seen under load):
    # read again until the run's exit record is there
    deadline = time.monotonic() + wait_s
    while True:
        run, exited = OfflineRun(run_dir=run_dir), False
        for payload in _records(next(run_dir.glob("run-*.wandb")).read_bytes()):
            record = pb.Record()
            try:
                record.ParseFromString(payload)
            except Exception:  # a record still being written
                break
            exited |= record.WhichOneof("record_type") == "exit"
            _add(run, record)
        if exited or time.monotonic() > deadline:
            return run
        time.sleep(0.25)


def _add(run: OfflineRun, record) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "history":
        run.history.append(_items(record.history.item))
    elif kind == "summary":
        run.summary.update(_items(record.summary.update))
    elif kind == "config":
        run.config.update(_items(record.config.update))
    elif kind == "artifact":
        run.artifacts.append(record.artifact.name)
