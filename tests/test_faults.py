"""Faults that give a plausible but wrong number, each pinned by a closed-form value.

Most tests score hand-set bigram models (tests/handset.py), whose NLL for every token
is ``-table[previous token, token]``, so the expected value is known exactly. Where it
makes sense, a test also computes what a typical wrong variant would report: labels
shifted twice, a dropped first token, a BOS in every window, a mean of means, sums
in half precision. It then checks that lmeval's number differs from that, so the
test would catch the variant.
"""

import math

import numpy as np
import pytest
import torch
from handset import bigram_llama, bigram_nll, cycle_table, random_table
from tiny import make_tiny_llama, make_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from lmeval.data import Corpus, Document, load_corpus
from lmeval.errors import ConfigError, ScoringError
from lmeval.models import LoadedModel
from lmeval.perplexity import (
    ScoringSettings,
    build_units,
    corpus_metrics,
    resolve_settings,
    score_corpus,
)
from lmeval.scoring import WindowScorer

WORDS = [f"w{i}" for i in range(13)]
VOCAB = 16  # <unk>, <s>, </s>, then the 13 words
BOS, EOS = 1, 2
FIRST_WORD_ID = 3
# A bigram model's float32 log-softmax matches the closed form this closely.
RTOL = 1e-5


def loaded_model(model, tokenizer=None, add_bos_token=False) -> LoadedModel:
    tokenizer = tokenizer or make_tokenizer(WORDS)
    identity = {"spec": "handset", "add_bos_token": add_bos_token}
    return LoadedModel(model, tokenizer, identity, model.config.max_position_embeddings)


def corpus_of(*texts: str) -> Corpus:
    return Corpus([Document(str(i), text, text) for i, text in enumerate(texts)], {})


def text_of(token_ids: list[int]) -> str:
    return " ".join(WORDS[i - FIRST_WORD_ID] for i in token_ids)


def random_ids(length: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_WORD_ID, VOCAB, size=length).tolist()


def score(loaded, corpus, **settings):
    resolved = resolve_settings(ScoringSettings(**settings), loaded)
    return score_corpus(loaded, corpus, resolved)


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return random_table(VOCAB, seed=0)


@pytest.fixture(scope="module")
def bigram(table) -> LoadedModel:
    return loaded_model(bigram_llama(table))


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """A random Llama, whose outputs depend on positions and the whole context."""
    return loaded_model(make_tiny_llama(VOCAB, max_positions=64, seed=0))


# --- label shift ----------------------------------------------------------------


def test_label_shift_closed_form(bigram, table):
    tokens = random_ids(30, seed=1)
    document = score(bigram, corpus_of(text_of(tokens)), window_size=64)[0]
    expected = bigram_nll(table, tokens, BOS)
    np.testing.assert_allclose(document.token_nll, expected, rtol=RTOL)


@pytest.mark.parametrize("variant", ["unshifted", "shifted twice"])
def test_label_shift_variant_differs(bigram, table, variant):
    tokens = random_ids(30, seed=1)
    document = score(bigram, corpus_of(text_of(tokens)), window_size=64)[0]
    if variant == "unshifted":
        wrong = -table[tokens, tokens]  # each token predicted from itself
    else:
        wrong = -table[[BOS, *tokens[:-2]], tokens[1:]]  # from the token two before it
    assert document.sum_nll != pytest.approx(wrong.sum(), rel=1e-3)


# --- padding --------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_never_scored(bigram, table, padding_side):
    lengths = [2, 40, 5, 17, 3]
    documents = [random_ids(n, seed=n) for n in lengths]
    corpus = corpus_of(*map(text_of, documents))
    results = score(
        bigram, corpus, window_size=64, batch_size=len(lengths), padding_side=padding_side
    )
    for result, tokens in zip(results, documents, strict=True):
        assert result.num_tokens == len(tokens)
        np.testing.assert_allclose(result.token_nll, bigram_nll(table, tokens, BOS), rtol=RTOL)


@pytest.fixture(scope="module")
def gpt2() -> LoadedModel:
    """A random GPT-2: its learned absolute positions make a wrong position id visible.

    Llama's rotary positions are shift-invariant, so left padding with positions
    counted from the pad tokens gives Llama the same numbers and would hide the fault.
    """
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    return loaded_model(GPT2LMHeadModel(config).eval())


def test_left_padding_matches_unpadded(gpt2):
    documents = [random_ids(n, seed=n) for n in (4, 30, 11)]
    corpus = corpus_of(*map(text_of, documents))
    alone = score(gpt2, corpus, window_size=64, batch_size=1)
    padded = score(gpt2, corpus, window_size=64, batch_size=3, padding_side="left")
    for a, b in zip(alone, padded, strict=True):
        np.testing.assert_allclose(b.token_nll, a.token_nll, rtol=RTOL, atol=1e-6)


def test_left_padding_without_position_ids_differs(gpt2):
    # The wrong variant: left padding with positions counted from the pad tokens.
    tokens = random_ids(6, seed=2)
    inputs = [BOS, *tokens[:-1]]
    pad = 4
    input_ids = torch.tensor([[EOS] * pad + inputs])
    attention_mask = torch.tensor([[0] * pad + [1] * len(inputs)])
    with torch.no_grad():
        logits = gpt2.model(input_ids=input_ids, attention_mask=attention_mask).logits[0, pad:]
    lmeval = score(gpt2, corpus_of(text_of(tokens)), window_size=64)[0]
    wrong = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens), reduction="sum")
    assert lmeval.sum_nll != pytest.approx(wrong.item(), rel=1e-3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_token_equal_to_pad_id_scored(table, padding_side):
    tokenizer = make_tokenizer(WORDS)
    tokenizer.pad_token = WORDS[3]  # a real word is also the pad token
    pad_id = tokenizer.pad_token_id
    loaded = loaded_model(bigram_llama(table), tokenizer)
    short = [pad_id, 5, pad_id, pad_id, 7]
    long = random_ids(20, seed=3)
    results = score(
        loaded,
        corpus_of(text_of(short), text_of(long)),
        window_size=64,
        batch_size=2,
        padding_side=padding_side,
    )
    assert results[0].num_tokens == len(short)
    np.testing.assert_allclose(results[0].token_nll, bigram_nll(table, short, BOS), rtol=RTOL)


def test_eos_text_equal_to_pad_id_scored(bigram, table):
    # Without a pad token the batch is padded with EOS, and an EOS in the text still counts.
    tokens = [4, EOS, 6, EOS]
    text = "w1 </s> w3 </s>"
    results = score(bigram, corpus_of(text, text_of(random_ids(12, 4))), batch_size=2)
    assert results[0].num_tokens == 4
    np.testing.assert_allclose(results[0].token_nll, bigram_nll(table, tokens, BOS), rtol=RTOL)


# --- first token of a document --------------------------------------------------


def test_first_token_predicted_from_bos(bigram, table):
    tokens = random_ids(10, seed=5)
    document = score(bigram, corpus_of(text_of(tokens)), window_size=64)[0]
    assert document.num_tokens == len(tokens)
    assert document.token_nll[0] == pytest.approx(-table[BOS, tokens[0]], rel=RTOL)


def test_first_token_not_dropped(bigram, table):
    tokens = random_ids(10, seed=5)
    document = score(bigram, corpus_of(text_of(tokens)), window_size=64)[0]
    dropped = bigram_nll(table, tokens, BOS)[1:].sum()
    assert len(document.token_nll) == len(tokens)
    assert document.sum_nll != pytest.approx(dropped, rel=1e-3)


def test_first_token_from_eos_without_bos(table):
    tokenizer = make_tokenizer(WORDS, bos=False)  # <unk> 0, </s> 1, words from 2
    loaded = loaded_model(bigram_llama(table), tokenizer)
    tokens = [2, 5, 9, 3]
    text = " ".join(WORDS[i - 2] for i in tokens)
    document = score(loaded, corpus_of(text), window_size=64)[0]
    np.testing.assert_allclose(document.token_nll, bigram_nll(table, tokens, 1), rtol=RTOL)


@pytest.mark.parametrize("protocol", ["rolling", "sliding"])
def test_no_double_bos(table, protocol):
    tokenizer = make_tokenizer(WORDS, add_bos_token=True)
    loaded = loaded_model(bigram_llama(table), tokenizer, add_bos_token=True)
    tokens = random_ids(12, seed=6)
    corpus = corpus_of(text_of(tokens))
    settings = resolve_settings(ScoringSettings(protocol, window_size=64), loaded)
    window = build_units(loaded, corpus.documents, settings)[0].windows[0]
    assert window.input_ids[:2] == [BOS, tokens[0]]
    document = score_corpus(loaded, corpus, settings)[0]
    assert document.num_tokens == len(tokens)
    np.testing.assert_allclose(document.token_nll, bigram_nll(table, tokens, BOS), rtol=RTOL)


@pytest.mark.parametrize("add_bos_token", [False, True])
@pytest.mark.parametrize(("protocol", "stride"), [("rolling", None), ("sliding", 3)])
def test_bos_only_before_first_window(table, add_bos_token, protocol, stride):
    tokenizer = make_tokenizer(WORDS, add_bos_token=add_bos_token)
    loaded = loaded_model(bigram_llama(table), tokenizer, add_bos_token=add_bos_token)
    tokens = random_ids(41, seed=7)
    corpus = corpus_of(text_of(tokens))
    document = score(loaded, corpus, protocol=protocol, window_size=5, stride=stride)[0]
    expected = bigram_nll(table, tokens, BOS)
    np.testing.assert_allclose(document.token_nll, expected, rtol=RTOL)
    # The wrong variant: every window's first scored token predicted from BOS.
    settings = resolve_settings(ScoringSettings(protocol, window_size=5, stride=stride), loaded)
    firsts = [
        window.first_target for window in build_units(loaded, corpus.documents, settings)[0].windows
    ]
    wrong = expected.copy()
    wrong[firsts] = -table[BOS, np.asarray(tokens)[firsts]]
    assert document.sum_nll != pytest.approx(wrong.sum(), rel=1e-3)


@pytest.mark.parametrize("add_bos_token", [False, True])
def test_llama_cpp_bos_in_every_chunk(tiny, add_bos_token):
    tokenizer = make_tokenizer(WORDS, add_bos_token=add_bos_token)
    loaded = loaded_model(tiny.model, tokenizer, add_bos_token=add_bos_token)
    stream = random_ids(50, seed=8)
    corpus = corpus_of(text_of(stream))
    window = 12
    documents = score(loaded, corpus, protocol="llama-cpp", window_size=window)
    assert len(documents) == len(stream) // window
    for index, document in enumerate(documents):
        chunk = stream[index * window : (index + 1) * window]
        if add_bos_token:
            chunk[0] = BOS
        with torch.no_grad():
            logits = tiny.model(torch.tensor([chunk[:-1]])).logits[0, window // 2 :]
        expected = torch.nn.functional.cross_entropy(
            logits.float(), torch.tensor(chunk[window // 2 + 1 :]), reduction="none"
        )
        np.testing.assert_allclose(document.token_nll, expected.numpy(), rtol=RTOL, atol=1e-6)


# --- windows: every token scored exactly once ----------------------------------

LENGTHS = [2, 3, 7, 16, 17, 40]
DOCUMENT_CASES = [
    ("rolling", 1, None),
    ("rolling", 2, None),
    ("rolling", 5, None),
    ("rolling", 16, None),
    ("rolling", 64, None),
    ("sliding", 2, 1),
    ("sliding", 5, 2),
    ("sliding", 8, 3),
    ("sliding", 16, 16),
    ("sliding", 64, 7),
]


@pytest.mark.parametrize(("protocol", "window_size", "stride"), DOCUMENT_CASES)
def test_each_token_scored_once(bigram, table, protocol, window_size, stride):
    documents = [random_ids(n, seed=n) for n in LENGTHS]
    corpus = corpus_of(*map(text_of, documents))
    results = score(bigram, corpus, protocol=protocol, window_size=window_size, stride=stride)
    for result, tokens in zip(results, documents, strict=True):
        assert result.num_tokens == len(tokens)
        np.testing.assert_allclose(result.token_nll, bigram_nll(table, tokens, BOS), rtol=RTOL)


@pytest.mark.parametrize("window_size", [3, 4, 7, 16, 33])
def test_llama_cpp_scores_second_halves(bigram, table, window_size):
    stream = random_ids(100, seed=9)
    results = score(
        bigram, corpus_of(text_of(stream)), protocol="llama-cpp", window_size=window_size
    )
    assert len(results) == len(stream) // window_size
    for index, result in enumerate(results):
        begin = index * window_size
        targets = list(range(begin + window_size // 2 + 1, begin + window_size))
        previous = np.asarray(stream)[np.asarray(targets) - 1]
        expected = -table[previous, np.asarray(stream)[targets]]
        assert result.num_tokens == window_size - 1 - window_size // 2
        np.testing.assert_allclose(result.token_nll, expected, rtol=RTOL)


def test_llama_cpp_window_two_rejected(bigram):
    with pytest.raises(ConfigError, match="--window-size must be at least 3"):
        resolve_settings(ScoringSettings("llama-cpp", window_size=2), bigram)


# --- aggregation ----------------------------------------------------------------


# A long document mostly on the cycle (low NLL) and a short one off it (high NLL).
ON_CYCLE = [4 + (i % 12) for i in range(40)]
OFF_CYCLE = [9, 4, 12]


def test_mean_nll_token_weighted():
    table = cycle_table(VOCAB, 0.9)
    loaded = loaded_model(bigram_llama(table))
    corpus = corpus_of(text_of(ON_CYCLE), text_of(OFF_CYCLE))
    metrics = corpus_metrics(score(loaded, corpus, window_size=8, batch_size=2), "rolling")
    total = bigram_nll(table, ON_CYCLE, BOS).sum() + bigram_nll(table, OFF_CYCLE, BOS).sum()
    assert metrics["num_tokens"] == 43
    assert metrics["mean_nll"] == pytest.approx(total / 43, rel=RTOL)


@pytest.mark.parametrize("unit", ["document", "window", "batch"])
def test_mean_of_means_differs(unit):
    loaded = loaded_model(bigram_llama(cycle_table(VOCAB, 0.9)))
    corpus = corpus_of(text_of(ON_CYCLE), text_of(OFF_CYCLE))
    settings = resolve_settings(ScoringSettings(window_size=8, batch_size=2), loaded)
    results = score_corpus(loaded, corpus, settings)
    metrics = corpus_metrics(results, "rolling")
    if unit == "document":
        means = [r.token_nll.mean() for r in results]
    else:
        windows = [w for u in build_units(loaded, corpus.documents, settings) for w in u.windows]
        token_nll = {r.index: r.token_nll for r in results}
        per_window = [
            token_nll[w.document][w.first_target : w.first_target + w.num_scored] for w in windows
        ]
        if unit == "window":
            means = [part.mean() for part in per_window]
        else:
            scorer = WindowScorer(loaded.model, batch_size=2)
            batches = scorer.batches(windows)
            means = [np.concatenate([per_window[i] for i in batch]).mean() for batch in batches]
    assert metrics["mean_nll"] != pytest.approx(np.mean(means), rel=1e-3)


# --- half precision -------------------------------------------------------------


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half(request, table):
    dtype = getattr(torch, request.param)
    return loaded_model(bigram_llama(table).to(dtype))


def half_reference(half: LoadedModel, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the model's own logits and their float32 NLL for ``tokens`` after BOS."""
    with torch.no_grad():
        logits = half.model(torch.tensor([[BOS, *tokens[:-1]]])).logits[0]
    targets = torch.tensor(tokens)
    nll = -torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(tokens)), targets]
    return logits, nll


def test_half_log_softmax_in_float32(half):
    tokens = random_ids(300, seed=10)
    document = score(half, corpus_of(text_of(tokens)), window_size=512)[0]
    _, expected = half_reference(half, tokens)
    assert document.token_nll.dtype == np.float64
    np.testing.assert_allclose(document.token_nll, expected.double().numpy(), rtol=0, atol=2e-6)


def test_half_log_softmax_variant_differs(half):
    tokens = random_ids(300, seed=10)
    logits, expected = half_reference(half, tokens)
    in_half = -torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (in_half.double() - expected.double()).abs().max() > 1e-4


def test_half_sum_in_float64(half):
    tokens = random_ids(300, seed=10)
    document = score(half, corpus_of(text_of(tokens)), window_size=512)[0]
    _, expected = half_reference(half, tokens)
    assert document.sum_nll == pytest.approx(math.fsum(expected.tolist()), abs=1e-3)
    summed_in_half = expected.to(half.model.dtype).sum().item()
    assert abs(summed_in_half - document.sum_nll) > 0.05


# --- batch size and padding side -----------------------------------------------


@pytest.mark.parametrize("protocol", ["rolling", "sliding", "llama-cpp"])
def test_batch_and_padding_side_change_nothing(tiny, protocol):
    documents = [random_ids(n, seed=n) for n in (2, 9, 30, 63, 64, 100, 5)]
    corpus = corpus_of(*map(text_of, documents))
    base = score(tiny, corpus, protocol=protocol, window_size=16)
    for batch_size, side in [(3, "right"), (3, "left"), (16, "right"), (16, "left")]:
        other = score(
            tiny,
            corpus,
            protocol=protocol,
            window_size=16,
            batch_size=batch_size,
            padding_side=side,
        )
        for a, b in zip(base, other, strict=True):
            np.testing.assert_allclose(b.token_nll, a.token_nll, rtol=RTOL, atol=1e-6)
            assert b.num_correct == a.num_correct


# --- truncation -----------------------------------------------------------------


def test_long_document_windowed_not_truncated(table):
    tokenizer = make_tokenizer(WORDS)
    tokenizer.model_max_length = 8  # a tokenizer limit must not cut the document either
    loaded = loaded_model(bigram_llama(table, max_positions=16), tokenizer)
    tokens = random_ids(100, seed=11)
    document = score(loaded, corpus_of(text_of(tokens)))[0]
    assert document.num_tokens == 100
    np.testing.assert_allclose(document.token_nll, bigram_nll(table, tokens, BOS), rtol=RTOL)


def test_window_above_limit_names_both(table):
    loaded = loaded_model(bigram_llama(table, max_positions=16))
    with pytest.raises(ConfigError) as raised:
        resolve_settings(ScoringSettings(window_size=17), loaded)
    assert "--window-size 17" in str(raised.value)
    assert "position limit of 16" in str(raised.value)


# --- word and byte counts -------------------------------------------------------


def test_bytes_counted_in_utf8(bigram):
    text = "w1 café w2 日本 w3 🙂"
    document = score(bigram, corpus_of(text), window_size=64)[0]
    assert document.num_bytes == len(text.encode("utf-8"))
    assert document.num_bytes != len(text)
    assert document.num_words == 6


def test_byte_perplexity_closed_form(bigram, table):
    text = "w1 café w2 日本 w3"
    tokens = [4, 0, 5, 0, 6]  # café and 日本 are <unk>
    metrics = corpus_metrics(score(bigram, corpus_of(text), window_size=64), "rolling")
    total = bigram_nll(table, tokens, BOS).sum()
    num_bytes = len(text.encode("utf-8"))
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(total / num_bytes), rel=RTOL)
    assert metrics["bits_per_byte"] == pytest.approx(total / num_bytes / math.log(2), rel=RTOL)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(total / 5), rel=RTOL)


def test_counts_from_text_before_normalization(bigram, tmp_path):
    raw = " = Title = \n\n w1 @-@ w2 , w3 . \n"
    path = tmp_path / "wiki.test.raw"
    path.write_text(raw, encoding="utf-8")
    corpus = load_corpus(task="wikitext2", data_files=[str(path)])
    assert corpus.documents[0].text != raw
    metrics = corpus_metrics(score(bigram, corpus, window_size=64), "rolling")
    assert metrics["num_bytes"] == len(raw.encode("utf-8"))
    assert metrics["num_words"] == len(raw.split())


# --- non-finite outputs ---------------------------------------------------------


def test_infinite_nll_names_location():
    table = random_table(VOCAB, seed=0)
    # The model gives w9 no probability after w6: its logit overflows to -inf in float32.
    table[9, 12] = -1e39
    loaded = loaded_model(bigram_llama(table))
    corpus = corpus_of(text_of([4, 5, 6, 7]), text_of([4, 5, 9, 12, 8]))
    with pytest.raises(ScoringError, match=r"\(inf\) in document 1 at token 3;"):
        score(loaded, corpus, window_size=64)


def test_nan_output_raises(table):
    model = bigram_llama(table)
    with torch.no_grad():
        model.lm_head.weight[5] = math.nan
    loaded = loaded_model(model)
    with pytest.raises(ScoringError, match=r"\(nan\) in document 0 at token 0;"):
        score(loaded, corpus_of(text_of([4, 6, 7])), window_size=64)
