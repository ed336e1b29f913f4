"""Port a torchvision-style ResNet-18 to JAX with jbn, and train both side by side.

The PyTorch model is written here with torchvision's module names, so its state_dict has
torchvision's keys (``layer2.0.downsample.1.running_mean``...): its 20 batch norms hold 100
of the 122 entries. The port takes three calls:

* ``jbn.options_from_torch(model)``: every batch norm's path, how it was built, and its
  ``momentum`` and ``eps`` (which a state_dict does not hold);
* ``jbn.from_torch_model(state_dict, layers=...)``: the 20 layers' ``(params, state)`` by
  path, and the other entries (convolutions, ``fc``) as they are;
* ``jbn.to_torch_model(params, state)`` on the way back, for ``load_state_dict``.

Both train for a few SGD steps in float64 on the same random batches. Per step it prints:

* **lockstep**: JAX re-synced from PyTorch before the step, then one step in each: the
  differences of loss, parameters and running statistics (all ≤ 1e-9, in fact ~1e-15);
* **free-running**: JAX from the initial weights on its own: its parameters drift from
  PyTorch's as each step amplifies the previous rounding;
* **control**: PyTorch against itself with one weight moved by one ulp, which drifts alike.

Then eval logits in both on the same weights, and the JAX-trained checkpoint loaded into a
fresh PyTorch ResNet with ``strict=True``, giving JAX's eval logits. Exits with status 1
if any check fails. Full size takes about a minute on 2 CPU cores; ``--width 4 --blocks 1
--size 16 --batch 4 --steps 2`` about ten seconds, most of them compiling.
"""

from __future__ import annotations

import argparse
import copy
import sys

import jax

jax.config.update("jax_enable_x64", True)  # parity in float64 needs it before any array

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax import lax  # noqa: E402

import jbn  # noqa: E402

TOLERANCE = 1e-9  # float64 parity: rounding of one step is ~1e-15


# ---------------------------------------------------------------------------------------
# PyTorch: torchvision's ResNet with BasicBlock, written out for its module names.


class BasicBlock(torch.nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                torch.nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(torch.nn.Module):
    """ResNet-18 for ``blocks=(2, 2, 2, 2), width=64``; fewer or narrower for tests."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
        inplanes = width
        for stage, count in enumerate(blocks, start=1):
            planes = width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            setattr(self, f"layer{stage}", torch.nn.Sequential(*(
                BasicBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                for i in range(count))))
            inplanes = planes
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(inplanes, num_classes)
        for module in self.modules():  # torchvision's initialization
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out",
                                              nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------
# JAX: the same network over the ported arrays, every batch norm a jbn.batchnorm call.


def conv(x, kernel, stride: int, padding: int):
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"))


def max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                             ((0, 0), (0, 0), (1, 1), (1, 1)))


def resnet(params, state, options, x, training: bool):
    """Logits and the new state of every batch norm, keyed by path as ``state`` is.

    ``params["weights"]`` holds the other entries under their state_dict keys, and
    ``params["bn"]`` / ``state`` the batch norms by path; ``options`` their keywords.
    """
    weights, new_state = params["weights"], {}

    def bn(path, h):
        h, new_state[path] = jbn.batchnorm(params["bn"][path], state[path], h, training,
                                           **options[path])
        return h

    h = max_pool(jax.nn.relu(bn("bn1", conv(x, weights["conv1.weight"], 2, 3))))
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in weights:  # the structure is static
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = jax.nn.relu(bn(f"{name}.bn1", conv(h, weights[f"{name}.conv1.weight"],
                                                     stride, 1)))
            out = bn(f"{name}.bn2", conv(out, weights[f"{name}.conv2.weight"], 1, 1))
            if f"{name}.downsample.0.weight" in weights:
                h = bn(f"{name}.downsample.1",
                       conv(h, weights[f"{name}.downsample.0.weight"], stride, 0))
            h = jax.nn.relu(out + h)
            block += 1
    return h.mean(axis=(2, 3)) @ weights["fc.weight"].T + weights["fc.bias"], new_state


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def make_train_step(options, learning_rate: float):
    @jax.jit
    def train_step(params, state, x, labels):
        def loss_fn(params):
            logits, new_state = resnet(params, state, options, x, True)
            return cross_entropy(logits, labels), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return loss, params, new_state

    return train_step


def make_predict(options):
    return jax.jit(lambda params, state, x: resnet(params, state, options, x, False)[0])


# ---------------------------------------------------------------------------------------
# Between the two.


def port(model: torch.nn.Module):
    """The model's arrays for ``resnet``: params (weights and batch norms), state, options."""
    layers, options = jbn.options_from_torch(model)
    bn_params, state, rest = jbn.from_torch_model(model.state_dict(), layers=layers)
    weights = {key: jnp.array(value.numpy()) for key, value in rest.items()}  # copies
    return {"weights": weights, "bn": bn_params}, state, options


def as_state_dict(params, state) -> dict[str, np.ndarray]:
    """The JAX model as a PyTorch state_dict of NumPy arrays, keys as the model's."""
    return {**{key: np.array(value) for key, value in params["weights"].items()},
            **jbn.to_torch_model(params["bn"], state)}


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def differences(actual: dict, expected: dict, parameter_keys) -> tuple[float, float]:
    """Largest |difference| over the parameters and over the running statistics (inf for
    a missing key or a different batch count)."""
    param, running = (0.0, 0.0) if actual.keys() == expected.keys() else (np.inf, np.inf)
    for key in actual.keys() & expected.keys():
        difference = float(np.max(np.abs(actual[key] - expected[key])))
        if key.endswith("num_batches_tracked"):
            running = max(running, 0.0 if difference == 0 else np.inf)
        elif key in parameter_keys:
            param = max(param, difference)
        else:
            running = max(running, difference)
    return param, running


def torch_train_step(model, optimizer, x, labels) -> float:
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                             torch.from_numpy(labels))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def torch_eval(model, x) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per stage (18 layers: 2)")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ResNet((args.blocks,) * 4, args.width).double()
    control = copy.deepcopy(model)  # PyTorch against itself, one weight one ulp apart
    with torch.no_grad():
        first = control.conv1.weight.view(-1)[:1]
        first.copy_(torch.nextafter(first, torch.full_like(first, np.inf)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    control_optimizer = torch.optim.SGD(control.parameters(), lr=args.lr)
    parameter_keys = {name for name, _ in model.named_parameters()}

    free_params, free_state, options = port(model)
    train_step, predict = make_train_step(options, args.lr), make_predict(options)
    count = sum(p.numel() for p in model.parameters())
    momenta = sorted({str(o["momentum"]) for o in options.values()})
    epsilons = sorted({o["eps"] for o in options.values()})
    print(f"ResNet with blocks {(args.blocks,) * 4}, width {args.width}: {count:,} parameters, "
          f"{len(options)} batch norms (momentum {', '.join(momenta)}; eps "
          f"{', '.join(map(str, epsilons))}) among {len(model.state_dict())} state_dict "
          f"entries; float64, batches of {args.batch}×3×{args.size}×{args.size}, "
          f"SGD lr {args.lr}")

    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(args.batch, 3, args.size, args.size)),
                rng.integers(0, 10, args.batch)) for _ in range(args.steps + 1)]
    print()
    print("      |           lockstep (JAX re-synced from PyTorch)          | free-running"
          " |  control")
    print("step  |  loss      |Δ loss|   max|Δ param|  max|Δ running stat|  |"
          "  max|Δ param|  |  max|Δ param|")
    worst = 0.0
    for step, (x, labels) in enumerate(batches[:-1], start=1):
        params, state, _ = port(model)  # re-sync
        torch_loss = torch_train_step(model, optimizer, x, labels)
        torch_train_step(control, control_optimizer, x, labels)
        loss, params, new_state = train_step(params, state, x, labels)
        free_loss, free_params, new_free_state = train_step(free_params, free_state, x, labels)
        stale = jbn.stale_layers(state, new_state) + jbn.stale_layers(free_state,
                                                                      new_free_state)
        if stale:
            print(f"FAILED: batch norms whose state was not threaded: {stale}", file=sys.stderr)
            return 1
        state, free_state = new_state, new_free_state

        expected = torch_state(model)
        param_diff, running_diff = differences(as_state_dict(params, state), expected,
                                               parameter_keys)
        free_diff, _ = differences(as_state_dict(free_params, free_state), expected,
                                   parameter_keys)
        control_diff, _ = differences(torch_state(control), expected, parameter_keys)
        loss_diff = abs(float(loss) - torch_loss)
        worst = max(worst, loss_diff, param_diff, running_diff)
        print(f"{step:4d}  | {torch_loss:8.5f}   {loss_diff:8.1e}    {param_diff:8.1e}"
              f"       {running_diff:8.1e}       |    {free_diff:8.1e}  |    "
              f"{control_diff:8.1e}")

    x_eval = batches[-1][0]
    # Eval on the same weights: PyTorch's, as trained, ported once more.
    params, state, _ = port(model)
    jax_logits = np.asarray(predict(params, state, x_eval))
    eval_diff = float(np.max(np.abs(jax_logits - torch_eval(model, x_eval))))
    # The checkpoint JAX trained on its own, back into a fresh PyTorch ResNet.
    fresh = ResNet((args.blocks,) * 4, args.width).double()
    entries = as_state_dict(free_params, free_state)
    result = fresh.load_state_dict({key: torch.from_numpy(value)
                                    for key, value in entries.items()}, strict=True)
    free_logits = np.asarray(predict(free_params, free_state, x_eval))
    loaded_diff = float(np.max(np.abs(torch_eval(fresh, x_eval) - free_logits)))
    scale = float(np.max(np.abs(jax_logits)))
    print()
    print(f"eval logits (largest |logit| {scale:.2f}), same weights: "
          f"max |PyTorch − JAX| = {eval_diff:.1e}")
    print(f"JAX-trained checkpoint into a fresh PyTorch ResNet, strict=True: "
          f"{len(entries)} entries, missing {result.missing_keys}, unexpected "
          f"{result.unexpected_keys}; eval logits max |PyTorch − JAX| = {loaded_diff:.1e}")

    worst = max(worst, eval_diff, loaded_diff)
    if not worst <= TOLERANCE:
        print(f"FAILED: a difference of {worst:.1e} exceeds {TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"match: every lockstep and eval difference ≤ {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
