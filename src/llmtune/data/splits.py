"""Train/validation/test splits: as the data gives them, or drawn from one pool of rows.

Given splits (a split column, dataset.files, a saved DatasetDict or a Hub dataset's named splits): the test split is
used as it is (all of it, or a stratified sample of split.test_rows drawn with a fixed seed, so every seed of a grid is
scored on the same rows); the training budget (train_rows or train_per_class; null: all) is drawn from the given train
split with the run's seed; validation is the given one, or carved out of train (stratified, seeded) when there is none.

One pool (no split in the data): test is drawn first, then train, then validation, per class (*_per_class) or in
proportion to the classes (*_rows), so a different training budget never changes the test set.

Rows are stratified by `label` where they have one (classification) and drawn at random otherwise (Q&A). A *_rows
setting, when set, takes precedence over the matching *_per_class one.
"""

import logging
import random
from collections import Counter, defaultdict

from omegaconf import DictConfig

from llmtune.errors import UserError

log = logging.getLogger(__name__)
PARTS = ("train", "val", "test")
SMALL_TEST_CLASS = 20  # test rows of one class below which its per-label precision/recall swing by >10 points
GIVEN_TEST_SEED = 0  # the test sample of a given split must not change with the run's seed


def normalised(text: str) -> str:
    """What makes two texts "the same": case and spacing ignored."""
    return " ".join(text.lower().split())


def drop_duplicates(rows: list[dict], answer_key: str, counts: dict) -> list[dict]:
    """The first row of each text, so no text can land in two splits; counts gets duplicates_removed and
    conflicting_answers (texts that came with more than one label or answer)."""
    first: dict[str, dict] = {}
    conflicting = set()
    for row in rows:
        key = normalised(row["text"])
        if key in first and first[key][answer_key] != row[answer_key]:
            conflicting.add(key)
        first.setdefault(key, row)
    counts["duplicates_removed"] = counts.get("duplicates_removed", 0) + len(rows) - len(first)
    counts["conflicting_answers"] = counts.get("conflicting_answers", 0) + len(conflicting)
    return list(first.values())


def make_splits(rows: list[dict], split_cfg: DictConfig, seed: int, labels: list[str] | None, answer_key: str,
                drop_repeats: bool, counts: dict, given_by: str | None = None) -> dict[str, list[dict]]:
    """{"train", "val", "test"} rows. given_by names where the rows' own `split` ("train", "validation", "test") came
    from (None: one pool to draw from). counts gets split_mode, class_counts per part and the repeats dropped or
    found across parts."""
    if given_by:
        splits = _from_given(rows, split_cfg, seed, labels, answer_key, drop_repeats, counts, given_by)
    else:
        if drop_repeats:
            rows = drop_duplicates(rows, answer_key, counts)
        splits = _from_pool(rows, split_cfg, seed, labels)
        counts["overlap_with_test"] = _overlap({normalised(r["text"]) for r in splits["test"]},
                                               {"train": splits["train"], "validation": splits["val"]})
        counts["split_mode"] = "drawn per class" if labels and not any(
            split_cfg.get(f"{p}_rows") for p in PARTS) else "drawn in proportion"
    for name in PARTS:
        for row in splits[name]:
            row.pop("split", None)
    if labels is not None:
        counts["class_counts"] = {name: {label: Counter(r["label"] for r in splits[name])[label] for label in labels}
                                  for name in PARTS}
        small = {label: n for label, n in counts["class_counts"]["test"].items() if n < SMALL_TEST_CLASS}
        if small:
            log.warning("test classes with fewer than %d rows (%s): their per-label figures are noisy",
                        SMALL_TEST_CLASS, ", ".join(f"{label} {n}" for label, n in small.items()))
    if counts.get("overlap_with_test"):
        log.warning("texts also in the test split: %s rows (%s)", ", ".join(
            f"{part} {n}" for part, n in counts["overlap_with_test"].items()),
            "removed from them" if drop_repeats else "kept: dataset.duplicates=keep")
    if not splits["train"] or not splits["test"]:
        raise UserError("the split left no training or no test rows; raise dataset.split.train_* / test_* or check "
                        "the data's split")
    return splits


def _from_pool(rows: list[dict], split_cfg: DictConfig, seed: int, labels: list[str] | None) -> dict:
    rng = random.Random(seed)
    pools = _pools(rows, labels, rng)
    # Validation is what is left, up to its budget (none when it has none).
    splits = {name: _take(pools, split_cfg, name, rng, exact=name != "val", none_means_all=name != "val")
              for name in ("test", "train", "val")}
    wanted = _budget(split_cfg, "val", labels)
    if wanted and len(splits["val"]) < wanted:
        log.warning("validation got %d of its %d rows (the pool is drawn for test, then train, then what is left for "
                    "validation), so the epoch trainer.select=best picks is noisier: lower dataset.split.train_rows "
                    "(or train_per_class) to leave more", len(splits["val"]), wanted)
    if labels is not None:  # interleave the classes; the test order must not depend on the other budgets
        rng.shuffle(splits["train"])
        rng.shuffle(splits["val"])
        random.Random(f"{seed}-test").shuffle(splits["test"])
    return {name: splits[name] for name in PARTS}


def _from_given(rows: list[dict], split_cfg: DictConfig, seed: int, labels: list[str] | None, answer_key: str,
                drop_repeats: bool, counts: dict, mode: str) -> dict:
    parts = defaultdict(list)
    for row in rows:
        parts[row["split"]].append(row)
    counts["split_mode"] = mode
    for needed in ("train", "test"):
        if not parts[needed]:
            raise UserError(f"the data's own split ({mode}) has no {needed} rows: give it a {needed} part, or drop "
                            "the split (dataset.split.column=null, dataset.files=null) to draw one from all rows")
    if drop_repeats:
        parts = {name: drop_duplicates(part, answer_key, counts) for name, part in parts.items()}
    test = parts["test"]
    if split_cfg.get("test_rows") is not None:
        test_rng = random.Random(GIVEN_TEST_SEED)
        test = _take(_pools(test, labels, test_rng), split_cfg, "test", test_rng, exact=False, per_class=False)
    # Texts of the test rows must not be trained on; the given test split itself is never changed.
    test_texts = {normalised(r["text"]) for r in test}
    counts["overlap_with_test"] = _overlap(test_texts, parts)
    rng = random.Random(seed)
    kept = {name: [r for r in parts.get(name, []) if not (drop_repeats and normalised(r["text"]) in test_texts)]
            for name in ("train", "validation")}
    train_pools = _pools(kept["train"], labels, rng)
    if kept["validation"]:
        val = _take(_pools(kept["validation"], labels, rng), split_cfg, "val", rng, exact=False)
    else:  # carved out of train first, so a different training budget never changes validation
        val = _take(train_pools, split_cfg, "val", rng, exact=False, none_means_all=False)
        counts["split_mode"] = f"{mode}, validation carved from train"
    train = _take(train_pools, split_cfg, "train", rng, exact=False)
    for part in (train, val):
        rng.shuffle(part)
    return {"train": train, "val": val, "test": test}


def _overlap(test_texts: set[str], parts: dict) -> dict:
    """{part: rows whose text is also a test row's (normalised)} for the training and validation parts, where any."""
    found = {name: sum(normalised(r["text"]) in test_texts for r in parts.get(name, [])) for name in ("train",
                                                                                                  "validation")}
    return {name: n for name, n in found.items() if n}


def _pools(rows: list[dict], labels: list[str] | None, rng: random.Random) -> dict:
    """Rows per class, each pool shuffled with rng (one pool where rows have no label)."""
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"] if labels is not None else None].append(row)
    order = labels if labels is not None else [None]
    pools = {}
    for label in order:
        pool = by_label.get(label, [])
        rng.shuffle(pool)
        pools[label] = pool
    return pools


def _take(pools: dict, split_cfg: DictConfig, part: str, rng: random.Random, exact: bool,
          per_class: bool = True, none_means_all: bool = True) -> list[dict]:
    """Remove and return one part's rows from the pools: split.<part>_rows in proportion to the classes, else
    split.<part>_per_class from each class, else (both null) every row left, or none where not none_means_all.
    exact: a budget larger than the pool is an error; otherwise it is a cap (a given split may be smaller)."""
    total = _rows_setting(split_cfg, part)
    each = split_cfg.get(f"{part}_per_class") if per_class else None
    if total is None and each is None:
        if not none_means_all:
            return []
        return [row for label in pools for row in _pop(pools, label, len(pools[label]))]
    if total is not None:
        available = sum(len(pool) for pool in pools.values())
        if total > available and exact:
            raise UserError(f"dataset.split.{part}_rows={total} but only {available} rows are left for it; lower "
                            f"dataset.split.{part}_rows or use a larger file")
        sizes = _proportional({label: len(pool) for label, pool in pools.items()}, min(total, available))
    else:
        short = {label: len(pool) for label, pool in pools.items() if len(pool) < each}
        if short and exact:
            label, have = next(iter(short.items()))
            raise UserError(f"label {label!r} has {have} rows left but dataset.split.{part}_per_class asks for "
                            f"{each}; lower dataset.split.*_per_class or use a larger file")
        sizes = {label: min(each, len(pool)) for label, pool in pools.items()}
    return [row for label, size in sizes.items() for row in _pop(pools, label, size)]


def _rows_setting(split_cfg: DictConfig, part: str) -> int | None:
    """split.<part>_rows; Q&A configs before 0.2 named it split.<part>."""
    total = split_cfg.get(f"{part}_rows")
    return split_cfg.get(part) if total is None else total


def _budget(split_cfg: DictConfig, part: str, labels: list[str] | None) -> int | None:
    """The rows split.<part>_rows (or, with labels, <part>_per_class) asks for; None: no budget."""
    total = _rows_setting(split_cfg, part)
    each = split_cfg.get(f"{part}_per_class")
    if total is None and each is not None and labels:
        total = each * len(labels)
    return total


def _pop(pools: dict, label, size: int) -> list[dict]:
    taken, pools[label] = pools[label][:size], pools[label][size:]
    return taken


def _proportional(sizes: dict, total: int) -> dict:
    """total split over the classes in proportion to their sizes (largest remainders), never more than a class has."""
    available = sum(sizes.values())
    if available == 0:
        return {label: 0 for label in sizes}
    exact = {label: total * size / available for label, size in sizes.items()}
    shares = {label: int(value) for label, value in exact.items()}
    for label in sorted(exact, key=lambda key: exact[key] - shares[key], reverse=True)[:total - sum(shares.values())]:
        shares[label] += 1
    return shares
