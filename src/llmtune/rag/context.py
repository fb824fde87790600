"""rag=true: put retrieved text into every row's prompt, in training and evaluation alike.

Q&A rows get the k document chunks nearest their question; classification rows get the k nearest labelled training
examples as demonstrations (a training row never retrieves itself). Each row keeps what was retrieved, for recall@k
and for the examples in the report.
"""

from pathlib import Path

from omegaconf import DictConfig

from llmtune.rag.documents import DOCUMENT_SUFFIXES, load_chunks
from llmtune.rag.retrievers import build_retriever


def document_retriever(retriever_cfg: DictConfig, dataset_cfg: DictConfig, cache_dir: str | Path):
    """(add, settings): add(rows) gives each row the chunks of dataset.documents nearest its text (`context` for the
    prompt, `retrieved` for the record); settings describe the retrieval for the report."""
    chunks = load_chunks(dataset_cfg.documents, retriever_cfg.chunk_size, retriever_cfg.chunk_overlap,
                         dataset_cfg.get("document_types") or DOCUMENT_SUFFIXES)
    retriever = build_retriever(retriever_cfg, [c.text for c in chunks], cache_dir)

    def add(rows: list[dict]) -> None:
        for row, hits in zip(rows, retriever.search([r["text"] for r in rows], retriever_cfg.k)):
            found = [chunks[i] for i in hits]
            row["context"] = "\n\n".join(retriever_cfg.context_template.format(source=c.source, page=c.page,
                                                                              text=c.text) for c in found)
            row["retrieved"] = [{"source": c.source, "page": c.page, "text": c.text} for c in found]

    return add, {**_settings(retriever_cfg, retriever), "documents": str(dataset_cfg.documents),
                 "chunks": len(chunks), "chunk_size": retriever_cfg.chunk_size,
                 "chunk_overlap": retriever_cfg.chunk_overlap}


def add_document_context(splits: dict[str, list[dict]], retriever_cfg: DictConfig, dataset_cfg: DictConfig,
                         cache_dir: str | Path) -> dict:
    """Chunks of dataset.documents retrieved for each question; returns the retrieval settings for the report."""
    add, settings = document_retriever(retriever_cfg, dataset_cfg, cache_dir)
    for rows in splits.values():
        add(rows)
    return settings


def example_retriever(retriever_cfg: DictConfig, train: list[dict], cache_dir: str | Path):
    """(add, settings): add(rows, exclude_own) gives each row the k training rows nearest its text, written with
    retriever.example_template, as demonstrations; exclude_own (rows are the training rows themselves) keeps a
    row from seeing its own label."""
    retriever = build_retriever(retriever_cfg, [r["text"] for r in train], cache_dir)

    def add(rows: list[dict], exclude_own: bool = False) -> None:
        exclude = list(range(len(train))) if exclude_own else None
        for row, hits in zip(rows, retriever.search([r["text"] for r in rows], retriever_cfg.k, exclude)):
            row["context"] = "\n\n".join(retriever_cfg.example_template.format(input=train[i]["text"],
                                                                              answer=train[i]["label"]) for i in hits)
            row["retrieved"] = [{"id": train[i]["id"], "label": train[i]["label"], "text": train[i]["text"]}
                                for i in hits]

    return add, {**_settings(retriever_cfg, retriever), "corpus": "training examples", "examples": len(train)}


def add_example_context(splits: dict[str, list[dict]], retriever_cfg: DictConfig, cache_dir: str | Path) -> dict:
    """The k training rows nearest each row's text as demonstrations; returns the retrieval settings."""
    add, settings = example_retriever(retriever_cfg, splits["train"], cache_dir)
    for name, rows in splits.items():
        add(rows, exclude_own=name == "train")
    return settings


def recall_at_k(rows: list[dict]) -> dict:
    """Share of the rows with a known gold document whose retrieved chunks include that document, and (where the gold
    page is known too) that page. Documents match by file stem: an answer written against HR_Policy.pdf is found in
    HR_Policy.txt, the same handbook's extracted text."""
    def hit(row, by_page):
        gold = Path(row["gold_source"]).stem
        return any(Path(r["source"]).stem == gold and (not by_page or r["page"] == row["gold_page"])
                   for r in row["retrieved"])

    with_source = [r for r in rows if r.get("gold_source") and "retrieved" in r]
    with_page = [r for r in with_source if r.get("gold_page") is not None]
    return {"document_recall": sum(hit(r, False) for r in with_source) / len(with_source) if with_source else None,
            "page_recall": sum(hit(r, True) for r in with_page) / len(with_page) if with_page else None,
            "n_gold_pages": len(with_page)}


def _settings(retriever_cfg: DictConfig, retriever) -> dict:
    return {"retriever": retriever_cfg.name, "k": retriever_cfg.k, "index_from_cache": retriever.from_cache}
