"""Bad input is refused at trace time with an error naming the argument and what was seen."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

PARAMS, STATE = jbn.init(3)
X = jnp.ones((4, 3, 5))
LIMITS = (2.0, 0.5)


def exactly(message):
    """A pattern for the whole message (JAX may append its traceback note on a new line)."""
    return "^" + re.escape(message) + r"(\n|$)"


def call(params=PARAMS, state=STATE, x=X, training=True, **kwargs):
    return jbn.batchnorm(params, state, x, training, **kwargs)


BAD_CALLS = {
    "channel count differs from params": (
        dict(x=jnp.ones((4, 5, 2))), ValueError,
        exactly("x has 5 channels at axis 1 (x of shape (4, 5, 2)), params['weight'] has 3")),
    "channel count differs from state": (
        dict(params={}, x=jnp.ones((4, 5, 2))), ValueError,
        exactly("x has 5 channels at axis 1 (x of shape (4, 5, 2)), state['running_mean'] has 3")),
    "channels-last x with the default axis": (
        dict(x=jnp.ones((4, 5, 3))), ValueError,
        re.escape("x has 5 channels at axis 1 (x of shape (4, 5, 3)), params['weight'] has 3; "
                  "axis -1 of x has size 3: pass axis=-1")),
    "channels at another axis": (
        dict(x=jnp.ones((4, 5, 3, 7)), axis=-1), ValueError,
        re.escape("x has 7 channels at axis -1 (x of shape (4, 5, 3, 7)), params['weight'] has "
                  "3; axis 2 of x has size 3: pass axis=2")),
    "params and state of different sizes": (
        dict(state=jbn.init(4)[1]), ValueError,
        r"state\['running_mean'\] must have shape \(3,\).*got shape \(4,\)"),
    "rank 1 without axis_name": (
        dict(x=jnp.ones(3)), ValueError, r"rank ≥ 2.*\(3,\).*axis_name"),
    "integer x": (dict(x=jnp.ones((4, 3), jnp.int32)), TypeError, r"x must be a floating.*int32"),
    "x not an array": (dict(x=[[1.0, 2.0, 3.0]]), TypeError, r"x must be an array.*list"),
    "momentum above 1": (dict(momentum=1.5), ValueError, r"momentum.*\[0, 1\].*1\.5"),
    "momentum below 0": (dict(momentum=-0.1), ValueError, r"momentum.*-0\.1"),
    "momentum a string": (dict(momentum="0.1"), TypeError, r"momentum.*'0\.1'"),
    "negative eps": (dict(eps=-1e-5), ValueError, r"eps.*≥ 0.*-1e-05"),
    "zero eps in training": (
        dict(eps=0.0), ValueError,
        re.escape("eps must be positive when the batch's own statistics normalize (training, or "
                  "eval with state == {}), as in PyTorch; got 0.0")),
    "zero eps in eval without running statistics": (
        dict(eps=0.0, state={}, training=False), ValueError, r"eps must be positive"),
    "axis out of range of one example under vmap": (
        dict(x=jnp.ones(3), axis_name="batch"), ValueError,
        re.escape("axis 1 is out of range for x of rank 1 (shape (3,)); under jax.vmap over "
                  "examples x is one example, without its batch axis: for channels first, as "
                  "in (C,) or (C, L), pass axis=0")),
    "nan eps": (dict(eps=float("nan")), ValueError, r"eps.*nan"),
    "params with a bias alone": (
        dict(params={"bias": jnp.zeros(3)}), ValueError,
        exactly("params must have keys ['weight', 'bias'], or ['weight'] alone (PyTorch's "
                "bias=False) (or be empty); missing ['weight'], unexpected []")),
    "params with extra key": (
        dict(params={**PARAMS, "scale": jnp.ones(3)}), ValueError,
        r"params.*unexpected \['scale'\]"),
    "state with a running mean alone": (
        dict(state={"running_mean": jnp.zeros(3)}), ValueError,
        r"state must have keys \['running_mean', 'running_var', 'num_batches_tracked'\], or "
        r"\['running_mean', 'running_var'\] alone \(a frozen layer's.*missing "
        r"\['num_batches_tracked', 'running_var'\]"),
    "training a state without a count": (
        dict(state={"running_mean": jnp.zeros(3), "running_var": jnp.ones(3)}), ValueError,
        re.escape("state has no 'num_batches_tracked': it is a frozen layer's "
                  "(FrozenBatchNorm2d keeps none), which training does not update. Normalize "
                  "with it (training=False, or mode='frozen'), or give it a count to train it: "
                  "{**state, 'num_batches_tracked': jnp.zeros((), jnp.int32)}")),
    "training a bfloat16 state": (
        dict(state={**STATE, "running_var": STATE["running_var"].astype(jnp.bfloat16)}),
        ValueError,
        r"state\['running_var'\] is bfloat16, and training updates it: its small updates "
        r"would round away.*\.astype\(jnp\.float32\)"),
    "mode unknown": (dict(mode="eval"), ValueError,
                     exactly("mode must be one of ['tracked', 'untracked', 'frozen'], got "
                             "'eval'")),
    "mode of Equinox, in a functional call": (
        dict(mode="batch"), ValueError,
        exactly("mode must be one of ['tracked', 'untracked', 'frozen'], got 'batch'")),
    "mode not a str": (dict(mode=None), TypeError, r"mode must be a str.*got None"),
    "frozen without running statistics": (
        dict(state={}, mode="frozen"), ValueError,
        r"mode='frozen' normalizes with the running statistics, and state is \{\}"),
    "zero eps where untracked": (dict(eps=0.0, training=False, mode="untracked"), ValueError,
                                 r"eps must be positive"),
    "params not a dict": (dict(params=[jnp.ones(3)]), TypeError, r"params must be a dict.*list"),
    "integer weight": (
        dict(params={"weight": jnp.ones(3, jnp.int32), "bias": jnp.zeros(3)}), ValueError,
        r"params\['weight'\].*floating.*int32"),
    "2-D running_var": (
        dict(state={**STATE, "running_var": jnp.ones((3, 1))}), ValueError,
        r"state\['running_var'\].*\(3,\).*\(3, 1\)"),
    "float batch count": (
        dict(state={**STATE, "num_batches_tracked": jnp.zeros(())}), ValueError,
        r"state\['num_batches_tracked'\].*int32 or int64.*float"),
    "int8 batch count, which would wrap around": (
        dict(state={**STATE, "num_batches_tracked": jnp.zeros((), jnp.int8)}), ValueError,
        r"state\['num_batches_tracked'\].*int32 or int64.*int8"),
    "weight as a list": (
        dict(params={"weight": [1.0, 1.0, 1.0], "bias": jnp.zeros(3)}), TypeError,
        r"params\['weight'\] must be an array, got list"),
    "eps an array": (dict(eps=jnp.asarray(1e-5)), TypeError, r"eps must be a float"),
    "eps a bool": (dict(eps=True), TypeError, r"eps must be a float.*True"),
    "axis_index_groups without axis_name": (
        dict(axis_index_groups=[[0, 1]]), ValueError, r"axis_index_groups.*needs axis_name"),
    "axis out of range": (
        dict(axis=3), ValueError,
        exactly("axis 3 is out of range for x of rank 3 (shape (4, 3, 5))")),
    "axis not an int": (dict(axis=1.0), TypeError, r"axis must be an int.*1\.0"),
    "training an array": (
        dict(training=jnp.asarray(True)), TypeError,
        re.escape("training must be a Python bool, got ArrayImpl. It is an array: pass a Python "
                  "bool, e.g. bool(training).")),
    "training a NumPy array": (
        dict(training=np.asarray(True)), TypeError, r"got ndarray.*bool\(training\)"),
    "training a string": (dict(training="yes"), TypeError, r"training must be a Python bool.*str"),
    "mask of floats": (dict(mask=jnp.ones(4)), TypeError, r"mask must be a boolean.*float"),
    "mask of wrong shape": (
        dict(mask=jnp.ones((4, 3), bool)), ValueError,
        r"mask.*\(4, 5\) or \(4,\) or \(\).*got \(4, 3\)"),
    "mask with the channel axis": (
        dict(mask=jnp.ones((4, 3, 5), bool)), ValueError, r"mask.*got \(4, 3, 5\)"),
    "one value per channel in training": (
        dict(x=jnp.ones((1, 3))), ValueError, r"Expected more than 1 value per channel"),
    "one value per channel without running stats": (
        dict(state={}, training=False, x=jnp.ones((1, 3))), ValueError,
        r"Expected more than 1 value per channel"),
    "unbound axis_name": (dict(axis_name="batch"), ValueError, r"axis_name 'batch' is not bound"),
    "renorm in training without running statistics": (
        dict(state={}, renorm=LIMITS), ValueError,
        r"renorm corrects the batch statistics towards the running statistics, and state is "
        r"\{\} \(track_running_stats=False\)"),
    "renorm in eval without running statistics": (
        dict(state={}, training=False, renorm=LIMITS), ValueError, r"state is \{\}"),
    "renorm not a pair": (dict(renorm=2.0), TypeError, r"renorm must be None or a pair "
                                                      r"\(rmax, dmax\), got 2\.0"),
    "renorm of three": (dict(renorm=(2.0, 1.0, 0.0)), TypeError, r"a pair"),
    "rmax below 1": (dict(renorm=(0.5, 1.0)), ValueError, r"renorm's rmax must be ≥ 1, got 0\.5"),
    "negative dmax": (dict(renorm=(2.0, -1.0)), ValueError, r"renorm's dmax must be ≥ 0, got -1"),
    "nan rmax": (dict(renorm=(float("nan"), 1.0)), ValueError, r"rmax must be ≥ 1, got nan"),
    "rmax a vector": (dict(renorm=(jnp.ones(3), 1.0)), ValueError,
                      r"renorm's rmax must be a scalar, got shape \(3,\)"),
    "dmax a string": (dict(renorm=(2.0, "1")), TypeError, r"dmax must be a real number.*'1'"),
    "dmax a bool": (dict(renorm=(2.0, True)), TypeError, r"dmax must be a real number"),
    "ghost batch size not dividing the batch": (
        dict(virtual_batch_size=3), ValueError,
        r"virtual_batch_size 3 must divide the batch: x has 4 examples on axis 0 "
        r"\(shape \(4, 3, 5\)\)"),
    "ghost batch size 0": (dict(virtual_batch_size=0), ValueError,
                           r"virtual_batch_size must be positive, got 0"),
    "ghost batch size a float": (dict(virtual_batch_size=4.0), TypeError,
                                 r"virtual_batch_size must be an int or None, got 4\.0"),
    "ghost batch size in eval a float": (dict(virtual_batch_size=4.0, training=False),
                                         TypeError, r"virtual_batch_size must be an int"),
    "ghost batches with channels on axis 0": (
        dict(x=jnp.ones((3, 8)), axis=0, virtual_batch_size=4), ValueError,
        r"virtual_batch_size groups the examples of axis 0, and x \(shape \(3, 8\)\) has its "
        r"channels there"),
    "group_size without axis_name": (
        dict(group_size=2), ValueError, r"group_size 2 needs axis_name"),
    "group_size with axis_index_groups": (
        dict(group_size=2, axis_index_groups=[[0, 1]], axis_name="batch"), ValueError,
        r"pass group_size or axis_index_groups, not both"),
    "accumulation_steps without an accumulator": (
        dict(accumulation_steps=4), ValueError,
        r"accumulation_steps accumulates into state\['accumulator'\], and state has keys "
        r"\['num_batches_tracked', 'running_mean', 'running_var'\]: make the state with "
        r"jbn.init\(num_features, accumulation_steps=k\)"),
    "accumulation_steps 0": (
        dict(accumulation_steps=0, state=jbn.init(3, accumulation_steps=2)[1]), ValueError,
        r"accumulation_steps must be positive, got 0"),
    "accumulation_steps a float": (
        dict(accumulation_steps=2.0, state=jbn.init(3, accumulation_steps=2)[1]), TypeError,
        r"accumulation_steps must be an int or None, got 2\.0"),
    "accumulation_steps with ghost batches": (
        dict(accumulation_steps=2, virtual_batch_size=2,
             state=jbn.init(3, accumulation_steps=2)[1]), ValueError,
        r"accumulation_steps and virtual_batch_size do not go together"),
    "unknown accumulation_pooling": (
        dict(accumulation_pooling="mean"), ValueError,
        r"accumulation_pooling must be one of \['union', 'micro-batches'\], got 'mean'"),
    "accumulator of the wrong shape": (
        dict(state={**jbn.init(3, accumulation_steps=2)[1],
                    "accumulator": {**jbn.init(4, accumulation_steps=2)[1]["accumulator"]}}),
        ValueError, r"state\['accumulator'\]\['mean_head'\] must have shape \(3,\)"),
    "statistics not a dict": (
        dict(statistics=(jnp.zeros(3), jnp.ones(3))), TypeError,
        r"statistics must be a dict with 'mean' and 'var'"),
    "statistics of the wrong size": (
        dict(statistics={"mean": jnp.zeros(4), "var": jnp.ones(4)}), ValueError,
        r"^statistics\['mean'\] must have shape \(3,\) and a floating dtype, got shape "
        r"\(4,\) float64"),
    "statistics in eval with running statistics": (
        dict(statistics={"mean": jnp.zeros(3), "var": jnp.ones(3)}, training=False),
        ValueError, r"in eval the running statistics normalize"),
    "statistics with renorm": (
        dict(statistics={"mean": jnp.zeros(3), "var": jnp.ones(3)}, renorm=LIMITS),
        ValueError, r"renorm and virtual_batch_size, which change how the batch's own "
                    r"normalize, do not go with them"),
    "one value per channel in each ghost batch": (
        dict(x=jnp.ones((8, 3)), virtual_batch_size=1), ValueError,
        r"more than 1 value per channel in each ghost batch, got virtual_batch_size=1"),
}


TRACED_TRAINING = ("training must be a Python bool, got DynamicJaxprTracer. It is traced: mark "
                   "it static, e.g. jax.jit(f, static_argnames='training').")


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_is_refused_with_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_is_refused_at_trace_time_under_jit(kwargs, error, message):
    """The same table under jax.jit: arrays (and what holds one) are traced arguments, the
    rest Python values closed over, as a user would pass them."""
    def holds_array(value):
        return any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(value))
    traced = {k: v for k, v in kwargs.items()
              if k in ("params", "state", "x", "mask") or holds_array(v)}
    static = {k: v for k, v in kwargs.items() if k not in traced}
    if "training" in traced:
        # Under jit an array argument is traced: the hint is then to mark it static.
        message = re.escape(TRACED_TRAINING)
    with pytest.raises(error, match=message):
        jax.jit(lambda traced: call(**traced, **static))(traced)


def test_num_features_must_be_positive_int():
    with pytest.raises(ValueError, match=r"num_features must be positive, got 0"):
        jbn.init(0)
    with pytest.raises(TypeError, match=r"num_features must be an int, got 3\.0"):
        jbn.init(3.0)
    with pytest.raises(TypeError, match=re.escape("dtype must be a floating dtype, got int32")):
        jbn.init(3, dtype=jnp.int32)


def test_one_value_per_channel_is_fine_in_eval_with_running_statistics():
    y, state = call(x=jnp.ones((1, 3)), training=False)
    assert y.shape == (1, 3) and state is STATE


def test_zero_eps_is_fine_in_eval_with_running_statistics_as_in_pytorch():
    y, state = call(training=False, eps=0.0)
    expected = (X - STATE["running_mean"][:, None]) / jnp.sqrt(STATE["running_var"][:, None])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert state is STATE


@pytest.mark.parametrize("momentum", [0.9, 0.99, 1.0])
def test_momentum_of_0_9_or_more_in_training_warns_of_the_convention(momentum):
    expected = (f"momentum={momentum} is the weight of the new batch (PyTorch's convention), so "
                "the running statistics follow the last batch almost entirely. Flax's and "
                "Haiku's momentum is the weight of the old value: their momentum=0.99 is "
                "jbn's momentum=0.01.")
    with pytest.warns(UserWarning, match="^" + re.escape(expected) + "$") as caught:
        call(momentum=momentum)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    with pytest.warns(UserWarning, match=re.escape(expected)) as caught:
        f = jax.jit(lambda x: call(x=x, momentum=momentum))
        f(X)
        f(X + 1)  # the same trace: no second warning
    assert len(caught) == 1


@pytest.mark.parametrize("kwargs", [dict(momentum=0.5), dict(momentum=None),
                                    dict(momentum=0.99, training=False),
                                    dict(momentum=0.99, state={}),
                                    dict(momentum=0.99, mode="untracked"),
                                    dict(momentum=0.99, mode="frozen")],
                         ids=["momentum 0.5", "momentum None", "eval", "no running statistics",
                              "untracked", "frozen"])
def test_no_momentum_warning_where_momentum_is_unused_or_below_0_9(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(**kwargs)


def test_momentum_warning_is_silenced_by_the_standard_filters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="momentum=", category=UserWarning)
        call(momentum=0.99)


def test_params_and_state_in_each_others_place_are_called_swapped():
    swapped = exactly("params and state look swapped: params has a state's keys "
                      "['num_batches_tracked', 'running_mean', 'running_var'], state ['bias', "
                      "'weight']; pass params first, then state, as jbn.init returns them: "
                      "params, state = jbn.init(C)")
    with pytest.raises(ValueError, match=swapped):
        jbn.batchnorm(STATE, PARAMS, X, True)
    with pytest.raises(ValueError, match=swapped):  # the one check: converters and folding too
        jbn.fold(STATE, PARAMS)
    without_affine, _ = jbn.init(3, affine=False)
    with pytest.raises(ValueError, match=r"look swapped: params has a state's keys .*, state "
                                         r"\[\];"):
        jbn.batchnorm(STATE, without_affine, X, True)


# Each bad value of a numeric option, as init, batchnorm and the layers (when built) see it.
BAD_NUMBERS = {
    "a float": (2.0, TypeError, "accumulation_steps must be an int or None, got 2.0"),
    "a bool": (True, TypeError, "accumulation_steps must be an int or None, got True"),
    "a str": ("2", TypeError, "accumulation_steps must be an int or None, got '2'"),
    "zero": (0, ValueError, "accumulation_steps must be positive, got 0"),
    "negative": (-1, ValueError, "accumulation_steps must be positive, got -1"),
}


@pytest.mark.parametrize("value, error, message", BAD_NUMBERS.values(), ids=BAD_NUMBERS.keys())
def test_init_batchnorm_and_the_layers_refuse_a_bad_number_alike(value, error, message):
    nnx = pytest.importorskip("jbn.nnx")
    equinox = pytest.importorskip("jbn.equinox")
    for make in (lambda: jbn.init(3, accumulation_steps=value),
                 lambda: call(state=jbn.init(3, accumulation_steps=2)[1],
                              accumulation_steps=value),
                 lambda: nnx.BatchNorm(3, accumulation_steps=value),
                 lambda: equinox.BatchNorm(3, "batch", accumulation_steps=value)):
        with pytest.raises(error, match=exactly(message)):
            make()


def test_init_and_batchnorm_take_numpy_integers_alike():
    _, state = jbn.init(3, accumulation_steps=np.int64(2))
    _, after = call(state=state, accumulation_steps=np.int64(2))
    assert int(after["accumulator"]["micro_batches"]) == 1


def test_the_nnx_layer_names_epsilon_where_eps_is_passed():
    nnx = pytest.importorskip("jbn.nnx")
    with pytest.raises(TypeError, match=exactly(
            "BatchNorm() got an unexpected keyword argument 'eps': this layer takes "
            "'epsilon', as nnx.BatchNorm does")):
        nnx.BatchNorm(16, eps=1e-3)


def test_the_equinox_layer_names_eps_where_epsilon_is_passed():
    equinox = pytest.importorskip("jbn.equinox")
    with pytest.raises(TypeError, match=exactly(
            "BatchNorm() got an unexpected keyword argument 'epsilon': this layer takes "
            "'eps', as eqx.nn.BatchNorm does")):
        equinox.BatchNorm(16, "batch", epsilon=1e-3)


def test_layers_check_their_mode_when_built_in_messages_of_their_framework():
    nnx = pytest.importorskip("jbn.nnx")
    equinox = pytest.importorskip("jbn.equinox")
    unknown = "mode must be one of ['tracked', 'untracked', 'frozen'], got 'nonsense'"
    with pytest.raises(ValueError, match=exactly(unknown)):
        equinox.BatchNorm(16, "batch", mode="nonsense")
    with pytest.raises(ValueError, match=exactly(unknown)):
        nnx.BatchNorm(16, mode="nonsense")
    with pytest.raises(ValueError, match=exactly(
            "mode must be one of ['tracked', 'untracked', 'frozen'], got 'batch': "
            "eqx.nn.BatchNorm's mode chooses how it averages, where jbn averages as PyTorch "
            "does; leave mode out")):
        equinox.BatchNorm(16, "batch", mode="batch")
    with pytest.raises(ValueError, match=exactly(
            "mode must be one of ['tracked', 'untracked', 'frozen'], got 'batch'")):
        nnx.BatchNorm(16, mode="batch")  # no word of Equinox to an NNX user


def test_the_momentum_warning_points_at_the_users_line_through_the_layers():
    nnx = pytest.importorskip("jbn.nnx")
    equinox = pytest.importorskip("jbn.equinox")
    eqx = pytest.importorskip("equinox")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    with pytest.warns(UserWarning, match="momentum=0.99") as caught:
        nnx.BatchNorm(3, momentum=0.99)(x)
    assert [w.filename for w in caught] == [__file__]
    layer, state = eqx.nn.make_with_state(equinox.BatchNorm)(3, "batch", momentum=0.99)
    with pytest.warns(UserWarning, match="momentum=0.99") as caught:
        jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    assert [w.filename for w in caught] == [__file__]
