"""Independent random streams per purpose, each a function of the seed alone (and of a rank or
an index where it says), so that e.g. changing the world size does not change the test split."""

from __future__ import annotations

import numpy as np

SPLIT, SHARD, ORDER, SEED_LIBRARY, SEED_BATCH, TEACHER, AUGMENT, EVAL, WORKERS = range(9)


def rng(seed: int, purpose: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *extra])


def sample_seed(seed: int, purpose: int, *extra: int) -> int:
    return int(np.random.SeedSequence([seed, purpose, *extra]).generate_state(1, np.uint64)[0] >> 1)
