"""Benchmark: int8 with the ops between int8 layers quantized too, against the layers alone.

Given only the layers (Conv, Gemm, MatMul), ONNX Runtime's QDQ quantizer leaves every op between
two of them in float: a convolution's output is dequantized, its ReLU, residual Add or pooling runs
in float, and the next layer quantizes again. ``quantize`` now also hands it those ops where they sit
between int8 layers (``autocomp_plugins._precision.int8_glue``). This measures both on the same
fp32 exports, every layer at int8, side by side:

- the built-in digits model (trained), pruned uniformly at several ratios with the search's pruning
  (L2, channels rounded to 8) and batch norm re-estimated, no fine-tuning; accuracy on the
  validation and test splits of all three versions;
- zoo architectures at small sizes with random weights (latency does not depend on the values):
  how far each int8 version's output is from fp32 (relative L2 over 32 random inputs).

Latency: the cpu target's harness, 1 thread, every file measured in each of ``--rounds``
interleaved rounds (shuffled order), median over rounds of each measurement's fastest run; the
Q/DQ kernels left after ONNX Runtime's graph optimisation are counted.

    python benchmarks/int8_glue.py [--rounds 5]

Writes benchmarks/int8_glue.json and .md. Takes about two minutes here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

RATIOS = (0.0, 0.4, 0.55, 0.7)
ZOO = {
    "resnet20": ({"num_classes": 10, "width": 16}, (1, 3, 32, 32)),
    "mobilenet_v2": ({"num_classes": 10, "width_mult": 0.5, "last_channels": 128}, (1, 3, 64, 64)),
    "mobilefacenet": ({"width": 16, "embedding_size": 64, "input_size": 64}, (1, 3, 64, 64)),
    "vit": ({"image_size": 32, "patch_size": 4, "num_classes": 10, "dim": 64, "depth": 4, "heads": 4},
            (1, 3, 32, 32)),
}


def quantize_both(fp32: Path, calibration, target) -> dict[str, Path]:
    """Every layer of ``fp32`` at int8: by the quantize method (with the ops between layers) and
    with the layers alone, as it quantized before."""
    import onnx

    from autocomp.method import CandidateContext
    from autocomp_plugins import _precision
    from autocomp_plugins.quantize import QuantizeConfig, QuantizeMethod, _load, quantize_int8

    work = fp32.parent / f"{fp32.stem}.work"
    work.mkdir()
    ctx = CandidateContext(workload=SimpleNamespace(train=SimpleNamespace(inputs=calibration)), teacher=None,
                           target=target, work_dir=work, seed=0)
    glue = QuantizeMethod().apply(fp32, {"all_layers": "int8"}, QuantizeConfig(), ctx)
    source = fp32.with_name(f"{fp32.stem}.inlined.onnx")
    model = _precision.inline_layer_constants(_load(fp32))
    onnx.save(model, str(source))
    layers = quantize_int8(source, fp32.with_name(f"{fp32.stem}.layers.onnx"),
                           [layer.node for layer in _precision.layer_table(model).values()], calibration)
    return {"fp32": fp32, "int8, layers only": layers, "int8, with the ops between": glue.rename(
        fp32.with_name(f"{fp32.stem}.glue.onnx"))}


def qdq_kernels(path: Path) -> int:
    """QuantizeLinear/DequantizeLinear nodes of activations left once ONNX Runtime has optimised
    the graph (those of constants are folded into the int8 kernels' weights)."""
    from autocomp.ort import optimised_model

    graph = optimised_model(path, path.with_suffix(".opt.onnx")).graph
    constants = {i.name for i in graph.initializer}
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in constants
               for n in graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime
    import torch

    from autocomp.candidate import recalibrate_batchnorm
    from autocomp.export import export_onnx
    from autocomp.ort import run_batches
    from autocomp.plugins import get_registry
    from autocomp.search import evaluate, resolve_target, resolve_workload
    from autocomp.zoo import build
    from autocomp_plugins.cpu_calibrate import _randomise_constants, measure_candidates
    from autocomp_plugins.prune import prunable_groups, prune_model

    started = time.time()
    registry = get_registry()
    target = resolve_target(registry, "cpu", {})
    workload = resolve_workload("digits", {n: e.factory for n, e in registry.workloads.items()})
    calibration = workload.train.inputs[:256]
    cases = []  # (name, files by variant, input shape, scoring)
    with tempfile.TemporaryDirectory(prefix="autocomp-int8-glue-") as tmp:
        for ratio in RATIOS:
            model = copy.deepcopy(workload.model).eval()
            example = workload.example_input
            if ratio:
                prune_model(model, example, {g: ratio for g in prunable_groups(model, example)},
                            importance="l2", round_to=8)
                recalibrate_batchnorm(model, workload.train.inputs)
            fp32 = export_onnx(model.eval(), example, Path(tmp) / f"digits-{ratio}.onnx")
            cases.append((f"digits, pruned {ratio:g}", quantize_both(fp32, calibration, target),
                          tuple(example.shape), "accuracy"))
        for name, (kwargs, shape) in ZOO.items():
            torch.manual_seed(0)
            model = build(name, **kwargs)
            _randomise_constants(model)
            fp32 = export_onnx(model.eval(), torch.randn(*shape), Path(tmp) / f"{name}.onnx")
            generator = torch.Generator().manual_seed(1)
            cases.append((name, quantize_both(fp32, torch.randn(32, *shape[1:], generator=generator), target),
                          shape, "error"))

        paths = [p for _, files, _, _ in cases for p in files.values()]
        shapes = [{"input": shape} for _, files, shape, _ in cases for _ in files]
        measured = iter(measure_candidates(paths, shapes, rounds=args.rounds,
                                           progress=lambda line: print(line, flush=True)))
        rows = []
        for name, files, shape, scoring in cases:
            row = {"model": name, "input": list(shape), "variants": {}}
            inputs = torch.randn(32, *shape[1:], generator=torch.Generator().manual_seed(2)).numpy()
            reference = run_batches(files["fp32"], inputs)
            for variant, path in files.items():
                m = next(measured)
                entry = {"min_ms": m["min_ms"], "round_min_ms": m["round_min_ms"], "p50_ms": m["p50_ms"],
                         "qdq_kernels": qdq_kernels(path)}
                if scoring == "accuracy":
                    entry["val_accuracy"] = evaluate(path, workload)
                    entry["test_accuracy"] = evaluate(path, workload, "test")
                else:
                    out = run_batches(path, inputs)
                    entry["relative_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                row["variants"][variant] = entry
            rows.append(row)

    record = {"command": "python benchmarks/int8_glue.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "onnxruntime": onnxruntime.__version__,
              "rounds": args.rounds, "seconds": round(time.time() - started), "rows": rows}
    (HERE / "int8_glue.json").write_text(json.dumps(record, indent=1) + "\n")
    (HERE / "int8_glue.md").write_text(report(record))
    print(report(record))


def report(record: dict) -> str:
    layers, glue = "int8, layers only", "int8, with the ops between"
    lines = [
        "# int8 with the ops between int8 layers quantized too",
        "",
        f"Generated by `{record['command'].strip()}` on {record['date']} (ONNX Runtime {record['onnxruntime']}, "
        f"1 thread, {record['seconds']} s). Every layer at int8 (QDQ, u8 activations, s8 per-channel weights); "
        f"latency: median over {record['rounds']} interleaved rounds of each measurement's fastest run. "
        "Q/DQ: QuantizeLinear/DequantizeLinear kernels of activations left after ONNX Runtime's optimisation. "
        "The digits model is the trained built-in one, pruned uniformly without fine-tuning: only its "
        "unpruned row's accuracy means anything, the pruned rows' only compare the three versions; "
        "the zoo models have random weights, so their output error against fp32 is given instead.",
        "",
        "| model | fp32 ms | int8 layers only ms (Q/DQ) | int8 with the ops between ms (Q/DQ) | with / layers only "
        "| fp32 / with | accuracy val, test: fp32; layers only; with (or output error vs fp32: layers only; with) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    ratios = []
    for row in record["rows"]:
        v = row["variants"]
        ratio = v[glue]["min_ms"] / v[layers]["min_ms"]
        ratios.append(ratio)
        if "val_accuracy" in v[glue]:
            quality = "; ".join(f"{100 * v[k]['val_accuracy']:.2f}, {100 * v[k]['test_accuracy']:.2f} %"
                                for k in ("fp32", layers, glue))
        else:
            quality = f"{100 * v[layers]['relative_error']:.1f} %; {100 * v[glue]['relative_error']:.1f} %"
        lines.append(f"| {row['model']} | {v['fp32']['min_ms']:.3f} | {v[layers]['min_ms']:.3f} ({v[layers]['qdq_kernels']}) "
                     f"| {v[glue]['min_ms']:.3f} ({v[glue]['qdq_kernels']}) | {ratio:.2f} "
                     f"| {v['fp32']['min_ms'] / v[glue]['min_ms']:.2f}x | {quality} |")
    lines += ["", f"Median of with / layers only over the {len(ratios)} models: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
