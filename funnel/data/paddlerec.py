"""PaddleRec's ESMM text format of Ali-CCP (models/multitask/esmm/data in PaddlePaddle/PaddleRec).

One impression a line, comma-separated, no header:

    sample_id,click,conversion,field:feat_id,field:feat_id,...

a variable number of ``field:feat_id`` items (a field repeats for each of its ids), no values: every
id weighs 1.0. The fields are those of the raw release (:data:`funnel.data.aliccp.FIELDS`).

PaddleRec's own reader starts at the fifth item (``features[4:]``) and so skips the first feature of
every line; funnel keeps every item from the fourth on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from funnel.data.aliccp import LineChecks, Parsed, parse_features, parse_ints, parse_labels, split_columns

COLUMNS = ("sample_id", "click", "conversion")
_ITEM = r"^(?P<field>[^:]+):(?P<id>[^:]+)$"


def parse_lines(lines, fields: Sequence[str]) -> Parsed:
    """Parse a block of lines (a pyarrow string array, no blank lines) into labels and per-field ids."""
    import pyarrow.compute as pc

    n = len(lines)
    checks = LineChecks(n)
    split = split_columns(lines, COLUMNS, checks, exact=False)
    if split is None:
        return checks.result(n)
    (sample_id, click, conversion), parts = split
    ids = parse_ints(sample_id, checks, np.arange(n), "sample_id")
    clicks, conversions = parse_labels(click, "click", checks), parse_labels(conversion, "conversion", checks)
    if (bad := checks.result(n)) is not None:
        return bad
    items = pc.list_slice(parts, len(COLUMNS))
    features = parse_features(items, n, fields, checks, _ITEM, "item", False)
    if features is None:
        return checks.result(n)
    lists, unknown, _ = features
    return Parsed(n, sample_id=ids, click=clicks, purchase=conversions, lists=lists, unknown=unknown)
