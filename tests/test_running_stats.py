"""The running-statistics utilities: ``reset_running_stats`` (a fresh start, for
recalibrating the running statistics on a trained model), ``stale_layers`` (the layers whose
new state a step did not thread back) and ``sync_running_stats`` (one set of running
statistics for all devices).

References are the means and variances of the batches in NumPy, and the layers a test
threads by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from helpers import WITH_RUNNING_STATS, ZOO_CHANNELS, assert_trees_close, index, zoo

pytestmark = pytest.mark.usefixtures("statistics_path")

C = ZOO_CHANNELS  # the Zoo's, whose layers stale_layers names; any number serves the rest
DEVICES = 8
RNG = np.random.default_rng(0)
PARAMS = {"weight": jnp.asarray(RNG.normal(1, 0.3, C)), "bias": jnp.asarray(RNG.normal(0, 0.3, C))}
STATE = {"running_mean": jnp.asarray(RNG.normal(size=C)),
         "running_var": jnp.asarray(RNG.uniform(0.5, 2.0, C)),
         "num_batches_tracked": jnp.asarray(3, jnp.int32)}
# The micro-batches of one optimizer step of gradient accumulation.
MICRO = [RNG.normal(2.0, 1.5, (n, C, 4)) for n in (5, 3)]
CLOSE = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Reset, and recalibration from a fresh start


@pytest.mark.quick
def test_reset_running_stats_restores_every_layer_of_a_tree_and_keeps_its_dtypes():
    _, layer32 = jbn.init(2)
    _, layer64 = jbn.init(3, dtype=jnp.float64)
    frozen = {"running_mean": jnp.full(2, 7.0), "running_var": jnp.full(2, 8.0)}
    trained = jax.tree.map(lambda v: v + 7, {"blocks": [layer32, {}], "head": layer64})
    trained["frozen"] = frozen  # no count: it does not learn, and is left as it is
    fresh = jbn.reset_running_stats(trained)
    expected = {"blocks": [layer32, {}], "head": layer64, "frozen": frozen}
    assert jax.tree.structure(fresh) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(fresh), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert int(trained["head"]["num_batches_tracked"]) == 7  # the input is left as it was


def test_recalibration_averages_the_batch_means_and_unbiased_variances():
    """A fresh state and momentum=None over K batches: each batch weighs 1/K."""
    batches = [RNG.normal(3.0, 2.0, (6, C)) for _ in range(3)]
    masks = [None, None, np.arange(6) < 4]  # the last batch: 4 valid examples
    trained = {**STATE, "num_batches_tracked": jnp.asarray(500, jnp.int32)}
    state = jbn.reset_running_stats(trained)
    step = jax.jit(lambda s, x, m: jbn.batchnorm(PARAMS, s, x, True, mask=m, momentum=None)[1])
    for x, mask in zip(batches, masks, strict=True):
        state = step(state, jnp.asarray(x), mask if mask is None else jnp.asarray(mask))
    valid = [x if mask is None else x[mask] for x, mask in zip(batches, masks, strict=True)]
    np.testing.assert_allclose(state["running_mean"], np.mean([v.mean(0) for v in valid], 0),
                               rtol=1e-14)
    np.testing.assert_allclose(state["running_var"],
                               np.mean([v.var(0, ddof=1) for v in valid], 0), rtol=1e-14)
    assert int(state["num_batches_tracked"]) == 3
    # Batches of equal counts: the mean is that of all their values.
    state = jbn.reset_running_stats(trained)
    for x in batches:
        state = step(state, jnp.asarray(x), None)
    np.testing.assert_allclose(state["running_mean"], np.concatenate(batches).mean(0),
                               rtol=1e-14)


# ---------------------------------------------------------------------------------------
# Layers whose new state was not threaded


def model_of_three(params, state, x, forget=""):
    """bn1, then the two layers of block, each returning its new state unless forgotten."""
    x, new = jbn.batchnorm(params["bn1"], state["bn1"], x, True)
    new_state = {"bn1": state["bn1"] if forget == "bn1" else new, "block": []}
    for i, (p, s) in enumerate(zip(params["block"], state["block"], strict=True)):
        x, new = jbn.batchnorm(p, s, x, True)
        new_state["block"].append(s if forget == f"block.{i}" else new)
    return x, new_state


@pytest.mark.quick
@pytest.mark.parametrize("forget", ["", "bn1", "block.1"])
def test_stale_layers_names_each_layer_whose_new_state_was_not_threaded(forget):
    (p1, s1), (p2, s2), (p3, s3) = (jbn.init(C) for _ in range(3))
    params, state = {"bn1": p1, "block": [p2, p3]}, {"bn1": s1, "block": [s2, s3]}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, C)), jnp.float32)
    _, new_state = model_of_three(params, state, x, forget)
    assert jbn.stale_layers(state, new_state) == ([forget] if forget else [])


def test_stale_layers_names_layers_missing_from_the_new_state_and_takes_one_layer():
    params, state, _ = jbn.from_torch_model(zoo().state_dict())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, C)))
    new_state = {path: jbn.batchnorm(params[path], state[path], x, True)[1]
                 for path in ("head_norm", "no_bias")}
    # The frozen layer counts no batches: it is never stale.
    assert jbn.stale_layers(state, new_state) == sorted(
        path for path in WITH_RUNNING_STATS if path not in new_state and path != "frozen")
    assert jbn.stale_layers(state["no_bias"], new_state["no_bias"]) == []
    assert jbn.stale_layers(state["no_bias"], state["no_bias"]) == [""]


def test_stale_layers_and_reset_know_the_accumulator():
    params, state = jbn.init(C, accumulation_steps=2)
    _, after = jbn.batchnorm(params, state, jnp.asarray(MICRO[0], jnp.float32), True,
                             accumulation_steps=2)
    assert int(after["num_batches_tracked"]) == 0  # the step is under way
    assert jbn.stale_layers({"bn": state}, {"bn": after}) == []
    assert jbn.stale_layers({"bn": after}, {"bn": after}) == ["bn"]
    fresh = jbn.reset_running_stats(after)
    assert_trees_close(fresh, state, rtol=0)


# ---------------------------------------------------------------------------------------
# Synchronized across devices


@pytest.mark.quick
@pytest.mark.parametrize("weighted", [False, True], ids=["equal weights", "weighted"])
def test_sync_running_stats_pools_the_devices_means_variances_and_spread(weighted):
    means = RNG.normal(size=(DEVICES, C))
    variances = RNG.uniform(0.5, 2.0, (DEVICES, C))
    weights = RNG.integers(1, 100, DEVICES).astype(float) if weighted else np.ones(DEVICES)
    states = {"block": {"bn": {"running_mean": jnp.asarray(means),
                               "running_var": jnp.asarray(variances),
                               "num_batches_tracked": jnp.full(DEVICES, 7, jnp.int32)}},
              "other": jnp.arange(DEVICES)}

    def sync(states, weight):
        return jbn.sync_running_stats(states, "data", weight=weight if weighted else None)

    synced = jax.vmap(sync, axis_name="data")(states, jnp.asarray(weights))
    mean = (weights[:, None] * means).sum(0) / weights.sum()
    var = (weights[:, None] * (variances + (means - mean) ** 2)).sum(0) / weights.sum()
    for device in range(DEVICES):
        layer = index(synced, device)["block"]["bn"]
        np.testing.assert_allclose(layer["running_mean"], mean, **CLOSE)
        np.testing.assert_allclose(layer["running_var"], var, **CLOSE)
        assert int(layer["num_batches_tracked"]) == 7
    np.testing.assert_array_equal(synced["other"], states["other"])

