"""dataset.labels: the words a model answers with, optionally keyed by the raw values the data stores.

    labels: [positive, negative, neutral]            # the file holds the words themselves
    labels: {0: negative, 1: positive}               # the file holds 0/1; the model scores "negative"/"positive"

Predictions, metrics and reports use the words; predict can also write the raw value back (raw_label_of).
"""

from omegaconf import DictConfig, ListConfig

from llmtune.errors import UserError


def label_map(dataset_cfg: DictConfig) -> dict[str, str] | None:
    """{raw value as text: word} where dataset.labels is a mapping; None where it lists the words."""
    labels = dataset_cfg.get("labels")
    if isinstance(labels, (DictConfig, dict)):
        return {_raw_text(raw): str(word) for raw, word in labels.items()}
    return None


def label_words(dataset_cfg: DictConfig) -> list[str]:
    """The words the model chooses between, in the config's order (several codes may map to one word, merging
    classes)."""
    labels = dataset_cfg.get("labels")
    mapping = label_map(dataset_cfg)
    if mapping is not None:
        return list(dict.fromkeys(mapping.values()))
    if not isinstance(labels, (ListConfig, list)):
        raise UserError(f"dataset.labels={labels!r} must be a list of label words or a mapping "
                        "{raw value: word}, e.g. dataset.labels='{0: negative, 1: positive}'")
    return [str(label) for label in labels]


def word_of(raw, mapping: dict[str, str] | None) -> str | None:
    """The word for a raw cell value (None where the mapping has no such value); without a mapping the value's text
    is the word. 1, 1.0 and "1" are one value: CSV readers disagree on which they give."""
    text = _raw_text(raw)
    if mapping is None:
        return text
    return mapping.get(text)


def raw_label_of(word: str, mapping: dict[str, str] | None) -> str:
    """The raw value a word stands for (the word itself without a mapping; the first code where several map to it)."""
    if mapping is None:
        return word
    return next(raw for raw, mapped in mapping.items() if mapped == word)


def _raw_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()
