"""The registry of masking rules: one small function per operation type, extensible with ``register_rule``.

A rule has the signature ``rule(op, *args, **kwargs)``. ``op`` is the operation of the original model (a module,
a function, or a callable that invokes a tensor method) and ``args``/``kwargs`` are its arguments, in which every
activation that depends on the image arrives as a :class:`~captum_layermask.Masked`. The rule returns the
operation's result with the same wrapping: a ``Masked`` for an image-dependent tensor (a tuple/list of them for
operations that return several).
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .errors import UnsupportedLayerError
from .masked import Masked, is_masked

Rule = Callable[..., Any]
Target = Union[type, Callable[..., Any], str]


@dataclass(frozen=True)
class RuleEntry:
    """A rule and what it is for.

    Attributes:
        target: a module class, a function (as ``torch.fx`` records it, e.g. ``torch.flatten``, ``operator.add``)
            or a tensor method name (``"view"``).
        rule: the masking rule.
        metadata: True when the operation reads only the shape/dtype of its input (``x.size()``), so that its
            result does not depend on pixel values.
        per_cell: for a rule that acts on each cell separately, how its output mask combines its inputs'
            (``"intersection"`` or ``"union"``); None for a rule that mixes cells. The demand analysis
            (:mod:`captum_layermask.core.demand`) follows masks through such rules.
    """

    target: Target
    rule: Rule
    metadata: bool = False
    per_cell: Optional[str] = None

    def matches(self, op: Any) -> bool:
        if isinstance(self.target, type):
            return isinstance(op, torch.nn.Module) and covers(self.target, op)
        return op is self.target or (isinstance(op, str) and op == self.target)


def covers(module_class: type, module: torch.nn.Module) -> bool:
    """Whether a registration for ``module_class`` applies to ``module``: an instance of the class, or of a subclass
    that does not override ``forward`` (one that does computes something else, and is traced through instead)."""
    return type(module) is module_class or (
        isinstance(module, module_class) and type(module).forward is module_class.forward
    )


class RuleHandle:
    """Returned by :func:`register_rule`; ``remove()`` (or leaving its ``with`` block) unregisters the rules."""

    def __init__(self, registry: RuleRegistry, entries: List[RuleEntry]) -> None:
        self._registry = registry
        self._entries = entries

    def remove(self) -> None:
        for entry in self._entries:
            if entry in self._registry.entries:
                self._registry.entries.remove(entry)
        self._entries = []

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


class RuleRegistry:
    """Rules in lookup order: the first entry that matches an operation wins."""

    def __init__(self) -> None:
        self.entries: List[RuleEntry] = []

    def add(
        self,
        targets: List[Target],
        rule: Rule,
        *,
        metadata: bool = False,
        first: bool = True,
        per_cell: Optional[str] = None,
    ) -> RuleHandle:
        for target in targets:
            if not isinstance(target, (type, str)) and not callable(target):
                raise TypeError(f"a rule target must be a module class, a function or a method name, got {target!r}.")
        new = [RuleEntry(target, rule, metadata, per_cell) for target in targets]
        if first:
            self.entries[0:0] = new
        else:
            self.entries.extend(new)
        return RuleHandle(self, new)

    def find(self, op: Any) -> Optional[RuleEntry]:
        for entry in self.entries:
            if entry.matches(op):
                return entry
        return None

    def apply(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        """Applies the rule of ``op`` (a module, function or method name) to its arguments: how a rule for a
        composite module masks its parts. A rule declaring a keyword-only ``rules`` parameter receives the
        conversion's registry there, to call ``rules.apply``.

        Raises:
            UnsupportedLayerError: if ``op`` has no rule and one of its arguments is masked.
        """
        if not (args and type(args[0]) is Masked) and not is_masked((args, kwargs)):  # the first: most calls
            return op(*args, **kwargs)
        entry = self.find(op)
        if entry is None:
            name = type(op).__qualname__ if isinstance(op, torch.nn.Module) else getattr(op, "__name__", repr(op))
            raise UnsupportedLayerError(f"{name} has no masking rule; register one with register_rule.")
        if takes_rules(entry.rule):
            kwargs = {**kwargs, "rules": self}
        return entry.rule(op, *args, **kwargs)


RULES = RuleRegistry()
"""The rules users register with :func:`register_rule`; consulted before the built-in ones."""

BUILTIN_RULES = RuleRegistry()
"""The built-in rules (:mod:`captum_layermask.core.rules`)."""

LEAVES = RuleRegistry()
"""Module classes and functions traced as one operation (:func:`register_leaf`); their entries have no rule."""

RULE_SETS: Dict[str, Callable[[], Any]] = {}


def register_leaf(target: Union[type, Callable[..., Any]]) -> Any:
    """Makes ``torch.fx`` record a module class or a function as one operation instead of tracing into it.

    For code that ``torch.fx`` cannot trace (data-dependent Python: size checks, run-time padding). A leaf that
    computes on the image still needs a rule (:func:`register_rule`), or the conversion names it in its
    :class:`~captum_layermask.UnsupportedLayerError`; one that reads only parameters or shapes (resizing a
    position embedding) needs none. A module class or a function with a rule is a leaf already.

    Args:
        target: a module class (covering subclasses that do not override ``forward``) or a Python function,
            which is recorded where a traced ``forward`` calls it by its global name (``torch.fx``'s
            ``autowrap_functions``).

    Returns:
        ``target``, so that it serves as a decorator; :func:`~captum_layermask.unregister` undoes it. One
        conversion can take leaves of its own instead: ``layer_masked(model, leaves=[...])``.

    Examples::

        >>> @register_leaf
        ... class SizeDependent(nn.Module): ...
    """
    check_leaf(target)
    LEAVES.add([target], None)  # type: ignore[arg-type]
    return target


def check_leaf(target: Any) -> None:
    """Raises ``TypeError`` for a leaf that is neither a module class nor a Python function."""
    if not isinstance(target, type) and not isinstance(target, types.FunctionType):
        raise TypeError(f"a leaf must be a module class or a Python function, got {target!r}.")


def leaf_registry(leaves: Any = ()) -> RuleRegistry:
    """The leaves of one conversion: ``leaves`` (checked) before the registered ones."""
    registry = RuleRegistry()
    for target in leaves:
        check_leaf(target)
        registry.add([target], None, first=False)  # type: ignore[arg-type]
    registry.entries.extend(LEAVES.entries)
    return registry


def leaf_functions(registry: RuleRegistry, leaves: RuleRegistry) -> Tuple[Callable[..., Any], ...]:
    """The Python functions that tracing records as one call: the leaves and those with a rule.

    ``torch.nn.functional``'s functions are left out: they dispatch on ``__torch_function__``, so ``torch.fx``
    records each as one call already, and autowrapping one makes the traced code re-register it under a dotted
    name that breaks every later trace (``F.rms_norm``: a KeyError in ``torch.fx``)."""
    targets = [entry.target for entry in (*leaves.entries, *registry.entries)]
    return tuple(
        dict.fromkeys(
            target
            for target in targets
            if isinstance(target, types.FunctionType) and target.__module__ != "torch.nn.functional"
        )
    )


def register_rule_set(package: str, load: Optional[Callable[[], Any]] = None) -> Any:
    """Installs the rules (and leaves) of a third-party layer library the first time a model uses it.

    ``load()`` runs once, when a model with a submodule defined in ``package`` (e.g. ``"timm"``) is converted,
    and registers its rules with :func:`register_rule`/``builtin_rule`` and its leaves with
    :func:`register_leaf`. The library is never imported for models that do not use it.

    Returns:
        ``load`` (without it, a decorator that registers the function it decorates and returns it);
        :func:`~captum_layermask.unregister` undoes it.
    """
    if load is None:
        return lambda function: register_rule_set(package, function)
    RULE_SETS[package] = load
    return load


def load_rule_sets(model: torch.nn.Module) -> None:
    """Runs the loaders of :func:`register_rule_set` for the packages whose modules ``model`` contains."""
    if not RULE_SETS:
        return
    packages = {type(module).__module__.partition(".")[0] for module in model.modules()}
    for package in sorted(packages & set(RULE_SETS)):
        if package in sys.modules:
            RULE_SETS[package]()
            del RULE_SETS[package]


def register_rule(*targets: Target, rule: Optional[Rule] = None, metadata: bool = False) -> Any:
    """Registers a masking rule for module classes, functions or tensor method names.

    User rules take precedence over the built-in ones and over earlier registrations. A rule registered for a
    module class also applies to its subclasses that do not override ``forward``; a module class that has a rule
    is not traced into. Usable as a decorator or called with ``rule=``.

    Args:
        *targets: module classes (``MyBlur``), functions as ``torch.fx`` records them (``torch.roll``), or
            tensor method names (``"roll"``).
        rule: ``rule(op, *args, **kwargs)`` (see :mod:`captum_layermask.core.registry`); if omitted, a decorator is
            returned.
        metadata: the operation reads only shapes/dtypes, never pixel values.

    Returns:
        ``rule`` (without it, a decorator that registers the function it decorates and returns it);
        :func:`~captum_layermask.unregister` undoes it.

    Examples::

        >>> @register_rule(MyBlur)
        ... def blur(op, x):
        ...     padded = neighbor_pad(x.value, x.mask, width=2)
        ...     return Masked(op(padded), propagate_mask(x.mask, kernel_size=5, padding=2))
    """
    if not targets:
        raise TypeError("register_rule needs at least one module class, function or method name.")
    if rule is None:
        return lambda function: register_rule(*targets, rule=function, metadata=metadata)
    RULES.add(list(targets), rule, metadata=metadata)
    return rule


def builtin_rule(*targets: Target, metadata: bool = False, per_cell: Optional[str] = None) -> Callable[[Rule], Rule]:
    """Registers a built-in rule after the ones registered so far (user rules always come first)."""

    def decorate(function: Rule) -> Rule:
        BUILTIN_RULES.add(list(targets), function, metadata=metadata, first=False, per_cell=per_cell)
        return function

    return decorate


def call_method(name: str) -> Callable[..., Any]:
    """The callable a rule receives as ``op`` for a tensor method: ``op(x, *args)`` is ``x.<name>(*args)``."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    method.__name__ = name
    return method


def takes_rules(rule: Rule) -> bool:
    """Whether a rule declares a keyword-only ``rules`` parameter (to receive the conversion's registry)."""
    try:
        parameter = inspect.signature(rule).parameters.get("rules")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY


class RuleCall:
    """The target of one node of a layer-masked graph: a rule bound to the operation and module path it masks.

    For a module, the module itself is the node's first argument (so that it stays registered on the graph
    module and moves with ``.to()``); for functions and methods the operation is bound here.
    """

    def __init__(
        self,
        rule: Rule,
        op: Optional[Callable[..., Any]],
        path: str,
        op_name: str,
        registry: Optional[RuleRegistry] = None,
    ) -> None:
        self.rule = rule
        self.op = op
        self.path = path
        self.registry = registry if takes_rules(rule) else None
        self.__name__ = f"{getattr(rule, '__name__', 'rule')}_{op_name}"  # how the generated code names the node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        op = self.op
        if op is None:
            op, args = args[0], args[1:]
        if not (args and type(args[0]) is Masked) and not is_masked((args, kwargs)):  # the first: most calls
            return op(*args, **kwargs)
        if self.registry is not None:
            kwargs = {**kwargs, "rules": self.registry}
        try:
            return self.rule(op, *args, **kwargs)
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"cannot layer-mask '{self.path}': {error}") from None

    def __repr__(self) -> str:
        return f"RuleCall({getattr(self.rule, '__name__', self.rule)!r} at '{self.path}')"
