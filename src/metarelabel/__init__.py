"""metarelabel: off-policy meta-RL (PEARL) with trajectory relabeling during meta-training."""

__version__ = "0.1.0"


def load_agent(source, checkpoint=None, device=None, seed: int = 12345):
    """A trained agent from a run directory or an exported file (see ``metarelabel.agent``)."""
    from .agent import load_agent as _load

    return _load(source, checkpoint=checkpoint, device=device, seed=seed)
