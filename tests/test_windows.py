"""Windowing on integer lists: hand-written windows and the scored-once invariant."""

from collections import Counter

import pytest

from lmeval.windows import (
    Window,
    iter_scored_positions,
    llama_cpp_chunks,
    rolling_windows,
    sliding_windows,
)

BOS = 100


def scored_tokens(window: Window) -> list[int]:
    return window.target_ids[window.score_start :]


def test_rolling_single_window_starts_from_prefix():
    windows = rolling_windows([1, 2, 3], BOS, window_size=4)
    assert windows == [Window([BOS, 1, 2], [1, 2, 3], 0, 0)]


def test_rolling_full_windows_use_one_token_context():
    windows = rolling_windows(list(range(1, 9)), BOS, window_size=4)
    assert windows[0] == Window([BOS, 1, 2, 3], [1, 2, 3, 4], 0, 0)
    assert windows[1] == Window([4, 5, 6, 7], [5, 6, 7, 8], 0, 4)
    assert len(windows) == 2


def test_rolling_partial_last_window_gets_full_context():
    windows = rolling_windows(list(range(1, 7)), BOS, window_size=4)
    # Tokens 5 and 6 remain: the window contains the 4 inputs before them.
    assert windows[1] == Window([2, 3, 4, 5], [3, 4, 5, 6], 2, 4)


def test_sliding_windows_hand_written():
    windows = sliding_windows(list(range(1, 8)), BOS, window_size=4, stride=2)
    assert windows[0] == Window([BOS, 1, 2, 3], [1, 2, 3, 4], 0, 0)
    assert windows[1] == Window([2, 3, 4, 5], [3, 4, 5, 6], 2, 4)
    assert windows[2] == Window([4, 5, 6], [5, 6, 7], 2, 6)
    assert len(windows) == 3


def test_sliding_context_at_least_window_minus_stride():
    tokens = list(range(1, 40))
    for window in sliding_windows(tokens, BOS, window_size=8, stride=3)[1:]:
        assert window.score_start >= 8 - 3


def test_llama_cpp_chunks_hand_written():
    stream = list(range(10, 30))  # 20 tokens, 2 full chunks of 8, 4 dropped
    chunks = llama_cpp_chunks(stream, window_size=8, bos_token=BOS)
    assert len(chunks) == 2
    assert chunks[0].input_ids == [BOS, 11, 12, 13, 14, 15, 16]
    assert scored_tokens(chunks[0]) == [15, 16, 17]
    assert scored_tokens(chunks[1]) == [23, 24, 25]
    assert chunks[1].input_ids[0] == BOS


def test_llama_cpp_chunks_without_bos_keep_first_token():
    chunks = llama_cpp_chunks(list(range(8)), window_size=8, bos_token=None)
    assert chunks[0].input_ids[0] == 0


def test_llama_cpp_scored_per_chunk():
    chunks = llama_cpp_chunks(list(range(512 * 3)), window_size=512, bos_token=None)
    assert [chunk.num_scored for chunk in chunks] == [255, 255, 255]


LENGTHS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 64, 100]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("window_size", [1, 2, 3, 4, 8, 16])
def test_rolling_scores_every_token_once(length, window_size):
    tokens = list(range(1000, 1000 + length))
    windows = rolling_windows(tokens, BOS, window_size)
    assert_scored_once(tokens, windows, window_size)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(
    ("window_size", "stride"), [(1, 1), (4, 1), (4, 2), (4, 4), (8, 3), (16, 5)]
)
def test_sliding_scores_every_token_once(length, window_size, stride):
    tokens = list(range(1000, 1000 + length))
    windows = sliding_windows(tokens, BOS, window_size, stride)
    assert_scored_once(tokens, windows, window_size)


def assert_scored_once(tokens: list[int], windows: list[Window], window_size: int) -> None:
    positions = Counter(p for window in windows for p in iter_scored_positions(window))
    assert sorted(positions) == list(range(len(tokens)))
    assert set(positions.values()) == {1}
    for window in windows:
        assert len(window.input_ids) <= window_size
        assert len(window.input_ids) == len(window.target_ids)
        assert (
            scored_tokens(window)
            == tokens[window.first_target : window.first_target + window.num_scored]
        )
    # The first token is predicted from the prefix, never from nothing.
    assert windows[0].input_ids[0] == BOS


def test_sliding_rejects_stride_above_window():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows([1, 2, 3], BOS, window_size=2, stride=3)


def test_window_size_zero_rejected():
    with pytest.raises(ValueError, match="window_size"):
        rolling_windows([1, 2], BOS, window_size=0)
