"""Simulated malicious and low-quality clients, for robustness experiments (FedDRL, Krum, ...).

An attack is chosen by the run's ``[attack]`` section (``AttackConfig``): its ``kind``, the
``fraction`` of clients that are malicious and a ``seed``. Which clients are malicious is a pure
function of (seed, num_clients, fraction) (``malicious_clients``), so the clients decide it for
themselves from the run config and the server records the same set as ground truth for the
detection metrics.

Two families, applied by ``fedmerge.clients.app`` to the chosen clients only:

- data attacks change the client's training data before it trains (``attack_data``):
  ``label_flip`` (label y becomes C − 1 − y), ``noisy_labels`` (a share ``label_noise`` of the
  labels is redrawn uniformly), ``tiny`` (the client keeps only a share ``tiny_fraction`` of its
  shard);
- model attacks change the reply after honest training (``attack_state``): ``noise`` (the update
  is replaced by Gaussian noise, θ' = θt + ε, ε ~ N(0, noise_std²)), ``sign_flip`` (θ' = θt −
  flip_scale · (θ − θt)).

``count_factor`` multiplies the example count a malicious client reports, whatever its kind;
``inflate`` is the attack that does only that. Note that the spine's reply validation
(``federation.validation``) refuses a count above the client's shard size, so an inflation that
exceeds the shard is rejected there rather than reaching the aggregator.

A kind of one's own is an ``Attack`` subclass found like any plug-in (``fedmerge.plugins``): a
name registered with ``@register_attack``, a ``module:Class`` path, or an entry point of the
``fedmerge.attacks`` group; its own settings go in ``[attack.params]``, checked against its
``Params``. The built-in kinds keep their fields of ``[attack]``.

Everything random is seeded from the attack seed and the client (its id, or its seed of the
round), so the same run config gives the same attack. Pure NumPy and torch: no flwr or ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fedmerge.aggregators.params import ParamSpec, check, check_fields, describe, hyperparameter
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.plugins import PluginError, Registry, concrete_subclass

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "Attack",
    "DATA_ATTACKS",
    "MODEL_ATTACKS",
    "AttackConfig",
    "attack_data",
    "attack_params",
    "attack_state",
    "client_attack",
    "is_malicious",
    "malicious_clients",
    "register_attack",
    "reported_count",
    "summary",
]

DATA_ATTACKS = ("label_flip", "noisy_labels", "tiny")
MODEL_ATTACKS = ("noise", "sign_flip")
ATTACK_KINDS = ("none", *MODEL_ATTACKS, *DATA_ATTACKS, "inflate")

# Separates the attack's random streams from every other use of the same seed.
_STREAM_CHOICE, _STREAM_DATA, _STREAM_MODEL = 0xA77AC, 0xDA7A, 0x30DE1


class Attack:
    """A kind of misbehaviour of one's own. A malicious client calls ``poison_data`` on its
    training data before it trains and ``poison_state`` on its weights after (each leaves its
    input alone unless overridden). ``rng`` / ``generator`` are seeded from the attack seed and
    the client (data: its id; weights: its seed of the round). Settings are a frozen ``Params``
    dataclass of ``hyperparameter`` fields, set in ``[attack.params]`` and checked into
    ``self.params``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type | None] = None

    def __init__(self, **params: Any) -> None:
        label = f"attack {self.name or type(self).__qualname__!r}"
        if type(self).Params is None:
            if params:
                raise TypeError(f"{label} takes no parameters; got {', '.join(sorted(params))}")
            self.params: Any = None
        else:
            self.params = check(label, type(self).Params, params)

    def poison_data(
        self, data: ArrayData, *, num_classes: int, rng: np.random.Generator
    ) -> ArrayData:
        return data

    def poison_state(
        self,
        state: Mapping[str, torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        *,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        return dict(state)


ATTACKS: Registry[type[Attack]] = Registry(
    "attack",
    "fedmerge.attacks",
    accept=concrete_subclass(Attack, "a fedmerge.clients.attacks.Attack subclass"),
    how_to=(
        "Built-in kinds: " + ", ".join(ATTACK_KINDS) + ". To plug one in: decorate an Attack "
        'subclass with @register_attack("name") in a module listed in [run] plugins, give its '
        'import path "package.module:Class", or expose it under the entry-point group '
        '"fedmerge.attacks"; its settings go in [attack.params].'
    ),
)


def register_attack(name: str):
    """Class decorator: make an ``Attack`` subclass the attack kind ``name``."""

    def decorator(cls: type[Attack]) -> type[Attack]:
        if name in ATTACK_KINDS:
            raise ValueError(f"attack kind {name!r} is built in; choose another name")
        ATTACKS.add(name, cls)
        if not cls.name:
            cls.name = name
        return cls

    return decorator


def plugin_attack(config: AttackConfig) -> Attack | None:
    """The ``Attack`` a plug-in kind names, built with ``[attack.params]``; None for a built-in."""
    if config.kind in ATTACK_KINDS:
        return None
    cls = ATTACKS.resolve(config.kind)
    try:
        return cls(**config.params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params: {exc}") from None


@dataclass(frozen=True)
class AttackConfig:
    """Which clients misbehave and how; ``kind = "none"`` (the default) simulates no attack."""

    kind: str = hyperparameter(
        "none",
        "none | noise | sign_flip | label_flip | noisy_labels | tiny | inflate, or a plug-in "
        "Attack (registered name, module:Class, fedmerge.attacks entry point)",
    )
    fraction: float = hyperparameter(
        0.0,
        "share of the clients that are malicious: round(fraction * num_clients) of them",
        ge=0,
        le=1,
    )
    seed: int = hyperparameter(
        0, "chooses the malicious clients and seeds the attacks' noise", ge=0
    )
    noise_std: float = hyperparameter(
        0.5, "noise: std of the Gaussian noise sent instead of the update", gt=0
    )
    flip_scale: float = hyperparameter(
        4.0, "sign_flip: the update sent is -flip_scale times the honest one", gt=0
    )
    label_noise: float = hyperparameter(
        0.8, "noisy_labels: share of the client's labels redrawn uniformly at random", gt=0, le=1
    )
    tiny_fraction: float = hyperparameter(
        0.02, "tiny: share of its shard a client keeps (at least one example)", gt=0, le=1
    )
    count_factor: float = hyperparameter(
        1.0, "malicious clients report this many times their example count (any kind)", gt=0
    )
    params: dict[str, Any] = field(
        default_factory=dict,
        metadata={"doc": "a plug-in kind's own settings, checked against its Params"},
    )

    def __post_init__(self) -> None:
        # The message starts with the field's name: the config parser puts "attack." before it.
        for name, value in check_fields("", self).items():
            object.__setattr__(self, name, value)
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params must be a table, got {type(self.params).__name__}")
        object.__setattr__(self, "params", dict(self.params))
        if self.kind in ATTACK_KINDS:
            if self.params:
                raise ValueError(
                    f"params is only for a plug-in attack kind; {self.kind!r} is built in "
                    "(its settings are fields of [attack])"
                )
        else:
            try:
                plugin_attack(self)  # resolves the kind and checks its params
            except PluginError as exc:
                raise ValueError(f"kind: {exc}") from None
        if self.kind == "inflate" and self.count_factor == 1.0:
            raise ValueError(
                "count_factor=1.0 is invalid for kind 'inflate': it must differ from 1 "
                "(inflate only changes the reported example count)"
            )

    @property
    def active(self) -> bool:
        """True when some client misbehaves."""
        return self.kind != "none" and self.fraction > 0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AttackConfig:
        """Rebuild from ``dataclasses.asdict`` output (what the clients receive in the run config)."""
        return cls(**dict(raw))


ATTACK_SPECIFIC = {
    "noise": ("noise_std",),
    "sign_flip": ("flip_scale",),
    "noisy_labels": ("label_noise",),
    "tiny": ("tiny_fraction",),
    "label_flip": (),
    "inflate": (),
    "none": (),
}
"""The parameters only one kind reads; the others (kind, fraction, seed, count_factor) every kind."""


def attack_params(kind: str | None = None) -> list[ParamSpec]:
    """The declared ``[attack]`` parameters (``fedmerge list --attack KIND``): all of them, or
    those ``kind`` reads. An unknown kind is a ValueError with a "did you mean"."""
    specs = describe(AttackConfig)
    if kind is None:
        return specs
    specific = {name for names in ATTACK_SPECIFIC.values() for name in names}
    if kind not in ATTACK_SPECIFIC and kind in ATTACKS.available() or ":" in kind:
        cls = ATTACKS.resolve(kind)
        own = [] if cls.Params is None else describe(cls.Params)
        common = [s for s in specs if s.name not in specific and s.name != "params"]
        return common + [dataclasses.replace(s, name=f"params.{s.name}") for s in own]
    if kind not in ATTACK_SPECIFIC:
        import difflib

        close = difflib.get_close_matches(kind, ATTACK_KINDS, n=1) if len(kind) <= 100 else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        shown = repr(kind) if len(kind) <= 80 else f"{kind[:80]!r}... ({len(kind):,} characters)"
        raise ValueError(
            f"unknown attack kind {shown}.{hint} Available: "
            f"{', '.join([*ATTACK_KINDS, *ATTACKS.available()])}"
        )
    return [
        s
        for s in specs
        if (s.name not in specific or s.name in ATTACK_SPECIFIC[kind]) and s.name != "params"
    ]


def malicious_clients(seed: int, num_clients: int, fraction: float) -> list[int]:
    """The malicious clients' ids, sorted: round(fraction · num_clients) of 0..num_clients−1 drawn
    without replacement by a generator seeded with ``seed`` alone (pure function)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} is invalid: must be an integer >= 1")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: must be in [0, 1]")
    count = int(round(fraction * num_clients))
    if count == 0:
        return []
    rng = np.random.default_rng([seed, _STREAM_CHOICE])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def is_malicious(config: AttackConfig, client_id: int, num_clients: int) -> bool:
    return config.active and client_id in malicious_clients(
        config.seed, num_clients, config.fraction
    )


def attack_data(
    config: AttackConfig, data: ArrayData, *, num_classes: int, client_id: int
) -> ArrayData:
    """A malicious client's training data under a data attack (other kinds: ``data`` unchanged).

    Seeded by (attack seed, client id) only, so a client's poisoned data are the same every round.
    """
    plugin = plugin_attack(config)
    if plugin is not None:
        rng = np.random.default_rng([config.seed, _STREAM_DATA, client_id])
        return plugin.poison_data(data, num_classes=num_classes, rng=rng)
    if config.kind not in DATA_ATTACKS:
        return data
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}: a label attack needs at least 2 classes")
    labels = np.asarray(data.y, dtype=np.int64)
    rng = np.random.default_rng([config.seed, _STREAM_DATA, client_id])
    if config.kind == "label_flip":
        return ArrayData(data.x, (num_classes - 1) - labels)
    if config.kind == "noisy_labels":
        redraw = rng.random(len(labels)) < config.label_noise
        noisy = labels.copy()
        noisy[redraw] = rng.integers(0, num_classes, size=int(redraw.sum()))
        return ArrayData(data.x, noisy)
    keep = max(1, int(round(config.tiny_fraction * len(labels))))
    return data.subset(np.sort(rng.choice(len(labels), size=keep, replace=False)))


def attack_state(
    config: AttackConfig,
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    *,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A malicious client's reply weights under a model attack (other kinds: ``state`` as is).

    Only floating tensors change; integer buffers (step counters) are sent as trained. ``seed``
    is the client's seed for the round, so the noise differs between rounds and clients.
    """
    plugin = plugin_attack(config)
    if plugin is not None:
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([config.seed, _STREAM_MODEL, seed]).integers(2**63))
        )
        return dict(plugin.poison_state(state, global_state, generator=generator))
    out = dict(state)
    if config.kind not in MODEL_ATTACKS:
        return out
    missing = sorted(set(state) - set(global_state))
    if missing:
        raise ValueError(f"attack_state: key {missing[0]!r} is not in the global state")
    generator = torch.Generator().manual_seed(
        int(np.random.default_rng([config.seed, _STREAM_MODEL, seed]).integers(2**63))
    )
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        reference = global_state[key].to(value.dtype)
        if config.kind == "noise":
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(
                value.dtype
            )
            out[key] = reference + config.noise_std * noise
        else:  # sign_flip
            out[key] = reference - config.flip_scale * (value - reference)
    return out


def reported_count(config: AttackConfig, num_examples: int) -> int:
    """The example count a malicious client reports: ``count_factor`` × the true one, rounded,
    at least 1."""
    return max(1, int(round(num_examples * config.count_factor)))


def summary(config: AttackConfig, num_clients: int) -> dict[str, Any]:
    """What a run records about its attack: the settings and the malicious clients (ground truth)."""
    chosen = malicious_clients(config.seed, num_clients, config.fraction) if config.active else []
    return {"attack": asdict(config), "num_clients": num_clients, "malicious_clients": chosen}


def client_attack(run: Mapping[str, Any], client_id: int) -> AttackConfig | None:
    """The attack this client carries out according to the run config, or None when honest."""
    raw = run.get("attack")
    if not raw:
        return None
    config = AttackConfig.from_mapping(raw)
    return config if is_malicious(config, client_id, int(run["num_clients"])) else None
