"""The models behind the published edge-device rows, built in plain torch and exported to ONNX.

``benchmarks/edge_validation.py`` predicts every row of ``shared/data/device_latency_published.csv``
with the edge cost model; the rows name four models:

- ``resnet18``, ``resnet34``, ``resnet50``: the standard ImageNet ResNets of :mod:`autocomp.zoo.resnet`
  (torchvision layout; ResNet-50 is v1.5, stride on the 3x3, as MLPerf's).
- ``yolov8n``: an approximation of Ultralytics YOLOv8n written here from its published architecture
  (``yolov8.yaml`` at depth 0.33, width 0.25): a CSPDarknet backbone of C2f blocks, SPPF, a PAN
  neck and the decoupled, anchor-free detect head with its DFL box decoder. At 640x640 it has
  3.15 M parameters (batch norm folded) and 8.74 GFLOPs (2 x 4.37 G multiply-accumulates): within
  2 % of the published 3.2 M / 8.7 GFLOPs (``python benchmarks/edge_models.py`` prints the counts).
  Batch-norm statistics are randomised so that the folded biases differ layer by layer, as in a
  trained model.

Exported and quantized ONNX files are cached under ``benchmarks/.cache/`` (not committed).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "MODEL_BUILDERS",
    "build_model",
    "count_params_and_flops",
    "export_onnx",
    "quantize_onnx_int8",
    "resnet",
    "yolov8n",
]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"


# --- ResNet -------------------------------------------------------------------------------


def resnet(name: str, num_classes: int = 1000) -> nn.Module:
    """``resnet18``/``resnet34``/``resnet50`` from :mod:`autocomp.zoo.resnet` (torchvision layout)."""
    from autocomp.zoo import resnet as zoo_resnet

    return getattr(zoo_resnet, name)(num_classes=num_classes)


# --- YOLOv8n ------------------------------------------------------------------------------


class _ConvBnSiLU(nn.Module):
    """Ultralytics ``Conv``: convolution without bias, batch norm, SiLU."""

    def __init__(self, in_ch: int, out_ch: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _YoloBottleneck(nn.Module):
    def __init__(self, ch: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = _ConvBnSiLU(ch, ch, 3)
        self.cv2 = _ConvBnSiLU(ch, ch, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    """CSP bottleneck with two convolutions: split, n bottlenecks on one half, concatenate all."""

    def __init__(self, in_ch: int, out_ch: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = out_ch // 2
        self.cv1 = _ConvBnSiLU(in_ch, 2 * self.c, 1)
        self.cv2 = _ConvBnSiLU((2 + n) * self.c, out_ch, 1)
        self.m = nn.ModuleList(_YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, k: int = 5) -> None:
        super().__init__()
        hidden = in_ch // 2
        self.cv1 = _ConvBnSiLU(in_ch, hidden, 1)
        self.cv2 = _ConvBnSiLU(hidden * 4, out_ch, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class _Detect(nn.Module):
    """Decoupled anchor-free head: per level a box branch (4 x 16 DFL bins) and a class branch."""

    reg_max = 16

    def __init__(self, num_classes: int, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__()
        self.nc, self.strides = num_classes, strides
        c2 = max(16, channels[0] // 4, self.reg_max * 4)
        c3 = max(channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(_ConvBnSiLU(c, c2, 3), _ConvBnSiLU(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for c in channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(_ConvBnSiLU(c, c3, 3), _ConvBnSiLU(c3, c3, 3), nn.Conv2d(c3, num_classes, 1))
            for c in channels
        )
        self.dfl = nn.Conv2d(self.reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(self.reg_max, dtype=torch.float).view(1, self.reg_max, 1, 1)

    def _anchors(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        points, strides = [], []
        for f, stride in zip(feats, self.strides):
            h, w = int(f.shape[2]), int(f.shape[3])  # static at export: the anchors fold to constants
            sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            points.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(stride)))
        return torch.cat(points).T.unsqueeze(0), torch.cat(strides).T.unsqueeze(0)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        b = feats[0].shape[0]
        outs = [torch.cat((self.cv2[i](f), self.cv3[i](f)), 1) for i, f in enumerate(feats)]
        x = torch.cat([o.view(b, 4 * self.reg_max + self.nc, -1) for o in outs], 2)
        box, cls = x.split((4 * self.reg_max, self.nc), 1)
        a = box.shape[2]
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        anchors, strides = self._anchors(feats)
        lt, rb = dist.chunk(2, 1)
        xy1, xy2 = anchors - lt, anchors + rb
        boxes = torch.cat(((xy1 + xy2) / 2, xy2 - xy1), 1) * strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class YOLOv8n(nn.Module):
    """YOLOv8n (yolov8.yaml, scale n) in plain torch; outputs (batch, 4 + classes, anchors)."""

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        conv, c2f = _ConvBnSiLU, _C2f
        self.b0, self.b1, self.b2 = conv(3, 16, 3, 2), conv(16, 32, 3, 2), c2f(32, 32, 1, True)
        self.b3, self.b4 = conv(32, 64, 3, 2), c2f(64, 64, 2, True)
        self.b5, self.b6 = conv(64, 128, 3, 2), c2f(128, 128, 2, True)
        self.b7, self.b8, self.b9 = conv(128, 256, 3, 2), c2f(256, 256, 1, True), _SPPF(256, 256)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12, self.h15 = c2f(384, 128, 1, False), c2f(192, 64, 1, False)
        self.h16, self.h18 = conv(64, 64, 3, 2), c2f(192, 128, 1, False)
        self.h19, self.h21 = conv(128, 128, 3, 2), c2f(384, 256, 1, False)
        self.detect = _Detect(num_classes, (64, 128, 256), (8, 16, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n4 = self.h12(torch.cat((self.up(p5), p4), 1))
        out3 = self.h15(torch.cat((self.up(n4), p3), 1))
        out4 = self.h18(torch.cat((self.h16(out3), n4), 1))
        out5 = self.h21(torch.cat((self.h19(out4), p5), 1))
        return self.detect([out3, out4, out5])


def yolov8n(num_classes: int = 80) -> nn.Module:
    """The YOLOv8n approximation described in the module docstring."""
    return YOLOv8n(num_classes)


MODEL_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: resnet("resnet18"),
    "resnet34": lambda: resnet("resnet34"),
    "resnet50": lambda: resnet("resnet50"),
    "yolov8n": yolov8n,
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised model (eval mode) for a published row's model name."""
    if name not in MODEL_BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_BUILDERS)}")
    torch.manual_seed(0)
    model = MODEL_BUILDERS[name]()
    with torch.no_grad():  # trained-looking batch-norm statistics: folded biases differ per layer
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def count_params_and_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, float]:
    """Parameters (batch-norm excluded, as after folding) and FLOPs (2 x MACs of convs and linears)."""
    macs = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # (in / groups) * kh * kw
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(input_shape))
    for h in handles:
        h.remove()
    params = sum(p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters(recurse=False))
    return params, 2.0 * macs


# --- export and quantization ----------------------------------------------------------------


def _cache_path(name: str, input_shape: tuple[int, ...], suffix: str) -> Path:
    """Where the export of ``name`` lives; the builders' source is part of the name, so an edit re-exports."""
    from autocomp.zoo import resnet as zoo_resnet

    source = Path(__file__).read_bytes() + Path(zoo_resnet.__file__).read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:10]
    shape = "x".join(str(d) for d in input_shape)
    return CACHE_DIR / f"{name}_{shape}_{digest}{suffix}.onnx"


_CACHE_NAME = re.compile(r"^(?P<stem>.+)_[0-9a-f]{10}(?P<suffix>(_int8)?\.onnx)$")


def _drop_stale(path: Path) -> None:
    """Remove exports of the same model, shape and precision made from older builder sources."""
    current = _CACHE_NAME.match(path.name)
    for old in path.parent.glob("*.onnx"):
        match = _CACHE_NAME.match(old.name)
        if match and old != path and match["stem"] == current["stem"] and match["suffix"] == current["suffix"]:
            old.unlink()


def export_onnx(name: str, input_shape: tuple[int, ...]) -> Path:
    """The fp32 ONNX export of ``name`` at ``input_shape`` (cached)."""
    path = _cache_path(name, input_shape, "")
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(name)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():  # the tracer warns that the anchor sizes become constants: intended
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(input_shape), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    tmp.replace(path)
    _drop_stale(path)
    return path


def quantize_onnx_int8(name: str, input_shape: tuple[int, ...], calibration_batches: int = 4) -> Path:
    """The int8 QDQ version of the fp32 export (cached), as ``quantize_static`` writes it.

    QUInt8 activations, per-channel QInt8 weights, calibrated on a few random batches: the
    calibration only sets ranges, which do not change the cost model's view of the graph.
    """
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    path = _cache_path(name, input_shape, "_int8")
    if path.exists():
        return path
    fp32 = export_onnx(name, input_shape)

    class _RandomBatches(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._batches = iter(
                [{"input": rng.standard_normal(input_shape).astype(np.float32)} for _ in range(calibration_batches)]
            )

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    tmp = path.with_suffix(".tmp.onnx")
    logging.disable(logging.WARNING)  # quantize_static logs advice on the root logger for every call
    try:
        quantize_static(str(fp32), str(tmp), _RandomBatches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    tmp.replace(path)
    _drop_stale(path)
    return path


if __name__ == "__main__":
    for model_name, shape in (("resnet18", (1, 3, 224, 224)), ("resnet34", (1, 3, 224, 224)),
                              ("resnet50", (1, 3, 224, 224)), ("yolov8n", (1, 3, 640, 640))):
        n_params, flops = count_params_and_flops(build_model(model_name), shape)
        print(f"{model_name:10s} {n_params / 1e6:6.2f} M params  {flops / 1e9:6.2f} GFLOPs at {shape}")
