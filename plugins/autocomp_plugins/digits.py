"""Built-in workload ``digits``: a small residual CNN on scikit-learn's handwritten digits.

The 8x8 digit images that ship inside scikit-learn (1,797 of them) are upsampled to 32x32 so the
network has the compute profile of a deployed CNN (latency dominated by convolutions, not by
per-operator overhead). Data is split into train / validation / test (60/20/20) by a fixed seed.
The model is trained on first use and cached (safetensors) under ``$AUTOCOMP_CACHE_DIR`` or
``~/.cache/autocomp``; training is deterministic, so the cache only saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from autocomp.cache import cache_dir
from autocomp.hookspecs import hookimpl

logger = logging.getLogger("autocomp")

__all__ = ["DigitsConfig", "digits_workload", "tiny_digits_workload", "load_digits_splits", "DigitsResNet"]

_RECIPE_VERSION = 1


@dataclass(frozen=True)
class DigitsConfig:
    """The model and training recipe; any change gives a new cache entry."""

    image_size: int = 32
    width: int = 32
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0


def _build_model(config: DigitsConfig):
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu2 = nn.ReLU()
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def is_shape_preserving(self) -> bool:
            return len(self.shortcut) == 0

        def forward(self, x):
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + self.shortcut(x))

    class DigitsResNet(nn.Module):
        """stem (w) -> block(w) -> block(w, w) -> block(2w, /2) -> block(4w, /2) -> pool -> fc."""

        def __init__(self, width: int, num_classes: int = 10):
            super().__init__()
            w = width
            self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
            self.layer1 = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, w, 1))
            self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2))
            self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(4 * w, num_classes)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(self.flatten(self.pool(x)))

    return DigitsResNet(config.width)


def DigitsResNet(width: int = 32):  # noqa: N802 - reads like the class it builds
    """A fresh, untrained digits ResNet of the given width."""
    return _build_model(DigitsConfig(width=width))


def load_digits_splits(image_size: int = 32, seed: int = 0):
    """(train, val, test) :class:`autocomp.Split` of the digits set, normalised, at ``image_size``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from autocomp.workload import Split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(x))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    idx_train = torch.as_tensor(order[:n_train])
    idx_val = torch.as_tensor(order[n_train : n_train + n_val])
    idx_test = torch.as_tensor(order[n_train + n_val :])
    return (Split(x[idx_train], y[idx_train]), Split(x[idx_val], y[idx_val]), Split(x[idx_test], y[idx_test]))


def _shift_augment(x, generator):
    """Random translation by up to 2 pixels (pad and crop), a cheap, label-preserving augmentation."""
    import torch
    import torch.nn.functional as F

    pad = 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def _train(model, train, config: DigitsConfig, generator):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), config.batch_size):
            idx = perm[i : i + config.batch_size]
            xb = _shift_augment(train.inputs[idx], generator)
            loss = F.cross_entropy(model(xb), train.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _accuracy(model, split) -> float:
    import torch

    with torch.no_grad():
        return float((model(split.inputs).argmax(1) == split.targets).float().mean())


def digits_workload(config: DigitsConfig = DigitsConfig(), cache: bool = True, name: str = "digits"):
    """The ``digits`` workload: trained (or loaded from cache) model, splits and accuracy metric."""
    import torch
    from safetensors.torch import load_file, save_file

    from autocomp.workload import Workload

    train, val, test = load_digits_splits(config.image_size, config.seed)
    model = _build_model(config)
    key = hashlib.sha256(json.dumps({"v": _RECIPE_VERSION, **asdict(config)}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir("digits", key, "model.safetensors")
    if cache and path.exists():
        model.load_state_dict(load_file(str(path)))
        model.eval()
        logger.info("digits: loaded the trained model from %s", path)
    else:
        logger.info("digits: training the built-in model (first use; cached afterwards)")
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = _build_model(config)
        _train(model, train, config, generator)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
    info: dict[str, Any] = {"config": asdict(config), "cache": str(path),
                            "val_accuracy_torch": _accuracy(model, val)}
    return Workload(
        name=name,
        model=model.eval(),
        example_input=torch.zeros(1, 1, config.image_size, config.image_size),
        train=train,
        val=val,
        test=test,
        batch_size=config.batch_size,
        info=info,
    )


def tiny_digits_workload():
    """A tiny digits workload (8x8 inputs, width 8, a few seconds to train) for tests and demos."""
    return digits_workload(DigitsConfig(image_size=8, width=8, epochs=8, lr=0.1), name="digits-tiny")


@hookimpl
def register_workloads(register):
    register("digits", digits_workload,
             "small residual CNN on scikit-learn's handwritten digits (32x32), trained on first use")
    register("digits-tiny", tiny_digits_workload, "tiny version of digits (8x8, width 8) for tests and demos")
