"""The real SmolLM2-135M on real text, checked against plain transformers calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmeval.data import load_corpus
from lmeval.models import load_model
from lmeval.perplexity import ScoringSettings, resolve_settings, score_corpus

pytestmark = pytest.mark.slow

WIKITEXT = os.environ.get("LMEVAL_WIKITEXT_RAW")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def first_article():
    if not WIKITEXT:
        pytest.skip("set LMEVAL_WIKITEXT_RAW to the path of WikiText-2's wiki.test.raw")
    return load_corpus(task="wikitext2", data_files=[WIKITEXT], limit=1)


def test_first_article_matches_model_loss(smollm2, first_article):
    settings = resolve_settings(ScoringSettings(window_size=8192), smollm2)
    document = score_corpus(smollm2, first_article, settings)[0]

    # The independent computation: one forward pass over [BOS] + tokens with the
    # model's own shifted cross-entropy, which averages over the len(tokens) targets.
    tokenizer = smollm2.tokenizer
    tokens = tokenizer(first_article.documents[0].text, add_special_tokens=False).input_ids
    ids = torch.tensor([[tokenizer.bos_token_id, *tokens]])
    with torch.inference_mode():
        loss = smollm2.model(ids, labels=ids).loss.item()

    assert document.num_tokens == len(tokens)
    assert document.sum_nll / document.num_tokens == pytest.approx(loss, rel=1e-5)


def test_first_article_sliding_matches_plain_strided_loop(smollm2, first_article):
    window_size, stride = 1024, 512
    settings = ScoringSettings(protocol="sliding", window_size=window_size, stride=stride)
    document = score_corpus(smollm2, first_article, resolve_settings(settings, smollm2))[0]

    # The independent computation: a strided loop over [BOS] + tokens, each window a
    # plain forward pass of up to 1024 inputs that predict the 1024 tokens after
    # them, scoring only targets no earlier window scored.
    tokenizer = smollm2.tokenizer
    tokens = tokenizer(first_article.documents[0].text, add_special_tokens=False).input_ids
    ids = torch.tensor([tokenizer.bos_token_id, *tokens])
    sum_nll, scored_until, begin = 0.0, 1, 0
    with torch.inference_mode():
        while scored_until < len(ids):
            end = min(begin + window_size, len(ids) - 1)  # inputs are ids[begin:end]
            logprobs = torch.log_softmax(smollm2.model(ids[None, begin:end]).logits[0].float(), -1)
            targets = torch.arange(scored_until, end + 1)  # indices into ids
            sum_nll -= logprobs[targets - begin - 1, ids[targets]].double().sum().item()
            scored_until, begin = end + 1, begin + stride

    assert document.num_tokens == len(tokens)
    assert document.sum_nll == pytest.approx(sum_nll, rel=1e-5)


def test_main_job_on_embedded_corpus(tmp_path: Path):
    command = [sys.executable, "-m", "lmeval", "ppl", "--model", "smollm2-135m"]
    command += ["--limit", "3", "--no-progress", "--json", "--output", str(tmp_path / "run")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    metrics = results["metrics"]
    assert results["data"]["task"] == "python-docs"
    assert metrics["num_documents"] == 3
    assert 1.0 < metrics["perplexity"] < 100.0
    assert 0.0 < metrics["bits_per_byte"] < 2.0
    assert 0.0 < metrics["accuracy"] < 1.0
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["metrics"] == metrics
