import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="where tests compute: cpu (default) or cuda[:N]; tensors and modules a test creates go there "
        "(torch.set_default_device), so a GPU machine runs the suite on its GPU with `pytest --device cuda`",
    )


def pytest_configure(config):
    device = config.getoption("--device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: this machine has no CUDA device.")


@pytest.fixture(autouse=True)
def _device(request):
    """Every test computes on ``--device``: new tensors and module parameters are created there."""
    device = request.config.getoption("--device")
    if device == "cpu":
        yield
        return
    with torch.device(device):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_user_rule_left_behind():
    """A test that registers a rule globally must unregister it: a leftover would change every later conversion."""
    from captum_layermask.core.registry import RULES

    before = list(RULES.entries)
    yield
    assert RULES.entries == before, "a test left a rule registered; unregister it (or pass rules= for one conversion)"
