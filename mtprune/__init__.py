"""mtprune: prune machine-translation training data by EL2N scores and measure the cost in BLEU."""

__version__ = "0.1.0"
