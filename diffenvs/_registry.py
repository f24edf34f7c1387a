"""The registry of tasks: `make`, `names`, `register`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ._env import AbstractEnv
from ._tasks._bacteria import Bacteria
from ._tasks._bioreactor import Bioreactor
from ._tasks._cancer import Cancer
from ._tasks._credit_assignment import CreditAssignment
from ._tasks._double_pendulum import DoublePendulum
from ._tasks._harvest import Harvest
from ._tasks._hiv import HIV
from ._tasks._invasive_plant import InvasivePlant
from ._tasks._mould import Mould
from ._tasks._one_bounce import OneBounce
from ._tasks._timber import Timber

EnvFactory = Callable[..., AbstractEnv]

_REGISTRY: dict[str, EnvFactory] = {}

# The eight optimal-control tasks of the Myriad testbed, in the papers' order.
CONTROL_TASKS: tuple[str, ...] = (
    "cancer",
    "bioreactor",
    "mould",
    "bacteria",
    "harvest",
    "invasive_plant",
    "hiv",
    "timber",
)


def register(name: str, factory: EnvFactory, *, overwrite: bool = False) -> None:
    """Add a task to the registry, so that `make(name, horizon=H)` builds it.

    Args:
        name: the task's name.
        factory: called as `factory(horizon=H, **options)`; must return an
            `AbstractEnv`. A subclass of `AbstractEnv` is itself such a factory.
        overwrite: replace an existing task of the same name instead of failing.
    """
    if not _accepts(factory, "horizon"):
        raise TypeError(
            f"factory must accept the horizon as a keyword, factory(horizon=H, "
            f"**options); {factory!r} has no horizon parameter."
        )
    add_entry(_REGISTRY, "task", name, factory, overwrite)


def names() -> tuple[str, ...]:
    """The names of the registered tasks, in registration order."""
    return tuple(_REGISTRY)


def make(name: str, horizon: int, **options) -> AbstractEnv:
    """Build the registered task `name` with `horizon` control steps.

    Args:
        name: one of `names()`.
        horizon: the number of control steps H, a positive int.
        **options: passed to the task, e.g. `solver=diffrax.Heun()` or a physical
            constant such as `r=0.4`.

    Returns:
        The task, an `AbstractEnv`.
    """
    factory = lookup(_REGISTRY, "task", name)
    try:
        env = factory(horizon=horizon, **options)
    except TypeError as error:
        # An unknown option is the user's mistake: say which options exist.
        parameters = _options_of(factory)
        unknown = [key for key in options if parameters and key not in parameters]
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for task {name!r}; valid options are: "
                f"{', '.join(sorted(parameters))}."
            ) from None
        error.add_note(_building(name, horizon, options))
        raise
    except Exception as error:
        error.add_note(_building(name, horizon, options))
        raise
    if not isinstance(env, AbstractEnv):
        raise TypeError(
            f"the factory registered as {name!r} returned {type(env).__name__}, "
            f"expected an AbstractEnv."
        )
    return env


def add_entry(
    registry: dict[str, Callable],
    kind: str,
    name: str,
    factory: Callable,
    overwrite: bool,
) -> None:
    """Add `factory` under `name` to `registry` (of tasks, of models: `kind`)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}.")
    if name in registry and not overwrite:
        raise ValueError(
            f"a {kind} named {name!r} is already registered; pass overwrite=True to "
            f"replace it."
        )
    registry[name] = factory


def lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    """The factory registered as `name`, or an error that lists the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown {kind} name={name!r}; valid names are: {', '.join(registry)}."
        ) from None


def _building(name: str, horizon: object, options: dict) -> str:
    return (
        f"(raised by the factory of task {name!r}, called with horizon={horizon!r}"
        f"{''.join(f', {k}={v!r}' for k, v in options.items())})"
    )


def _options_of(factory: EnvFactory) -> set[str]:
    """The keyword options `factory` names; empty when it cannot be told (no
    signature, or a `**kwargs` that takes anything)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return set()
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return set()
    return {p.name for p in parameters if p.name != "horizon"}


def _accepts(factory: Callable, keyword: str) -> bool:
    """Whether `factory` can be called with `keyword=...` (true when its signature
    cannot be read)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == keyword and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in signature.parameters.values()
    )


for _cls in (
    Cancer,
    Bioreactor,
    Mould,
    Bacteria,
    Harvest,
    InvasivePlant,
    HIV,
    Timber,
    DoublePendulum,
    OneBounce,
    CreditAssignment,
):
    register(_cls.name, _cls)
