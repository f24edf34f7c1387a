"""Named model configurations: `make`, `names`, `register`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax.random as jr
from jaxtyping import PRNGKeyArray

import diffenvs

from ._awm import AWM
from ._backbones._recurrent import LSTM, RNN
from ._backbones._transformer import Transformer
from ._checks import check_key
from ._hwm import HWM
from ._markov import Markov
from ._model import AbstractWorldModel

ModelFactory = Callable[..., AbstractWorldModel]


class _SequenceModel:
    """A family (AWM or HWM) over a backbone, built from the papers' sizes unless
    told otherwise."""

    def __init__(self, family: type[AWM] | type[HWM], backbone: str):
        self.family = family
        self.backbone = backbone
        self.sizes = dict(_TRANSFORMER if backbone == "transformer" else _RECURRENT)

    def __call__(self, state_dim, action_dim, horizon, *, key, **sizes):
        backbone_key, key = jr.split(key)
        sizes = {**self.sizes, **sizes}
        if self.backbone == "transformer":
            backbone = Transformer(horizon, **sizes, key=backbone_key)
        else:
            width = sizes.pop("width")
            cell = LSTM if self.backbone == "lstm" else RNN
            backbone = cell(width, **sizes, key=backbone_key)
        return self.family(state_dim, action_dim, horizon, backbone, key=key)


# arXiv App. C: inputs embedded to width 72; transformers of 2 layers, 3 heads and
# MLP width 64; LSTM and RNN of 2 layers of 64; the Markov MLP 2 x 64.
_TRANSFORMER = {"width": 72, "depth": 2, "num_heads": 3, "mlp_width": 64}
_RECURRENT = {"width": 72, "hidden_size": 64, "depth": 2}


def _markov(state_dim, action_dim, horizon, *, key, hidden_size=64, depth=2):
    return Markov(state_dim, action_dim, horizon, hidden_size, depth, key=key)


_REGISTRY: dict[str, ModelFactory] = {
    "awm-transformer": _SequenceModel(AWM, "transformer"),
    "awm-lstm": _SequenceModel(AWM, "lstm"),
    "awm-rnn": _SequenceModel(AWM, "rnn"),
    "hwm-transformer": _SequenceModel(HWM, "transformer"),
    "hwm-lstm": _SequenceModel(HWM, "lstm"),
    "markov": _markov,
}


def register(name: str, factory: ModelFactory, *, overwrite: bool = False) -> None:
    """Add a model configuration, so that `make(name, env, key=key)` builds it.

    Args:
        name: the configuration's name.
        factory: called as `factory(state_dim, action_dim, horizon, *, key,
            **sizes)`; returns a world model.
        overwrite: replace an existing configuration of the same name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"a model named {name!r} is already registered; pass overwrite=True to "
            f"replace it."
        )
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    """The names of the registered model configurations."""
    return tuple(_REGISTRY)


def sizes(name: str) -> dict[str, Any]:
    """The size options of configuration `name` and their defaults."""
    factory = _lookup(name)
    if isinstance(factory, _SequenceModel):
        return dict(factory.sizes)
    return {
        parameter.name: parameter.default
        for parameter in inspect.signature(factory).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name != "key"
    }


def make(
    name: str, env: diffenvs.AbstractEnv, *, key: PRNGKeyArray, **sizes_: Any
) -> AbstractWorldModel:
    """Build the model configuration `name` for the task `env`: its state and
    action sizes and its horizon.

    Args:
        name: one of `names()`: `awm-transformer`, `awm-lstm`, `awm-rnn`,
            `hwm-transformer`, `hwm-lstm`, `markov`.
        env: a `diffenvs` task.
        key: PRNG key for the initial weights.
        **sizes_: any of `sizes(name)`, e.g. `width=128` or `depth=3`. The
            defaults are the papers' (arXiv App. C).

    Returns:
        The model, untrained, with an identity normaliser (`worldmodels.fit`
        fits it from the data).
    """
    factory = _lookup(name)
    check_key(key)
    if not isinstance(env, diffenvs.AbstractEnv):
        raise TypeError(
            f"env must be a diffenvs task (diffenvs.make(...)), got {env!r}; to "
            f"build a model from plain sizes, use the model classes directly."
        )
    valid = sizes(name)
    unknown = sorted(set(sizes_) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown size {', '.join(unknown)} for model {name!r}; valid sizes are: "
            f"{', '.join(f'{k}={v}' for k, v in valid.items())}."
        )
    model = factory(env.state_dim, env.action_dim, env.horizon, key=key, **sizes_)
    if not callable(getattr(model, "predict", None)):
        raise TypeError(
            f"the factory registered as {name!r} returned {type(model).__name__}, "
            f"expected a world model (an object with predict(s1, actions))."
        )
    return model


def _lookup(name: str) -> ModelFactory:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise ValueError(
        f"unknown model name={name!r}; valid names are: {', '.join(_REGISTRY)}."
    )
