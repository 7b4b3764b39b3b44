"""lmeval: perplexity and KL-divergence evaluation of causal language models."""

__version__ = "0.1.0"

__all__ = ["KLDriftCallback", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `import lmeval` does not import torch.
    if name == "KLDriftCallback":
        from lmeval.callbacks import KLDriftCallback

        return KLDriftCallback
    raise AttributeError(f"module 'lmeval' has no attribute {name!r}")
