"""What the agent checks in a request before it runs anything: the uploaded file is one ONNX model
without external data, and the shape and timing-policy headers are well formed. Each refusal is a
:class:`_Rejected`, which the server turns into an HTTP error answer. Private to
:mod:`autocomp.agent.server`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

from autocomp.agent.client import POLICY_HEADER, SHAPES_HEADER
from autocomp.ort import TimingPolicy


class _Rejected(Exception):
    """An HTTP error answer; ``status`` and ``code`` go to the client with the message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def _tensors_of(graph: Any) -> Iterator[Any]:
    """Every TensorProto stored in ``graph`` and its subgraphs (initializers, constants, attributes)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _tensors_of_node(node)


def _tensors_of_node(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _tensors_of(attr.g)
        for sub in attr.graphs:
            yield from _tensors_of(sub)


def check_model_file(path: Path) -> None:
    """Refuse a file that is not an ONNX model or that references external data.

    Parses the protobuf only (no external data is loaded, nothing runs). Raises :class:`_Rejected`
    with status 422.
    """
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _Rejected(422, "model_rejected", f"not an ONNX model: the file does not parse ({exc})") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.output:
        raise _Rejected(422, "model_rejected",
                        "not an ONNX model: no IR version or no graph with outputs; upload the .onnx file itself")
    tensors = list(_tensors_of(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_tensors_of_node(node))
    external = [t.name or "<unnamed>" for t in tensors
                if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)]
    if external:
        shown = ", ".join(repr(n) for n in external[:5]) + (" ..." if len(external) > 5 else "")
        raise _Rejected(
            422, "model_rejected",
            f"the model references external data ({len(external)} tensor(s): {shown}), which the agent does "
            "not accept; save it as one file (onnx.save(model, path, save_as_external_data=False))",
        )


def _parse_shapes(raw: str | None) -> dict[str, list[int]]:
    if raw is None:
        raise _Rejected(400, "bad_request",
                        f"missing header {SHAPES_HEADER}; send the input shapes as JSON, "
                        '''e.g. {"input": [1, 3, 32, 32]}''')
    try:
        shapes = json.loads(raw)
    except ValueError as exc:
        raise _Rejected(400, "bad_request", f"header {SHAPES_HEADER} is not JSON ({exc})") from exc
    valid = isinstance(shapes, dict) and shapes and all(
        isinstance(name, str) and name and isinstance(dims, list) and len(dims) <= 16
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
        for name, dims in shapes.items()
    )
    if not valid:
        raise _Rejected(400, "bad_request",
                        f"header {SHAPES_HEADER} must map each input name to a list of positive integers, "
                        f'e.g. {{"input": [1, 3, 32, 32]}}, but got {raw[:200]!r}')
    return shapes


def _parse_policy(raw: str | None, default: TimingPolicy) -> TimingPolicy:
    if raw is None:
        return default
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise _Rejected(400, "bad_request", f"header {POLICY_HEADER} is not JSON ({exc})") from exc
    known = {f.name: f.type for f in dataclasses.fields(TimingPolicy)}
    if not isinstance(fields, dict) or set(fields) - set(known):
        unknown = sorted(set(fields) - set(known)) if isinstance(fields, dict) else fields
        raise _Rejected(400, "bad_request",
                        f"header {POLICY_HEADER} must be a JSON object with fields among {sorted(known)}, "
                        f"but got {unknown!r}")
    for name, value in fields.items():
        integral = known[name] in ("int", int)
        ok = isinstance(value, int) if integral else isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or isinstance(value, bool):
            kind = "an integer" if integral else "a finite number"
            raise _Rejected(400, "bad_request", f"timing policy field {name} must be {kind}, but got {value!r}")
    try:
        return dataclasses.replace(default, **fields)
    except ValueError as exc:
        raise _Rejected(400, "bad_request", f"bad timing policy: {exc}") from exc
