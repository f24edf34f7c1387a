"""Backpropagation-based policy optimisation (BPO, Ma et al. 2024, Algorithm 1)
through a differentiable simulator or a world model learned alongside."""

from ._bpo import (
    BPO as BPO,
    Hyperparameters as Hyperparameters,
    TrainState as TrainState,
)
from ._buffer import ReplayBuffer as ReplayBuffer
from ._checkpoint import CheckpointError as CheckpointError
from ._objective import (
    Imagined as Imagined,
    batch_objective as batch_objective,
    objective as objective,
)
from ._policy import TanhGaussianPolicy as TanhGaussianPolicy
from ._train import Result as Result
