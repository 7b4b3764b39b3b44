"""lmeval.kl: divergences on hand-computed distributions, edge cases and statistics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmeval import kl
from lmeval.kl import TokenDivergences, TopKSummary

INF = math.inf


def logprobs_of(*rows: list[float]) -> torch.Tensor:
    """Return ``[C, V]`` log-probabilities of explicit probability rows (0 -> -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def value(tensor: torch.Tensor) -> float:
    return float(tensor.reshape(-1)[0])


# Hand-computed values ---------------------------------------------------------------


def test_two_token_kl_both_directions():
    p, q = logprobs_of([0.5, 0.5]), logprobs_of([0.9, 0.1])
    # KL(P || Q) = 0.5 ln(0.5 / 0.9) + 0.5 ln(0.5 / 0.1) = ln(5 / 3).
    assert value(kl.kl_divergence(p, q)) == pytest.approx(math.log(5 / 3), abs=1e-7)
    expected_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert value(kl.kl_divergence(q, p)) == pytest.approx(expected_qp, abs=1e-7)


def test_two_token_js_and_tv():
    p, q = logprobs_of([0.5, 0.5]), logprobs_of([0.9, 0.1])
    m = [0.7, 0.3]
    kl_pm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_qm = 0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    assert value(kl.js_divergence(p, q)) == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-7)
    assert value(kl.js_divergence(q, p)) == pytest.approx(value(kl.js_divergence(p, q)), abs=1e-9)
    assert value(kl.total_variation(p, q)) == pytest.approx(0.4, abs=1e-7)


def test_three_token_with_zero_probability():
    p, q = logprobs_of([0.5, 0.5, 0.0]), logprobs_of([0.25, 0.25, 0.5])
    # p = 0 at the third token adds exactly 0: KL(P || Q) = ln 2.
    assert value(kl.kl_divergence(p, q)) == pytest.approx(math.log(2), abs=1e-7)
    # q > 0 where p = 0 makes KL(Q || P) infinite.
    assert value(kl.kl_divergence(q, p)) == INF
    m = [0.375, 0.375, 0.25]
    expected_js = 0.5 * (2 * 0.5 * math.log(0.5 / m[0])) + 0.5 * (
        2 * 0.25 * math.log(0.25 / m[0]) + 0.5 * math.log(0.5 / m[2])
    )
    assert value(kl.js_divergence(p, q)) == pytest.approx(expected_js, abs=1e-7)
    assert value(kl.total_variation(p, q)) == pytest.approx(0.5, abs=1e-7)


def test_entropy_hand_values():
    assert value(kl.entropy(logprobs_of([0.5, 0.5, 0.0]))) == pytest.approx(math.log(2))
    assert value(kl.entropy(logprobs_of([1.0, 0.0]))) == 0.0


# Zero probabilities and -inf logits -------------------------------------------------


def test_shared_zero_adds_exactly_zero():
    p, q = logprobs_of([1.0, 0.0]), logprobs_of([1.0, 0.0])
    for function in (kl.kl_divergence, kl.js_divergence, kl.total_variation):
        assert value(function(p, q)) == 0.0


def test_disjoint_supports():
    p, q = logprobs_of([1.0, 0.0]), logprobs_of([0.0, 1.0])
    assert value(kl.kl_divergence(p, q)) == INF
    assert value(kl.kl_divergence(q, p)) == INF
    assert value(kl.js_divergence(p, q)) == pytest.approx(math.log(2), abs=1e-7)
    assert value(kl.total_variation(p, q)) == pytest.approx(1.0)


def test_underflowing_p_against_zero_q_is_infinite():
    # exp(-200) underflows to 0 in float32 but p > 0, so KL(P || Q) is +inf, not NaN.
    logits_p = torch.tensor([[0.0, -200.0]])
    logits_q = torch.tensor([[0.0, -INF]])
    p, q = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    assert value(kl.kl_divergence(p, q)) == INF
    assert value(kl.kl_divergence(q, p)) == pytest.approx(0.0, abs=1e-30)


def test_minus_inf_logits_give_no_nan():
    logits = torch.tensor([[2.0, -INF, 0.5, -INF], [-INF, 1.0, -INF, 3.0]])
    other = torch.tensor([[1.0, -INF, -INF, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)
    for function in (kl.kl_divergence, kl.js_divergence, kl.total_variation):
        for a, b in ((p, q), (q, p)):
            assert not torch.isnan(function(a, b)).any(), function.__name__
    assert not torch.isnan(kl.entropy(p)).any()


def test_kl_of_identical_distributions_is_exactly_zero():
    logprobs = torch.log_softmax(
        torch.randn(50, 300, generator=torch.Generator().manual_seed(0)), -1
    )
    assert (kl.kl_divergence(logprobs, logprobs.clone()) == 0).all()
    assert (kl.js_divergence(logprobs, logprobs.clone()) == 0).all()
    assert (kl.total_variation(logprobs, logprobs.clone()) == 0).all()


def test_float16_rounding_keeps_identical_zero():
    logprobs = torch.log_softmax(
        torch.randn(20, 100, generator=torch.Generator().manual_seed(1)), -1
    )
    rounded = kl.round_logprobs(logprobs, torch.float16)
    again = kl.round_logprobs(logprobs.clone(), torch.float16)
    assert (kl.kl_divergence(rounded, again) == 0).all()
    assert torch.allclose(rounded.exp().sum(-1), torch.ones(20), atol=1e-6)


# Agreement with torch.nn.functional.kl_div ------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_kl_div_both_directions(seed):
    generator = torch.Generator().manual_seed(seed)
    model = torch.log_softmax(3 * torch.randn(16, 64, generator=generator), -1)
    reference = torch.log_softmax(3 * torch.randn(16, 64, generator=generator), -1)
    # F.kl_div(input, target) is KL(target || input), with input as log-probabilities.
    kl_model_ref = F.kl_div(reference, model, log_target=True, reduction="none").sum(-1)
    kl_ref_model = F.kl_div(model, reference, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(
        kl.kl_divergence(model, reference), kl_model_ref.double(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        kl.kl_divergence(reference, model), kl_ref_model.double(), rtol=1e-5, atol=1e-6
    )


# Properties on random logits ---------------------------------------------------------

logit_rows = st.lists(
    st.one_of(st.floats(-30, 30, width=32), st.just(-INF)), min_size=2, max_size=12
).filter(lambda row: any(x != -INF for x in row))


@st.composite
def distribution_pairs(draw):
    size = draw(st.integers(2, 12))
    row = logit_rows.filter(lambda r: len(r) >= size).map(lambda r: r[:size])
    row = row.filter(lambda r: any(x != -INF for x in r))
    p = torch.log_softmax(torch.tensor([draw(row)]), -1)
    q = torch.log_softmax(torch.tensor([draw(row)]), -1)
    return p, q


@settings(max_examples=200, deadline=None)
@given(distribution_pairs())
def test_divergences_are_bounded_and_never_nan(pair):
    p, q = pair
    for a, b in ((p, q), (q, p)):
        divergence = value(kl.kl_divergence(a, b))
        assert not math.isnan(divergence)
        # Only float rounding may take the unclamped sum below 0.
        assert divergence >= -1e-6
        js = value(kl.js_divergence(a, b))
        assert -1e-6 <= js <= math.log(2) + 1e-6
        tv = value(kl.total_variation(a, b))
        assert -1e-7 <= tv <= 1 + 1e-6


@settings(max_examples=200, deadline=None)
@given(distribution_pairs(), st.integers(1, 4))
def test_coarsening_never_increases_divergence(pair, k):
    # The data-processing inequality: mapping both distributions onto the same cells
    # (the top k tokens of the reference, plus one bucket) can only lower an
    # f-divergence, in both KL directions as for JS and TV.
    model, reference = pair
    summary = TopKSummary.from_logprobs(reference, k)
    model_cells, reference_cells = summary.coarsen(model), summary.cells()
    pairs = {
        "kl_model_ref": ((model, reference), (model_cells, reference_cells), kl.kl_divergence),
        "kl_ref_model": ((reference, model), (reference_cells, model_cells), kl.kl_divergence),
        "js": ((model, reference), (model_cells, reference_cells), kl.js_divergence),
        "tv": ((model, reference), (model_cells, reference_cells), kl.total_variation),
    }
    for name, (exact_args, coarse_args, function) in pairs.items():
        exact, coarse = value(function(*exact_args)), value(function(*coarse_args))
        assert coarse <= exact + 1e-5 * max(1.0, abs(exact)), name


def test_coarse_cells_are_a_distribution():
    logprobs = torch.log_softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(3)), -1)
    summary = TopKSummary.from_logprobs(logprobs, 5)
    torch.testing.assert_close(summary.cells().exp().sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(summary.coarsen(logprobs), summary.cells())


# Top tokens --------------------------------------------------------------------------


def test_top_overlap_counts_shared_ids():
    model = torch.tensor([[1, 2, 3, 4, 5]])
    reference = torch.tensor([[5, 9, 1, 8, 7]])
    assert float(kl.top_overlap(model, reference)[0]) == pytest.approx(2 / 5)


def test_top_token_ids_with_small_vocabulary():
    logprobs = logprobs_of([0.2, 0.5, 0.3])
    assert kl.top_token_ids(logprobs).tolist() == [[1, 2, 0]]


# Sampled-token estimators ----------------------------------------------------------


def test_sampled_estimators_hand_values():
    # p_model(x) = 0.5, p_ref(x) = 0.25, so r = 0.5.
    k1, k2, k3 = kl.sampled_kl_estimators(np.log([0.5]), np.log([0.25]))
    log_r = math.log(0.5)
    assert k1[0] == pytest.approx(-log_r)
    assert k2[0] == pytest.approx(log_r**2 / 2)
    assert k3[0] == pytest.approx((0.5 - 1) - log_r)


def test_sampled_estimators_zero_probabilities():
    k1, k2, k3 = kl.sampled_kl_estimators(np.array([0.0, -INF, -INF]), np.array([-INF, 0.0, -INF]))
    assert not np.isnan(k1).any()
    assert not np.isnan(k2).any()
    assert not np.isnan(k3).any()
    assert k3[0] == INF
    assert k3[1] == INF
    assert k1[2] == 0.0


# Statistics ---------------------------------------------------------------------------


def divergences(kl_model_ref, kl_ref_model=None, logprob_model=None, logprob_ref=None):
    n = len(kl_model_ref)
    kl_ref_model = kl_model_ref if kl_ref_model is None else kl_ref_model
    zeros = np.zeros(n)
    return TokenDivergences(
        kl_model_ref=np.asarray(kl_model_ref, dtype=np.float64),
        kl_ref_model=np.asarray(kl_ref_model, dtype=np.float64),
        js=zeros,
        tv=zeros,
        entropy_model=zeros,
        entropy_ref=zeros,
        logprob_model=np.log(np.full(n, 0.5)) if logprob_model is None else logprob_model,
        logprob_ref=np.log(np.full(n, 0.25)) if logprob_ref is None else logprob_ref,
        top1_agree=np.arange(n) % 2 == 0,
        top5_overlap=np.full(n, 0.6),
    )


def test_summarize_clamps_and_counts_negative_values():
    part = divergences([-1e-9, 0.0, 0.5, 1.0])
    summary = kl.summarize([part], documents_as_units=False, estimate="exact")
    assert summary["kl_model_ref"]["num_clamped"] == 1
    assert summary["kl_model_ref"]["min_before_clamp"] == -1e-9
    assert summary["kl_model_ref"]["min"] == 0.0
    assert summary["kl_model_ref"]["mean"] == pytest.approx(1.5 / 4)


def test_summarize_percentiles_and_counts():
    values = np.arange(1001, dtype=np.float64) / 1000  # 0.000 .. 1.000
    summary = kl.summarize([divergences(values)], documents_as_units=False, estimate="exact")
    ladder = summary["kl_model_ref"]
    assert ladder["median"] == pytest.approx(0.5)
    assert ladder["p90"] == pytest.approx(0.9)
    assert ladder["p99"] == pytest.approx(0.99)
    assert ladder["p999"] == pytest.approx(0.999)
    assert ladder["max"] == 1.0
    assert summary["num_tokens"] == 1001
    assert summary["top1_agreement"] == pytest.approx(501 / 1001)
    assert summary["top5_overlap"] == pytest.approx(0.6)


def test_summarize_perplexities_and_delta_p():
    summary = kl.summarize([divergences([0.1, 0.2])], documents_as_units=False, estimate="exact")
    assert summary["perplexity_model"] == pytest.approx(2.0)
    assert summary["perplexity_ref"] == pytest.approx(4.0)
    assert summary["log_ppl_ratio"] == pytest.approx(math.log(2 / 4))
    assert summary["k1"] == pytest.approx(-summary["log_ppl_ratio"])
    assert summary["delta_p"]["mean"] == pytest.approx(0.25)
    assert summary["delta_p"]["rms"] == pytest.approx(0.25)


def test_summarize_documents_as_units_stderr():
    parts = [divergences([0.1, 0.3]), divergences([0.5, 0.7, 0.9])]
    summary = kl.summarize(parts, documents_as_units=True, estimate="exact")
    assert summary["kl_model_ref"]["mean"] == pytest.approx(2.5 / 5)
    assert summary["kl_model_ref"]["stderr"] > 0


def test_summarize_infinite_kl():
    summary = kl.summarize([divergences([0.1, INF])], documents_as_units=False, estimate="exact")
    assert summary["kl_model_ref"]["mean"] == INF
    assert summary["kl_model_ref"]["stderr"] is None
    assert summary["kl_model_ref"]["max"] == INF
    assert not math.isnan(summary["kl_model_ref"]["p999"])


def test_summarize_labels_direction_and_estimate():
    summary = kl.summarize([divergences([0.1])], documents_as_units=False, estimate="lower bound")
    assert summary["kl_model_ref"]["direction"].startswith("KL(model || reference)")
    assert summary["kl_ref_model"]["direction"].startswith("KL(reference || model)")
    assert summary["kl_ref_model"]["estimate"] == "lower bound"


def test_kl_histogram_counts_every_token_once():
    values = np.array([0.0, 1e-9, 1e-8, 1.5e-8, 0.5, 99.0, 100.0, INF])
    summary = kl.summarize([divergences(values)], documents_as_units=False, estimate="exact")
    histogram = summary["kl_model_ref"]["histogram"]
    edges = histogram["edges"]
    assert edges[0] == pytest.approx(1e-8)
    assert edges[-1] == pytest.approx(100.0)
    assert len(histogram["counts"]) == len(edges) - 1
    # 0 and 1e-9 lie under the first edge; 100 and inf at or over the last.
    assert histogram["below"] == 2
    assert histogram["above"] == 2
    assert sum(histogram["counts"]) == 4
    # 1e-8 opens the first bin, whose top is 10 ** -7.75 = 1.78e-8.
    assert histogram["counts"][0] == 2
    assert histogram["counts"][edges.index(max(e for e in edges if e <= 0.5))] == 1


def test_delta_p_histogram_bins_by_magnitude():
    values = np.array([-1.0, -0.01, 0.0, 1e-7, 0.3, 1.0])
    histogram = kl.signed_log_histogram(values)
    edges = histogram["edges"]
    assert edges[0] == -1.0
    assert edges[-1] == 1.0
    middle = edges.index(-1e-6)
    assert edges[middle + 1] == 1e-6
    assert histogram["counts"][middle] == 2  # 0 and 1e-7
    assert histogram["counts"][0] == 1  # -1 opens the first bin
    assert histogram["counts"][-1] == 1  # 1 closes the last one
    assert histogram["counts"][edges.index(-0.01)] == 1
    assert sum(histogram["counts"]) == 6
    assert histogram["below"] == 0
    assert histogram["above"] == 0


def test_summarize_stores_delta_p_histogram():
    summary = kl.summarize([divergences([0.1, 0.2])], documents_as_units=False, estimate="exact")
    histogram = summary["delta_p"]["histogram"]
    # Every token has delta p = 0.5 - 0.25, in the bin from 10 ** -0.75 = 0.178.
    assert sum(histogram["counts"]) == 2
    bin_start = max(edge for edge in histogram["edges"] if edge <= 0.25)
    assert histogram["counts"][histogram["edges"].index(bin_start)] == 2
