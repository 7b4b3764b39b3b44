"""Functions of the local WikiText task: lm-evaluation-harness's own, imported unchanged."""

from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results,
    wikitext_detokenizer,
)
