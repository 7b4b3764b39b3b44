"""The perplexity pipeline on tiny real models: protocols, counts and aggregation."""

import math

import numpy as np
import pytest
from handset import bigram_llama, cycle_table
from tiny import make_tiny_llama, make_tokenizer

from lmeval.data import Corpus, Document
from lmeval.errors import ConfigError, ScoringError
from lmeval.models import LoadedModel
from lmeval.perplexity import (
    DocumentResult,
    ScoringSettings,
    corpus_metrics,
    resolve_settings,
    score_corpus,
)

WORDS = [f"w{i}" for i in range(13)]  # ids 3..15 after <unk>, <s>, </s>
VOCAB = 3 + len(WORDS)


def loaded_model(model, tokenizer=None, add_bos_token=False) -> LoadedModel:
    tokenizer = tokenizer or make_tokenizer(WORDS)
    identity = {"spec": "tiny", "add_bos_token": add_bos_token, "dtype": "float32"}
    return LoadedModel(model, tokenizer, identity, model.config.max_position_embeddings)


def corpus_of(*texts: str) -> Corpus:
    documents = [Document(str(i), text, text) for i, text in enumerate(texts)]
    return Corpus(documents, {"task": None})


def words(*indices: int) -> str:
    return " ".join(WORDS[i] for i in indices)


@pytest.fixture(scope="module")
def tiny():
    return loaded_model(make_tiny_llama(VOCAB, max_positions=64, seed=0))


def score(loaded, corpus, **settings):
    resolved = resolve_settings(ScoringSettings(**settings), loaded)
    return score_corpus(loaded, corpus, resolved)


def test_bigram_corpus_perplexity_closed_form():
    # Cycle over the word ids 3..15 (and 0..2): each word follows the previous one,
    # the first word follows <s> (id 1), so every token has probability p.
    p = 0.75
    loaded = loaded_model(bigram_llama(cycle_table(VOCAB, p)))
    text = words(1, 2, 3, 4, 5, 6, 7, 8)  # ids 4..11; <s>=1 -> 2 is off-cycle
    documents = score(loaded, corpus_of(text), window_size=4)
    token_nll = documents[0].token_nll
    assert len(token_nll) == 8
    assert token_nll[0] == pytest.approx(-math.log((1 - p) / (VOCAB - 1)), rel=1e-5)
    np.testing.assert_allclose(token_nll[1:], -math.log(p), rtol=1e-5)


@pytest.mark.parametrize("protocol", ["rolling", "sliding"])
@pytest.mark.parametrize("window_size", [1, 2, 3, 5, 16, 64])
def test_every_token_scored_once(tiny, protocol, window_size):
    texts = [words(*range(n % 13, 13)) + " " + words(*range(n % 7)) for n in range(1, 9)]
    corpus = corpus_of(*texts)
    stride = max(1, window_size // 2) if protocol == "sliding" else None
    documents = score(tiny, corpus, protocol=protocol, window_size=window_size, stride=stride)
    for document, text in zip(documents, texts, strict=True):
        assert document.num_tokens == len(text.split())
        assert len(document.token_nll) == document.num_tokens


def test_windowed_equals_single_window(tiny):
    text = words(*range(13), *range(13))
    one = score(tiny, corpus_of(text), window_size=64)[0]
    sliding = score(tiny, corpus_of(text), protocol="sliding", window_size=64, stride=8)[0]
    np.testing.assert_allclose(sliding.token_nll, one.token_nll, rtol=1e-6)


def test_batch_size_and_padding_side_change_nothing(tiny):
    texts = [words(*range(n), *range(n // 2)) for n in range(2, 14)]
    corpus = corpus_of(*texts)
    base = score(tiny, corpus, window_size=8, batch_size=1)
    for batch_size, side in [(16, "right"), (16, "left"), (3, "left")]:
        other = score(tiny, corpus, window_size=8, batch_size=batch_size, padding_side=side)
        for a, b in zip(base, other, strict=True):
            assert b.sum_nll == pytest.approx(a.sum_nll, rel=1e-6)
            assert b.num_correct == a.num_correct


def test_corpus_mean_is_token_weighted(tiny):
    documents = score(tiny, corpus_of(words(1, 2), words(*range(13))), window_size=64)
    result = corpus_metrics(documents, "rolling")
    total = sum(d.sum_nll for d in documents)
    assert result["mean_nll"] == pytest.approx(total / 15)
    mean_of_means = np.mean([d.sum_nll / d.num_tokens for d in documents])
    assert result["mean_nll"] != pytest.approx(mean_of_means)
    assert result["perplexity"] == pytest.approx(math.exp(total / 15))


def test_short_documents_counted_and_skipped(tiny):
    documents = score(tiny, corpus_of("", words(3), words(1, 2, 3)), window_size=8)
    assert [d.skipped for d in documents] == ["empty", "one token", None]
    result = corpus_metrics(documents, "rolling")
    assert result["num_skipped"] == 2
    assert result["num_documents"] == 3
    assert result["num_tokens"] == 3


def test_all_documents_skipped_is_an_error(tiny):
    documents = score(tiny, corpus_of("", words(3)), window_size=8)
    with pytest.raises(ScoringError, match="nothing was scored"):
        corpus_metrics(documents, "rolling")


def test_words_and_bytes_from_original_text(tiny):
    original = "w1  w2\nw3 é"  # é is two UTF-8 bytes
    corpus = Corpus([Document("0", "w1 w2 w3", original)], {})
    document = score(tiny, corpus, window_size=8)[0]
    assert document.num_words == 4
    assert document.num_bytes == len(original.encode("utf-8"))
    assert document.num_bytes == 12


def test_word_and_byte_perplexity_by_hand(tiny):
    documents = score(tiny, corpus_of(words(1, 2, 3, 4), words(5, 6)), window_size=8)
    result = corpus_metrics(documents, "rolling")
    total = sum(d.sum_nll for d in documents)
    num_bytes = sum(d.num_bytes for d in documents)
    assert result["word_perplexity"] == pytest.approx(math.exp(total / 6))
    assert result["byte_perplexity"] == pytest.approx(math.exp(total / num_bytes))
    assert result["bits_per_byte"] == pytest.approx(total / num_bytes / math.log(2))
    assert result["accuracy"] == sum(d.num_correct for d in documents) / 6


def test_interval_contains_estimate(tiny):
    texts = [words(*range(n), *range(13 - n)) for n in range(1, 12)]
    result = corpus_metrics(score(tiny, corpus_of(*texts), window_size=8), "rolling")
    low, high = result["perplexity_interval"]
    assert low < result["perplexity"] < high
    assert result["mean_nll_stderr"] > 0


def test_llama_cpp_protocol_scores_second_half_of_chunks(tiny):
    text = " ".join(WORDS * 5)  # 65 tokens: 4 chunks of 16
    documents = score(tiny, corpus_of(text), protocol="llama-cpp", window_size=16)
    assert len(documents) == 4
    assert [d.num_tokens for d in documents] == [7, 7, 7, 7]
    result = corpus_metrics(documents, "llama-cpp")
    assert result["num_tokens"] == 28
    assert result["perplexity_interval"] is not None


def test_llama_cpp_replaces_first_token_with_bos_only_when_tokenizer_adds_it():
    # The bigram model makes the first scored token depend only on its predecessor,
    # so compare inputs through the scorer's windows instead.
    from lmeval.perplexity import build_units

    text = " ".join(WORDS * 3)
    for add_bos, first in [(True, 1), (False, 3)]:
        loaded = loaded_model(bigram_llama(cycle_table(VOCAB, 0.5)), add_bos_token=add_bos)
        settings = resolve_settings(ScoringSettings("llama-cpp", window_size=8), loaded)
        units = build_units(loaded, corpus_of(text).documents, settings)
        assert all(unit.windows[0].input_ids[0] == first for unit in units[:1])


def test_window_above_model_limit_rejected(tiny):
    with pytest.raises(
        ConfigError, match="--window-size 65 is above the model's position limit of 64"
    ):
        resolve_settings(ScoringSettings(window_size=65), tiny)


def test_long_document_is_windowed_not_truncated(tiny):
    text = " ".join(WORDS * 10)  # 130 tokens, model limit 64
    document = score(tiny, corpus_of(text), window_size=64)[0]
    assert document.num_tokens == 130
    assert len(document.token_nll) == 130


def test_stride_rejected_outside_sliding(tiny):
    with pytest.raises(ConfigError, match="--stride applies to the sliding protocol"):
        resolve_settings(ScoringSettings(stride=4), tiny)


def test_unknown_protocol_rejected(tiny):
    with pytest.raises(ConfigError, match="unknown protocol 'strided'"):
        resolve_settings(ScoringSettings(protocol="strided"), tiny)


def test_default_window_is_model_limit_capped(tiny):
    assert resolve_settings(ScoringSettings(), tiny).window_size == 64


def test_documents_reported_before_run_ends(tiny):
    events = []
    corpus = corpus_of(*[words(*range(13)) for _ in range(12)])
    settings = resolve_settings(ScoringSettings(window_size=8), tiny)
    score_corpus(
        tiny,
        corpus,
        settings,
        on_document=lambda d: events.append("document"),
        progress=lambda n: events.append("batch"),
    )
    # 12 documents of 2 windows each: the first finished documents are reported
    # after a few batches, not after all 24.
    assert events.index("document") < 8
    assert events.count("document") == 12


def test_intervals_stay_in_range():
    # One document of 5 tokens with 2 correct: the normal interval of the accuracy,
    # 0.4 +- 1.96 * 0.245, would reach below 0. Per-token NLLs 0.1, 0.1, 0.1, 0.1, 5.
    document = DocumentResult(
        index=0,
        id="0",
        title=None,
        num_tokens=5,
        num_words=3,
        num_bytes=20,
        sum_nll=5.4,
        sum_nll_squared=4 * 0.01 + 25.0,
        num_correct=2,
    )
    metrics = corpus_metrics([document], "rolling")
    low, high = metrics["accuracy_interval"]
    # Wilson's interval for 2 of 5: [0.118, 0.769].
    assert low == pytest.approx(0.1176, abs=1e-4)
    assert high == pytest.approx(0.7693, abs=1e-4)
    assert metrics["mean_nll_interval"][0] == 0.0
    assert metrics["perplexity_interval"][0] == 1.0
    assert metrics["bits_per_byte_interval"][0] >= 0.0


def test_accuracy_interval_at_zero_has_width():
    document = DocumentResult(
        index=0, id="0", title=None, num_tokens=13, num_words=5, num_bytes=30,
        sum_nll=60.0, sum_nll_squared=300.0, num_correct=0,
    )  # fmt: skip
    low, high = corpus_metrics([document], "rolling")["accuracy_interval"]
    assert low == 0.0
    # Wilson's upper bound for 0 of 13: z^2 / (n + z^2) = 0.228.
    assert high == pytest.approx(0.2281, abs=1e-4)
