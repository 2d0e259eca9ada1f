"""The encoded store: chunks appended on disk read back memory-mapped, equal, in compact dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from funnel.data import store
from funnel.data.table import BAG, CAT, LABELS, NUM, EncodedTable, Ragged, bag_key, bag_offsets_key, seq_key, take


def chunk(start: int, n: int, weights: bool = True) -> EncodedTable:
    """Rows start..start+n-1; row i has i % 3 bag ids (i, i+1, ...) and labels i % 2, (i % 4 == 0)."""
    ids = torch.arange(start, start + n)
    lengths = ids % 3
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    parts = [torch.arange(i, i + int(k)) for i, k in zip(ids.tolist(), lengths.tolist(), strict=True)]
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return EncodedTable(
        cat=torch.stack([ids, ids * 2], 1),
        num=ids.float().unsqueeze(1) / 10,
        seq={"hist": torch.stack([ids, ids + 1], 1)},
        bags={"tags": Ragged(values.long(), offsets, values.float() / 2 if weights else None)},
        labels=torch.stack([(ids % 2).float(), (ids % 4 == 0).float()], 1),
        truth={"true_cond": torch.full((n, 2), 0.25)},
    )


def written(tmp_path, sizes=(5, 0, 7)) -> EncodedTable:
    writer = store.SplitWriter(tmp_path, "train")
    start = 0
    for n in sizes:
        writer.append(chunk(start, n))
        start += n
    writer.close()
    return store.open_split(tmp_path, "train")


def test_chunks_read_back_as_one_table(tmp_path):
    got = written(tmp_path)
    whole = chunk(0, 12)
    assert len(got) == 12
    for key, tensor in whole.tensors().items():
        assert torch.equal(got.tensors()[key].to(tensor.dtype), tensor), key
    assert got.bags["tags"].offsets.tolist() == whole.bags["tags"].offsets.tolist()  # rebased across chunks


def test_compact_dtypes_on_disk_and_the_batch_contract_in_batches(tmp_path):
    got = written(tmp_path)
    assert got.cat.dtype == torch.int32 and got.seq["hist"].dtype == torch.int32
    assert got.labels.dtype == torch.uint8 and got.bags["tags"].values.dtype == torch.int32
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["rows"] == 12
    # 12 rows: cat 2x4 B, num 4 B, seq 2x4 B, labels 2 B, truth 2x4 B per row; 12 ids (4 B + 4 B weights); 13 offsets
    assert sum((tmp_path / a["file"]).stat().st_size for a in meta["arrays"]) == 12 * 30 + 12 * 8 + 13 * 8
    batch = take(got.tensors(), torch.tensor([11, 2]))
    assert batch[CAT].dtype == torch.int64 and batch[LABELS].dtype == torch.float32
    assert batch[NUM].dtype == torch.float32 and batch[seq_key("hist")].dtype == torch.int64
    assert batch[bag_key("tags")].tolist() == [11, 12, 2, 3] and batch[bag_offsets_key("tags")].tolist() == [0, 2, 4]


def test_the_tensors_are_memory_mapped_not_loaded(tmp_path):
    got = written(tmp_path)
    meta = json.loads((tmp_path / "train.json").read_text())
    cat_file = str(tmp_path / next(a["file"] for a in meta["arrays"] if a["key"] == "cat"))
    ranges = [
        [int(x, 16) for x in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(cat_file)
    ]
    assert any(lo <= got.cat.data_ptr() < hi for lo, hi in ranges)  # the tensor's bytes are the file's pages


def test_an_empty_split_opens_with_its_widths(tmp_path):
    writer = store.SplitWriter(tmp_path, "valid")
    writer.append(chunk(0, 0))
    writer.close()
    got = store.open_split(tmp_path, "valid")
    assert len(got) == 0 and got.cat.shape == (0, 2) and len(got.bags["tags"]) == 0
    assert BAG == "bag"


def test_labels_that_are_not_zero_or_one_stay_float(tmp_path):
    t = chunk(0, 4)
    t.labels = t.labels * 0.5
    store.write_split(tmp_path, "train", t)
    got = store.open_split(tmp_path, "train")
    assert got.labels.dtype == torch.float32 and torch.equal(got.labels, t.labels)


def test_large_tables_keep_int64_ids(tmp_path):
    t = chunk(0, 3)
    t.cat = t.cat + 2**40
    store.write_split(tmp_path, "train", t, np.int64)
    assert torch.equal(store.open_split(tmp_path, "train").cat, t.cat)
