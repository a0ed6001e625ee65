"""The executor's linear layer: every kernel it may choose computes F.linear, and it re-tunes when
the weight changes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference import linear
from reference.linear import KERNELS, Linear, row_bucket, tune_plan


@pytest.fixture
def layer() -> Linear:
    torch.manual_seed(0)
    return Linear(48, 80).eval()


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (2, 48), (1, 3, 48), (2, 5, 48), (9, 48), (4, 50, 48)])
def test_inference_path_computes_f_linear(layer, shape):
    x = torch.randn(*shape)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*shape[:-1], 80)
    torch.testing.assert_close(y, F.linear(x, layer.weight.detach()), rtol=1e-5, atol=1e-5)


def test_every_candidate_computes_f_linear(layer):
    x = torch.randn(3, 48)
    copies, _ = layer._state()
    assert {"linear", "transposed"} <= set(copies)
    for kind, w in copies.items():
        torch.testing.assert_close(KERNELS[kind](x, w), F.linear(x, layer.weight.detach()), rtol=1e-5, atol=1e-5)


def test_one_choice_per_row_bucket(layer):
    with torch.inference_mode():
        for rows in (1, 2, 3, 9, 12, 16, 100):
            layer(torch.randn(rows, 48))
    choices = layer.kernel_choices()
    assert sorted(choices) == [1, 2, 3, 16, 128]
    assert set(choices.values()) <= set(KERNELS)
    assert [row_bucket(r) for r in (1, 8, 9, 16, 17, 100)] == [1, 8, 16, 16, 32, 128]


def test_a_changed_weight_is_seen(layer):
    x = torch.randn(3, 48)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    layer.load_state_dict({"weight": torch.ones(80, 48)})
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, torch.ones(80, 48)), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_take_f_linear(layer):
    x = torch.randn(2, 48, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert layer.kernel_choices() == {}  # nothing tuned: the training path never leaves F.linear
    double = copy.deepcopy(layer).double()
    with torch.inference_mode():
        xd = torch.randn(2, 48, dtype=torch.float64)
        torch.testing.assert_close(double(xd), F.linear(xd, double.weight))
    assert double.kernel_choices() == {}


def test_copies_survive_deepcopy(layer):
    with torch.inference_mode():
        layer(torch.randn(3, 48))
        twin = copy.deepcopy(layer)
        assert twin.kernel_choices() == {}  # re-tuned on its own first call
        x = torch.randn(3, 48)
        torch.testing.assert_close(twin(x), layer(x))


def test_a_long_tuning_says_so_once_on_stderr(layer, capsys, monkeypatch):
    """Stubbed: with a notice threshold of 0 s every tuning is long enough to be announced."""
    monkeypatch.setattr(linear, "TUNE_NOTICE_S", 0.0)
    with torch.inference_mode():
        layer(torch.randn(5, 48))
        layer(torch.randn(5, 48))  # the same row count: chosen already, nothing tuned or said
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tuning the linear layer 48x80 for 5 rows: about ") and err.endswith(" s (once per shape)\n")


def test_a_tuning_under_the_threshold_is_silent(layer, capsys, monkeypatch):
    """Stubbed the other way (a loaded machine can make even this layer's tuning take seconds)."""
    monkeypatch.setattr(linear, "TUNE_NOTICE_S", float("inf"))
    with torch.inference_mode():
        layer(torch.randn(6, 48))
    assert capsys.readouterr().err == ""


def test_a_slow_tuning_is_cut_to_its_budget(layer, monkeypatch):
    """With no budget left each candidate runs once to warm up and once timed, and the chosen one serves."""
    monkeypatch.setattr(linear, "TUNE_BUDGET_S", 0.0)
    calls = {kind: 0 for kind in KERNELS}

    def counting(kind):
        kernel = KERNELS[kind]
        return lambda x, w: (calls.__setitem__(kind, calls[kind] + 1), kernel(x, w))[1]

    for kind in list(KERNELS):
        monkeypatch.setitem(KERNELS, kind, counting(kind))
    with torch.inference_mode():
        layer(torch.randn(7, 48))
    chosen = layer.kernel_choices()[7]
    copies, _ = layer._state()
    assert {kind: calls[kind] for kind in copies} == {kind: 2 + (kind == chosen) for kind in copies}


@pytest.mark.parametrize("round_s,plan", [(0.0, (5, 3)), (1e-4, (5, 3)), (0.4, (5, 2)), (1.0, (5, 1)), (2.0, (2, 1)), (3.0, (1, 1)), (107.0, (1, 1))])
def test_tune_plan_fits_the_budget(round_s, plan):
    samples, calls = tune_plan(round_s)
    assert (samples, calls) == plan
    assert samples * calls * round_s <= linear.TUNE_BUDGET_S or (samples, calls) == (1, 1)
