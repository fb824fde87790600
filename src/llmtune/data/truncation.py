"""dataset.max_input_tokens: a row's text cut to a number of the model's tokens before the prompt is built, so the
instruction, the template and retrieved context are never cut and memory stays bounded for any input length.

Sides: head keeps the start, tail the end, head+tail a quarter of the budget from the start and the rest from the end
(for long reviews and articles the end often carries the verdict), joined by an ellipsis.
"""

SIDES = ("head", "tail", "head+tail")
JOIN = " … "


def truncate_texts(texts: list[str], tokenizer, max_tokens: int | None, side: str) -> tuple[list[str], int]:
    """The texts cut to max_tokens tokens each (None: unchanged), and how many were cut. Cuts fall on token
    boundaries of the original text (the tokenizer's character offsets), so nothing is re-spelled by decoding."""
    if max_tokens is None or not texts:
        return list(texts), 0
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    joiner = len(tokenizer(JOIN, add_special_tokens=False).input_ids)
    cut_texts, cut = [], 0
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        if len(offsets) <= max_tokens:
            cut_texts.append(text)
            continue
        cut += 1
        cut_texts.append(_cut(text, offsets, max_tokens, side, joiner))
    return cut_texts, cut


def _cut(text: str, offsets: list, max_tokens: int, side: str, joiner: int) -> str:
    if side == "head":
        return text[:offsets[max_tokens - 1][1]]
    head = (max_tokens - joiner) // 4 if side == "head+tail" else 0
    if head < 1:  # too small a budget to keep both ends: the end alone
        return text[offsets[-max_tokens][0]:]
    tail = max_tokens - joiner - head
    return text[:offsets[head - 1][1]] + JOIN + text[offsets[-tail][0]:]
