"""Calibrating the ``cpu`` latency predictor on this host: candidates, measurements, the fit.

:func:`calibrate_cpu` (``autocomp calibrate --target cpu``) builds candidates like the ones a search
produces (:func:`candidate_specs`, :func:`build_candidate`), measures them with the cpu target's
harness (:func:`measure_candidates`), fits :data:`autocomp_plugins.cpu_predictor.FEATURES`'
coefficients and caches the calibration where
:func:`autocomp_plugins.cpu_predictor.load_calibration` finds it first. ``benchmarks/cpu_predictor.py``
and ``benchmarks/cpu_predictor_holdout.py`` use the same pieces. Importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from autocomp_plugins.cpu_predictor import (
    FEATURE_SET,
    FEATURES,
    FIT_TARGET,
    CpuCalibration,
    cache_path,
    fit_coefficients,
    graph_features,
    host_feature_facts,
    host_identity,
    out_of_fold_ms,
    random_folds,
    write_calibrations,
)

__all__ = ["CANDIDATE_BUILD", "DEFAULT_CANDIDATES", "MIN_CANDIDATES", "CandidateSpec", "candidate_specs",
           "build_candidate", "measure_candidates", "calibrate_cpu"]

logger = logging.getLogger("autocomp")

#: Fewer candidates than this many per coefficient get a warning: the fit then reproduces its own
#: candidates (``autocomp calibrate --target cpu --count 10`` fitted them exactly) and little else.
WELL_DETERMINED = 3

#: Candidates ``autocomp calibrate --target cpu`` measures by default. On the 300 of
#: benchmarks/cpu_predictor.md, with feature set 3, fits on 100 / 150 / 200 / 240 of them scored
#: 84 / 86 / 87 / 87 % within 10 % on 60 others (20 random splits; that file's feature-set-3
#: section, and commit 45b37dd): past 200, more candidates stopped helping.
DEFAULT_CANDIDATES = 200

#: Fewest candidates a calibration is fitted on (:func:`calibrate_cpu` raises below it).
MIN_CANDIDATES = 10


#: Version of :func:`build_candidate`'s recipe, part of a candidate's key, so files built by an
#: older recipe are not reused. 2: int8 as the quantize method writes it (with the ops between int8
#: layers, :func:`autocomp_plugins.quantize.quantize_layers_int8`), not the layers alone.
CANDIDATE_BUILD = 2


@dataclass(frozen=True)
class CandidateSpec:
    """One calibration model: an architecture at some size, maybe pruned, at some precision.

    ``family`` is ``digits`` (:func:`autocomp_plugins.digits.DigitsResNet`) or a zoo name;
    ``prune_max`` the upper bound of the random per-group pruning ratios (0: not pruned);
    ``precision`` ``fp32``, ``int8`` (every Conv/Gemm/MatMul) or ``mixed`` (a random subset).
    """

    family: str
    kwargs: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, ...]
    prune_max: float = 0.0
    precision: str = "fp32"
    seed: int = 0

    @property
    def key(self) -> str:
        text = json.dumps({**asdict(self), "build": CANDIDATE_BUILD}, sort_keys=True)
        return f"{self.family}-{self.precision}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs)
        pruned = f" pruned<={self.prune_max:.2f}" if self.prune_max else ""
        return f"{self.family}({args}) {'x'.join(map(str, self.input_shape))}{pruned} {self.precision}"


def _sample_architecture(rng: random.Random) -> tuple[str, dict[str, Any], tuple[int, ...]]:
    family = rng.choices(["digits", "resnet20", "mobilenet_v2", "vit", "mobilefacenet"],
                         weights=[4, 2, 2, 1.5, 1.5])[0]
    if family == "digits":
        size = rng.choice([16, 24, 32, 48, 64])
        width = rng.choice([8, 16, 24, 32, 48, 64] if size <= 32 else [8, 16, 24, 32, 48])
        return family, {"width": width}, (1, 1, size, size)
    if family == "resnet20":
        size = rng.choice([16, 32])
        return family, {"width": rng.choice([8, 16, 24, 32]), "num_classes": 10}, (1, 3, size, size)
    if family == "mobilenet_v2":
        size = rng.choice([32, 64, 96])
        return family, {"width_mult": rng.choice([0.25, 0.35, 0.5, 0.75, 1.0]),
                        "last_channels": rng.choice([64, 128, 256]), "num_classes": 10}, (1, 3, size, size)
    if family == "vit":
        return family, {"image_size": 32, "patch_size": rng.choice([4, 8]), "dim": rng.choice([32, 48, 64, 96]),
                        "depth": rng.choice([2, 4]), "heads": rng.choice([2, 4]), "num_classes": 10}, (1, 3, 32, 32)
    size = rng.choice([32, 64])
    return family, {"width": rng.choice([8, 16, 24, 32]), "embedding_size": 64, "input_size": size}, (1, 3, size, size)


def candidate_specs(count: int, seed: int = 0) -> list[CandidateSpec]:
    """``count`` random calibration candidates, like the ones a search produces (deterministic in ``seed``).

    The 300 of benchmarks/cpu_predictor.md ran in 0.05 to 10.5 ms (fastest run; p50 0.05 to 10.7 ms)
    on one thread here: from heavily pruned
    versions of the built-in digits model to models several times its size, so the fit sees both
    overhead-bound and compute-bound graphs.
    """
    rng = random.Random(seed)
    specs: list[CandidateSpec] = []
    seen: set[str] = set()
    while len(specs) < count:
        family, kwargs, shape = _sample_architecture(rng)
        prune_max = rng.choice([0.0, 0.0, 0.3, 0.5, 0.7])
        precision = rng.choices(["fp32", "int8", "mixed"], weights=[4, 3, 3])[0]
        seed_used = rng.randrange(10**6)
        if prune_max == 0 and precision != "mixed":  # nothing random left: one model, whatever the seed
            seed_used = 0
        spec = CandidateSpec(family, tuple(sorted(kwargs.items())), shape, prune_max, precision, seed_used)
        if spec.key not in seen:
            seen.add(spec.key)
            specs.append(spec)
    return specs


def _randomise_constants(model: Any) -> None:
    """Give every layer its own batch-norm statistics, norm scales and activation slopes.

    Freshly initialised layers of one width share identical constants (zero biases, unit scales);
    the exporter then stores one initializer for all of them, and ONNX Runtime's int8 fusion
    cannot fuse a convolution whose bias is shared. A trained model has distinct values.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(0.05 * torch.randn_like(parameter))


def build_candidate(spec: CandidateSpec, directory: Path) -> Path:
    """Build, prune, export and quantize ``spec`` into ``directory``; reuse a file built before.

    Untrained weights: latency does not depend on their values. Raises the errors of export,
    pruning and quantization (:class:`autocomp.errors.AutocompError` subclasses).
    """
    out = Path(directory) / f"{spec.key}.onnx"
    if out.exists():
        return out
    import torch

    import tempfile

    import onnx

    from autocomp.export import export_onnx
    from autocomp_plugins._precision import inline_layer_constants, layer_table
    from autocomp_plugins.prune import prunable_groups, prune_model
    from autocomp_plugins.quantize import load_named, quantize_layers_int8

    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    kwargs = dict(spec.kwargs)
    if spec.family == "digits":
        from autocomp_plugins.digits import DigitsResNet

        model = DigitsResNet(**kwargs)
    else:
        from autocomp import zoo

        model = zoo.build(spec.family, **kwargs)
    _randomise_constants(model)
    model.eval()
    example = torch.randn(*spec.input_shape)
    if spec.prune_max > 0:
        groups = prunable_groups(model, example)
        ratios = {name: rng.uniform(0.0, spec.prune_max) for name in groups}
        prune_model(model, example, ratios, importance="l2", round_to=8)
    fp32 = out.with_name(f"{spec.key}.fp32.tmp.onnx")
    export_onnx(model, example, fp32)
    try:
        if spec.precision == "fp32":
            os.replace(fp32, out)
            return out
        graph = inline_layer_constants(load_named(fp32))  # as the quantize method reads its input
        nodes = [layer.node for layer in layer_table(graph).values()]
        if spec.precision == "mixed" and len(nodes) > 1:
            nodes = rng.sample(nodes, rng.randint(1, len(nodes) - 1))
        calibration_inputs = torch.randn(8, *spec.input_shape[1:])
        tmp = out.with_name(f"{spec.key}.int8.tmp.onnx")
        with tempfile.TemporaryDirectory(prefix=f"{spec.key}-", dir=directory) as work:
            onnx.save(quantize_layers_int8(graph, nodes, calibration_inputs, Path(work)), str(tmp))
        os.replace(tmp, out)
        return out
    finally:
        fp32.unlink(missing_ok=True)


def measure_candidates(paths: Sequence[Path], input_shapes: Sequence[Mapping[str, Sequence[int]]], *,
                       threads: int = 1, rounds: int = 3, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every model ``rounds`` times, interleaved (shuffled order each round), with the cpu
    target's harness (:func:`autocomp.ort.measure_latency`, default :class:`TimingPolicy` but for
    ``threads``). Returns per model ``{"round_min_ms": [...], "round_p50_ms": [...], "round_load": [...],
    "min_ms": median of the round minima, "p50_ms": median of the round p50s}``, where ``round_min_ms``
    holds each measurement's fastest run, ``round_load`` the 1-minute load average when that round's
    measurement started and
    ``round_cpu_share`` the share of one core this process got while measuring (CPU time over wall
    time; below 1 when other jobs took the core away).
    """
    import itertools
    import statistics
    import time

    from autocomp.latency import interleaved
    from autocomp.ort import TimingPolicy, measure_latency

    policy = TimingPolicy(threads=threads)
    calls = itertools.count()

    def measure(i: int) -> tuple[Any, float, float]:
        done = next(calls)
        load = os.getloadavg()[0]
        if progress and done % len(paths) % 20 == 0:
            progress(f"round {done // len(paths) + 1}/{rounds}: {done % len(paths)}/{len(paths)} measured, "
                     f"load {load:.2f}")
        wall, cpu = time.perf_counter(), time.process_time()
        stats = measure_latency(paths[i], input_shapes[i], policy)
        share = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9) / threads
        return stats, load, round(share, 3)

    results = []
    for row in interleaved(range(len(paths)), measure, rounds, random.Random(seed)):
        result = {"round_p50_ms": [s.p50_ms for s, _, _ in row], "round_min_ms": [s.min_ms for s, _, _ in row],
                  "round_load": [load for _, load, _ in row], "round_cpu_share": [share for _, _, share in row]}
        result["min_ms"] = statistics.median(result["round_min_ms"])
        result["p50_ms"] = statistics.median(result["round_p50_ms"])
        results.append(result)
    return results


def calibrate_cpu(threads: int = 1, count: int = DEFAULT_CANDIDATES, rounds: int = 3, seed: int = 0,
                  work_dir: Path | None = None, write: bool = True,
                  progress: Callable[[str], None] | None = None) -> CpuCalibration:
    """Calibrate the predictor on this host: build ``count`` candidates, measure, fit, and cache.

    Builds candidates of different shapes and precisions (:func:`candidate_specs`) in ``work_dir``
    (a temporary directory by default), measures each ``rounds`` times with the cpu target's harness
    at ``threads`` threads, fits :data:`FEATURES`' coefficients and, with ``write``, stores the
    calibration where :func:`load_calibration` finds it first. Takes about ``count * rounds * 1.5``
    seconds plus a second per candidate to build; run it on a quiet machine. Candidates that fail to
    build are skipped (logged). Raises :class:`autocomp.errors.InfrastructureError` when fewer than
    :data:`MIN_CANDIDATES` candidates could be built (nothing is written then).
    """
    import statistics
    import tempfile
    import time

    from autocomp.errors import AutocompError, InfrastructureError

    with tempfile.TemporaryDirectory(prefix="autocomp-cpu-calibration-") as tmp:
        directory = Path(work_dir) if work_dir is not None else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        paths, shapes, rows, last_failure = [], [], [], "none"
        for spec in candidate_specs(count, seed):
            try:
                path = build_candidate(spec, directory)
                shape = {"input": spec.input_shape}
                rows.append(graph_features(path, shape))
            except AutocompError as exc:
                logger.warning("cpu calibration: skipping %s: %s", spec.describe(), exc)
                last_failure = f"{spec.describe()}: {exc}"
                continue
            paths.append(path)
            shapes.append(shape)
        if len(paths) < MIN_CANDIDATES:
            raise InfrastructureError(
                f"only {len(paths)} of {count} calibration candidates could be built, and a fit needs at least "
                f"{MIN_CANDIDATES}; nothing was written. The last failure: {last_failure} "
                f"(each failure is logged as a warning; a broken torch, onnx or ONNX Runtime install, or a full disk, is the usual cause)")
        if len(paths) < WELL_DETERMINED * len(FEATURES):
            logger.warning("cpu calibration: %d candidates for %d coefficients; a fit this small matches its own "
                           "candidates and little else (at least %d recommended, %d by default)", len(paths),
                           len(FEATURES), WELL_DETERMINED * len(FEATURES), DEFAULT_CANDIDATES)
        load_before = os.getloadavg()
        measured = measure_candidates(paths, shapes, threads=threads, rounds=rounds, seed=seed, progress=progress)
    latencies = [m["min_ms"] for m in measured]
    coefficients = fit_coefficients(rows, latencies)
    host = host_identity()
    calibration = CpuCalibration(host=host, threads=threads, coefficients=coefficients)
    errors = sorted(abs(calibration.predict(r) / y - 1) for r, y in zip(rows, latencies))
    held_out = [abs(p / y - 1) for p, y in zip(out_of_fold_ms(rows, latencies, random_folds(len(rows))), latencies)]
    fit = {
        "models": len(rows),
        "rounds": rounds,
        "target": FIT_TARGET,
        "feature_set": FEATURE_SET,
        **host_feature_facts(),  # what the features were computed with
        "in_sample_within_10pct": sum(e <= 0.10 for e in errors) / len(errors),
        "in_sample_median_error": statistics.median(errors),
        "cross_validated_within_10pct": sum(e <= 0.10 for e in held_out) / len(held_out),
        "cross_validated_median_error": statistics.median(held_out),
        "load_1min_before": load_before[0],
        "load_1min_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    calibration = CpuCalibration(host=host, threads=threads, coefficients=coefficients, fit=fit)
    if write:
        path = write_calibrations(cache_path(host, threads), [calibration])
        calibration = CpuCalibration(host=host, threads=threads, coefficients=coefficients, fit=fit, source=str(path))
        logger.info("cpu calibration for %d thread(s) written to %s", threads, path)
    return calibration
