"""A transformers TrainerCallback that logs how far a model drifts during training.

:class:`KLDriftCallback` compares the model being trained with a frozen reference on a
fixed set of held-out texts, exactly (over whole distributions), at the start of
training and every N optimizer steps. The reference is either a second model (a copy
made before training) or the trained model itself with its PEFT adapters disabled,
which needs no second copy.

The values are logged with ``trainer.log``, so they land in
``trainer.state.log_history`` and reach every reporting integration (TensorBoard,
Weights & Biases, ...) like the training loss. A callback's own ``on_log`` is too late
for that. In transformers 5.25, ``Trainer.log`` appends to ``log_history`` before it
calls ``on_log``. The integrations' callbacks also come before any callback passed to
the Trainer, so a value added to ``logs`` in ``on_log`` reaches neither.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from lmeval.errors import ConfigError
from lmeval.kl import TokenDivergences, summarize
from lmeval.kl_scoring import (
    LiveReference,
    adapters_disabled,
    check_vocabularies,
    compare_windows,
    default_kl_chunk_size,
    token_list,
)
from lmeval.scoring import WindowScorer, prefix_token_id
from lmeval.windows import Window, rolling_windows

logger = logging.getLogger(__name__)

#: Window used when neither the caller nor the model's position limit sets one.
DEFAULT_WINDOW_SIZE = 512

#: Logged names (after the prefix) and where each value sits in the metrics object.
LOGGED_VALUES = {
    "kl_model_ref": ("kl_model_ref", "mean"),
    "kl_model_ref_p99": ("kl_model_ref", "p99"),
    "kl_model_ref_max": ("kl_model_ref", "max"),
    "kl_ref_model": ("kl_ref_model", "mean"),
    "kl_ref_model_p99": ("kl_ref_model", "p99"),
    "kl_ref_model_max": ("kl_ref_model", "max"),
    "js": ("js",),
    "top1_agreement": ("top1_agreement",),
    "top5_overlap": ("top5_overlap",),
    "delta_p_rms": ("delta_p", "rms"),
    "log_ppl_ratio": ("log_ppl_ratio",),
    "perplexity_model": ("perplexity_model",),
    "perplexity_ref": ("perplexity_ref",),
    "k1": ("k1",),
    "k2": ("k2",),
    "k3": ("k3",),
}


class KLDriftCallback(TrainerCallback):
    """Log the exact KL divergence of the model being trained from a frozen reference.

    Add it with ``trainer.add_callback(KLDriftCallback(trainer, texts, ...))``. Every
    value is a per-token mean (or percentile) over the scored tokens of ``texts``. The
    names are ``{prefix}kl_model_ref`` for KL(model ‖ reference), ``{prefix}kl_ref_model``
    for KL(reference ‖ model), and the others of :data:`LOGGED_VALUES`.

    Args:
        trainer: the Trainer the callback is added to; its ``log`` delivers the values.
        texts: held-out texts, tokenized once when training starts.
        reference: a frozen copy of the model from before training, on the model's
            device, or None to compare with the trained model with its PEFT adapters
            disabled.
        tokenizer: the tokenizer of both models; default ``trainer.processing_class``.
        every_n_steps: log after every N optimizer steps.
        at_start: also log before the first step (step 0, where KL is 0).
        window_size: tokens per window; default the model's position limit, at most
            :data:`DEFAULT_WINDOW_SIZE`. Longer texts are cut into rolling windows.
        batch_size: windows per forward pass.
        chunk_size: positions per logits chunk; None picks one from the vocabulary.
        prefix: prepended to every logged name.

    Raises:
        ConfigError: on empty ``texts``, ``every_n_steps`` below 1, or no reference and
            a model without PEFT adapters.
    """

    def __init__(
        self,
        trainer,
        texts: Sequence[str],
        *,
        reference: torch.nn.Module | None = None,
        tokenizer=None,
        every_n_steps: int = 50,
        at_start: bool = True,
        window_size: int | None = None,
        batch_size: int = 1,
        chunk_size: int | None = None,
        prefix: str = "drift/",
    ) -> None:
        if not texts:
            raise ConfigError("KLDriftCallback needs at least one held-out text")
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if reference is None:
            adapters_disabled(trainer.model)  # raises unless the model has adapters
        else:
            reference.eval().requires_grad_(False)
        self.trainer = trainer
        self.texts = list(texts)
        self.reference = reference
        self.tokenizer = tokenizer or getattr(
            trainer.processing_class, "tokenizer", trainer.processing_class
        )
        if self.tokenizer is None:
            raise ConfigError("KLDriftCallback needs a tokenizer: pass tokenizer=...")
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.window_size = window_size
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.prefix = prefix
        #: Every logged entry: ``{"step": ..., name: value, ...}``, in order.
        self.history: list[dict] = []
        self._windows: list[Window] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start:
            self._log(model or self.trainer.model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._log(model or self.trainer.model, state, control)

    def compute(self, model: torch.nn.Module | None = None) -> dict:
        """Compare ``model`` (default the trainer's) with the reference now.

        Returns:
            The ``metrics`` object of :func:`lmeval.kl.summarize`, exact.
        """
        model = model or self.trainer.model
        windows = self._prepare_windows(model)
        vocabulary_size = self._vocabulary_size(model)
        chunk_size = self.chunk_size or default_kl_chunk_size(vocabulary_size)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model_scorer = self._scorer(model, chunk_size)
                reference = self._reference_side(model, chunk_size, vocabulary_size)
                parts = compare_windows(model_scorer, reference, windows, vocabulary_size)
        finally:
            model.train(was_training)
        documents = _by_document(windows, parts)
        return summarize(documents, documents_as_units=len(documents) >= 2, estimate="exact")

    def _log(self, model, state, control) -> None:
        values = self._logged_values(self.compute(model))
        self.history.append({"step": state.global_step, **values})
        # Trainer.log ends in on_log, which clears control.should_log. The flag is put
        # back so that the trainer still logs its loss when this is a logging step.
        should_log = control.should_log
        self.trainer.log(dict(values))
        control.should_log = should_log

    def _logged_values(self, metrics: dict) -> dict[str, float]:
        values = {}
        for name, path in LOGGED_VALUES.items():
            value = metrics
            for key in path:
                value = value[key]
            values[f"{self.prefix}{name}"] = float(value)
        return values

    def _prepare_windows(self, model) -> list[Window]:
        if self._windows is not None:
            return self._windows
        window_size = self.window_size or min(
            getattr(model.config, "max_position_embeddings", None) or DEFAULT_WINDOW_SIZE,
            DEFAULT_WINDOW_SIZE,
        )
        prefix = prefix_token_id(self.tokenizer)
        encodings = self.tokenizer(self.texts, add_special_tokens=False)["input_ids"]
        windows = []
        for index, tokens in enumerate(encodings):
            if tokens:
                windows += rolling_windows(tokens, prefix, window_size, document=index)
        if not windows:
            raise ConfigError("the held-out texts of KLDriftCallback contain no tokens")
        self._windows = windows
        return windows

    def _vocabulary_size(self, model) -> int:
        tokens = token_list(self.tokenizer)
        reference = self.reference if self.reference is not None else model
        vocabulary = check_vocabularies(
            tokens, tokens, _output_rows(model), _output_rows(reference)
        )
        return vocabulary.size

    def _scorer(self, model, chunk_size: int) -> WindowScorer:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        return WindowScorer(
            model, batch_size=self.batch_size, chunk_size=chunk_size, pad_token_id=pad
        )

    def _reference_side(self, model, chunk_size: int, vocabulary_size: int) -> LiveReference:
        if self.reference is not None:
            return LiveReference(self._scorer(self.reference, chunk_size), vocabulary_size)
        return LiveReference(
            self._scorer(model, chunk_size),
            vocabulary_size,
            context=lambda: adapters_disabled(model),
        )


def _output_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _by_document(windows: Sequence[Window], parts: Sequence[TokenDivergences]) -> list:
    """Join per-window results into one part per document."""
    documents: dict[int, list[TokenDivergences]] = {}
    for window, part in zip(windows, parts, strict=True):
        documents.setdefault(window.document, []).append(part)
    return [TokenDivergences.concatenate(items) for items in documents.values()]
