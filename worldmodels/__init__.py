"""World models behind one protocol, `predict(s1, actions) -> states`.

Actions World Models (transformer, LSTM, RNN backbones), History World Models
(transformer, LSTM) and Markov one-step models, as in Ma et al. 2024, "Do
Transformer World Models Give Better Policy Gradients?" (arXiv 2402.05290), §4.
Every `diffenvs` task satisfies the same protocol.
"""

from ._awm import AWM as AWM
from ._backbones._attention import (
    AbstractAttention as AbstractAttention,
    BlockedAttention as BlockedAttention,
    ReferenceAttention as ReferenceAttention,
)
from ._backbones._backbone import AbstractBackbone as AbstractBackbone
from ._backbones._recurrent import LSTM as LSTM, RNN as RNN
from ._backbones._transformer import Transformer as Transformer
from ._hwm import HWM as HWM
from ._learned import (
    AbstractLearnedModel as AbstractLearnedModel,
    AbstractSequenceModel as AbstractSequenceModel,
)
from ._markov import Markov as Markov
from ._model import (
    AbstractWorldModel as AbstractWorldModel,
    Incremental as Incremental,
    PredictOnly as PredictOnly,
    Simulator as Simulator,
    TeacherForced as TeacherForced,
    incremental as incremental,
    unroll as unroll,
)
from ._normaliser import Normaliser as Normaliser
from ._registry import (
    make as make,
    names as names,
    register as register,
    sizes as sizes,
)
from ._rollout import AbstractCache as AbstractCache
from ._training import (
    DEFAULT_OPTIMISER as DEFAULT_OPTIMISER,
    Episodes as Episodes,
    fit as fit,
    init_optimiser as init_optimiser,
    loss as loss,
    parameters as parameters,
    update as update,
    with_normaliser as with_normaliser,
)
