"""A local retrieval dataset in the BEIR layout, read and checked line by line.

    DIR/corpus.jsonl        {"_id", "title" (optional), "text"} per line
    DIR/queries.jsonl       {"_id", "text"} per line
    DIR/qrels/<split>.tsv   header "query-id<TAB>corpus-id<TAB>score", then one judgement a line

Documents are embedded as MTEB does (`mteb._create_dataloaders._corpus_to_dict`):
`(title + " " + text).strip()` when the title is non-empty, else `text.strip()`. Only queries
that have judgements in the split are kept (as BEIR does). Every malformed line is an error
naming the file and line; judgements for documents missing from the corpus are kept (they
count as relevant-but-unretrieved, as in BEIR and MTEB) with one warning giving their count,
but a split where no relevant judgement names a document of the corpus is an error: every
metric would be 0 (the wrong corpus, split or id column).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..corpus.source import input_file, jsonl_records, lines
from ..validation import UserError

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclasses.dataclass(frozen=True)
class BeirDataset:
    """One split of a BEIR dataset; documents already joined as `document_text` does."""

    path: Path
    split: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]        # queries with judgements, in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """The files it was read from: corpus, queries, the split's qrels."""
        return files(self.path, self.split)


def files(path: Path, split: str) -> tuple[Path, Path, Path]:
    return path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / f"{split}.tsv"


def document_text(title: str, text: str) -> str:
    return (title + " " + text).strip() if title else text.strip()


def _reading(path: Path, desc: str) -> tqdm:
    """A byte progress bar over `path`, which must be a file."""
    return tqdm(total=Path(input_file(path)).stat().st_size, unit="B", unit_scale=True,
                desc=desc, disable=None)


def _string(path: Path, number: int, row: dict, key: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some BEIR exports store numeric ids
    if not isinstance(value, str):
        got = "missing" if key not in row else f"{type(value).__name__} {value!r:.40}"
        raise UserError(f"{path}: line {number}: {key!r} must be a string, got {got}")
    return value


def read_jsonl(path: Path, *, title: bool) -> dict[str, tuple[str, str]]:
    """{_id: (title, text)} in file order; duplicate ids and bad rows are errors."""
    out: dict[str, tuple[str, str]] = {}
    first_line: dict[str, int] = {}
    with _reading(path, f"reading {path.name}") as bar:
        for number, row in jsonl_records(path, progress=bar.update):
            key = _string(path, number, row, "_id")
            if key in first_line:
                raise UserError(f"{path}: line {number}: duplicate _id {key!r} (first on line "
                                f"{first_line[key]})")
            first_line[key] = number
            out[key] = (_string(path, number, row, "title", optional=True) if title else "",
                        _string(path, number, row, "text"))
    if not out:
        raise UserError(f"{path}: no records")
    return out


def _judgement(path: Path, number: int, line: str) -> tuple[str, str, int]:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 3:
        raise UserError(f"{path}: line {number}: expected 3 tab-separated fields, got "
                        f"{len(fields)}: {line.rstrip()!r:.80}")
    qid, did, score = fields
    try:
        return qid, did, int(score)
    except ValueError:
        raise UserError(f"{path}: line {number}: score {score!r} is not an integer") from None


def read_qrels(path: Path, query_ids) -> dict[str, dict[str, int]]:
    """{query id: {doc id: score}}; a query id absent from queries.jsonl is an error."""
    qrels: dict[str, dict[str, int]] = {}
    with _reading(path, f"reading {path.name}") as bar:
        rows = ((n, line) for n, line in lines(path, progress=bar.update) if line.strip())
        number, header = next(rows, (0, ""))
        if tuple(header.rstrip("\r\n").split("\t")) != QRELS_HEADER:
            raise UserError(f"{path}: line {max(number, 1)}: expected the header "
                            f"{chr(9).join(QRELS_HEADER)!r}, got {header.rstrip()!r:.80}")
        for number, line in rows:
            qid, did, value = _judgement(path, number, line)
            if qid not in query_ids:
                raise UserError(f"{path}: line {number}: query-id {qid!r} is not in "
                                "queries.jsonl")
            if did in qrels.setdefault(qid, {}):
                raise UserError(f"{path}: line {number}: duplicate judgement for ({qid!r}, "
                                f"{did!r})")
            qrels[qid][did] = value
    if not qrels:
        raise UserError(f"{path}: no judgements after the header")
    return qrels


def _check_some_relevant_in_corpus(qrels_path: Path, qrels, corpus, unknown) -> None:
    judged = {d for docs in qrels.values() for d in docs}
    if judged <= unknown:
        raise UserError(f"{qrels_path}: none of its {len(judged)} judged corpus-id(s) is in "
                        f"corpus.jsonl (e.g. {sorted(judged)[0]!r}): every metric would be 0; "
                        "check that the qrels belong to this corpus")
    if not any(score > 0 and d in corpus for docs in qrels.values()
               for d, score in docs.items()):
        raise UserError(f"{qrels_path}: no judgement with a score above 0 names a document "
                        "in corpus.jsonl: every metric would be 0")


def load_beir(path: str | Path, split: str = "test") -> BeirDataset:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a dataset directory")
    corpus_path, queries_path, qrels_path = files(path, split)
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
        raise FileNotFoundError(f"{qrels_path}: no qrels for split {split!r} (found: "
                                f"{', '.join(found) or 'none'})")
    corpus = read_jsonl(corpus_path, title=True)
    queries = read_jsonl(queries_path, title=False)
    qrels = read_qrels(qrels_path, queries)
    unknown = {d for judged in qrels.values() for d in judged if d not in corpus}
    _check_some_relevant_in_corpus(qrels_path, qrels, corpus, unknown)
    if unknown:
        warnings.warn(f"{qrels_path}: {len(unknown)} judged corpus-id(s) are not in "
                      f"corpus.jsonl (e.g. {sorted(unknown)[0]!r}); they count as relevant "
                      "documents that are never retrieved", stacklevel=2)
    kept = [q for q in queries if q in qrels]
    return BeirDataset(path=path, split=split, doc_ids=list(corpus),
                       doc_texts=[document_text(*v) for v in corpus.values()],
                       query_ids=kept, query_texts=[queries[q][1] for q in kept], qrels=qrels)
