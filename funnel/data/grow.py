"""Vocabulary growth for a warm start: the old vocabularies first, then the new data's new values.

An id keeps the row it had (matched by value: the old vocabulary's order is kept and new values
are appended), a new value that passes ``min_count`` on the new data gets the next row, and a
value absent from the new data keeps its row. Numeric statistics stay the old ones unless
``refit_numerics``. See funnel/training/warm_start.py for the weights.
"""

from __future__ import annotations

import logging

from funnel.data.encoders import CategoricalEncoder
from funnel.data.featurizer import Featurizer

log = logging.getLogger(__name__)


def _vocabularies(featurizer: Featurizer) -> dict[str, CategoricalEncoder]:
    """Every owned vocabulary, by feature name (a shared feature has none of its own)."""
    out = {}
    for f in featurizer.features:
        enc = featurizer.encoders[f.name]
        vocab = enc if isinstance(enc, CategoricalEncoder) else getattr(enc, "ids", None)
        if f.share_with is None and isinstance(vocab, CategoricalEncoder) and vocab.spec.hash_buckets is None:
            out[f.name] = vocab
    return out


def grow(old: Featurizer, new: Featurizer, refit_numerics: bool = False) -> Featurizer:
    """``new`` (fitted on the new train split) with the old vocabularies first, the new values
    after them, and the old numeric statistics unless ``refit_numerics``. Modified in place."""
    old_vocabs = _vocabularies(old)
    for name, vocab in _vocabularies(new).items():
        before = old_vocabs[name]
        seen = set(before.vocab)
        added = [t for t in vocab.vocab if t not in seen]
        vocab.vocab = before.vocab + added
        vocab.int_vocab = before.int_vocab and vocab.int_vocab
        vocab._lookup.clear()
        if added:
            log.info("init_from: feature %r: %d ids kept, %d new ids added", name, len(before.vocab), len(added))
    if not refit_numerics:
        for f in new.features:
            if f.kind == "numeric":
                new.encoders[f.name].load_state(old.encoders[f.name].state())
    return new
