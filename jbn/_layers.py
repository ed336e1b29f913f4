"""What models of many batch norms share: layer paths, and the check that every state was
threaded."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def stale_layers(before: Any, after: Any) -> list[str]:
    """The batch norms whose running state a training step did not advance.

    Every ``num_batches_tracked`` in ``before`` must have grown in ``after``, at the same
    place: a layer whose new state was not threaded back (it still holds, or was left out
    of, the new state) shows here. Runs on concrete arrays, outside ``jax.jit``.

    Args:
      before: the states before the step: any pytree of jbn states, such as
        ``from_torch_model``'s path → state dict or a nested dict mirroring the model.
      after: the states the step returned.

    Returns:
      The paths of the stale layers, their keys joined by dots (``"layer1.0.bn1"``;
      ``""`` when ``before`` is one layer's state), in pytree order (dict keys sorted). Empty when
      every layer advanced. A layer that trained on a masked batch of fewer than 2 valid
      values per channel is stale too (its state is kept as it was).

    PyTorch: no equivalent; each module there updates its own buffers in place.
    """
    advanced = {path: count for path, count in _counts(after)}
    return [path for path, count in _counts(before)
            if path not in advanced or not np.all(np.asarray(advanced[path]) > count)]


def _counts(states: Any) -> list[tuple[str, np.ndarray]]:
    """Each layer's path and ``num_batches_tracked``, found by that key."""
    return [(dotted(keys[:-1]), np.asarray(leaf))
            for keys, leaf in jax.tree_util.tree_leaves_with_path(states)
            if getattr(keys[-1], "key", None) == "num_batches_tracked"]


def dotted(keys) -> str:
    """A pytree key path as a module path: ``("layer1", 0, "bn1")`` → ``"layer1.0.bn1"``."""
    names = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in keys)
    return ".".join(str(name) for name in names)
