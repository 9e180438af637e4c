"""Edge devices the cost model knows: published peak figures, assumptions, and calibrated parameters.

The model (see :mod:`autocomp_plugins.edge.costmodel`)
------------------------------------------------------
A roofline per node, summed over the graph, at batch 1 (or whatever batch the input shape gives)::

    node_ms = max(flops / (peak_ops[precision] * KIND_EFFICIENCY[kind] * compute_scale),
                  bytes / bandwidth) + overhead_us
    model_ms = sum(node_ms over the nodes that are kernels of their own)

Assumptions, each a simplification to keep in mind when reading a prediction:

- **Fusion as TensorRT and XNNPACK do it.** Batch norm, activations (ReLU, clip, sigmoid, SiLU's
  ``x * sigmoid(x)``), scaling by constants and a residual Add that follow a convolution or GEMM are
  folded into it and cost nothing of their own (exported models fold batch norm anyway); the residual
  tensor the Add reads is added to the convolution's bytes. Reshape-like nodes, shape arithmetic and
  constant sub-graphs are free; Q/DQ nodes next to an int8 node are free.
- **Every other node is one kernel** with a fixed per-node overhead (launch, synchronisation,
  framework dispatch). Concat and slices are priced as copies, although TensorRT often elides them.
- **Bytes** are every weight plus every activation read and written once, at the node's precision,
  from DRAM: caches are ignored, which overstates traffic for small activations.
- **Compute** is the published peak for the precision, times a per-kind efficiency shared by all
  devices (:data:`KIND_EFFICIENCY`, relative to a dense convolution), times the device's
  ``compute_scale``: the fraction of peak a dense convolution reaches there.
- **Ampere fp32 is TF32.** TensorRT runs fp32 convolutions on the tensor cores in TF32 by default on
  Ampere (``trtexec --noTF32`` turns it off), so the Orin devices' fp32 peak is the TF32 rate, half
  the dense fp16 tensor rate.
- **One runtime per device**, the one its published figures were measured with (``runtime``).

Which parameters are priors and which are fitted
------------------------------------------------
Priors, never fitted: ``peak_ops`` and ``bandwidth_bytes_s`` (published figures, sources below),
:data:`KIND_EFFICIENCY`, :data:`BANDWIDTH_FRACTION`, and ``overhead_prior_us``. Fitted by
:mod:`autocomp_plugins.edge.calibrate` on the published rows of ``shared/data/
device_latency_published.csv``: ``compute_scale`` for every device with a row, and ``overhead_us``
for devices with at least three rows (Jetson Nano, Jetson Orin Nano), bounded to a factor four of
the prior; other devices keep ``overhead_us = overhead_prior_us``. A device with no row (Orin NX)
takes the geometric mean of the fitted scales of its ``family``. The values below are the fit
``python benchmarks/edge_validation.py`` computes; it says when they are stale, and so does a test.

Known weak spots (``benchmarks/edge_validation.md`` has the numbers): the Jetson Nano's fitted
overhead sits at its upper bound, standing in for per-inference costs of the wall-clock harness
it was measured with, so its predictions for many-layer models are pessimistic; and the AGX Orin's
only row comes from MLPerf's CUDA-graph harness, so it predicts that runtime, not trtexec's.

Peak and bandwidth figures (sources: ``shared/data/device_specs.md`` and the publications named in
the CSV's ``source`` column):

- Jetson Nano 4 GB: 128 Maxwell cores at 921.6 MHz = 236 GFLOPS fp32, 472 fp16 (half2); no int8
  (no DP4A on sm_53, no tensor cores); 25.6 GB/s LPDDR4. NVIDIA-AI-IOT/jetson_benchmarks README
  (clock); NVIDIA Jetson Nano spec sheet.
- Jetson Orin Nano 8 GB in MAXN Super mode (JetPack 6.2, the published rows' mode): 1024 Ampere
  cores (8 SMs) and 32 tensor cores at 1020 MHz; 67 TOPS int8 sparse = 33.5 dense; fp16 tensor at
  half the int8 rate (16.8 TFLOPS; the benchmark lists "about 20"); TF32 8.4 TFLOPS; 102 GB/s
  LPDDR5. NVIDIA Jetson Orin Nano product pages; hokwangchoi/jetson-orin-nano-benchmarks.
- Jetson Orin NX 16 GB: the same 8-SM GPU at 918 MHz. Its 100 TOPS (sparse) include two DLAs, so
  the GPU's share is scaled from the Orin Nano's: 33.5 x 918 / 1020 = 30.2 TOPS int8 dense;
  102.4 GB/s (128-bit LPDDR5 at 6400 MT/s). Jetson Orin NX datasheet.
- Jetson AGX Orin 64 GB: 2048 cores (16 SMs), 64 tensor cores at 1.3 GHz. Its 275 TOPS (sparse)
  include two DLAs; the GPU alone is 33.5 x 2 x 1300 / 1020 = 85.4 TOPS int8 dense (the
  datasheet's 170 sparse GPU TOPS); 204.8 GB/s (256-bit LPDDR5). Jetson AGX Orin datasheet.
- Raspberry Pi 4 B: 4x Cortex-A72 at 1.5 GHz, 8 FP32 FLOP/cycle/core = 48 GFLOPS. Armv8.0 has no
  fp16 arithmetic and no SDOT: int8 runs on widening 8-bit multiply-accumulates, assumed 2x fp32
  (96 GOPS). 5.56 GB/s measured (STREAM copy) of 9.6 theoretical. The MagPi Pi 4 specs;
  sci-pi.org.uk STREAM results.
- Raspberry Pi 5: 4x Cortex-A76 at 2.4 GHz, 16 FP32 FLOP/cycle/core = 154 GFLOPS; Armv8.2 fp16
  arithmetic at twice that (307); SDOT int8 at four times (614 GOPS). 17.1 GB/s theoretical
  (32-bit LPDDR4X-4267). Arm Cortex-A76 optimization guide; Raspberry Pi 5 product brief.

Importing this module is cheap (no third-party imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

__all__ = ["DeviceSpec", "DEVICES", "KIND_EFFICIENCY", "BANDWIDTH_FRACTION", "get_device"]

#: Fraction of peak each operator kind reaches relative to a dense convolution (shared prior).
#: Pointwise convolutions and GEMMs are the same matrix product with less reuse; depthwise
#: convolutions vectorise poorly and cannot use tensor cores; the rest are nearly always
#: memory-bound, where this number does not matter.
KIND_EFFICIENCY: Mapping[str, float] = {
    "conv": 1.0,
    "pointwise": 0.9,
    "gemm": 0.8,
    "depthwise": 0.25,
    "elementwise": 0.25,
    "pool": 0.25,
    "norm": 0.25,
    "memory": 0.25,
}

#: Achievable fraction of theoretical DRAM bandwidth, where no measured figure is published.
#: The Raspberry Pi 4's measured STREAM copy (5.56 of 9.6 GB/s, 58 %) is used for the Pi 5;
#: GPU memory systems are assumed to reach 70 %.
BANDWIDTH_FRACTION: Mapping[str, float] = {"arm-cpu": 0.58, "gpu": 0.70}

_G = 1e9
_T = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """One device as the cost model sees it.

    ``peak_ops`` maps each precision the device runs to its peak operations per second (a
    multiply-accumulate is two); its keys are the device's precisions. ``bandwidth_bytes_s`` is
    the effective DRAM bandwidth. ``compute_scale`` and ``overhead_us`` are the calibrated
    parameters (see the module docstring); ``overhead_prior_us`` is what calibration starts from.
    """

    name: str
    description: str
    family: str
    runtime: str
    peak_ops: Mapping[str, float]
    bandwidth_bytes_s: float
    overhead_prior_us: float
    compute_scale: float
    overhead_us: float
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("bandwidth_bytes_s", "overhead_prior_us", "compute_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} of device {self.name!r} must be > 0, got {getattr(self, name)!r}")
        if self.overhead_us < 0:
            raise ValueError(f"overhead_us of device {self.name!r} must be >= 0, got {self.overhead_us!r}")
        if not self.peak_ops or any(v <= 0 for v in self.peak_ops.values()):
            raise ValueError(f"peak_ops of device {self.name!r} must be positive, got {dict(self.peak_ops)}")

    @property
    def precisions(self) -> frozenset[str]:
        return frozenset(self.peak_ops)

    def efficiency(self, kind: str) -> float:
        """Fraction of peak a node of ``kind`` reaches on this device."""
        return KIND_EFFICIENCY.get(kind, KIND_EFFICIENCY["elementwise"]) * self.compute_scale

    def with_calibration(self, compute_scale: float, overhead_us: float | None = None) -> "DeviceSpec":
        """A copy with new calibrated parameters (``overhead_us`` unchanged when None)."""
        return replace(self, compute_scale=compute_scale,
                       overhead_us=self.overhead_us if overhead_us is None else overhead_us)


_ORIN_NANO_INT8 = 67 * _T / 2  # 67 TOPS sparse (Super) -> dense, GPU only (no DLA on Orin Nano)


def _ampere(int8_dense: float) -> dict[str, float]:
    """Ampere tensor-core peaks from the dense int8 rate: fp16 at half, TF32 ("fp32") at a quarter."""
    return {"fp32": int8_dense / 4, "fp16": int8_dense / 2, "int8": int8_dense}


DEVICES: Mapping[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        DeviceSpec(
            name="jetson-nano",
            description="NVIDIA Jetson Nano 4 GB, TensorRT (predicted by a calibrated cost model)",
            family="maxwell-gpu",
            runtime="TensorRT through torch2trt, wall clock per inference",
            peak_ops={"fp32": 128 * 2 * 0.9216 * _G, "fp16": 128 * 4 * 0.9216 * _G},
            bandwidth_bytes_s=25.6 * _G * BANDWIDTH_FRACTION["gpu"],
            overhead_prior_us=50.0,
            compute_scale=0.9231,
            overhead_us=200.0,
            sources=("NVIDIA-AI-IOT/jetson_benchmarks README (921.6 MHz GPU clock)",
                     "NVIDIA Jetson Nano spec sheet (128 CUDA cores, 25.6 GB/s)",
                     "kentaroy47/benchmark-FP32-FP16-INT8-with-TensorRT README.md (latencies)"),
        ),
        DeviceSpec(
            name="jetson-orin-nano",
            aliases=("jetson",),
            description="NVIDIA Jetson Orin Nano 8 GB (MAXN Super), TensorRT (predicted by a calibrated cost model)",
            family="ampere-gpu",
            runtime="TensorRT engine timed by trtexec (GPU compute time)",
            peak_ops=_ampere(_ORIN_NANO_INT8),
            bandwidth_bytes_s=102.4 * _G * BANDWIDTH_FRACTION["gpu"],
            overhead_prior_us=10.0,
            compute_scale=0.2893,
            overhead_us=15.6,
            sources=("NVIDIA Jetson Orin Nano product pages (67 TOPS sparse in Super mode, 102 GB/s)",
                     "hokwangchoi/jetson-orin-nano-benchmarks vision-benchmarks/assets/results/"
                     "yolov8_20260414_223810.json (latencies)"),
        ),
        DeviceSpec(
            name="jetson-orin-nx",
            description="NVIDIA Jetson Orin NX 16 GB, TensorRT (predicted; no published row, Orin-family calibration)",
            family="ampere-gpu",
            runtime="TensorRT engine timed by trtexec (GPU compute time)",
            peak_ops=_ampere(_ORIN_NANO_INT8 * 918 / 1020),
            bandwidth_bytes_s=102.4 * _G * BANDWIDTH_FRACTION["gpu"],
            overhead_prior_us=10.0,
            compute_scale=0.2574,
            overhead_us=10.0,
            sources=("Jetson Orin NX datasheet (100 TOPS sparse with DLAs, 918 MHz GPU, 102.4 GB/s)",),
        ),
        DeviceSpec(
            name="jetson-agx-orin",
            description=("NVIDIA Jetson AGX Orin 64 GB, TensorRT with CUDA graphs "
                         "(predicted by a calibrated cost model)"),
            family="ampere-gpu",
            runtime="TensorRT with CUDA graphs, as NVIDIA's MLPerf harness runs it (use_graphs = True)",
            peak_ops=_ampere(_ORIN_NANO_INT8 * 2 * 1300 / 1020),
            bandwidth_bytes_s=204.8 * _G * BANDWIDTH_FRACTION["gpu"],
            overhead_prior_us=2.0,
            compute_scale=0.2291,
            overhead_us=2.0,
            sources=("Jetson AGX Orin datasheet (275 TOPS sparse with DLAs, 2048 cores at 1.3 GHz, 204.8 GB/s)",
                     "mlcommons/inference_results_v3.1 closed/NVIDIA/results/Orin_TRT/resnet50/SingleStream",
                     "NVIDIA MLPerf v3.1 configs/resnet50/SingleStream (use_graphs = True)"),
        ),
        DeviceSpec(
            name="raspberry-pi-4",
            description="Raspberry Pi 4 B, 4x Cortex-A72 (predicted by a calibrated cost model)",
            family="arm-cpu",
            runtime="PyTorch, 4 threads",
            peak_ops={"fp32": 48 * _G, "int8": 96 * _G},
            bandwidth_bytes_s=5.56 * _G,
            overhead_prior_us=30.0,
            compute_scale=0.7681,
            overhead_us=30.0,
            sources=("The MagPi Raspberry Pi 4 specs (4x A72 at 1.5 GHz)",
                     "sci-pi.org.uk STREAM results (5.56 GB/s copy)",
                     "pytorch/tutorials intermediate_source/realtime_rpi.rst (latency)"),
        ),
        DeviceSpec(
            name="raspberry-pi-5",
            description="Raspberry Pi 5, 4x Cortex-A76 (predicted by a calibrated cost model)",
            family="arm-cpu",
            runtime="ExecuTorch with the XNNPACK delegate",
            peak_ops={"fp32": 153.6 * _G, "fp16": 307.2 * _G, "int8": 614.4 * _G},
            bandwidth_bytes_s=17.1 * _G * BANDWIDTH_FRACTION["arm-cpu"],
            overhead_prior_us=10.0,
            compute_scale=0.7065,
            overhead_us=10.0,
            sources=("Arm Cortex-A76 software optimization guide (16 FP32 FLOP/cycle, SDOT)",
                     "Raspberry Pi 5 product brief (2.4 GHz, 32-bit LPDDR4X-4267)",
                     "huggingface.co/Arm/resnet-18-int8-xnnpack-executorch (latency)"),
        ),
    )
}


def get_device(name: str) -> DeviceSpec:
    """The built-in device called ``name`` or one of its aliases; ``KeyError`` naming the known ones."""
    for spec in DEVICES.values():
        if name == spec.name or name in spec.aliases:
            return spec
    known = sorted({*DEVICES, *(a for s in DEVICES.values() for a in s.aliases)})
    raise KeyError(f"unknown edge device {name!r}; known: {', '.join(known)}")
