import pytest
import torch


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
