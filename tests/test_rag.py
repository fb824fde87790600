"""Retrieval: chunking, reading documents (txt/md/pdf), BM25/dense/hybrid rankings, exclusion and the index cache."""

import pytest
from omegaconf import OmegaConf
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from conftest import compose_config
from llmtune.errors import UserError
from llmtune.rag.documents import Chunk, chunk_text, content_hash, load_chunks
from llmtune.config import build_components
from llmtune.rag.retrievers import build_retriever

# Five topics; each query below names one of them.
CORPUS = [
    "The cat sat on the warm windowsill and purred in the sunshine.",
    "Interest rates were raised by the central bank to fight inflation.",
    "The football team won the championship after a penalty shootout.",
    "Bake the bread in a hot oven for forty minutes until golden.",
    "The volcano erupted, sending ash and lava down the mountain.",
]
# Queries that reuse the corpus's words (what BM25 needs) ...
KEYWORD_QUERIES = {"central bank inflation": 1, "bread oven minutes": 3, "volcano lava ash": 4, "cat purred": 0}
# ... and paraphrases that share no word with their sentence (what only a dense retriever can match).
PARAPHRASE_QUERIES = {"a kitten dozing by the window": 0, "monetary policy tightening to curb rising prices": 1,
                      "soccer club lifts the trophy": 2, "how long to cook a loaf": 3, "magma spewing from a crater": 4}


def retriever_cfg(choice: str, **overrides):
    return OmegaConf.merge(compose_config([f"retriever={choice}"]).retriever, overrides)


def write_pdf(path, page_texts: list[str]) -> None:
    """A small real PDF, one line of Helvetica text per page, written with pypdf."""
    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    for text in page_texts:
        page = writer.add_blank_page(width=300, height=100)
        fonts = DictionaryObject({NameObject("/F1"): font})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        content = DecodedStreamObject()
        content.set_data(f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode("latin-1"))
        page.replace_contents(content)
    writer.write(path)


# --- chunking ---------------------------------------------------------------------------------------------------


def test_chunk_windows_overlap_by_the_given_number_of_words():
    words = " ".join(f"w{i}" for i in range(10))
    assert chunk_text(words, chunk_size=4, chunk_overlap=1) == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]


def test_chunk_last_window_is_shorter_but_never_inside_the_previous_one():
    # 11 words, stride 3: the window at 9 (w9 w10) adds w10; a window at 12 would be empty.
    words = " ".join(f"w{i}" for i in range(11))
    assert chunk_text(words, chunk_size=4, chunk_overlap=1)[-2:] == ["w6 w7 w8 w9", "w9 w10"]
    # 5 words, size 4, overlap 2: the window at 2 (w2 w3 w4) reaches the end, so no window (w4) follows it.
    assert chunk_text("a b c d e", chunk_size=4, chunk_overlap=2) == ["a b c d", "c d e"]
    assert chunk_text("a b", chunk_size=4, chunk_overlap=1) == ["a b"]
    assert chunk_text("  \n ", chunk_size=4, chunk_overlap=1) == []


def test_chunk_rejoins_words_with_single_spaces():
    assert chunk_text("one\n\ttwo   three", chunk_size=5, chunk_overlap=0) == ["one two three"]


@pytest.mark.parametrize("size, overlap", [(4, 4), (4, 5), (0, 0)])
def test_chunk_rejects_overlap_not_below_size(size, overlap):
    with pytest.raises(ValueError):
        chunk_text("a b c", chunk_size=size, chunk_overlap=overlap)


# --- reading documents ------------------------------------------------------------------------------------------


def test_load_chunks_reads_pages_from_markers_pdf_pages_and_markdown(tmp_path):
    (tmp_path / "policy.txt").write_text("[page 1]\nleave rules one two three\n\n[page 2]\novertime four five\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("# Notes\nno page markers here\n")
    write_pdf(tmp_path / "handbook.pdf", ["Holiday leave is twenty days", "Overtime pay is doubled"])
    (tmp_path / "ignored.csv").write_text("not,a,document\n")

    chunks = load_chunks(tmp_path, chunk_size=4, chunk_overlap=1)

    assert chunks == [
        Chunk("Holiday leave is twenty", "handbook.pdf", 1), Chunk("twenty days", "handbook.pdf", 1),
        Chunk("Overtime pay is doubled", "handbook.pdf", 2),
        Chunk("leave rules one two", "policy.txt", 1), Chunk("two three", "policy.txt", 1),  # never across pages
        Chunk("overtime four five", "policy.txt", 2),
        Chunk("# Notes no page", "sub/notes.md", None), Chunk("page markers here", "sub/notes.md", None),
    ]
    # A folder with each document as PDF and as text reads one kind: dataset.document_types.
    assert {c.source for c in load_chunks(tmp_path, 4, 1, suffixes=[".TXT"])} == {"policy.txt"}


def test_missing_folder_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="documents folder not found.*set dataset.documents") as error:
        load_chunks(tmp_path / "nowhere", chunk_size=4, chunk_overlap=1)
    assert "\n" not in str(error.value)


def test_folder_without_documents_is_a_one_line_user_error(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"has no \.txt, \.md, \.pdf files; .*dataset.documents") as error:
        load_chunks(tmp_path, chunk_size=4, chunk_overlap=1)
    assert "\n" not in str(error.value)


def test_documents_without_text_are_a_one_line_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    write_pdf(tmp_path / "blank.pdf", [""])
    with pytest.raises(UserError, match="has no text.*OCR") as error:
        load_chunks(tmp_path, chunk_size=4, chunk_overlap=1)
    assert "\n" not in str(error.value)


def test_corrupt_pdf_is_a_one_line_user_error_naming_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("some text")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(UserError, match=r"could not read PDF .*broken\.pdf: .*; re-export it or remove it") as error:
        load_chunks(tmp_path, chunk_size=4, chunk_overlap=1)
    assert "\n" not in str(error.value)


def test_content_hash_changes_with_any_text_source_or_page():
    chunks = [Chunk("a b", "x.txt", 1), Chunk("c", "x.txt", 2)]
    assert content_hash(chunks) == content_hash(list(chunks))
    assert content_hash(chunks) != content_hash([Chunk("a b", "x.txt", 1), Chunk("c", "x.txt", 3)])
    assert content_hash(chunks) != content_hash([Chunk("a b", "y.txt", 1), Chunk("c", "x.txt", 2)])
    assert content_hash(["a b", "c"]) != content_hash(["a", "b c"])


# --- retrieval --------------------------------------------------------------------------------------------------


def test_retriever_configs_compose_with_usable_chunking():
    for name in ("bm25", "dense", "hybrid"):
        cfg = retriever_cfg(name)
        assert cfg.name == name and cfg.k >= 1
        assert chunk_text("a " * 500, cfg.chunk_size, cfg.chunk_overlap)  # size and overlap are accepted
    assert retriever_cfg("hybrid").index.rrf_k == 60 and retriever_cfg("hybrid").index.candidates == 50


def test_bm25_ranks_the_sentence_with_the_query_words_first(tmp_path):
    retriever = build_retriever(retriever_cfg("bm25"), CORPUS, tmp_path)
    rankings = retriever.search(list(KEYWORD_QUERIES), k=3)
    assert [ranking[0] for ranking in rankings] == list(KEYWORD_QUERIES.values())
    assert all(len(ranking) <= 3 for ranking in rankings)


def test_bm25_returns_nothing_for_a_query_sharing_no_word(tmp_path):
    retriever = build_retriever(retriever_cfg("bm25"), CORPUS, tmp_path)
    assert retriever.search(["soccer club lifts the trophy"], k=3) == [[]]


@pytest.mark.parametrize("name", ["dense", "hybrid"])
def test_dense_and_hybrid_rank_the_paraphrased_sentence_first(tmp_path, name):
    retriever = build_retriever(retriever_cfg(name), CORPUS, tmp_path)
    queries = list(PARAPHRASE_QUERIES) + list(KEYWORD_QUERIES)
    expected = list(PARAPHRASE_QUERIES.values()) + list(KEYWORD_QUERIES.values())
    rankings = retriever.search(queries, k=2)
    assert [ranking[0] for ranking in rankings] == expected
    assert all(len(ranking) == 2 for ranking in rankings)


@pytest.mark.parametrize("name", ["bm25", "dense", "hybrid"])
def test_excluded_text_never_retrieves_itself(tmp_path, name):
    retriever = build_retriever(retriever_cfg(name), CORPUS, tmp_path)
    rankings = retriever.search(CORPUS, k=len(CORPUS), exclude=list(range(len(CORPUS))))
    for own_index, ranking in enumerate(rankings):
        assert own_index not in ranking
    # Without the exclusion each sentence is its own best match.
    assert [ranking[0] for ranking in retriever.search(CORPUS, k=1, exclude=[None] * len(CORPUS))] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["bm25", "dense", "hybrid"])
def test_index_is_reused_from_cache_and_rebuilt_when_a_text_changes(tmp_path, name):
    cfg = retriever_cfg(name)
    first = build_retriever(cfg, CORPUS, tmp_path)
    again = build_retriever(cfg, CORPUS, tmp_path)
    assert (first.from_cache, again.from_cache) == (False, True)
    queries = list(KEYWORD_QUERIES) + list(PARAPHRASE_QUERIES)
    assert again.search(queries, k=3) == first.search(queries, k=3)

    edited = CORPUS[:4] + ["Quantum computers store information in qubits."]  # the volcano sentence replaced
    rebuilt = build_retriever(cfg, edited, tmp_path)
    assert rebuilt.from_cache is False
    assert rebuilt.search(["qubits in quantum computers"], k=1) == [[4]]
    assert first.search(["volcano lava ash"], k=1) == [[4]] and rebuilt.search(["volcano lava ash"], k=1) != [[4]]
    # Only finished indexes remain: no temporary build folder left behind.
    assert not [path for path in (tmp_path / "rag-index").iterdir() if path.name.startswith(".")]


def test_unknown_retriever_and_bad_model_path_are_one_line_user_errors(tmp_path):
    cfg = compose_config(["rag=true", "retriever=bm25", "retriever.index._target_=llmtune.rag.retrievers.TfIdf"])
    with pytest.raises(UserError, match="retriever.index._target_=llmtune.rag.retrievers.TfIdf cannot be imported"):
        build_components(cfg)
    with pytest.raises(UserError, match="retriever.index.model_path=.* is not a model folder.*set it to null") as error:
        build_retriever(retriever_cfg("dense", index={"model_path": str(tmp_path / "no-model")}), CORPUS, tmp_path)
    assert "\n" not in str(error.value)
