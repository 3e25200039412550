"""The local training loop: it learns, it is reproducible, loss terms act, state loading is strict."""

from __future__ import annotations

import pytest
import torch

from fedmerge.clients.tasks import get_task
from fedmerge.clients.training import TrainConfig, evaluate, get_state, set_state, train


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    return task, task.load("train"), task.load("test")


def _fresh_model(task, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return task.build_model()


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_digits_learns_above_85_percent(digits):
    task, train_data, test_data = digits
    model = _fresh_model(task)
    metrics = train(model, task, train_data, TrainConfig(local_epochs=3), seed=0)
    assert set(metrics) == {"train_loss", "train_accuracy", "num_examples", "local_steps"}
    assert metrics["num_examples"] == len(train_data)
    assert metrics["local_steps"] == 3 * -(-len(train_data) // 32)  # epochs × batches
    result = evaluate(model, task, test_data)
    assert result["num_examples"] == len(test_data)
    assert result["accuracy"] > 0.85, result
    assert result["loss"] < 0.6, result


def test_adam_learns_too(digits):
    task, train_data, test_data = digits
    model = _fresh_model(task)
    train(model, task, train_data, TrainConfig(local_epochs=3, optimizer="adam", lr=0.01), seed=0)
    assert evaluate(model, task, test_data)["accuracy"] > 0.85


def test_same_seed_is_bit_identical(digits):
    task, train_data, _ = digits
    cfg = TrainConfig(local_epochs=2, batch_size=16)
    runs = []
    for _ in range(2):
        model = _fresh_model(task)
        torch.manual_seed(12345 + len(runs))  # the caller's global RNG must not matter
        runs.append((train(model, task, train_data, cfg, seed=3), get_state(model)))
    (metrics_a, state_a), (metrics_b, state_b) = runs
    assert metrics_a == metrics_b and _same_state(state_a, state_b)
    other = _fresh_model(task)
    train(other, task, train_data, cfg, seed=4)
    assert not _same_state(state_a, get_state(other))


def test_train_leaves_the_global_rng_alone(digits):
    task, train_data, _ = digits
    model = _fresh_model(task)
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    train(model, task, train_data, TrainConfig(), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_loss_term_changes_the_result(digits):
    task, train_data, _ = digits
    plain, pulled = _fresh_model(task), _fresh_model(task)
    train(plain, task, train_data, TrainConfig(), seed=0)

    def l2(model: torch.nn.Module) -> torch.Tensor:
        return 0.05 * sum((p**2).sum() for p in model.parameters())

    train(pulled, task, train_data, TrainConfig(), seed=0, loss_terms=[l2])
    norm = lambda m: sum(p.detach().pow(2).sum().item() for p in m.parameters())  # noqa: E731
    assert norm(pulled) < norm(plain)  # the penalty shrank the weights


def test_get_state_is_a_detached_cpu_copy(digits):
    task = digits[0]
    model = _fresh_model(task)
    state = get_state(model)
    state["0.weight"].zero_()
    assert model.state_dict()["0.weight"].abs().sum() > 0
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())


def test_set_state_round_trips(digits):
    task = digits[0]
    source, target = _fresh_model(task, seed=1), _fresh_model(task, seed=2)
    set_state(target, get_state(source))
    assert _same_state(get_state(target), get_state(source))


def test_set_state_names_every_problem(digits):
    task = digits[0]
    model = _fresh_model(task)
    state = get_state(model)
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as error:
        set_state(model, state)
    message = str(error.value)
    assert "missing keys: 0.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "2.weight: shape (3, 3), model has (10, 64)" in message


@pytest.mark.parametrize(
    "field,value",
    [
        ("local_epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("optimizer", "lbfgs"),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        TrainConfig(**{field: value})


def test_empty_data_is_rejected(digits):
    task, train_data, _ = digits
    import numpy as np

    with pytest.raises(ValueError, match="empty"):
        train(_fresh_model(task), task, train_data.subset(np.arange(0)), TrainConfig(), seed=0)


def test_channels_last_evaluation_gives_the_same_scores():
    """The NHWC path (the server's validation scoring) scores what the default layout scores."""
    import numpy as np

    from fedmerge.clients.tasks.base import ArrayData

    task = get_task("fashion_mnist")
    rng = np.random.default_rng(0)
    data = ArrayData(
        rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=300)
    )
    torch.manual_seed(0)
    state = get_state(task.build_model())
    scores = []
    for channels_last in (False, True):
        model = task.build_model()
        set_state(model, state)
        scores.append(evaluate(model, task, data, batch_size=128, channels_last=channels_last))
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
