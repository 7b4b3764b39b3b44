"""Comparison of two runs: differences and the error-bar tests."""

import json
import subprocess
import sys

import pytest

from lmeval.cli import main
from lmeval.compare import (
    compare_results,
    intervals_disjoint,
    paired_ratio_difference,
    setting_differences,
    t_test_outside,
    z_test_outside,
)
from lmeval.errors import ConfigError


def ppl_results(mean_nll: float, stderr: float, accuracy: float = 0.5) -> dict:
    import math

    low, high = mean_nll - 1.96 * stderr, mean_nll + 1.96 * stderr
    return {
        "command": "ppl",
        "metrics": {
            "perplexity": math.exp(mean_nll),
            "perplexity_interval": [math.exp(low), math.exp(high)],
            "mean_nll": mean_nll,
            "mean_nll_interval": [low, high],
            "mean_nll_stderr": stderr,
            "bits_per_byte": mean_nll / 3,
            "bits_per_byte_interval": [low / 3, high / 3],
            "byte_perplexity": 2.0,
            "byte_perplexity_interval": [1.9, 2.1],
            "word_perplexity": 9.0,
            "word_perplexity_interval": None,
            "accuracy": accuracy,
            "accuracy_interval": [accuracy - 0.02, accuracy + 0.02],
            "accuracy_stderr": 0.01,
            "num_tokens": 1000,
        },
    }


def rows_by_name(a: dict, b: dict) -> dict:
    return {row.name: row for row in compare_results(a, b)}


def test_compare_flags_difference_outside():
    rows = rows_by_name(ppl_results(3.0, 0.01), ppl_results(3.1, 0.01))
    assert rows["mean_nll"].difference == pytest.approx(0.1)
    assert rows["mean_nll"].outside is True
    assert rows["perplexity"].outside is True
    assert rows["perplexity"].test == "z-test on mean_nll"
    assert rows["bits_per_byte"].outside is True
    assert rows["bits_per_byte"].test == "95% intervals"


def test_compare_does_not_flag_difference_inside():
    rows = rows_by_name(ppl_results(3.0, 0.05), ppl_results(3.05, 0.05))
    # z = 0.05 / (0.05 * sqrt 2) = 0.71
    assert rows["mean_nll"].outside is False
    assert rows["perplexity"].outside is False
    assert rows["accuracy"].outside is False
    assert rows["bits_per_byte"].outside is False


def test_compare_missing_error_bars_are_unknown():
    rows = rows_by_name(ppl_results(3.0, 0.05), ppl_results(3.5, 0.05))
    assert rows["word_perplexity"].outside is None
    assert rows["num_tokens"].outside is None
    assert rows["num_tokens"].difference == 0


def test_z_test_and_intervals_by_hand():
    assert z_test_outside(0.0, 1.0, 2.8, 1.0) is True  # z = 1.98
    assert z_test_outside(0.0, 1.0, 2.7, 1.0) is False  # z = 1.91
    assert z_test_outside(0.0, None, 2.8, 1.0) is None
    assert intervals_disjoint([0, 1], [1.5, 2]) is True
    assert intervals_disjoint([0, 1], [0.9, 2]) is False


def test_compare_rejects_different_commands():
    kl = {"command": "kl", "metrics": {}}
    with pytest.raises(ConfigError, match="cannot compare"):
        compare_results(ppl_results(3.0, 0.1), kl)


def test_compare_command_prints_table(tmp_path, capsys):
    for name, mean_nll in (("a", 3.0), ("b", 3.2)):
        (tmp_path / name).mkdir()
        text = json.dumps(ppl_results(mean_nll, 0.01))
        (tmp_path / name / "results.json").write_text(text)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["metric", "A", "B"]
    mean_nll_line = next(line for line in lines if line.startswith("mean NLL"))
    assert "+0.2000" in mean_nll_line
    assert " yes " in mean_nll_line


def test_compare_command_missing_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "results.json' not found" in capsys.readouterr().err


def with_settings(results: dict, window_size: int, batch_size: int = 1) -> dict:
    protocol = {"name": "rolling", "window_size": window_size, "batch_size": batch_size}
    return results | {"data": {"task": "wikitext2", "limit": 3}, "protocol": protocol}


def test_setting_differences_name_data_and_protocol():
    a = with_settings(ppl_results(3.0, 0.1), 2048)
    b = with_settings(ppl_results(3.0, 0.1), 1024) | {"data": {"task": "wikitext2", "limit": 5}}
    assert setting_differences(a, b) == [
        "data.limit: 3 -> 5",
        "protocol.window_size: 2048 -> 1024",
    ]


def test_setting_differences_ignore_batching():
    a = with_settings(ppl_results(3.0, 0.1), 2048, batch_size=1)
    b = with_settings(ppl_results(3.1, 0.1), 2048, batch_size=8)
    assert setting_differences(a, b) == []


def test_setting_differences_ignore_paths_of_same_file():
    a, b = (with_settings(ppl_results(3.0, 0.1), 2048) for _ in range(2))
    for run, path in ((a, "../data/wiki.test.raw"), (b, "/work/data/wiki.test.raw")):
        run["data"] = {"source": {"files": [{"path": path, "sha256": "bbf9"}]}}
    assert setting_differences(a, b) == []
    b["data"]["source"]["files"][0]["sha256"] = "0000"
    assert setting_differences(a, b) == ['data.source.files.0.sha256: "bbf9" -> "0000"']


def test_compare_command_warns_about_other_settings(tmp_path):
    for name, window_size in (("a", 2048), ("b", 512)):
        (tmp_path / name).mkdir()
        text = json.dumps(with_settings(ppl_results(3.0, 0.01), window_size))
        (tmp_path / name / "results.json").write_text(text)
    command = [sys.executable, "-m", "lmeval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "differ in more than the model" in completed.stderr
    assert "protocol.window_size: 2048 -> 512" in completed.stderr
    assert completed.stdout.startswith("metric")


def document_rows(sum_nll: list[float], num_tokens: list[int]) -> list[dict]:
    return [
        {"index": i, "id": f"doc-{i}", "skipped": None, "sum_nll": nll, "num_tokens": n,
         "num_bytes": 4 * n, "num_words": n // 2, "num_correct": n // 3}
        for i, (nll, n) in enumerate(zip(sum_nll, num_tokens, strict=True))
    ]  # fmt: skip


def test_paired_ratio_difference_by_hand():
    # Per-document differences 1 and 3 over 10 tokens each: mean 0.2, and residuals
    # -1 and +1 give variance 2 / (2 * 1 * 10^2) = 0.01.
    difference, stderr = paired_ratio_difference([20, 30], [10, 10], [21, 33], [10, 10])
    assert difference == pytest.approx(0.2)
    assert stderr == pytest.approx(0.1)


def test_paired_test_sees_consistent_shift():
    # Documents differ a lot from each other, but B is worse on every one of them.
    a = ppl_results(3.0, 0.5)
    b = ppl_results(3.05, 0.5)
    rows_a = document_rows([100.0, 400.0, 250.0], [100, 100, 100])
    rows_b = document_rows([105.0, 405.0, 255.0], [100, 100, 100])
    independent = rows_by_name(a, b)["mean_nll"]
    assert independent.outside is False
    paired = {row.name: row for row in compare_results(a, b, rows_a, rows_b)}
    assert paired["mean_nll"].test == "paired t-test, 3 documents"
    # Every difference is exactly 0.05 per token, so the standard error is zero.
    assert paired["mean_nll"].outside is True
    assert paired["perplexity"].outside is True


def test_paired_test_two_documents_uses_t():
    # Differences of 1 and 2 tokens in 100: mean 0.015, standard error 0.005, so
    # z = 3. That passes 1.96, but not t(0.975, 1 degree of freedom) = 12.71.
    a, b = ppl_results(3.0, 0.5), ppl_results(3.0, 0.5)
    rows_a = document_rows([100.0, 100.0], [100, 100])
    rows_b = document_rows([101.0, 102.0], [100, 100])
    paired = {row.name: row for row in compare_results(a, b, rows_a, rows_b)}
    assert paired["mean_nll"].test == "paired t-test, 2 documents"
    assert paired["mean_nll"].outside is False


def test_t_test_threshold_by_degrees_of_freedom():
    # 2.5 standard errors: outside with 100 documents (t = 1.98), not with 5 (t = 2.78).
    assert t_test_outside(0.25, 0.1, 99) is True
    assert t_test_outside(0.25, 0.1, 4) is False


def test_paired_test_needs_same_documents():
    a, b = ppl_results(3.0, 0.5), ppl_results(3.05, 0.5)
    rows_a = document_rows([100.0, 400.0], [100, 100])
    rows_b = document_rows([105.0, 405.0], [100, 100])
    rows_b[1]["id"] = "other"
    row = {row.name: row for row in compare_results(a, b, rows_a, rows_b)}["mean_nll"]
    assert row.test == "z-test"


def test_compare_into_closed_pipe(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(ppl_results(3.0, 0.01)))
    command = [sys.executable, "-m", "lmeval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = subprocess.run(
        [*command, "--json"], stdout=reader.stdin, stderr=subprocess.PIPE, timeout=120
    )
    reader.stdin.close()
    reader.wait(timeout=60)
    assert "Traceback" not in writer.stderr.decode()
