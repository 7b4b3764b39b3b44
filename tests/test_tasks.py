"""Task files: the shipped YAML files, lookup by name or path, and schema validation."""

from pathlib import Path

import pytest
import yaml

from lmeval.data import DEFAULT_TASK, load_corpus
from lmeval.errors import ConfigError
from lmeval.tasks import (
    HubSource,
    LocalSource,
    available_tasks,
    find_task_file,
    load_task,
    parse_task,
)

SHIPPED = ["python-docs", "wikitext2"]


def test_available_tasks_lists_shipped():
    assert set(SHIPPED) <= set(available_tasks())


def test_default_task_is_shipped():
    assert DEFAULT_TASK in available_tasks()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_task_name_matches_file(name):
    assert load_task(name).name == name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_task_starts_with_command(name):
    lines = find_task_file(name).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ")
    comment = [line for line in lines if line.startswith("#")]
    assert any(f"lmeval ppl --model smollm2-135m --task {name}" in line for line in comment)


def test_wikitext2_task_fields():
    task = load_task("wikitext2")
    assert task.hub == HubSource(
        path="EleutherAI/wikitext_document_level",
        config="wikitext-2-raw-v1",
        split="test",
        text_field="page",
    )
    assert task.local == LocalSource(format="text", sample_by="wikitext-article")
    assert task.normalization == ("wikitext-detokenize",)
    assert task.titles == "wikitext-heading"


def test_python_docs_task_fields():
    task = load_task("python-docs")
    assert task.builtin == "pydoc-topics"
    assert task.hub is None
    assert task.local is None


def test_unknown_task_lists_available():
    with pytest.raises(ConfigError) as error:
        load_task("wikitext3")
    message = str(error.value)
    assert "unknown task 'wikitext3'" in message
    for name in SHIPPED:
        assert name in message


def test_missing_task_path(tmp_path):
    with pytest.raises(ConfigError, match="task file not found"):
        load_task(str(tmp_path / "absent.yaml"))


def write_task(tmp_path: Path, content: dict | str) -> str:
    path = tmp_path / "custom.yaml"
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_task_from_path(tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("one\ntwo\n", encoding="utf-8")
    task = {"name": "lines", "local": {"format": "text", "sample_by": "line"}}
    corpus = load_corpus(task=write_task(tmp_path, task), data_files=[str(data)])
    assert [document.text for document in corpus.documents] == ["one", "two"]
    assert corpus.identity["task"] == "lines"


def test_task_local_json_text_field(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    task = {"name": "rows", "local": {"format": "json", "text_field": "body"}}
    corpus = load_corpus(task=write_task(tmp_path, task), data_files=[str(data)])
    assert [document.text for document in corpus.documents] == ["a", "b"]


def test_task_local_needs_data_files(tmp_path):
    task = {"name": "lines", "local": {"format": "text"}}
    with pytest.raises(ConfigError, match="pass it with --data-files"):
        load_corpus(task=write_task(tmp_path, task))


def test_task_without_local_rejects_data_files(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("text\n", encoding="utf-8")
    task = {"name": "hub-only", "hub": {"path": "owner/name"}}
    with pytest.raises(ConfigError, match="does not read local files"):
        load_corpus(task=write_task(tmp_path, task), data_files=[str(data)])


def test_task_hub_defaults():
    task = parse_task({"name": "t", "hub": {"path": "owner/name"}}, "t.yaml")
    assert task.hub == HubSource(path="owner/name", config=None, split="test", text_field="text")


def test_task_normalization_default():
    task = parse_task({"name": "t", "builtin": "pydoc-topics"}, "t.yaml")
    assert task.normalization == ("none",)


# (case, task mapping, text the error message must contain)
INVALID_TASKS = [
    ("unknown key", {"name": "t", "builtin": "pydoc-topics", "sourc": 1}, "unknown key 'sourc'"),
    ("missing name", {"builtin": "pydoc-topics"}, "name is missing"),
    ("empty name", {"name": "", "builtin": "pydoc-topics"}, "name must be a non-empty string"),
    ("no source", {"name": "t"}, "needs a builtin, hub or local section"),
    (
        "builtin and hub",
        {"name": "t", "builtin": "pydoc-topics", "hub": {"path": "a/b"}},
        "builtin cannot be combined",
    ),
    ("unknown builtin", {"name": "t", "builtin": "man-pages"}, "builtin is 'man-pages'"),
    ("hub not mapping", {"name": "t", "hub": "a/b"}, "hub must be a mapping"),
    ("hub path missing", {"name": "t", "hub": {"split": "test"}}, "hub.path is missing"),
    (
        "hub unknown key",
        {"name": "t", "hub": {"path": "a/b", "revision": "x"}},
        "unknown key hub.'revision'",
    ),
    ("local format missing", {"name": "t", "local": {}}, "local.format is missing"),
    ("local format unknown", {"name": "t", "local": {"format": "xml"}}, "local.format is 'xml'"),
    (
        "sample_by unknown",
        {"name": "t", "local": {"format": "text", "sample_by": "word"}},
        "local.sample_by is 'word'",
    ),
    (
        "sample_by with json",
        {"name": "t", "local": {"format": "json", "sample_by": "line"}},
        "local.sample_by applies to the text format only",
    ),
    (
        "normalization not list",
        {"name": "t", "builtin": "pydoc-topics", "normalization": "none"},
        "normalization must be a list",
    ),
    (
        "normalization unknown",
        {"name": "t", "builtin": "pydoc-topics", "normalization": ["lower"]},
        "unknown normalization 'lower'",
    ),
    (
        "titles unknown",
        {"name": "t", "builtin": "pydoc-topics", "titles": "first-line"},
        "titles is 'first-line'",
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(raw, expected) for _, raw, expected in INVALID_TASKS],
    ids=[case for case, _, _ in INVALID_TASKS],
)
def test_task_invalid(raw, expected):
    with pytest.raises(ConfigError) as error:
        parse_task(raw, "t.yaml")
    assert expected in str(error.value)


def test_task_reports_all_problems():
    raw = {"extra": 1, "hub": {"path": 5}, "normalization": ["lower"]}
    with pytest.raises(ConfigError) as error:
        parse_task(raw, "t.yaml")
    message = str(error.value)
    assert "unknown key 'extra'" in message
    assert "hub.path must be a non-empty string" in message
    assert "unknown normalization 'lower'" in message
    assert "name is missing" in message


def test_task_error_is_one_line():
    with pytest.raises(ConfigError) as error:
        parse_task({"extra": 1, "hub": {"path": 5}}, "t.yaml")
    assert "\n" not in str(error.value)


def test_task_not_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_task(write_task(tmp_path, "- just\n- a list\n"))


def test_task_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_task(write_task(tmp_path, "name: [unclosed\n"))


def test_task_invalid_yaml_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_task(write_task(tmp_path, "name: [unclosed\n"))
    assert "\n" not in str(error.value)
