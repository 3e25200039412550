"""Krum, coordinate-wise median and trimmed mean on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.krum import krum, krum_scores
from fedmerge.aggregators.median import coordinate_median
from fedmerge.aggregators.trimmed_mean import trimmed_mean


def _states(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.tensor(r), "n": torch.tensor(i, dtype=torch.int64)} for i, r in enumerate(rows)
    ]


def _ctx(malicious: frozenset[int] = frozenset()) -> RoundContext:
    zero = {"w": torch.zeros(2), "n": torch.tensor(0)}
    return RoundContext(round=1, global_state=zero, base_state=zero, malicious=malicious)


def test_median_odd_and_even() -> None:
    odd = coordinate_median(_states([1.0, 10.0], [3.0, -2.0], [100.0, 0.0]))
    assert torch.equal(odd["w"], torch.tensor([3.0, 0.0])) and odd["n"] == 1
    even = coordinate_median(_states([1.0, 10.0], [3.0, -2.0], [100.0, 0.0], [5.0, 4.0]))
    assert torch.equal(even["w"], torch.tensor([4.0, 2.0]))  # mean of the two middle values
    assert even["n"].dtype == torch.int64 and even["n"] == 2  # (1 + 2) / 2 = 1.5 rounds to even


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    states = _states([1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [1000.0, 3.0])
    out = trimmed_mean(states, beta=0.2)  # k = 1 of 5 at each end
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))
    assert torch.allclose(trimmed_mean(states, beta=0.0)["w"], torch.tensor([202.0, -8.8]))
    assert torch.allclose(
        trimmed_mean(states, beta=0.1)["w"], trimmed_mean(states, beta=0.0)["w"]
    )  # k = 0
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(states, beta=0.5)


def test_krum_scores_and_selection_by_hand() -> None:
    # Four clustered points and one outlier; n = 5, f = 1: each scores its n - f - 2 = 2 nearest.
    states = _states([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0])
    scores = krum_scores(states, num_byzantine=1)
    assert scores[:4] == [2.0, 2.0, 2.0, 2.0]
    assert scores[4] == 162.0 + 181.0  # to (1, 1) and to (1, 0) or (0, 1)
    merged, selected = krum(states, num_byzantine=1)
    assert selected == [0] and torch.equal(merged["w"], torch.tensor([0.0, 0.0]))
    merged, selected = krum(states, num_byzantine=1, multi=4)
    assert selected == [0, 1, 2, 3] and torch.allclose(merged["w"], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="num_byzantine"):
        krum_scores(states, num_byzantine=3)


def test_krum_aggregator_reports_what_it_dropped() -> None:
    updates = [
        ClientUpdate(cid, s, 10)
        for cid, s in zip(
            [7, 8, 9, 10, 11], _states([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0])
        )
    ]
    result = create_aggregator("krum", {"multi": 4}).aggregate(_ctx(frozenset({11})), updates)
    assert result.metrics["clients_dropped"] == 1 and result.metrics["detection_precision"] == 1.0
    assert result.metrics["detection_recall"] == 1.0 and result.metrics["krum_f"] == 1
    with pytest.raises(ValueError, match="multi"):
        create_aggregator("krum", {"multi": 0})


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_aggregators_resist_one_huge_update_where_fedavg_does_not(name) -> None:
    honest = [[1.0 + 0.1 * i, 2.0 - 0.1 * i] for i in range(6)]
    updates = [ClientUpdate(i, s, 10) for i, s in enumerate(_states(*honest, [1e6, -1e6]))]
    params = {"beta": 0.2} if name == "trimmed_mean" else {}
    robust = create_aggregator(name, params).aggregate(_ctx(), updates).state["w"]
    plain = create_aggregator("fedavg", {}).aggregate(_ctx(), updates).state["w"]
    assert float((robust - torch.tensor([1.25, 1.75])).abs().max()) < 0.3
    assert float(plain.abs().max()) > 1e5
