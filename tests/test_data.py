"""Corpus loading from real files written to tmp_path, and the errors users see."""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmeval.data import (
    Document,
    documents_sha256,
    load_corpus,
    split_wikitext_articles,
    wikitext_title,
)
from lmeval.errors import ConfigError, DataError


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def texts(corpus) -> list[str]:
    return [document.original_text for document in corpus.documents]


# Document ----------------------------------------------------------------------


def test_document_counts_words():
    document = Document("0", "x", "héllo  wörld\n  again ")
    assert document.num_words == 3


def test_document_counts_utf8_bytes():
    document = Document("0", "x", "héllo")
    assert document.num_bytes == 6


def test_document_counts_on_original_text():
    document = Document("0", "a-b", "a @-@ b")
    assert document.num_words == 3


# Plain text --------------------------------------------------------------------


def test_text_document_is_verbatim(tmp_path):
    content = "first line\r\nsecond line\r\n\n  trailing  \n"
    corpus = load_corpus(data=write(tmp_path / "a.txt", content))
    assert texts(corpus) == [content]


def test_text_document_text_equals_original(tmp_path):
    corpus = load_corpus(data=write(tmp_path / "a.txt", "a @-@ b\n"))
    assert corpus.documents[0].text == "a @-@ b\n"


def test_text_any_extension_is_text(tmp_path):
    corpus = load_corpus(data=write(tmp_path / "wiki.test.raw", " a , b \n"))
    assert texts(corpus) == [" a , b \n"]


def test_text_document_has_no_title(tmp_path):
    corpus = load_corpus(data=write(tmp_path / "a.txt", " = Title = \nbody\n"))
    assert corpus.documents[0].title is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a\nb\n\nc", ["a", "b", "", "c"]),
        ("a\nb\n", ["a", "b"]),
        ("a\r\nb\r\n", ["a", "b"]),
        ("only", ["only"]),
        ("a\n\n", ["a", ""]),
    ],
    ids=["empty line kept", "final newline", "crlf", "no newline", "trailing empty"],
)
def test_sample_by_line(tmp_path, content, expected):
    corpus = load_corpus(data=write(tmp_path / "a.txt", content), sample_by="line")
    assert texts(corpus) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("p1 a\np1 b\n\np2\n", ["p1 a\np1 b", "p2"]),
        ("p1\n\n\n\np2", ["p1", "p2"]),
        ("\n\np1\n  \t\np2\n\n", ["p1", "p2"]),
        ("p1\r\n\r\np2\r\n", ["p1", "p2"]),
    ],
    ids=["two paragraphs", "many blank lines", "blank lines with spaces", "crlf"],
)
def test_sample_by_paragraph(tmp_path, content, expected):
    corpus = load_corpus(data=write(tmp_path / "a.txt", content), sample_by="paragraph")
    assert texts(corpus) == expected


def test_ids_are_row_indices(tmp_path):
    corpus = load_corpus(data=write(tmp_path / "a.txt", "a\nb\nc\n"), sample_by="line")
    assert [document.id for document in corpus.documents] == ["0", "1", "2"]


def test_empty_documents_kept(tmp_path):
    corpus = load_corpus(data=write(tmp_path / "a.txt", "a\n\nb\n"), sample_by="line")
    assert len(corpus.documents) == 3


def test_data_files_without_task(tmp_path):
    first = write(tmp_path / "a.txt", "one\n")
    second = write(tmp_path / "b.txt", "two\n")
    corpus = load_corpus(data_files=[first, second])
    assert texts(corpus) == ["one\n", "two\n"]


# WikiText articles ---------------------------------------------------------------

RAW_WIKITEXT = (
    " = First = \n Body one . \n = = Section = = \n More . \n = Second ( film ) = \n Body two . \n"
)


def test_wikitext_split_at_article_headings():
    articles = split_wikitext_articles(RAW_WIKITEXT)
    assert articles == [
        " = First = \n Body one . \n = = Section = = \n More . ",
        " = Second ( film ) = \n Body two . \n",
    ]


def test_wikitext_split_rejoins_to_file():
    articles = split_wikitext_articles(RAW_WIKITEXT)
    assert "\n".join(articles) == RAW_WIKITEXT


def test_wikitext_split_drops_blank_preamble():
    articles = split_wikitext_articles(" \n = First = \n body \n")
    assert articles == [" = First = \n body \n"]


def test_wikitext_split_keeps_text_preamble():
    articles = split_wikitext_articles("intro\n = First = \n body \n")
    assert articles == ["intro", " = First = \n body \n"]


def test_wikitext_split_without_heading():
    assert split_wikitext_articles("no heading\n") == ["no heading\n"]


def test_wikitext_subsection_does_not_split():
    articles = split_wikitext_articles(" = A = \n = = = Sub = = = \n x \n")
    assert len(articles) == 1


def test_wikitext_triple_marker_collapses_first():
    # "= T = = =" collapses to "= T ===", which does not end with " =".
    articles = split_wikitext_articles(" = A = \n = T = = = \n x \n")
    assert len(articles) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" = Robert Boulter = \n body", "Robert Boulter"),
        (" = Only heading = ", "Only heading"),
        (" = = Section = = \n body", None),
        ("no heading", None),
    ],
    ids=["article", "heading only", "section", "plain"],
)
def test_wikitext_title(text, expected):
    assert wikitext_title(text) == expected


def test_wikitext_task_local_file(tmp_path):
    path = write(tmp_path / "wiki.test.raw", RAW_WIKITEXT)
    corpus = load_corpus(task="wikitext2", data_files=[path])
    assert len(corpus.documents) == 2
    assert [document.title for document in corpus.documents] == ["First", "Second (film)"]
    assert corpus.documents[1].text == " = Second (film) =\nBody two.\n"
    assert corpus.documents[1].original_text == " = Second ( film ) = \n Body two . \n"


def test_wikitext_task_without_headings_warns(tmp_path, caplog):
    path = write(tmp_path / "notes.txt", "Plain notes.\nNo headings here.\n")
    with caplog.at_level(logging.WARNING, logger="lmeval.data"):
        corpus = load_corpus(task="wikitext2", data_files=[path])
    assert len(corpus.documents) == 1
    assert "no WikiText article heading" in caplog.text
    assert "notes.txt" in caplog.text


def test_wikitext_task_with_headings_no_warning(tmp_path, caplog):
    path = write(tmp_path / "wiki.test.raw", RAW_WIKITEXT)
    with caplog.at_level(logging.WARNING, logger="lmeval.data"):
        load_corpus(task="wikitext2", data_files=[path])
    assert "heading" not in caplog.text


def test_wikitext_task_identity(tmp_path):
    path = write(tmp_path / "wiki.test.raw", RAW_WIKITEXT)
    identity = load_corpus(task="wikitext2", data_files=[path]).identity
    assert identity["task"] == "wikitext2"
    assert identity["normalization"] == ["wikitext-detokenize"]
    assert identity["sample_by"] == "wikitext-article"
    assert identity["source"]["kind"] == "local"


WIKITEXT_RAW = os.environ.get("LMEVAL_WIKITEXT_RAW")


@pytest.mark.skipif(
    not WIKITEXT_RAW,
    reason="set LMEVAL_WIKITEXT_RAW to the path of WikiText-2's wiki.test.raw",
)
def test_wikitext_real_file_articles():
    corpus = load_corpus(task="wikitext2", data_files=[WIKITEXT_RAW])
    first_ten = corpus.documents[:10]
    assert len(corpus.documents) == 62
    assert sum(document.num_bytes for document in first_ten) == 234_831
    assert sum(document.num_words for document in first_ten) == 44_828
    assert corpus.documents[0].title == "Robert Boulter"


@pytest.mark.skipif(
    not WIKITEXT_RAW,
    reason="set LMEVAL_WIKITEXT_RAW to the path of WikiText-2's wiki.test.raw",
)
def test_wikitext_real_file_rejoins():
    corpus = load_corpus(task="wikitext2", data_files=[WIKITEXT_RAW])
    rejoined = "\n".join(texts(corpus))
    assert rejoined == Path(WIKITEXT_RAW).read_text(encoding="utf-8")


# Structured files --------------------------------------------------------------

ROWS = [{"text": "first row", "other": "x"}, {"text": "second row", "other": "y"}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_csv(path: Path, rows: list[dict]) -> str:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_json_list(path: Path, rows: list[dict]) -> str:
    return write(path, json.dumps(rows))


WRITERS = {
    "rows.jsonl": write_jsonl,
    "rows.json": write_json_list,
    "rows.csv": write_csv,
    "rows.parquet": write_parquet,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_structured_default_field(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    corpus = load_corpus(data=path)
    assert texts(corpus) == ["first row", "second row"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_structured_custom_field(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    corpus = load_corpus(data=path, text_field="other")
    assert texts(corpus) == ["x", "y"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_structured_missing_field(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    with pytest.raises(DataError) as error:
        load_corpus(data=path, text_field="body")
    message = str(error.value)
    assert "'body'" in message
    assert "text, other" in message


@pytest.mark.parametrize("name", list(WRITERS))
def test_structured_identity(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    identity = load_corpus(data=path).identity
    assert identity["text_field"] == "text"
    assert identity["sample_by"] == "row"
    assert identity["source"]["files"][0]["path"] == path


def test_jsonl_null_is_empty_document(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": None}])
    assert texts(load_corpus(data=path)) == ["a", ""]


def test_jsonl_missing_field_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"body": "b"}, {"text": "c"}])
    with caplog.at_level(logging.WARNING, logger="lmeval.data"):
        corpus = load_corpus(data=path)
    assert texts(corpus) == ["a", "", "c"]
    assert "1 of 3 rows" in caplog.text
    assert "'text'" in caplog.text


def test_csv_empty_cell_is_empty_document(tmp_path):
    path = write(tmp_path / "a.csv", "text,n\n,1\nhello,2\n")
    assert texts(load_corpus(data=path)) == ["", "hello"]


def test_jsonl_number_field_rejected(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": 5}, {"text": 6}])
    with pytest.raises(DataError, match="row 0 .* expected a string"):
        load_corpus(data=path)


def test_jsonl_malformed(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n{bad\n')
    with pytest.raises(DataError, match="could not read .* as json"):
        load_corpus(data=path)


def test_parquet_malformed(tmp_path):
    path = write(tmp_path / "a.parquet", b"not a parquet file")
    with pytest.raises(DataError, match="could not read .* as parquet"):
        load_corpus(data=path)


# Limit and identity ------------------------------------------------------------


def test_limit_keeps_first_documents(tmp_path):
    path = write(tmp_path / "a.txt", "a\nb\nc\n")
    corpus = load_corpus(data=path, sample_by="line", limit=2)
    assert texts(corpus) == ["a", "b"]


def test_limit_records_total(tmp_path):
    path = write(tmp_path / "a.txt", "a\nb\nc\n")
    identity = load_corpus(data=path, sample_by="line", limit=2).identity
    assert identity["num_documents_total"] == 3
    assert identity["num_documents"] == 2
    assert identity["limit"] == 2


def test_limit_above_total(tmp_path):
    path = write(tmp_path / "a.txt", "a\nb\n")
    corpus = load_corpus(data=path, sample_by="line", limit=10)
    assert len(corpus.documents) == 2


def test_identity_file_sha256(tmp_path):
    content = b"some text\n"
    identity = load_corpus(data=write(tmp_path / "a.txt", content)).identity
    assert identity["source"]["files"][0]["sha256"] == hashlib.sha256(content).hexdigest()


def test_identity_is_json(tmp_path):
    identity = load_corpus(data=write(tmp_path / "a.txt", "text\n")).identity
    assert json.loads(json.dumps(identity)) == identity


def test_identity_records_definitions(tmp_path):
    identity = load_corpus(data=write(tmp_path / "a.txt", "text\n")).identity
    assert identity["word_definition"] == "len(original_text.split())"
    assert identity["byte_definition"] == "len(original_text.encode('utf-8'))"


def test_identity_hash_changes_with_content(tmp_path):
    path = tmp_path / "a.txt"
    before = load_corpus(data=write(path, "one\n")).identity
    after = load_corpus(data=write(path, "two\n")).identity
    assert before["documents_sha256"] != after["documents_sha256"]
    assert before["source"]["files"][0]["sha256"] != after["source"]["files"][0]["sha256"]


def test_identity_hash_changes_with_jsonl_content(tmp_path):
    before = load_corpus(data=write_jsonl(tmp_path / "a.jsonl", ROWS)).identity
    changed = [{"text": "first row"}, {"text": "second row!"}]
    after = load_corpus(data=write_jsonl(tmp_path / "b.jsonl", changed)).identity
    assert before["documents_sha256"] != after["documents_sha256"]


def test_identity_hash_same_for_same_content(tmp_path):
    first = load_corpus(data=write(tmp_path / "a.txt", "same\n")).identity
    second = load_corpus(data=write(tmp_path / "b.txt", "same\n")).identity
    assert first["documents_sha256"] == second["documents_sha256"]


def test_documents_sha256_separates_documents():
    assert documents_sha256(["ab", "c"]) != documents_sha256(["a", "bc"])


def test_identity_hash_covers_kept_documents(tmp_path):
    path = write(tmp_path / "a.txt", "a\nb\n")
    identity = load_corpus(data=path, sample_by="line", limit=1).identity
    assert identity["documents_sha256"] == documents_sha256(["a"])


# Default corpus ----------------------------------------------------------------


def test_default_corpus_is_python_docs():
    from pydoc_data.topics import topics

    corpus = load_corpus()
    assert corpus.identity["task"] == "python-docs"
    assert [document.title for document in corpus.documents] == sorted(topics)
    assert corpus.documents[0].original_text == topics[sorted(topics)[0]]
    assert corpus.documents[0].id == "0"


def test_default_corpus_identity():
    source = load_corpus().identity["source"]
    assert source["kind"] == "builtin"
    assert source["name"] == "pydoc-topics"


def test_default_corpus_limit():
    corpus = load_corpus(limit=3)
    assert len(corpus.documents) == 3
    assert corpus.identity["num_documents_total"] > 3


# Errors ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.txt"):
        load_corpus(data=str(tmp_path / "missing.txt"))


def test_missing_relative_file_not_hub():
    with pytest.raises(DataError, match="data file not found: corpora/missing.jsonl"):
        load_corpus(data="corpora/missing.jsonl")


def test_missing_data_file_for_task(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_corpus(task="wikitext2", data_files=[str(tmp_path / "wiki.test.raw")])


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_corpus(data=str(tmp_path))


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.csv", "a.parquet"])
def test_empty_file(tmp_path, name):
    with pytest.raises(DataError, match="is empty"):
        load_corpus(data=write(tmp_path / name, b""))


@pytest.mark.parametrize(
    ("sample_by", "message"),
    [
        ("document", "every document in .* is empty or whitespace"),
        ("line", "every document in .* is empty or whitespace"),
        ("paragraph", "no documents found in .*a.txt: pass data"),
    ],
)
def test_whitespace_file(tmp_path, sample_by, message):
    path = write(tmp_path / "a.txt", " \n\n \n")
    with pytest.raises(DataError, match=message):
        load_corpus(data=path, sample_by=sample_by)


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.csv"])
def test_invalid_utf8_gives_offset(tmp_path, name):
    path = write(tmp_path / name, b"text,x\nabc\xff\n")
    with pytest.raises(DataError, match=r"not valid UTF-8: byte 0xff at byte offset 10"):
        load_corpus(data=path)


def test_task_and_data_both(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="both task 'wikitext2' and data"):
        load_corpus(task="wikitext2", data=path)


def test_data_and_data_files_both(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="both data and data_files"):
        load_corpus(data=path, data_files=[path])


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one(limit):
    with pytest.raises(ConfigError, match=f"invalid limit {limit}"):
        load_corpus(limit=limit)


def test_invalid_sample_by(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="invalid sample_by 'sentence'"):
        load_corpus(data=path, sample_by="sentence")


def test_sample_by_with_structured_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ConfigError, match="sample_by cannot be used with the json file"):
        load_corpus(data=path, sample_by="line")


def test_text_field_with_text_file(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="text_field cannot be used with the plain-text"):
        load_corpus(data=path, text_field="text")


def test_split_with_local_file(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="split cannot be used with local files"):
        load_corpus(data=path, split="test")


def test_sample_by_with_task(tmp_path):
    path = write(tmp_path / "wiki.test.raw", RAW_WIKITEXT)
    with pytest.raises(ConfigError, match="sample_by cannot be used with a task"):
        load_corpus(task="wikitext2", data_files=[path], sample_by="line")


def test_data_files_with_builtin_task(tmp_path):
    path = write(tmp_path / "a.txt", "text\n")
    with pytest.raises(ConfigError, match="data_files cannot be used with the built-in"):
        load_corpus(task="python-docs", data_files=[path])


def test_split_with_task_local_files(tmp_path):
    path = write(tmp_path / "wiki.test.raw", RAW_WIKITEXT)
    with pytest.raises(ConfigError, match="split cannot be used with data_files"):
        load_corpus(task="wikitext2", data_files=[path], split="validation")


# Hub datasets, run in a subprocess because huggingface_hub and datasets read
# HF_HUB_OFFLINE and HF_ENDPOINT when they are imported.

HUB_SCRIPT = """
import sys
from lmeval.data import load_corpus
from lmeval.errors import DataError
try:
    load_corpus(**eval(sys.argv[1]))
except DataError as error:
    print(error)
    sys.exit(3)
"""


def run_hub_load(
    tmp_path: Path, arguments: dict, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE"))
    }
    environment.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    environment.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, repr(arguments)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    return result, time.monotonic() - start


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_offline_not_cached(tmp_path, variable):
    result, seconds = run_hub_load(tmp_path, {"task": "wikitext2"}, **{variable: "1"})
    assert result.returncode == 3, result.stderr
    assert "offline and not cached" in result.stdout
    assert "--data-files" in result.stdout
    assert seconds < 60


def test_hub_connection_refused(tmp_path):
    result, seconds = run_hub_load(tmp_path, {"data": "someone/some-dataset"})
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Hugging Face Hub for dataset 'someone/some-dataset'" in result.stdout
    assert seconds < 60


def test_hub_unresponsive_times_out(tmp_path):
    # The socket accepts connections into its backlog but never answers.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        result, seconds = run_hub_load(tmp_path, {"task": "wikitext2"}, HF_ENDPOINT=endpoint)
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Hugging Face Hub" in result.stdout
    assert seconds < 60
