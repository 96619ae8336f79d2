"""The names plugin authors import: `from privbench.plugins import Attack, Defense`.

The interfaces live in privbench.plugin.base; this module keeps the documented import path.
"""

from privbench.plugin.base import Attack, Defense, Target, TrainContext, takes_keyword

__all__ = ["Attack", "Defense", "Target", "TrainContext", "takes_keyword"]
