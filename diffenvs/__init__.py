"""Differentiable deterministic control tasks, integrated with Diffrax."""

from ._closed_loop import (
    Dynamics as Dynamics,
    Stepper as Stepper,
    Trajectory as Trajectory,
    closed_loop as closed_loop,
    observation as observation,
    step_keys as step_keys,
)
from ._control import AbstractControlTask as AbstractControlTask
from ._env import (
    AbstractEnv as AbstractEnv,
    EnvState as EnvState,
    Rollout as Rollout,
)
from ._errors import (
    branched_error_if as branched_error_if,
    error_if as error_if,
)
from ._hashing import tree_hash as tree_hash
from ._references import (
    References as References,
    optimal_return as optimal_return,
    random_return as random_return,
)
from ._registry import (
    CONTROL_TASKS as CONTROL_TASKS,
    make as make,
    names as names,
    register as register,
)
from ._tasks._bacteria import Bacteria as Bacteria
from ._tasks._bioreactor import Bioreactor as Bioreactor
from ._tasks._cancer import Cancer as Cancer
from ._tasks._credit_assignment import CreditAssignment as CreditAssignment
from ._tasks._double_pendulum import DoublePendulum as DoublePendulum
from ._tasks._harvest import Harvest as Harvest
from ._tasks._hiv import HIV as HIV
from ._tasks._invasive_plant import InvasivePlant as InvasivePlant
from ._tasks._mould import Mould as Mould
from ._tasks._one_bounce import OneBounce as OneBounce
from ._tasks._timber import Timber as Timber
