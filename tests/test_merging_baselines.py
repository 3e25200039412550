"""Task arithmetic, TIES and simple averaging on hand-made tensors; per-task heads."""

from __future__ import annotations

import pytest
import torch

from fedmerge.aggregators import ClientUpdate, RoundContext, create_aggregator
from fedmerge.aggregators.merging import group_states, merged_heads
from fedmerge.aggregators.task_arithmetic import task_arithmetic
from fedmerge.aggregators.ties import ties_merge

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), "steps": torch.tensor(7)}


def test_task_arithmetic_by_hand() -> None:
    states = [
        {"w": torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0]), "steps": torch.tensor(9)},
        {"w": torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0]), "steps": torch.tensor(9)},
    ]
    out = task_arithmetic(BASE, states, lam=0.5)
    # τ1 = [1, 0, -1, 0, 0], τ2 = [0, 2, 1, 0, 0]; θ0 + 0.5 (τ1 + τ2)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 2.0, 1.0, 1.0, 1.0]))
    assert out["steps"].item() == 7  # integer buffers keep the base value


def test_ties_trims_elects_and_averages_the_agreeing_entries() -> None:
    base = {"w": torch.zeros(5)}
    states = [
        {"w": torch.tensor([4.0, -3.0, 0.1, 2.0, -0.2])},
        {"w": torch.tensor([2.0, 1.0, -0.1, -5.0, 0.3])},
        {"w": torch.tensor([-1.0, -2.0, 0.2, 0.1, 6.0])},
    ]
    out = ties_merge(base, states, lam=1.0, keep=0.6)  # keep 3 of 5 entries per model
    # trimmed: [4, -3, 0, 2, 0], [2, 1, 0, -5, 0], [-1, -2, 0, 0, 6]
    # signs of the sums: [+, -, 0, -, +]; agreeing means: [3, -2.5, 0, -5, 6]
    torch.testing.assert_close(out["w"], torch.tensor([3.0, -2.5, 0.0, -5.0, 6.0]))
    torch.testing.assert_close(ties_merge(base, states, lam=0.3, keep=0.6)["w"], 0.3 * out["w"])


def test_ties_with_everything_kept_and_one_model_is_task_arithmetic() -> None:
    state = {"w": torch.tensor([2.0, 0.0, -1.0, 1.0, 3.0]), "steps": torch.tensor(1)}
    torch.testing.assert_close(
        ties_merge(BASE, [state], lam=0.3, keep=1.0)["w"],
        task_arithmetic(BASE, [state], lam=0.3)["w"],
    )


def _heads_state(shared: float, head0: float, head1: float) -> dict[str, torch.Tensor]:
    return {
        "body.weight": torch.full((2, 2), shared),
        "heads.0.weight": torch.full((3, 2), head0),
        "heads.1.weight": torch.full((2, 2), head1),
    }


def _updates() -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    base = _heads_state(0.0, 0.0, 0.0)
    # two clients of task 0 (different sizes), one of task 1; each trained only its own head
    updates = [
        ClientUpdate(0, _heads_state(1.0, 2.0, 0.0), 10, {"task_id": 0.0}),
        ClientUpdate(1, _heads_state(4.0, 5.0, 0.0), 30, {"task_id": 0.0}),
        ClientUpdate(2, _heads_state(-2.0, 0.0, 8.0), 20, {"task_id": 1.0}),
    ]
    return base, updates


def test_heads_stay_per_task_and_tasks_group_their_clients() -> None:
    base, updates = _updates()
    heads = merged_heads(base, updates, torch.device("cpu"))
    torch.testing.assert_close(heads["heads.0.weight"], torch.full((3, 2), (2 * 10 + 5 * 30) / 40))
    torch.testing.assert_close(heads["heads.1.weight"], torch.full((2, 2), 8.0))
    groups = group_states(updates, "task", torch.device("cpu"))
    assert [g.clients for g in groups] == [(0, 1), (2,)] and [g.task for g in groups] == [0, 1]
    torch.testing.assert_close(
        groups[0].state["body.weight"], torch.full((2, 2), (10 + 4 * 30) / 40)
    )
    assert len(group_states(updates, "client", torch.device("cpu"))) == 3


@pytest.mark.parametrize(
    ("name", "params", "body"),
    [
        ("task_arithmetic", {"lam": 0.5}, 0.5 * ((10 + 4 * 30) / 40 - 2.0)),
        ("simple_average", {}, ((10 + 4 * 30) / 40 - 2.0) / 2),
        ("task_arithmetic", {"lam": 0.5, "group_by": "client"}, 0.5 * (1.0 + 4.0 - 2.0)),
        (
            "ties",
            {"lam": 1.0, "keep": 1.0},
            (10 + 4 * 30) / 40,
        ),  # signs disagree: the positive side wins
    ],
)
def test_merging_aggregators_keep_heads_per_task(name: str, params: dict, body: float) -> None:
    base, updates = _updates()
    ctx = RoundContext(round=1, global_state=base, base_state=base)
    result = create_aggregator(name, params).aggregate(ctx, updates)
    torch.testing.assert_close(result.state["body.weight"], torch.full((2, 2), body))
    torch.testing.assert_close(result.state["heads.0.weight"], torch.full((3, 2), 4.25))
    torch.testing.assert_close(result.state["heads.1.weight"], torch.full((2, 2), 8.0))
    assert list(result.state) == list(base) and result.served_model is None


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="keep"):
        create_aggregator("ties", {"keep": 0})
    with pytest.raises(ValueError, match="group_by"):
        create_aggregator("task_arithmetic", {"group_by": "node"})
    with pytest.raises(ValueError, match="lam"):
        create_aggregator("task_arithmetic", {"lam": float("nan")})
