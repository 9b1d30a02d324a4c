"""Neighbor padding as a compiled PyTorch operation on the CPU (``neighbor_pad.cpp``), where a C++ compiler is at
hand.

Eager PyTorch pads a ring with five passes over every cell of the activations; the compiled operation finds the
ring cells once per image from the mask and then visits only those, in every channel, on PyTorch's own threads
(docs/results.md#speed). It is built on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``, against the installed torch's headers and libraries: a few seconds) into a per-user cache
folder (``$CAPTUM_LAYERMASK_CACHE``, else ``~/.cache/captum_layermask``), one file per source, torch version
and platform, and loaded with :func:`torch.ops.load_library`. Where it cannot be built, or with
``CAPTUM_LAYERMASK_NATIVE=0``, :func:`native_neighbor_pad` returns ``None`` and the PyTorch code of
:mod:`~captum_layermask.core.primitives` runs instead: the values agree to float rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("neighbor_pad.cpp")
MAX_RINGS = 254
"""Rings are numbered in a byte, 255 meaning "not reached"; wider padding runs the PyTorch code."""

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _cache_folder() -> Path:
    configured = os.environ.get("CAPTUM_LAYERMASK_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captum_layermask"


def _compilers() -> List[str]:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return [path for path in map(shutil.which, names) if path]


def _command(compiler: str, target: Path) -> List[str]:
    """The compiler call building the operation against the installed torch (as ``torch.utils.cpp_extension``
    does, without its ninja build)."""
    root = Path(torch.__file__).parent
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-DNDEBUG", "-w"]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
    if sys.platform == "darwin":  # no OpenMP in Apple's clang: the operation runs on one thread there
        flags += ["-undefined", "dynamic_lookup"]
    else:  # at::parallel_for's OpenMP loops, on the runtime torch has loaded (libgomp.so.1, its thread pool)
        flags.append("-fopenmp")
    library = root / "lib"
    return [
        compiler, *flags, f"-I{root / 'include'}", str(SOURCE), "-o", str(target),
        f"-L{library}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{library}",
    ]  # fmt: skip


def _build(compiler: str) -> Path:
    """The operation's library built by ``compiler``, from the cache when it is there (raises ``OSError`` or
    ``subprocess.SubprocessError`` when it cannot be built)."""
    identity = [SOURCE.read_text(), _command(compiler, Path()), torch.__version__, platform.platform(), sys.version]
    name = f"neighbor_pad-{hashlib.sha256(repr(identity).encode()).hexdigest()[:16]}.so"
    try:
        folder = _cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="captum_layermask-"))
    target = folder / name
    if target.exists():
        return target
    partial = folder / f"{name}.{os.getpid()}.{threading.get_ident()}.part"
    _logger.info("captum_layermask: building the compiled neighbor padding with %s into %s", compiler, folder)
    try:
        subprocess.run(_command(compiler, partial), check=True, capture_output=True, timeout=300)
        os.replace(partial, target)  # atomic: processes building at once each write their own file first
    finally:
        partial.unlink(missing_ok=True)
    return target


def _load() -> bool:
    if os.environ.get("CAPTUM_LAYERMASK_NATIVE", "1") == "0":
        _state["reason"] = "disabled by CAPTUM_LAYERMASK_NATIVE=0"
        return False
    if hasattr(torch.ops.captum_layermask_native, "neighbor_pad"):  # loaded before (another copy of this module)
        _state["reason"] = "loaded"
        return True
    failures = []
    for compiler in _compilers():
        try:
            torch.ops.load_library(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            stderr = getattr(error, "stderr", b"") or b""
            failures.append(f"{compiler}: {error} {stderr.decode(errors='replace')[-500:]}".strip())
            continue
        _state["reason"] = f"built with {compiler}"
        return True
    _state["reason"] = "; ".join(failures) or "no C++ compiler found (set CXX)"
    _logger.info("captum_layermask: neighbor padding runs in PyTorch (%s)", _state["reason"])
    return False


def available() -> bool:
    """Whether the compiled operation is loaded, building it on the first call (see :func:`status`)."""
    with _lock:
        if "available" not in _state:
            _state["available"] = _load()
        return _state["available"]


def status() -> str:
    """One line saying whether neighbor padding runs compiled, and why not where it does not."""
    return ("compiled" if available() else "PyTorch") + f" ({_state['reason']})"


def native_neighbor_pad(
    x: Tensor, mask: Tensor, width: int, grow: int = 0, stride: Tuple[int, int] = (1, 1), overwrite: bool = False
) -> Optional[Tuple[Tensor, Tensor]]:
    """Neighbor padding by the compiled operation, or ``None`` where it does not apply.

    It applies to float32/float64 CPU activations of shape ``(N, C, H, W)`` (contiguous or channels-last; the
    result keeps channels-last memory) with a mask of shape ``(N, 1, H, W)`` or ``(1, 1, H, W)`` on the CPU
    (float32, float64, bool or uint8; visible where > 0), ``1 <= width <= 254``, without autograd, when the
    operation loads.

    With ``overwrite``, ``x`` itself is padded where it is contiguous or channels-last (the ring cells are
    overwritten; the removed cells beyond the rings keep their values instead of 0): no copy is made, for an
    ``x`` whose removed cells nothing else reads.

    Returns:
        ``(padded, reached)``: ``padded`` as :func:`~captum_layermask.core.primitives.neighbor_pad` returns it
        (``x`` itself with ``overwrite``); ``reached``, in the mask's dtype, 1 on the cells within ``grow`` rings
        of a visible cell, at every ``stride``-th row and column (shape ``(N or 1, 1, ceil(H / sh),
        ceil(W / sw))``): the output mask of a centred convolution with that radius and stride.
    """
    if not _applies(x, mask, width) or not available():
        return None
    operations = torch.ops.captum_layermask_native
    if overwrite and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return x, operations.neighbor_pad_(x, mask, width, grow, *stride)
    return operations.neighbor_pad(x, mask, width, grow, *stride)


def _applies(x: Tensor, mask: Tensor, width: int) -> bool:
    if type(x) is not Tensor or type(mask) is not Tensor:  # fake and other subclassed tensors hold no memory
        return False
    if x.dim() != 4 or mask.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if mask.dtype not in (torch.float32, torch.float64, torch.bool, torch.uint8):
        return False
    if x.device.type != "cpu" or mask.device.type != "cpu" or not 1 <= width <= MAX_RINGS:
        return False
    if mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:] or mask.shape[0] not in (1, x.shape[0]):
        return False
    if x.shape[2] * x.shape[3] >= 2**31 or x.numel() == 0:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)
