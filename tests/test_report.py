"""``lmeval report`` on a real tiny-model run: embedded figures, headline numbers, notes."""

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from tiny import make_tiny_llama, make_tokenizer, save_model_dir

from lmeval.cli import main

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "big", "red"]
LMEVAL = [sys.executable, "-m", "lmeval"]
IMAGE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
HEADLINE_CELL = re.compile(r'<td[^>]*data-key="([^"]+)"[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td>')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    tokenizer = make_tokenizer(WORDS)
    model_dir = save_model_dir(root / "model", make_tiny_llama(len(tokenizer)), tokenizer)
    rng = np.random.default_rng(1)
    paragraphs = [" ".join(rng.choice(WORDS, size=n)) for n in rng.integers(4, 60, size=10)]
    data = root / "data.txt"
    data.write_text("\n\n".join(paragraphs))
    output = root / "run"
    command = [*LMEVAL, "ppl", "--model", str(model_dir), "--data", str(data)]
    command += ["--sample-by", "paragraph", "--window-size", "24", "--output", str(output)]
    command += ["--save-tokens", "--no-progress", "-q"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return output


@pytest.fixture(scope="module")
def report(run_dir) -> str:
    completed = subprocess.run(
        [*LMEVAL, "report", str(run_dir)], check=True, capture_output=True, text=True, timeout=300
    )
    assert completed.stdout.split() == [str(run_dir / "report.html"), str(run_dir / "report.md")]
    return (run_dir / "report.html").read_text()


def test_report_images_decode(report):
    images = IMAGE.findall(report)
    assert len(images) == 3  # position, calibration, documents
    for data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        height, width = pixels.shape[:2]
        assert width >= 400
        assert height >= 200
        assert pixels.std() > 0.01  # not a blank canvas


def test_report_needs_no_network(report):
    assert "<script" not in report
    assert "<link" not in report
    assert "http://" not in report
    assert "https://" not in report


def test_report_headline_matches_results(run_dir, report):
    results = json.loads((run_dir / "results.json").read_text())
    cells = {key: (value, interval) for key, value, interval in HEADLINE_CELL.findall(report)}
    m = results["metrics"]
    for name in ("perplexity", "mean_nll", "bits_per_byte", "byte_perplexity"):
        value, interval = cells[f"metrics.{name}"]
        low, high = m[f"{name}_interval"]
        assert value == f"{m[name]:.4f}", name
        assert interval == f"[{low:.4f}, {high:.4f}]", name
    for name in ("word_perplexity", "accuracy"):
        assert cells[f"metrics.{name}"][0] == f"{m[name]:.4f}", name
    for name in ("num_tokens", "num_words", "num_bytes", "num_documents", "num_skipped"):
        assert cells[f"metrics.{name}"][0] == f"{m[name]:,}", name
    rate = results["timing"]["tokens_per_second"]
    assert cells["timing.tokens_per_second"][0] == f"{rate:,.1f}"


def test_report_markdown_has_same_headline(run_dir, report):
    markdown = (run_dir / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    perplexity = results["metrics"]["perplexity"]
    assert f"| perplexity | {perplexity:.4f} |" in markdown
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(figures) == 3
    for figure in figures:
        assert (run_dir / figure).read_bytes()[:4] == b"\x89PNG"


def test_report_states_method(run_dir, report):
    results = json.loads((run_dir / "results.json").read_text())
    assert "How these numbers were computed" in report
    assert results["interval_method"] in report
    assert results["definitions"]["word"] in report
    assert "prefix_token" in report
    assert "ECE" in report


def test_report_highest_loss_tokens(run_dir, report):
    worst = json.loads((run_dir / "results.json").read_text())["diagnostics"]["highest_loss_tokens"]
    assert len(worst) == 40
    assert report.count('class="target"') == len(worst)
    # With tokens.parquet the context tokens are coloured one by one.
    assert report.count("rgba(") > 2 * len(worst)


def test_report_of_two_runs_compares(run_dir, tmp_path, capsys):
    output = tmp_path / "both.html"
    assert main(["report", str(run_dir), str(run_dir), "--output", str(output)]) == 0
    page = output.read_text()
    assert "Comparison" in page
    # The same documents in both runs, so the paired test is used.
    assert re.search(r"no \(paired t-test, \d+ documents\)", page)
    assert "differ in more than the model" not in page
    assert (tmp_path / "both.md").exists()


def test_report_notes_partial_diagnostics(run_dir, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    results = json.loads((run_dir / "results.json").read_text())
    results["metrics"]["num_tokens"] += 100
    (resumed / "results.json").write_text(json.dumps(results))
    assert main(["report", str(resumed)]) == 0
    page = (resumed / "report.html").read_text()
    covered = results["diagnostics"]["num_tokens"]
    assert f"the figures below cover {covered:,} of the {covered + 100:,} scored" in page


def test_report_of_checkpoint_series(run_dir, tmp_path):
    import shutil

    series = tmp_path / "series"
    rows = []
    for name in ("checkpoint-20", "checkpoint-10"):
        shutil.copytree(run_dir, series / name)
        rows.append({"checkpoint": name, "results": str(series / name / "results.json")})
    (series / "summary.json").write_text(json.dumps({"command": "ppl-checkpoints", "rows": rows}))
    assert main(["report", str(series)]) == 0
    page = (series / "report.html").read_text()
    assert "Comparison" in page
    assert "1: checkpoint-20" in page
    assert "2: checkpoint-10" in page


def test_report_unwritable_output_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory\n")
    output = tmp_path / "a-file" / "report.html"
    assert main(["report", str(run_dir), "--output", str(output)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lmeval: error: cannot write the report to ")
    assert str(output) in lines[0]


def test_report_into_existing_directory(run_dir, tmp_path):
    assert main(["report", str(run_dir), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "report.md").exists()


def test_report_notes_other_settings(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    results = json.loads((run_dir / "results.json").read_text())
    results["protocol"]["window_size"] = 12
    (other / "results.json").write_text(json.dumps(results))
    output = tmp_path / "both.html"
    assert main(["report", str(run_dir), str(other), "--output", str(output)]) == 0
    page = output.read_text()
    assert "runs 1 and 2 differ in more than the model" in page
    assert "protocol.window_size: 24 -&gt; 12" in page


def kl_results() -> dict:
    ladder = {"p1": 1e-4, "p10": 1e-3, "median": 0.01, "p90": 0.1, "p99": 0.5, "max": 2.0}
    worst = {
        "document": 0,
        "position": 3,
        "token": " cat",
        "context": "the big",
        "kl_model_ref": 1.5,
        "kl_ref_model": 2.0,
        "model_top": [{"token": " dog", "id": 5, "probability": 0.6}],
        "reference_top": [{"token": " cat", "id": 4, "probability": 0.7}],
    }
    return {
        "command": "kl",
        "metrics": {
            "kl_model_ref": {"mean": 0.05, "stderr": 0.01, **ladder},
            "kl_ref_model": {"mean": "inf", "stderr": None, **ladder},
            "top1_agreement": 0.9,
            "delta_p": {"mean": -0.01, "rms": 0.05, "p1": -0.2, "median": 0.0, "p99": 0.1},
            "num_tokens": 100,
        },
        "worst_tokens": [worst],
        "worst_tokens_by": "kl_ref_model",
        "model": {"spec": "tiny"},
        "reference": {"spec": "tiny-ref"},
    }


def test_report_of_kl_run(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(kl_results()))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert len(IMAGE.findall(page)) == 2  # KL ladder and delta p
    assert "percentile ladder" in page
    assert "stores no KL histogram" in page
    assert "Tokens where the models disagree most" in page
    assert 'class="target"' in page
    assert '<td class="num" data-key="metrics.top1_agreement">0.9000</td>' in page
    assert 'data-key="metrics.kl_ref_model.mean">inf</td>' in page


def test_report_of_real_kl_run(tmp_path):
    tokenizer = make_tokenizer(WORDS)
    model = save_model_dir(tmp_path / "a", make_tiny_llama(len(tokenizer), seed=1), tokenizer)
    reference = save_model_dir(tmp_path / "b", make_tiny_llama(len(tokenizer), seed=2), tokenizer)
    rng = np.random.default_rng(2)
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=n)) for n in (30, 12, 45)))
    output = tmp_path / "kl"
    command = [*LMEVAL, "kl", "--model", str(model), "--reference", str(reference)]
    command += ["--data", str(data), "--sample-by", "paragraph", "--window-size", "16"]
    command += ["--output", str(output), "--no-progress", "-q", "--threads", "1"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    results = json.loads((output / "results.json").read_text())
    for key in ("kl_model_ref", "kl_ref_model", "delta_p"):
        histogram = results["metrics"][key]["histogram"]
        counted = sum(histogram["counts"]) + histogram["below"] + histogram["above"]
        assert counted == results["metrics"]["num_tokens"]

    subprocess.run([*LMEVAL, "report", str(output)], check=True, capture_output=True, timeout=300)
    page = (output / "report.html").read_text()
    assert "Histogram of per-token KL" in page
    assert "Histogram of delta p" in page
    cells = {key: value for key, value, _ in HEADLINE_CELL.findall(page)}
    for key in ("kl_model_ref", "kl_ref_model"):
        mean = results["metrics"][key]["mean"]
        assert float(cells[f"metrics.{key}.mean"]) == pytest.approx(mean, rel=1e-3)
    assert float(cells["metrics.js"]) == pytest.approx(results["metrics"]["js"], rel=1e-3)
    images = IMAGE.findall(page)
    assert len(images) == 4  # KL histogram and ladder, delta p histogram and percentiles
    for data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[1] >= 400
        assert pixels.std() > 0.01


def test_report_rejects_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
