"""Per-token output of a perplexity run: one Parquet row per scored token.

The file is plain Parquet written with pyarrow, so ``pandas.read_parquet``,
``polars.read_parquet`` and ``datasets.Dataset.from_parquet`` read it as it is.
Rows are in document order, then in token order within a document.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmeval.perplexity import DocumentResult

TOKENS_FILE = "tokens.parquet"

SCHEMA = pa.schema(
    [
        pa.field("document_index", pa.int32()),
        pa.field("document_id", pa.dictionary(pa.int32(), pa.string())),
        pa.field("position", pa.int32()),
        pa.field("window_position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("token", pa.string()),
        pa.field("token_nll", pa.float64()),
        pa.field("correct", pa.bool_()),
        pa.field("top1_prob", pa.float32()),
        pa.field("entropy", pa.float32()),
    ],
    metadata={
        b"position": b"index of the token among its document's scored tokens",
        b"window_position": b"index of the predicting input within its window; "
        b"the model saw window_position + 1 tokens, the prefix token included",
        b"token_nll": b"-log p(token | context) in nats",
        b"entropy": b"entropy of the predicted distribution in nats (null if not computed)",
    },
)


def write_tokens(path: str | Path, documents: Sequence[DocumentResult], tokenizer) -> int:
    """Write every scored token of ``documents`` to the Parquet file ``path``.

    The file is written next to ``path`` under a temporary name and renamed, so a
    crash never leaves a partial file.

    Returns:
        The number of rows written.

    Raises:
        ValueError: when a scored document has no per-token arrays (a document read
            back from documents.jsonl by a resumed run).
    """
    path = Path(path)
    scored = [d for d in documents if d.skipped is None]
    missing = [d.index for d in scored if len(d.token_nll) != d.num_tokens]
    if missing:
        raise ValueError(
            f"documents {missing[:5]} have no per-token values (scored by an earlier run "
            "that was resumed), so tokens.parquet would be incomplete"
        )
    table = _token_table(scored, tokenizer)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        pq.write_table(table, temporary)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return table.num_rows


def _token_table(documents: Sequence[DocumentResult], tokenizer) -> pa.Table:
    lengths = [d.num_tokens for d in documents]
    token_ids = _concatenate([d.target_ids for d in documents], np.int32)
    # Decode each distinct id once: a corpus repeats a vocabulary of at most V ids.
    distinct, inverse = np.unique(token_ids, return_inverse=True)
    pieces = np.array([tokenizer.decode([int(i)]) for i in distinct], dtype=object)
    if documents and all(d.entropy is not None for d in documents):
        entropy = pa.array(_concatenate([d.entropy for d in documents], np.float32))
    else:
        entropy = pa.nulls(len(token_ids), pa.float32())
    document_ids = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(documents), dtype=np.int32), lengths)),
        pa.array([d.id for d in documents], pa.string()),
    )
    columns = {
        "document_index": np.repeat(np.array([d.index for d in documents], np.int32), lengths),
        "document_id": document_ids,
        "position": _concatenate([np.arange(n) for n in lengths], np.int32),
        "window_position": _concatenate([d.window_position for d in documents], np.int32),
        "token_id": token_ids,
        "token": pa.array(pieces[inverse] if len(token_ids) else [], pa.string()),
        "token_nll": _concatenate([d.token_nll for d in documents], np.float64),
        "correct": _concatenate([d.correct for d in documents], np.bool_),
        "top1_prob": _concatenate([d.top1_prob for d in documents], np.float32),
        "entropy": entropy,
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _concatenate(parts: Sequence[np.ndarray], dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts).astype(dtype, copy=False)
