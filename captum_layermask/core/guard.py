"""The plain-model guard: a model that is not layer-masked must not receive pixels marked as removed.

Perturbation tools mark removed pixels with a value the model is meant to decode (Captum's ``LayerMask()``
sentinel, NaN for the shap/lime/Quantus/ROAD adapters). A plain model given such pixels explains the mark (a grey
fill, NaN outputs) instead. While an object that writes marks exists, a :class:`PlainModelGuard` looks at the
image input of every top-level module call and refuses one that carries marks but does not decode them.

A call is top-level unless it runs inside the forward of the module of the last top-level call, whose frame is
then on the stack: a stack test, not a depth counter, so that a call ended by an exception (``KeyboardInterrupt``
included) leaves no state that skips later checks. Once its frame is gone, the next call is top-level, and its
leftover per-call hook is removed then. Only calls whose first argument is an image batch (a 4-D tensor) are
looked at, so models of other data pay one global pre-hook call per module call, and nothing more.
"""

from __future__ import annotations

import sys
import threading
import weakref
from types import FrameType
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import LayerMaskError

_CALL_CODE = nn.Module._call_impl.__code__


def _calling_frame() -> Optional[FrameType]:
    """The frame of the ``nn.Module._call_impl`` that runs the hooks being called."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _CALL_CODE:
        frame = frame.f_back
    return frame


def _on_stack(target: FrameType) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


class PlainModelGuard:
    """Refuses top-level module calls that receive marked pixels but do not decode them.

    Args:
        marked: ``marked(x) -> bool``, whether an image batch ``(N, C, H, W)`` holds marked (removed) pixels.
        decoder: the module class (or a tuple of classes) that decodes the marks (a call of one, or of
            ``torch.compile`` of one, passes).
        refusal: the message for a plain model, formatted with ``{name}``, the model's class name.
        altered: the message for a wrapper that contains a decoder which did not see the marks (the wrapper changed
            the pixels first), formatted with ``{name}``.
        before_refusal: called with ``x`` before a refusal, to raise a more specific error first.

    A decoder reports each call that decoded marks with :meth:`decoded`. The guard is installed while at least one
    owner (:meth:`acquire`) is alive.
    """

    def __init__(
        self,
        marked: Callable[[Tensor], bool],
        decoder: Union[type, Tuple[type, ...]],
        refusal: str,
        altered: str,
        before_refusal: Optional[Callable[[Tensor], None]] = None,
    ) -> None:
        self.marked, self.decoder, self.refusal, self.altered = marked, decoder, refusal, altered
        self.before_refusal = before_refusal
        self.live = 0
        self.handle: Any = None
        self.local = threading.local()
        self.exits: dict = {}  # the per-call forward hooks not yet removed, by thread

    def acquire(self, owner: object) -> None:
        """Installs the guard for as long as ``owner`` lives."""
        if self.live == 0:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._enter)
        self.live += 1
        weakref.finalize(owner, self._release)

    def _release(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.handle.remove()
            for exit_hook in list(self.exits.values()):
                exit_hook.remove()
            self.exits.clear()
            self.local = threading.local()

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor) or args[0].ndim != 4 or torch.compiler.is_compiling():
            return  # calls inside a compiled region are nested in the compiled module's call, checked eagerly
        local = self.local
        frame = getattr(local, "frame", None)
        if frame is not None and _on_stack(frame):
            return
        self._finish()
        local.module, local.frame, local.pending = module, _calling_frame(), None
        self.exits[threading.get_ident()] = module.register_forward_hook(self._leave, always_call=True)
        x = args[0]
        if isinstance(getattr(module, "_orig_mod", module), self.decoder):  # itself, or torch.compile of it
            return
        if not x.is_floating_point() or not self.marked(x):
            return
        gradients = torch.is_grad_enabled() and x.requires_grad
        if not gradients and any(isinstance(m, self.decoder) for m in module.modules()):
            local.pending = module  # a wrapper: the decoder inside must see these pixels
            return
        self._finish()
        if self.before_refusal is not None:
            self.before_refusal(x)
        raise LayerMaskError(self.refusal.format(name=type(module).__name__))

    def _finish(self) -> None:
        """Forgets the last top-level call of this thread and removes its forward hook."""
        exit_hook = self.exits.pop(threading.get_ident(), None)
        if exit_hook is not None:
            exit_hook.remove()
        self.local.frame = self.local.module = self.local.pending = None

    def decoded(self) -> None:
        """Called by a decoder that found marks in its input: the wrapper around it passed them on intact."""
        if not torch.compiler.is_compiling():
            self.local.pending = None

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        local = self.local
        if module is not getattr(local, "module", None) or _calling_frame() is not local.frame:
            return  # a recursive call of the same module
        pending = local.pending
        self._finish()
        if pending is module and output is not None:
            raise LayerMaskError(self.altered.format(name=type(module).__name__))
