"""Simulated attacks: who is malicious, and what each attack does to data, weights and counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.clients.attacks import (
    AttackConfig,
    attack_data,
    attack_state,
    client_attack,
    malicious_clients,
    reported_count,
    summary,
)
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.federation.config import ConfigError
from fedmerge.federation.scoring import hold_out

from .conftest import digits_config


def _states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    global_state = {
        "w": torch.randn(200, 50, generator=g),
        "b": torch.randn(50, generator=g),
        "steps": torch.tensor(3, dtype=torch.int64),
    }
    trained = {
        "w": global_state["w"] + 0.01 * torch.randn(200, 50, generator=g),
        "b": global_state["b"] + 0.01 * torch.randn(50, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    return global_state, trained


def test_malicious_clients_are_a_pure_function_of_seed_count_and_fraction() -> None:
    chosen = malicious_clients(5, 20, 0.4)
    assert chosen == malicious_clients(5, 20, 0.4) and len(chosen) == 8 == len(set(chosen))
    assert all(0 <= i < 20 for i in chosen) and chosen == sorted(chosen)
    assert malicious_clients(6, 20, 0.4) != chosen
    assert malicious_clients(5, 20, 0.0) == [] and malicious_clients(5, 4, 0.25) != []
    assert len(malicious_clients(0, 10, 0.25)) == 2  # round(2.5) = 2, banker's rounding
    with pytest.raises(ValueError, match="fraction"):
        malicious_clients(0, 10, 1.5)


def test_only_the_chosen_clients_attack() -> None:
    config = AttackConfig(kind="noise", fraction=0.5, seed=3)
    run = {"attack": {**summary(config, 10)["attack"]}, "num_clients": 10}
    bad = malicious_clients(3, 10, 0.5)
    assert summary(config, 10)["malicious_clients"] == bad
    for cid in range(10):
        attack = client_attack(run, cid)
        assert (attack is not None) == (cid in bad)
        if attack is not None:
            assert attack == config
    assert client_attack({"attack": None, "num_clients": 10}, bad[0]) is None
    assert summary(AttackConfig(), 10)["malicious_clients"] == []


def test_noise_replaces_the_update_with_gaussian_noise() -> None:
    global_state, trained = _states()
    config = AttackConfig(kind="noise", fraction=1.0, noise_std=0.5)
    out = attack_state(config, trained, global_state, seed=11)
    delta = out["w"] - global_state["w"]
    assert abs(float(delta.std()) - 0.5) < 0.02 and abs(float(delta.mean())) < 0.02
    assert (
        float(
            torch.corrcoef(
                torch.stack([delta.reshape(-1), (trained["w"] - global_state["w"]).reshape(-1)])
            )[0, 1]
        )
        < 0.05
    )
    assert out["steps"] is trained["steps"]  # integer buffers are sent as trained
    again = attack_state(config, trained, global_state, seed=11)
    assert torch.equal(again["w"], out["w"])
    assert not torch.equal(attack_state(config, trained, global_state, seed=12)["w"], out["w"])


def test_sign_flip_sends_the_negated_scaled_update() -> None:
    global_state, trained = _states()
    out = attack_state(
        AttackConfig(kind="sign_flip", fraction=1.0, flip_scale=3.0), trained, global_state, seed=0
    )
    for key in ("w", "b"):
        torch.testing.assert_close(
            out[key] - global_state[key], -3.0 * (trained[key] - global_state[key])
        )
    assert out["steps"] is trained["steps"]


@pytest.mark.parametrize("kind", ["label_flip", "noisy_labels", "tiny", "inflate"])
def test_data_and_count_attacks_leave_the_weights_alone(kind) -> None:
    global_state, trained = _states()
    config = AttackConfig(kind=kind, fraction=1.0, count_factor=5.0 if kind == "inflate" else 1.0)
    out = attack_state(config, trained, global_state, seed=0)
    assert all(out[k] is trained[k] for k in trained)


def test_data_attacks_change_the_labels_or_the_size_as_specified() -> None:
    rng = np.random.default_rng(0)
    data = ArrayData(
        rng.integers(0, 255, size=(1000, 4), dtype=np.uint8), rng.integers(0, 10, size=1000)
    )
    flipped = attack_data(
        AttackConfig(kind="label_flip", fraction=1.0), data, num_classes=10, client_id=2
    )
    assert np.array_equal(flipped.y, 9 - data.y) and flipped.x is data.x
    noisy = attack_data(
        AttackConfig(kind="noisy_labels", fraction=1.0, label_noise=0.5),
        data,
        num_classes=10,
        client_id=2,
    )
    changed = float(np.mean(noisy.y != data.y))
    assert (
        0.5 * 0.9 - 0.06 < changed < 0.5 * 0.9 + 0.06
    )  # a redrawn label keeps its value 1 time in 10
    assert np.array_equal(noisy.x, data.x) and noisy.y.min() >= 0 and noisy.y.max() <= 9
    tiny = attack_data(
        AttackConfig(kind="tiny", fraction=1.0, tiny_fraction=0.05),
        data,
        num_classes=10,
        client_id=2,
    )
    assert len(tiny) == 50
    rows = {bytes(r) + bytes([int(y)]) for r, y in zip(data.x, data.y)}
    assert all(bytes(r) + bytes([int(y)]) in rows for r, y in zip(tiny.x, tiny.y))
    for kind in ("noise", "sign_flip", "inflate"):
        assert (
            attack_data(
                AttackConfig(kind=kind, fraction=1.0, count_factor=2.0),
                data,
                num_classes=10,
                client_id=2,
            )
            is data
        )


def test_inflated_counts() -> None:
    assert reported_count(AttackConfig(kind="inflate", fraction=1.0, count_factor=10.0), 37) == 370
    assert reported_count(AttackConfig(kind="noise", fraction=1.0), 37) == 37
    assert reported_count(AttackConfig(kind="tiny", fraction=1.0, count_factor=0.01), 37) == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ('attack.kind="bogus"', "attack.kind"),
        ("attack.fraction=1.5", "attack.fraction"),
        ("attack.noise_std=0", "attack.noise_std"),
        ('attack.kind="inflate"', "count_factor"),
        ("attack.wrong=1", "attack.wrong"),
        ("data.server_val_size=-1", "data.server_val_size"),
    ],
)
def test_bad_attack_settings_name_the_key(tmp_path, override, key) -> None:
    with pytest.raises(ConfigError, match=key):
        digits_config(tmp_path, override)


def test_server_validation_set_is_held_out_and_seeded() -> None:
    data = ArrayData(np.arange(500).reshape(500, 1), np.arange(500) % 10)
    rest, held = hold_out(data, 100, seed=4)
    assert len(held) == 100 and len(rest) == 400
    assert set(held.x[:, 0]).isdisjoint(rest.x[:, 0]) and set(held.x[:, 0]) | set(
        rest.x[:, 0]
    ) == set(range(500))
    assert np.array_equal(hold_out(data, 100, seed=4)[1].x, held.x)
    assert not np.array_equal(hold_out(data, 100, seed=5)[1].x, held.x)
    with pytest.raises(ValueError, match="server_val_size"):
        hold_out(data, 500, seed=0)


# ---- an attack of one's own -----------------------------------------------------------------


def test_a_plug_in_attack_poisons_data_and_state_with_its_checked_params():
    import tests.plugins.user_attack  # noqa: F401  (registers "one_class_boost")
    from fedmerge.clients.attacks import attack_params

    config = AttackConfig(kind="one_class_boost", fraction=0.5, params={"label": 2, "scale": 2})
    data = ArrayData(np.zeros((6, 3), np.float32), np.arange(6) % 3)
    poisoned = attack_data(config, data, num_classes=3, client_id=1)
    assert poisoned.y.tolist() == [2] * 6 and poisoned.x is data.x
    received = {"w": torch.ones(2), "n": torch.tensor(4)}
    sent = attack_state(
        config, {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}, received, seed=3
    )
    assert sent["w"].tolist() == [3.0, -1.0] and sent["n"].item() == 5  # 1 + 2 * (w - 1)
    names = [s.name for s in attack_params("one_class_boost")]
    assert "params.label" in names and "params.scale" in names and "noise_std" not in names
    with pytest.raises(ValueError, match=r"params: attack 'one_class_boost': scale=0 is invalid"):
        AttackConfig(kind="one_class_boost", params={"scale": 0})
    with pytest.raises(ValueError, match="params is only for a plug-in attack kind"):
        AttackConfig(kind="noise", params={"scale": 2})
    with pytest.raises(ValueError, match=r"kind: unknown attack 'one_class_bost'\. Did you mean"):
        AttackConfig(kind="one_class_bost")
    with pytest.raises(ValueError, match="is built in"):
        from fedmerge.clients.attacks import Attack, register_attack

        register_attack("noise")(type("Shadow", (Attack,), {}))
