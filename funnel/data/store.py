"""The encoded store: encoded splits on disk in a layout that is memory-mapped to train from.

One folder holds ``encoders.json`` and, per split, ``<split>.json`` (row count and the list
of arrays) and one raw little-endian file per array, ``<split>.aNN.bin``:

| array | dtype | shape |
| --- | --- | --- |
| ``cat`` | int32 (int64 when a table has 2^31 ids or more) | (N, C) |
| ``num`` | float32 | (N, K) |
| ``labels`` | uint8 (float32 if a label is not 0/1) | (N, S) |
| ``seq/<name>`` | as ``cat`` | (N, L) |
| ``bag/<name>`` values, offsets, weights | as ``cat``, int64, float32 | (nnz,), (N + 1,), (nnz,) |
| ``truth/<kind>`` | float32 | (N, S) |

A split is written chunk by chunk (``SplitWriter.append``), so a file larger than memory
is encoded with flat memory; ``open_split`` maps the files copy-on-write (``np.memmap``
mode "c"): pages are read on demand and shared with the page cache, so the process's
anonymous memory does not grow with the row count. Batches widen the compact dtypes
(see ``funnel.data.table.take``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from funnel.data.table import EncodedTable, Ragged

LAYOUT = 1


@dataclass
class _Array:
    key: str  # "cat", "num", "labels", "seq/<name>", "bag/<name>/values|offsets|weights", "truth/<kind>"
    file: str
    dtype: str
    width: tuple[int, ...]  # the shape after the first (row or id) dimension
    length: int = 0  # rows (or ids) written so far
    handle: BinaryIO | None = field(default=None, repr=False)


def _parts(table: EncodedTable, id_dtype: np.dtype) -> dict[str, tuple[np.ndarray, str]]:
    """Every array of a chunk, by key, in its stored dtype."""
    out: dict[str, tuple[np.ndarray, str]] = {
        "cat": (table.cat.numpy().astype(id_dtype, copy=False), str(id_dtype)),
        "num": (table.num.numpy().astype(np.float32, copy=False), "float32"),
    }
    for name, ids in table.seq.items():
        out[f"seq/{name}"] = (ids.numpy().astype(id_dtype, copy=False), str(id_dtype))
    for name, bag in table.bags.items():
        out[f"bag/{name}/values"] = (bag.values.numpy().astype(id_dtype, copy=False), str(id_dtype))
        out[f"bag/{name}/offsets"] = (bag.offsets.numpy().astype(np.int64, copy=False), "int64")
        if bag.weights is not None:
            out[f"bag/{name}/weights"] = (bag.weights.numpy().astype(np.float32, copy=False), "float32")
    if table.labels is not None:
        labels = table.labels.numpy()
        binary = bool(((labels == 0) | (labels == 1)).all())
        out["labels"] = (labels.astype(np.uint8) if binary else labels.astype(np.float32), "uint8" if binary else "f4")
    for kind, values in table.truth.items():
        out[f"truth/{kind}"] = (values.numpy().astype(np.float32, copy=False), "float32")
    return out


class SplitWriter:
    """Append encoded chunks of one split to the store in ``directory``; ``close()`` seals it.

    ``id_dtype``: int32 when every embedding table has fewer than 2^31 rows (the layout knows)."""

    def __init__(self, directory: Path, split: str, id_dtype: np.dtype | type = np.int32):
        self.directory = Path(directory)
        self.split = split
        self.id_dtype = np.dtype(id_dtype)
        self.rows = 0
        self.arrays: dict[str, _Array] = {}
        self._nnz: dict[str, int] = {}  # bag name -> ids written (the base of the next chunk's offsets)

    def append(self, table: EncodedTable) -> None:
        parts = _parts(table, self.id_dtype)
        if not self.arrays:
            for i, (key, (arr, dtype)) in enumerate(parts.items()):
                file = f"{self.split}.a{i:02d}.bin"
                self.arrays[key] = _Array(
                    key,
                    file,
                    dtype,
                    tuple(arr.shape[1:]),
                    handle=open(self.directory / file, "wb"),  # noqa: SIM115  (closed by close/abort)
                )
        if set(parts) != set(self.arrays):
            raise ValueError(f"{self.split}: chunk arrays {sorted(parts)} differ from the first chunk's")
        for key, (arr, _) in parts.items():
            target = self.arrays[key]
            if key.endswith("/offsets"):
                name = key.removeprefix("bag/").removesuffix("/offsets")
                base = self._nnz.get(name, 0)
                arr = arr[1:] + base if target.length else arr + base  # (N + 1,) offsets, one shared 0
                self._nnz[name] = base + int(parts[f"bag/{name}/values"][0].shape[0])
            if tuple(arr.shape[1:]) != target.width:
                raise ValueError(f"{self.split}: {key} has width {arr.shape[1:]}, earlier chunks {target.width}")
            np.ascontiguousarray(arr).tofile(target.handle)
            target.length += arr.shape[0]
        self.rows += len(table)

    def close(self) -> dict[str, Any]:
        for a in self.arrays.values():
            a.handle.close()
        meta = {
            "layout": LAYOUT,
            "rows": self.rows,
            "arrays": [
                {"key": a.key, "file": a.file, "dtype": a.dtype, "shape": [a.length, *a.width]}
                for a in self.arrays.values()
            ],
        }
        (self.directory / f"{self.split}.json").write_text(json.dumps(meta, indent=1))
        return meta

    def abort(self) -> None:
        for a in self.arrays.values():
            if a.handle is not None and not a.handle.closed:
                a.handle.close()


def write_split(directory: Path, split: str, table: EncodedTable, id_dtype: np.dtype | type = np.int32) -> None:
    """Write a whole in-memory table as one split of the store."""
    writer = SplitWriter(directory, split, id_dtype)
    writer.append(table)
    writer.close()


def _map(path: Path, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if int(np.prod(shape)) == 0:  # mmap cannot map an empty file
        return torch.from_numpy(np.zeros(shape, dtype=dtype))
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", shape=shape))


def open_split(directory: Path, split: str) -> EncodedTable:
    """The split as an EncodedTable whose tensors are memory-mapped from the store's files."""
    directory = Path(directory)
    meta = json.loads((directory / f"{split}.json").read_text())
    if meta.get("layout") != LAYOUT:
        raise ValueError(f"{directory / split}.json: store layout {meta.get('layout')!r}, expected {LAYOUT}")
    arrays = {a["key"]: _map(directory / a["file"], a["dtype"], tuple(a["shape"])) for a in meta["arrays"]}
    bags: dict[str, Ragged] = {}
    for key in arrays:
        if key.startswith("bag/") and key.endswith("/offsets"):
            name = key.removeprefix("bag/").removesuffix("/offsets")
            bags[name] = Ragged(arrays[f"bag/{name}/values"], arrays[key], arrays.get(f"bag/{name}/weights"))
    return EncodedTable(
        cat=arrays["cat"],
        num=arrays["num"],
        seq={k.removeprefix("seq/"): v for k, v in arrays.items() if k.startswith("seq/")},
        bags=bags,
        labels=arrays.get("labels"),
        truth={k.removeprefix("truth/"): v for k, v in arrays.items() if k.startswith("truth/")},
    )


def split_files(directory: Path, split: str) -> list[str]:
    """The file names of one split in the store (its ``.json`` and array files)."""
    meta = json.loads((Path(directory) / f"{split}.json").read_text())
    return [f"{split}.json", *(a["file"] for a in meta["arrays"])]
