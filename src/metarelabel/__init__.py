"""metarelabel: off-policy meta-RL (PEARL) with trajectory relabeling during meta-training."""

__version__ = "0.1.0"
