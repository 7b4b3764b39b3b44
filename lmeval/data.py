"""Corpus loading: local files, hub datasets and tasks, turned into scored documents.

A corpus comes from one of three places:

- ``data``: a local file (plain text, JSON Lines / JSON, CSV, Parquet) or, when no
  such file exists, a dataset on the Hugging Face Hub;
- ``task``: a task file ``tasks/<name>.yaml`` that fixes the source, how documents
  are formed and the normalisation (see :class:`Task`);
- nothing: the task :data:`DEFAULT_TASK`, which is embedded and needs no network.

Every document keeps the text before normalisation, on which words and bytes are
counted, so word and byte perplexities do not depend on the normalisation.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmeval.errors import ConfigError, DataError
from lmeval.normalize import normalize
from lmeval.tasks import (
    SAMPLE_BY,
    HubSource,
    LocalSource,
    Task,
    load_task,
)

logger = logging.getLogger(__name__)

DEFAULT_TASK = "python-docs"
"""Task loaded when neither a task nor data is given."""

WORD_DEFINITION = "len(original_text.split())"
BYTE_DEFINITION = "len(original_text.encode('utf-8'))"

_EXTENSION_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_FILE_SUFFIXES = {*_EXTENSION_FORMATS, ".txt", ".raw", ".text"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_PROBE_TIMEOUT_SECONDS = 10
_LOCAL_HINT = "pass a local copy instead (--data-files with a task, else --data)"


@dataclass(frozen=True)
class Document:
    """One scored unit of a corpus.

    Attributes:
        id: the document's index in the corpus as a string ("0", "1", ...).
        text: the text that is tokenized and scored, after normalisation.
        original_text: the text before normalisation, on which words and bytes
            are counted.
        title: a name for display, such as the WikiText article heading.
    """

    id: str
    text: str
    original_text: str
    title: str | None = None

    @property
    def num_words(self) -> int:
        """Number of whitespace-separated words of the original text."""
        # NOTE: lm-evaluation-harness counts len(re.split(r"\s+", text)), which is
        # one or two higher when the text starts or ends with whitespace, so its
        # word perplexity on WikiText is slightly lower than lmeval's.
        return len(self.original_text.split())

    @property
    def num_bytes(self) -> int:
        """Number of UTF-8 bytes of the original text."""
        return len(self.original_text.encode("utf-8"))


@dataclass
class Corpus:
    """Documents in scoring order, and a JSON-serialisable record of where they
    came from (see :func:`load_corpus` for its keys)."""

    documents: list[Document]
    identity: dict[str, Any]


# Local files -------------------------------------------------------------------


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file: pass a file, not a folder")
    data = path.read_bytes()
    if not data:
        raise DataError(f"data file {path} is empty: pass a file that contains text")
    return data


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {path} is not valid UTF-8: byte 0x{data[error.start]:02x} "
            f"at byte offset {error.start}; convert the file to UTF-8"
        ) from error


def format_of(path: Path) -> str:
    """Return the format of a local file from its extension; any other is text."""
    return _EXTENSION_FORMATS.get(path.suffix.lower(), "text")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _split_paragraphs(text: str) -> list[str]:
    paragraphs: list[list[str]] = [[]]
    for line in _split_lines(text):
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return ["\n".join(lines) for lines in paragraphs if lines]


def _is_article_heading(line: str) -> bool:
    """Tell whether ``line`` is a WikiText article heading such as `` = Title = ``.

    Section markers collapse first (``= = =`` to ``===``, then ``= =`` to ``==``),
    so section headings do not start with ``"= "``. The rule and its order are
    those of the loading script of the hub dataset EleutherAI/wikitext_document_level,
    so that a local file splits into the same articles as the hub copy.
    """
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def split_wikitext_articles(text: str) -> list[str]:
    """Split a raw WikiText file into articles, each starting at its heading line.

    Lines are split on ``"\\n"`` and rejoined with it, so the articles concatenate
    back to the file. The exception is whitespace-only text before the first
    heading, which is dropped because it belongs to no article (the hub dataset
    drops it too). Text before the first heading that is not blank becomes an
    article of its own.
    """
    articles: list[list[str]] = [[]]
    for line in text.split("\n"):
        if _is_article_heading(line) and articles[-1]:
            articles.append([])
        articles[-1].append(line)
    joined = ["\n".join(lines) for lines in articles]
    if len(joined) > 1 and not joined[0].strip():
        joined.pop(0)
    return joined


def wikitext_title(text: str) -> str | None:
    """Return the heading of a WikiText article, or None if it opens with none."""
    first_line = text.split("\n", 1)[0]
    if not _is_article_heading(first_line):
        return None
    return first_line.strip().strip("=").strip()


def _split_text(text: str, sample_by: str) -> list[str]:
    if sample_by == "document":
        return [text]
    if sample_by == "line":
        return _split_lines(text)
    if sample_by == "paragraph":
        return _split_paragraphs(text)
    return split_wikitext_articles(text)


def _field_texts(rows: Any, text_field: str, source: str) -> list[str]:
    """Return the ``text_field`` column of ``rows``, a ``datasets.Dataset``."""
    if text_field not in rows.column_names:
        raise DataError(
            f"{source} has no field {text_field!r}: available fields are "
            f"{', '.join(rows.column_names)}; choose one with --text-field"
        )
    texts = []
    missing = 0
    for index, value in enumerate(rows[text_field]):
        if value is None:
            # An empty CSV cell, a JSON null or a row without the field: kept as an
            # empty document, so that row numbers and document indices stay aligned.
            value = ""
            missing += 1
        if not isinstance(value, str):
            raise DataError(
                f"row {index} of {source}: field {text_field!r} is "
                f"{type(value).__name__} {value!r}, expected a string"
            )
        texts.append(value)
    if missing:
        logger.warning(
            "%d of %d rows of %s have no %r value (missing, null or an empty cell); "
            "they are kept as empty documents and skipped",
            missing,
            len(texts),
            source,
            text_field,
        )
    return texts


def _read_structured(path: Path, file_format: str, text_field: str) -> list[str]:
    import datasets
    import pyarrow

    try:
        rows = datasets.load_dataset(file_format, data_files=[str(path)], split="train")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise DataError(
            f"could not read {path} as {file_format}: {cause}; check the file format"
        ) from error
    except pyarrow.ArrowException as error:
        raise DataError(
            f"could not read {path} as {file_format}: {error}; check the file format"
        ) from error
    return _field_texts(rows, text_field, str(path))


def _read_local_file(path: Path, local: LocalSource) -> tuple[list[str], str]:
    """Return the documents of one file and the file's sha256."""
    data = _read_file(path)
    sha256 = hashlib.sha256(data).hexdigest()
    if local.format == "parquet":
        return _read_structured(path, "parquet", local.text_field), sha256
    # Decoding here also checks the UTF-8 of JSON and CSV files, with a byte offset.
    text = _decode_utf8(data, path)
    if local.format != "text":
        return _read_structured(path, local.format, local.text_field), sha256
    # Plain text is split here rather than by datasets' "text" loader, because
    # that loader opens files in text mode, which turns "\r\n" and "\r" into
    # "\n" and so changes the bytes that byte perplexity is counted on.
    return _split_text(text, local.sample_by), sha256


def _read_local_files(
    paths: Sequence[Path], locals_: Sequence[LocalSource]
) -> tuple[list[str], dict[str, Any]]:
    texts: list[str] = []
    files = []
    for path, local in zip(paths, locals_, strict=True):
        file_texts, sha256 = _read_local_file(path, local)
        texts.extend(file_texts)
        files.append({"path": str(path), "format": local.format, "sha256": sha256})
    return texts, {"kind": "local", "files": files}


# Hub datasets ------------------------------------------------------------------


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _probe_hub(name: str) -> str | None:
    """Return the dataset's current revision, failing fast if the hub is unreachable.

    One request with a short timeout runs before ``load_dataset``, whose timeouts
    and retries lmeval does not control, so that an unreachable hub fails in seconds.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError, RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(name, timeout=_HUB_PROBE_TIMEOUT_SECONDS)
    except RepositoryNotFoundError as error:
        raise DataError(
            f"dataset {name!r} not found on the Hugging Face Hub (or it is gated): "
            f"check the name, or {_LOCAL_HINT}"
        ) from error
    except (HTTPError, OSError) as error:
        raise DataError(
            f"cannot reach the Hugging Face Hub for dataset {name!r} ({error}): {_LOCAL_HINT}"
        ) from error
    return info.sha


def _load_hub_split(hub: HubSource, revision: str | None) -> Any:
    import datasets

    # NOTE: no hub is reachable where this was written, so loading a hub split
    # has only been run to its offline and unreachable errors.
    try:
        return datasets.load_dataset(hub.path, hub.config, split=hub.split, revision=revision)
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError) as error:
        state = "offline and not cached" if _offline() else "unavailable"
        raise DataError(f"hub dataset {hub.path!r} is {state} ({error}): {_LOCAL_HINT}") from error
    except ValueError as error:
        # datasets raises ValueError for an unknown config or split.
        message = str(error).replace("\n", " ")
        raise DataError(
            f"cannot load hub dataset {hub.path!r}: {message}; check --dataset-config and --split"
        ) from error
    except RuntimeError as error:
        # datasets 4 and later raise RuntimeError for a dataset that only has a loading script.
        raise DataError(f"cannot load hub dataset {hub.path!r}: {error}; {_LOCAL_HINT}") from error


def _read_hub(hub: HubSource) -> tuple[list[str], dict[str, Any]]:
    revision = None if _offline() else _probe_hub(hub.path)
    rows = _load_hub_split(hub, revision)
    texts = _field_texts(rows, hub.text_field, f"hub dataset {hub.path!r}")
    source = {
        "kind": "hub",
        "path": hub.path,
        "config": hub.config,
        "split": hub.split,
        "revision": revision,
    }
    return texts, source


# Built-in corpora --------------------------------------------------------------


def _read_pydoc_topics() -> tuple[list[str], list[str], dict[str, Any]]:
    """Return the texts, titles and source of CPython's reference-manual topics.

    ``pydoc_data.topics.topics`` maps a topic name (a keyword, operator or
    statement) to its section of the language reference, as ``help()`` shows it.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise DataError(
            "this Python installation lacks pydoc_data, which the python-docs task "
            "reads: install the full standard library or pass --data"
        ) from error
    names = sorted(topics)
    source = {
        "kind": "builtin",
        "name": "pydoc-topics",
        "python_version": platform.python_version(),
    }
    return [topics[name] for name in names], names, source


# Assembly ----------------------------------------------------------------------


def documents_sha256(texts: Sequence[str]) -> str:
    """Hash texts in order; each is its UTF-8 length as 8 big-endian bytes, then it."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


@dataclass
class _Plan:
    """Sources and settings of a :func:`load_corpus` call, once its arguments are resolved."""

    task: Task | None = None
    hub: HubSource | None = None
    paths: list[Path] = field(default_factory=list)
    locals_: list[LocalSource] = field(default_factory=list)
    normalization: tuple[str, ...] = ("none",)
    titles: str = "none"

    @property
    def text_field(self) -> str | None:
        if self.hub is not None:
            return self.hub.text_field
        structured = [local for local in self.locals_ if local.format != "text"]
        return structured[0].text_field if structured else None

    @property
    def sample_by(self) -> str:
        if self.paths and all(local.format == "text" for local in self.locals_):
            return self.locals_[0].sample_by
        return "row"


def _reject(options: dict[str, object], reason: str) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be used {reason}")


def _plan_task(
    task: Task,
    data_files: Sequence[str] | None,
    dataset_config: str | None,
    split: str | None,
) -> _Plan:
    plan = _Plan(task=task, normalization=task.normalization, titles=task.titles)
    if task.builtin is not None:
        _reject(
            {"data_files": data_files, "dataset_config": dataset_config, "split": split},
            f"with the built-in task {task.name!r}",
        )
    elif data_files:
        if task.local is None:
            raise ConfigError(f"task {task.name!r} does not read local files: drop --data-files")
        _reject({"dataset_config": dataset_config, "split": split}, "with data_files")
        plan.paths = [Path(path) for path in data_files]
        plan.locals_ = [task.local] * len(data_files)
    elif task.hub is not None:
        plan.hub = HubSource(
            path=task.hub.path,
            config=dataset_config or task.hub.config,
            split=split or task.hub.split,
            text_field=task.hub.text_field,
        )
    else:
        raise ConfigError(f"task {task.name!r} reads a local file: pass it with --data-files")
    return plan


def _looks_like_hub_name(data: str) -> bool:
    return bool(_HUB_NAME.fullmatch(data)) and Path(data).suffix not in _FILE_SUFFIXES


def _local_source(path: Path, text_field: str | None, sample_by: str | None) -> LocalSource:
    file_format = format_of(path)
    if file_format == "text":
        _reject({"text_field": text_field}, f"with the plain-text file {path}")
        return LocalSource(format="text", sample_by=sample_by or "document")
    _reject({"sample_by": sample_by}, f"with the {file_format} file {path}")
    return LocalSource(format=file_format, text_field=text_field or "text")


def _plan_data(
    paths: Sequence[str],
    text_field: str | None,
    dataset_config: str | None,
    split: str | None,
    sample_by: str | None,
) -> _Plan:
    is_hub = len(paths) == 1 and _looks_like_hub_name(paths[0])
    if is_hub and not Path(paths[0]).exists():
        _reject({"sample_by": sample_by}, "with a hub dataset")
        hub = HubSource(paths[0], dataset_config, split or "test", text_field or "text")
        return _Plan(hub=hub)
    _reject({"dataset_config": dataset_config, "split": split}, "with local files")
    plan = _Plan(paths=[Path(path) for path in paths])
    plan.locals_ = [_local_source(path, text_field, sample_by) for path in plan.paths]
    return plan


def _check_arguments(
    task: str | None,
    data: str | None,
    data_files: Sequence[str] | None,
    sample_by: str | None,
    limit: int | None,
) -> None:
    if task is not None and data is not None:
        raise ConfigError(
            f"both task {task!r} and data {data!r} were given: pass one of them "
            "(a task's local file goes in --data-files)"
        )
    if data is not None and data_files:
        raise ConfigError("both data and data_files were given: pass one of them")
    if sample_by is not None and sample_by not in SAMPLE_BY:
        raise ConfigError(f"invalid sample_by {sample_by!r}: use one of {', '.join(SAMPLE_BY)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"invalid limit {limit}: pass a number of documents >= 1")


def _normalize_title(title: str | None, plan: _Plan) -> str | None:
    # Titles are shown normalised like the scored text: "Ise-class", not "Ise @-@ class".
    return None if title is None else normalize(title, plan.normalization)


def _read(plan: _Plan) -> tuple[list[str], list[str | None], dict[str, Any]]:
    """Return the original texts, titles and source record of a plan."""
    if plan.task is not None and plan.task.builtin == "pydoc-topics":
        texts, names, source = _read_pydoc_topics()
        return texts, list(names), source
    if plan.hub is not None:
        texts, source = _read_hub(plan.hub)
    else:
        texts, source = _read_local_files(plan.paths, plan.locals_)
    if plan.titles == "wikitext-heading":
        headings = [wikitext_title(text) for text in texts]
        if not any(headings):
            logger.warning(
                "no WikiText article heading (a line ' = Title = ') in %s, so its text is "
                "scored as %d untitled document(s); check that the data is WikiText raw",
                ", ".join(str(path) for path in plan.paths) or "the data",
                len(texts),
            )
        titles = [_normalize_title(heading, plan) for heading in headings]
        return texts, titles, source
    return texts, [None] * len(texts), source


def _check_texts(texts: Sequence[str], source: dict[str, Any]) -> None:
    where = source.get("path") or ", ".join(file["path"] for file in source.get("files", []))
    if not texts:
        raise DataError(f"no documents found in {where}: pass data that contains text")
    if not any(text.strip() for text in texts):
        raise DataError(
            f"every document in {where} is empty or whitespace: pass data that contains text"
        )


def load_corpus(
    *,
    task: str | None = None,
    data: str | None = None,
    data_files: Sequence[str] | None = None,
    text_field: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    sample_by: str | None = None,
    limit: int | None = None,
) -> Corpus:
    """Load the documents to score, from a task, local data or a hub dataset.

    Args:
        task: a task name (see :func:`available_tasks`) or a path to a task YAML
            file. With neither ``task`` nor ``data`` nor ``data_files``,
            :data:`DEFAULT_TASK` is used.
        data: a local file, or a hub dataset name ``owner/name`` if no such file
            exists. The format follows the extension (see :func:`format_of`).
        data_files: local files for a task, read as its ``local`` section specifies,
            or, without a task, local files read as ``data`` is.
        text_field: the column holding the text in JSON, CSV, Parquet and hub
            data (default "text"); set by the task when ``task`` is given.
        dataset_config, split: the hub dataset's config and split (default
            "test"); with a task, they override the task's.
        sample_by: how plain-text files become documents, one of
            :data:`SAMPLE_BY` (default "document"); set by the task when
            ``task`` is given.
        limit: keep only the first ``limit`` documents.

    Returns:
        The corpus. Its ``identity`` has the keys task, source (with file
        sha256s or the hub revision), documents_sha256 (see
        :func:`documents_sha256`, over the documents kept), normalization,
        text_field, sample_by ("row" for structured and hub data),
        num_documents_total (before ``limit``), num_documents, limit,
        word_definition and byte_definition. Empty documents are kept.

    Raises:
        ConfigError: conflicting or invalid arguments, or an invalid task.
        DataError: data that is missing, empty, not UTF-8, lacks the text
            field, or a hub that cannot be reached.
    """
    _check_arguments(task, data, data_files, sample_by, limit)
    if task is not None or (data is None and not data_files):
        loaded_task = load_task(task or DEFAULT_TASK)
        _reject({"text_field": text_field, "sample_by": sample_by}, "with a task")
        plan = _plan_task(loaded_task, data_files, dataset_config, split)
    else:
        paths = [data] if data is not None else list(data_files or [])
        plan = _plan_data(paths, text_field, dataset_config, split, sample_by)

    texts, titles, source = _read(plan)
    _check_texts(texts, source)
    num_documents_total = len(texts)
    if limit is not None:
        texts, titles = texts[:limit], titles[:limit]

    documents = [
        Document(str(index), normalize(text, plan.normalization), text, title)
        for index, (text, title) in enumerate(zip(texts, titles, strict=True))
    ]
    identity = _identity(plan, source, texts, num_documents_total, limit)
    logger.info(
        "loaded %d of %d documents from %s data",
        len(documents),
        num_documents_total,
        source["kind"],
    )
    return Corpus(documents=documents, identity=identity)


def _identity(
    plan: _Plan,
    source: dict[str, Any],
    texts: Sequence[str],
    num_documents_total: int,
    limit: int | None,
) -> dict[str, Any]:
    return {
        "task": plan.task.name if plan.task else None,
        "source": source,
        "documents_sha256": documents_sha256(texts),
        "normalization": list(plan.normalization),
        "text_field": plan.text_field,
        "sample_by": plan.sample_by,
        "num_documents_total": num_documents_total,
        "num_documents": len(texts),
        "limit": limit,
        "word_definition": WORD_DEFINITION,
        "byte_definition": BYTE_DEFINITION,
    }
