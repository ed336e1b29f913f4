"""Port a PyTorch model with batch norm to JAX, then fold its batch norms away.

The model is a small CNN on scikit-learn's bundled 8×8 digits (nothing is downloaded)::

    conv 3×3 (no bias) → BatchNorm2d → ReLU → conv 3×3 stride 2 (no bias) → BatchNorm2d → ReLU
    → global average pool → Linear → BatchNorm1d → ReLU → Linear → 10 logits

1. PyTorch trains it for two epochs, so that weights and running statistics are its own.
2. Its ``state_dict`` goes to JAX: each batch norm through ``jbn.from_torch(sd, prefix)``,
   the convolutions and linear layers as plain arrays in PyTorch's layouts (OIHW and
   (out, in)), which ``jax.lax`` takes as they are. In eval mode, the JAX model gives
   PyTorch's logits.
3. For inference, ``jbn.fold_into`` folds each batch norm into the layer before it: the
   folded model has no batch norm left and gives the same logits.

Run ``python examples/port_from_torch.py`` (a few seconds on CPU). It prints the largest
differences between the models' logits and exits with status 1 if they exceed what float32
rounding explains.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from sklearn.datasets import load_digits

import jbn

EPOCHS = 2
BATCH_SIZE = 64
# Relative to the largest logit: float32 rounding through 4 layers, with room to spare.
TOLERANCE = 1e-5


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # No bias before batch norm: subtracting the batch mean would cancel it.
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.bn3 = torch.nn.BatchNorm1d(64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        x = torch.relu(self.bn3(self.fc1(x)))
        return self.fc2(x)


def train_in_torch(images: np.ndarray, labels: np.ndarray) -> TorchNet:
    torch.manual_seed(0)
    model = TorchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x)).split(BATCH_SIZE):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def port(state_dict) -> tuple[dict, dict]:
    """The layers' arrays, in PyTorch's layouts, and each batch norm's jbn (params, state)."""
    batch_norms = {name: jbn.from_torch(state_dict, f"{name}.") for name in ("bn1", "bn2", "bn3")}
    layers = {key: jnp.asarray(value.numpy()) for key, value in state_dict.items()
              if not key.startswith("bn")}
    return layers, batch_norms


def conv(x, kernel, stride: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))


@jax.jit
def jax_net(layers, batch_norms, x):
    """The PyTorch model in eval mode, with jbn's batch norm."""
    def bn(name, h):
        return jbn.batchnorm(*batch_norms[name], h, training=False)[0]

    h = jax.nn.relu(bn("bn1", conv(x, layers["conv1.weight"], 1)))
    h = jax.nn.relu(bn("bn2", conv(h, layers["conv2.weight"], 2)))
    h = h.mean(axis=(2, 3))
    h = jax.nn.relu(bn("bn3", h @ layers["fc1.weight"].T + layers["fc1.bias"]))
    return h @ layers["fc2.weight"].T + layers["fc2.bias"]


def fold_batch_norms(layers, batch_norms) -> dict:
    """Each batch norm folded into the layer before it: (kernel, bias) per layer."""
    return {
        "conv1": jbn.fold_into(layers["conv1.weight"], None, *batch_norms["bn1"], layout="oihw"),
        "conv2": jbn.fold_into(layers["conv2.weight"], None, *batch_norms["bn2"], layout="oihw"),
        "fc1": jbn.fold_into(layers["fc1.weight"], layers["fc1.bias"], *batch_norms["bn3"],
                             layout="oi"),
        "fc2": (layers["fc2.weight"], layers["fc2.bias"]),
    }


@jax.jit
def folded_net(folded, x):
    """The same model with no batch norm left."""
    def conv_bias(name, h, stride):
        kernel, bias = folded[name]
        return conv(h, kernel, stride) + bias[:, None, None]

    h = jax.nn.relu(conv_bias("conv1", x, 1))
    h = jax.nn.relu(conv_bias("conv2", h, 2))
    h = h.mean(axis=(2, 3))
    kernel, bias = folded["fc1"]
    h = jax.nn.relu(h @ kernel.T + bias)
    kernel, bias = folded["fc2"]
    return h @ kernel.T + bias


def main() -> int:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)

    model = train_in_torch(images, labels)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images)).numpy()

    layers, batch_norms = port(model.state_dict())
    jax_logits = np.asarray(jax_net(layers, batch_norms, images))
    folded_logits = np.asarray(folded_net(fold_batch_norms(layers, batch_norms), images))

    scale = np.max(np.abs(torch_logits))
    port_diff = np.max(np.abs(jax_logits - torch_logits))
    fold_diff = np.max(np.abs(folded_logits - jax_logits))
    accuracy = np.mean(np.argmax(jax_logits, axis=1) == labels)
    print(f"{len(images)} digits, accuracy after training in PyTorch: {accuracy:.3f}; "
          f"largest |logit| {scale:.2f}")
    print(f"max |PyTorch − JAX/jbn|   = {port_diff:.2e}")
    print(f"max |jbn − folded jbn|    = {fold_diff:.2e}")
    if max(port_diff, fold_diff) > TOLERANCE * scale:
        print(f"FAILED: differences beyond {TOLERANCE:g} × the largest logit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
