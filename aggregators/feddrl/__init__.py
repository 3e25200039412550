"""FedDRL: staged reinforcement-learning fusion of client models against malicious clients.

``features`` (what the agents see of each client model), ``agents`` (A2C keep/drop, TD3
weights), ``replay`` (TD3's replay buffer) and ``aggregator`` (the ``FedDRL`` aggregator, which
registers as ``"feddrl"``). Everything is re-exported here: import from
``fedmerge.aggregators.feddrl``.
"""

from fedmerge.aggregators.feddrl.agents import A2CAgent, A2CConfig, SetCritic, TD3Agent, TD3Config
from fedmerge.aggregators.feddrl.aggregator import HORIZONS, SELECT_STAGE1, SELECT_STAGE2, FedDRL
from fedmerge.aggregators.feddrl.features import FEATURES, LOG_CLIP, client_features
from fedmerge.aggregators.feddrl.replay import ReplayBuffer

__all__ = [
    "A2CAgent",
    "A2CConfig",
    "FEATURES",
    "FedDRL",
    "HORIZONS",
    "LOG_CLIP",
    "ReplayBuffer",
    "SELECT_STAGE1",
    "SELECT_STAGE2",
    "SetCritic",
    "TD3Agent",
    "TD3Config",
    "client_features",
]
