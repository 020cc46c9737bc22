"""Cross-validation splits in nnU-Net v2's rule and file format (`splits_final.json`).

nnU-Net splits the SORTED case names with scikit-learn's `KFold(n_splits=5, shuffle=True, random_state=12345)`;
`nnunet_folds` reproduces that exactly with numpy alone (KFold shuffles `arange(n)` with
`np.random.RandomState(seed).shuffle`, then takes consecutive test chunks, the first `n % k` one case larger).
A split file is a JSON list of `{"train": [...], "val": [...]}`, one entry per fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NNUNET_SEED = 12345
NNUNET_FOLDS = 5


def nnunet_folds(names: list[str], n_splits: int = NNUNET_FOLDS, seed: int = NNUNET_SEED) -> list[dict]:
    """nnU-Net's `generate_crossval_split(sorted(names), seed, n_splits)`: a list of {"train", "val"} per fold.

    Both lists of a fold keep the sorted order (as KFold returns ascending indices). Needs at least `n_splits` cases.
    """
    keys = sorted(names)
    n = len(keys)
    if n < n_splits:
        raise ValueError(f"{n_splits}-fold cross-validation needs at least {n_splits} cases, the dataset has {n}")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits)
    sizes[: n % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [keys[i] for i in range(n) if i not in val],
                       "val": [keys[i] for i in range(n) if i in val]})
    return splits


def read_splits(path) -> list[dict]:
    """A `splits_final.json` (list of {"train": [names], "val": [names]}); ValueError naming the file if malformed."""
    try:
        splits = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the splits file ({e})") from None
    ok = isinstance(splits, list) and splits and all(
        isinstance(s, dict) and set(s) >= {"train", "val"}
        and all(isinstance(s[k], list) and all(isinstance(n, str) for n in s[k]) for k in ("train", "val"))
        for s in splits)
    if not ok:
        raise ValueError(f"{path}: expected nnU-Net's splits format, a list of {{\"train\": [...], \"val\": [...]}}")
    return splits


def fold_cases(splits: list[dict], fold: int, names: list[str], source: str) -> tuple[list[str], list[str]]:
    """(training, validation) names of `fold`, checked against the dataset's case `names` (in dataset order)."""
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} is not in {source} (it has folds 0-{len(splits) - 1})")
    train, val = splits[fold]["train"], splits[fold]["val"]
    unknown = sorted(set(train + val) - set(names))
    if unknown:
        raise ValueError(f"{source}, fold {fold}: case(s) {unknown[:10]} are not in the dataset")
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise ValueError(f"{source}, fold {fold}: case(s) {overlap[:10]} are in both train and val")
    if not train:
        raise ValueError(f"{source}, fold {fold}: no training cases")
    return [n for n in names if n in set(train)], [n for n in names if n in set(val)]
