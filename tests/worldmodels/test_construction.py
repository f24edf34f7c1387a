"""Building models: `make`, `names`, `sizes`, `register`, the classes from plain
sizes, the normaliser, and the errors a user meets on the way."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffenvs
import worldmodels


def test_names_are_the_papers_families():
    assert set(worldmodels.names()) >= {
        "awm-transformer",
        "awm-lstm",
        "awm-rnn",
        "hwm-transformer",
        "hwm-lstm",
        "markov",
    }


def test_unknown_name_lists_the_valid_ones():
    env = diffenvs.make("hiv", horizon=10)
    with pytest.raises(ValueError, match="awm-transformer, awm-lstm") as info:
        worldmodels.make("awm-gru", env, key=jr.key(0))
    assert "'awm-gru'" in str(info.value)


def test_unknown_size_lists_the_valid_ones():
    env = diffenvs.make("hiv", horizon=10)
    with pytest.raises(TypeError, match="num_heads=3"):
        worldmodels.make("awm-transformer", env, key=jr.key(0), heads=4)


def test_make_needs_a_task():
    with pytest.raises(TypeError, match="diffenvs task"):
        worldmodels.make("markov", "hiv", key=jr.key(0))  # pyright: ignore


def test_paper_sizes_by_default_and_every_size_configurable():
    env = diffenvs.make("hiv", horizon=10)
    model = worldmodels.make("awm-transformer", env, key=jr.key(0))
    assert isinstance(model, worldmodels.AWM)
    assert isinstance(model.backbone, worldmodels.Transformer)
    assert len(model.backbone.blocks) == 2
    assert model.backbone.blocks[0].num_heads == 3
    assert model.backbone.in_size == 72
    assert model.backbone.blocks[0].hidden.out_features == 64
    wide = worldmodels.make(
        "awm-transformer", env, key=jr.key(0), width=32, depth=3, num_heads=4
    )
    assert len(wide.backbone.blocks) == 3 and wide.backbone.in_size == 32
    lstm = worldmodels.make("hwm-lstm", env, key=jr.key(0), hidden_size=16)
    assert isinstance(lstm, worldmodels.HWM)
    assert [cell.hidden_size for cell in lstm.backbone.cells] == [16, 16]
    assert worldmodels.sizes("markov") == {"hidden_size": 64, "depth": 2}
    assert worldmodels.sizes("awm-rnn") == {"width": 72, "hidden_size": 64, "depth": 2}


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="width must be a multiple of num_heads"):
        worldmodels.Transformer(10, width=70, num_heads=3, key=jr.key(0))
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        worldmodels.LSTM(8, hidden_size=0, key=jr.key(0))


def test_classes_from_plain_sizes_without_a_task():
    key = jr.key(0)
    backbone = worldmodels.RNN(16, hidden_size=8, depth=1, key=key)
    model = worldmodels.AWM(
        state_dim=3, action_dim=2, horizon=7, backbone=backbone, key=key
    )
    states = model.predict(jnp.ones(3), jnp.zeros((7, 2)))
    assert states.shape == (7, 3)


def test_register_a_configuration():
    def tiny_markov(state_dim, action_dim, horizon, *, key, hidden_size=4):
        return worldmodels.Markov(
            state_dim, action_dim, horizon, hidden_size, 1, key=key
        )

    worldmodels.register("test-tiny-markov", tiny_markov)
    env = diffenvs.make("one_bounce", horizon=5)
    model = worldmodels.make("test-tiny-markov", env, key=jr.key(0))
    assert model.mlp.width_size == 4
    assert worldmodels.sizes("test-tiny-markov") == {"hidden_size": 4}
    with pytest.raises(ValueError, match="already registered"):
        worldmodels.register("test-tiny-markov", tiny_markov)


def test_normaliser_statistics():
    states = jnp.array([[800.0, 1.0, 5.0], [1200.0, 3.0, 5.0]])
    normaliser = worldmodels.Normaliser.from_states(states)
    np.testing.assert_allclose(normaliser.mean, [1000.0, 2.0, 5.0])
    # The constant third dimension is shifted, not divided by zero.
    np.testing.assert_allclose(normaliser.scale, [200.0, 1.0, 1.0])
    z = normaliser.normalise(states)
    np.testing.assert_allclose(z[:, :2], [[-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(normaliser.denormalise(z), states, rtol=1e-6)


def test_normaliser_carries_no_gradient():
    normaliser = worldmodels.Normaliser(jnp.array([2.0]), jnp.array([4.0]))
    grads = jax.grad(lambda n: jnp.sum(n.normalise(jnp.array([3.0]))))(normaliser)
    assert float(grads.mean[0]) == 0.0 and float(grads.scale[0]) == 0.0


def test_incremental_needs_a_predict_method_or_an_action_size():
    with pytest.raises(TypeError, match="predict"):
        worldmodels.incremental(object(), action_dim=1)

    class OnlyPredict:
        def predict(self, s1, actions):
            return s1 + jnp.cumsum(actions, 0)

    with pytest.raises(ValueError, match="action_dim"):
        worldmodels.incremental(OnlyPredict())
    stepper = worldmodels.incremental(OnlyPredict(), action_dim=1)
    assert isinstance(stepper, worldmodels.PredictOnly)
