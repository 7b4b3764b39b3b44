"""lmeval: perplexity and KL-divergence evaluation of causal language models."""

__version__ = "0.1.0"
