"""The compiled CPU neighbor padding (core/neighbor_pad.cpp) against the PyTorch passes it replaces."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

from captum_layermask import layer_masked, neighbor_pad
from captum_layermask.core import native, primitives
from captum_layermask.core.primitives import pad_for_convolution

CPU = torch.device("cpu")  # the compiled operation is the CPU's; under `pytest --device cuda` these tests stay here
HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++")) or bool(os.environ.get("CXX"))


def random_case(batch, channels, height, width, mask_batch, share=0.3, dtype=torch.float32):
    x = torch.randn(batch, channels, height, width, dtype=dtype, device=CPU)
    mask = (torch.rand(mask_batch, 1, height, width, device=CPU) < share).to(dtype)
    return x, mask


def padded_by_pytorch(x, mask, width):
    """What the PyTorch passes of primitives.py give (as on a machine without a compiler)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(primitives, "native_neighbor_pad", lambda *args: None)
        return neighbor_pad(x, mask, width)


def test_the_operation_builds_where_a_compiler_is_at_hand():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine: neighbor padding runs in PyTorch (tested everywhere else)")
    assert native.available(), native.status()


needs_native = pytest.mark.skipif(not (HAS_COMPILER and native.available()), reason="no compiled neighbor padding")


@needs_native
@pytest.mark.parametrize("shape", [(2, 5, 17, 23), (3, 64, 9, 9), (1, 7, 30, 4), (4, 3, 1, 9), (2, 3, 9, 1)])
@pytest.mark.parametrize("width", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("shared_mask", [False, True])
def test_equals_the_pytorch_passes(shape, width, shared_mask):
    x, mask = random_case(*shape, mask_batch=1 if shared_mask else shape[0])
    expected = padded_by_pytorch(x, mask, width)
    assert native.native_neighbor_pad(x, mask, min(width, max(shape[2:]) - 1) or 1) is not None
    torch.testing.assert_close(neighbor_pad(x, mask, width), expected, rtol=1e-6, atol=1e-6)
    channels_last = neighbor_pad(x.contiguous(memory_format=torch.channels_last), mask, width)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) or channels_last.is_contiguous()
    torch.testing.assert_close(channels_last, expected, rtol=1e-6, atol=1e-6)


@needs_native
def test_float64_agrees_to_float64_rounding_and_bool_masks_are_masks():
    x, mask = random_case(3, 6, 20, 16, mask_batch=3, dtype=torch.float64)
    torch.testing.assert_close(neighbor_pad(x, mask.bool(), 4), padded_by_pytorch(x, mask, 4), rtol=1e-12, atol=1e-12)


@needs_native
def test_matches_the_examples_of_algorithm_1():
    row = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 5.0]]]], device=CPU)
    visible = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 1.0]]]], device=CPU)
    assert torch.equal(neighbor_pad(row, visible, 2), torch.tensor([[[[1.0, 1.0, 3.0, 5.0, 5.0]]]]))
    nothing_visible = torch.zeros_like(visible)
    assert torch.equal(neighbor_pad(row, nothing_visible, 3), torch.zeros_like(row))
    assert torch.equal(neighbor_pad(row, torch.ones_like(visible), 3), row)


@needs_native
@pytest.mark.parametrize("kernel,stride,padding,rings", [(3, 1, 1, None), (5, 2, 2, None), (3, 2, 1, 1), (5, 1, 2, 1)])
def test_output_masks_are_those_of_the_pytorch_rings(kernel, stride, padding, rings, monkeypatch):
    x, mask = random_case(2, 4, 19, 15, mask_batch=2, share=0.2)
    padded, output_mask = pad_for_convolution(x, mask, kernel, stride, padding, rings=rings)
    monkeypatch.setattr(primitives, "native_neighbor_pad", lambda *args: None)
    expected_padded, expected_mask = pad_for_convolution(x, mask, kernel, stride, padding, rings=rings)
    assert torch.equal(output_mask, expected_mask)
    torch.testing.assert_close(padded, expected_padded, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.uint8])
@pytest.mark.parametrize("grow,stride", [(0, (1, 1)), (1, (2, 2)), (2, (1, 3)), (9, (2, 1))])
def test_grown_masks_of_every_mask_dtype_are_those_of_the_pytorch_rings(dtype, grow, stride, monkeypatch):
    x, mask = random_case(3, 2, 7, 10, mask_batch=3, share=0.1)
    mask[1] = 0  # an image with no visible cell: no ring reaches any cell
    mask = mask.to(dtype)
    padded, reached = primitives._neighbor_pad(x, mask, 4, grow, stride)
    monkeypatch.setattr(primitives, "native_neighbor_pad", lambda *args: None)
    expected_padded, expected = primitives._neighbor_pad(x, mask, 4, grow, stride)
    assert reached.dtype == dtype and torch.equal(reached, expected)
    torch.testing.assert_close(padded, expected_padded, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_padding_in_place_fills_the_rings_of_the_activation_itself(channels_last):
    x, mask = random_case(3, 5, 16, 13, mask_batch=3, share=0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    original = x.clone()
    expected, expected_mask = native.native_neighbor_pad(x, mask, 2, 1, (2, 2))
    padded, reached = native.native_neighbor_pad(x, mask, 2, 1, (2, 2), overwrite=True)
    assert padded is x and torch.equal(reached, expected_mask)
    within = primitives._neighbor_pad(x, mask, 2, 2)[1] > 0  # visible cells and the two rings
    assert torch.equal(torch.where(within, x, 0), torch.where(within, expected, 0))
    assert torch.equal(torch.where(within, 0, x), torch.where(within, 0, original))  # the rest as it was
    strided = original.transpose(2, 3)  # neither contiguous nor channels-last: padded into a copy
    assert native.native_neighbor_pad(strided, mask.transpose(2, 3), 2, overwrite=True)[0] is not strided


class Branches(torch.nn.Module):
    """One activation read by two convolutions of different reach, a max pool and a residual sum."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.small, self.large = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 5, padding=2)
        self.pool = torch.nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.cat([self.small(x) + x, self.large(x), self.pool(x)], 1).mean((2, 3))


@needs_native
@pytest.mark.parametrize("residual", ["intersection", "union"])
def test_activations_padded_in_place_leave_every_later_layer_as_with_copies(residual, monkeypatch):
    torch.manual_seed(0)
    model = Branches().eval().to(CPU)
    masked = layer_masked(model, residual=residual)
    x, mask = random_case(4, 3, 20, 20, mask_batch=4, share=0.4)
    with torch.no_grad():
        in_place = masked(x, mask)
    with torch.enable_grad():  # autograd: the PyTorch passes, into copies
        expected = masked(x, mask)
    monkeypatch.setattr(primitives, "native_neighbor_pad", lambda *args: None)
    with torch.no_grad():
        torch.testing.assert_close(masked(x, mask), expected)
    torch.testing.assert_close(in_place, expected.detach(), rtol=1e-5, atol=1e-6)


@needs_native
def test_results_do_not_depend_on_the_number_of_threads():
    x, mask = random_case(4, 33, 24, 24, mask_batch=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = neighbor_pad(x, mask, 3)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(neighbor_pad(x, mask, 3), one)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_autograd_and_other_dtypes_take_the_pytorch_passes():
    x, mask = random_case(1, 2, 8, 8, mask_batch=1)
    assert native.native_neighbor_pad(x.requires_grad_(), mask, 2) is None
    assert native.native_neighbor_pad(x.detach().half(), mask, 2) is None
    assert native.native_neighbor_pad(x.detach(), mask, 255) is None  # ring numbers are bytes
    assert native.native_neighbor_pad(x.detach(), mask.expand(2, 1, 8, 8), 2) is None  # mask batch != x batch


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_layer_masked_efficientnet_gives_the_pytorch_padding_result(channels_last, monkeypatch):
    model = torchvision.models.efficientnet_b0(num_classes=10).eval().to(CPU)
    x = torch.randn(2, 3, 64, 64, device=CPU)
    mask = torch.ones(2, 1, 64, 64, device=CPU)
    mask[0, :, 8:40, 16:48] = 0
    mask[1, :, :, 32:] = 0
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    masked = layer_masked(model)
    with torch.no_grad():
        compiled = masked(x, mask)
        monkeypatch.setattr(primitives, "native_neighbor_pad", lambda *args: None)
        expected = masked(x, mask)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-5)


def run_python(code, **environment):
    env = {**os.environ, **environment}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


FALLBACK_CHECK = """
    import torch
    from captum_layermask import neighbor_pad
    from captum_layermask.core import native
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 5.0]]]])
    visible = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 1.0]]]])
    print(native.status())
    print(neighbor_pad(x, visible, 2).flatten().tolist())
"""


def test_disabled_by_the_environment_it_pads_in_pytorch():
    out = run_python(FALLBACK_CHECK, CAPTUM_LAYERMASK_NATIVE="0").splitlines()
    assert out[0] == "PyTorch (disabled by CAPTUM_LAYERMASK_NATIVE=0)"
    assert out[1] == "[1.0, 1.0, 3.0, 5.0, 5.0]"


def test_without_a_working_compiler_it_pads_in_pytorch_and_says_why(tmp_path):
    out = run_python(FALLBACK_CHECK, CXX=shutil.which("false") or "/bin/false", CAPTUM_LAYERMASK_CACHE=str(tmp_path))
    status, values = out.splitlines()
    assert status.startswith("PyTorch (") and "false" in status
    assert values == "[1.0, 1.0, 3.0, 5.0, 5.0]"
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left to load later
