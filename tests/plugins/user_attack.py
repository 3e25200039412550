"""A user's own attack kind, registered by name: every malicious client trains on one class only
and sends its update scaled by ``scale``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmerge.aggregators.params import hyperparameter
from fedmerge.clients.attacks import Attack, register_attack


@register_attack("one_class_boost")
class OneClassBoost(Attack):
    @dataclass(frozen=True)
    class Params:
        label: int = hyperparameter(0, "the label every training example gets", ge=0)
        scale: float = hyperparameter(3.0, "the update sent is scale times the honest one", gt=0)

    def poison_data(self, data, *, num_classes, rng):
        return type(data)(data.x, np.full_like(data.y, self.params.label))

    def poison_state(self, state, global_state, *, generator):
        return {
            k: global_state[k] + self.params.scale * (v - global_state[k])
            if v.is_floating_point()
            else v
            for k, v in state.items()
        }
