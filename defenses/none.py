"""No defense: the plain split model (channel options such as bottleneck and noise still apply)."""

from privbench.plugin.base import Defense


class NoDefense(Defense):
    """Trains the split model with cross-entropy only."""

    name = "none"
    summary = "no regularizer (bottleneck / noise stay available as channel options)"
