"""ONNX source: depthwise kernels from an ONNX model (config entry ``onnx: PATH``), without running it.

A depthwise conv in ONNX is a ``Conv`` node with ``group > 1`` whose weight has shape
(C, 1, kh, kw): every group sees one input channel, so ``group`` is the number of input channels
and C / group the channel multiplier. The weight may sit in

- a graph ``initializer`` (what exporters write),
- a ``Constant`` node's ``value`` (what constant folding and some converters write),
- either of these behind ``Identity`` nodes (exporters add them for shared weights),
- external data files next to the model (large models). External paths are resolved against the
  model's folder and **refused** when they are absolute or lead outside it (``../``, symlinks):
  a model file must not make dwk read arbitrary files.

Weights computed at run time (e.g. ``DequantizeLinear`` of a quantised model) are skipped with a
warning. Layer order is the graph's node order, which the ONNX spec requires to be topological.
``norm_after`` follows the conv's output through layout-only ops (Transpose, Reshape, Identity, ...)
to a normalization op (BatchNormalization, LayerNormalization, ..., or LayerNorm decomposed as
ReduceMean/Sub). Exporters usually fold an eval-mode BatchNorm into the conv before it: then the
graph has no norm after the conv, and neither does the record.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from dwk.errors import CheckpointError, NoDepthwiseError
from dwk.extract import Extracted, KernelLayer, assemble
from dwk.sources._base import Loaded, Source, existing_file, sha256_file

logger = logging.getLogger(__name__)

_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
             "RMSNormalization", "SkipLayerNormalization", "MeanVarianceNormalization", "LpNormalization"}
_LAYOUT_OPS = {"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast"}


class OnnxSourceError(ValueError):
    """The file is not a usable ONNX model, or asks for data dwk refuses to read."""


def load_graph(path: Path):
    """Parse an ONNX model without its external data (that is read tensor by tensor, checked)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise OnnxSourceError(f"cannot parse {path.name} as an ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is truncated, corrupt or not an ONNX model") from e
    if model.ir_version <= 0 or not len(model.graph.node):
        raise OnnxSourceError(f"{path.name} holds no ONNX graph (no ir_version or no nodes): not an ONNX model")
    return model


def external_path(base: Path, location: str) -> Path:
    """The file an external-data ``location`` names, refusing anything outside ``base`` (the model's folder)."""
    loc = Path(location)
    if not location or loc.is_absolute() or loc.anchor:
        raise OnnxSourceError(f"external data location {location!r} is absolute; refused (it must lie in the "
                              f"model's folder {base})")
    full = (base / loc).resolve()
    if not full.is_relative_to(base.resolve()):
        raise OnnxSourceError(f"external data location {location!r} leads outside the model's folder {base}; refused")
    if not full.is_file():
        raise OnnxSourceError(f"external data file {location!r} is missing next to the model in {base}")
    return full


def _all_tensors(graph):
    """Initializers and tensor attributes of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def external_files(model, base: Path) -> list[Path]:
    """Every external data file the model's tensors name (checked), sorted, without duplicates."""
    from onnx import TensorProto

    files = set()
    for t in _all_tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            files.add(external_path(base, info.get("location", "")))
    return sorted(files)


def content_hash(path: Path) -> str:
    """sha256 over the model file and the external data files it names (in sorted order)."""
    model = load_graph(path)
    h = hashlib.sha256(sha256_file(path).encode())
    for f in external_files(model, path.parent):
        h.update(f.relative_to(path.parent.resolve()).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def tensor_array(tensor, base: Path) -> np.ndarray:
    """A TensorProto as an array; external data read from a checked path, with its length checked."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    full = external_path(base, info.get("location", ""))
    offset, length = int(info.get("offset", 0) or 0), info.get("length")
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    expected = int(np.prod(tensor.dims)) * itemsize
    with open(full, "rb") as f:
        f.seek(offset)
        data = f.read(int(length) if length else expected)
    if len(data) != expected:
        raise OnnxSourceError(f"external data for tensor {tensor.name!r} in {full.name} is truncated: "
                              f"{len(data)} bytes, expected {expected}")
    t = TensorProto()
    t.CopyFrom(tensor)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = data
    return numpy_helper.to_array(t)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _norm_follows(out: str, consumers: dict[str, list]) -> bool:
    """Does a normalization op take ``out`` (through layout-only ops)?"""
    seen = set()
    while out not in seen:
        seen.add(out)
        nodes = consumers.get(out, [])
        ops = {n.op_type for n in nodes}
        if ops & _NORM_OPS:
            return True
        if "ReduceMean" in ops and "Sub" in ops:  # LayerNorm decomposed by older exporters
            return True
        if len(nodes) == 1 and nodes[0].op_type in _LAYOUT_OPS:
            out = nodes[0].output[0]
            continue
        return False
    return False


def extract_onnx(path: Path) -> Extracted:
    """Every depthwise Conv of an ONNX graph, in node order, with its per-layer metadata."""
    base = path.parent
    model = load_graph(path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts, identity, consumers = {}, {}, defaultdict(list)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
        elif node.op_type == "Identity" and node.input and node.output:
            identity[node.output[0]] = node.input[0]
        for name in node.input:
            consumers[name].append(node)
    items, skipped = [], []
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        attrs = _attrs(node)
        group = int(attrs.get("group", 1))
        w_name = node.input[1]
        while w_name in identity and w_name not in inits and w_name not in consts:
            w_name = identity[w_name]
        tensor = inits.get(w_name) if w_name in inits else consts.get(w_name)
        if tensor is None:
            if group > 1:
                skipped.append(node.name or node.input[1])
            continue
        dims = tuple(tensor.dims)
        if group <= 1 or len(dims) != 4 or dims[1] != 1 or dims[2] * dims[3] <= 1 or dims[0] % group:
            continue
        w = tensor_array(tensor, base).astype(np.float32)  # (C, 1, kh, kw)
        pads = list(attrs.get("pads", [0] * 4))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad not in ("NOTSET", ""):
            padding = auto_pad.lower()
        elif len(pads) == 4 and pads[:2] == pads[2:]:
            padding = "x".join(map(str, pads[:2]))
        else:
            padding = "x".join(map(str, pads))
        items.append(KernelLayer(
            module=node.name or w_name, weight=w.reshape(dims[0], dims[2], dims[3]),
            stride=tuple(attrs.get("strides", (1, 1))), dilation=tuple(attrs.get("dilations", (1, 1))),
            padding=padding, in_channels=group, norm_after=_norm_follows(node.output[0], consumers), param=w_name,
        ))
    if skipped:
        logger.warning("%s: %d grouped Conv nodes take weights computed at run time (e.g. quantised), skipped: %s",
                       path.name, len(skipped), skipped[:5])
    if not items:
        n_conv = sum(n.op_type == "Conv" for n in graph.node)
        raise NoDepthwiseError(f"{path.name} has no depthwise Conv node (found {n_conv} Conv nodes, none with "
                               "group > 1 and a (C, 1, kh, kw) weight in an initializer or Constant node)")
    logger.info("%s: %d depthwise Conv nodes", path.name, len(items))
    return assemble(items)


class OnnxSource(Source):
    kind = "onnx"
    builds_model = False

    @staticmethod
    def claims(spec) -> bool:
        return spec.onnx is not None

    def _path(self) -> Path:
        return existing_file(self.spec.onnx, self.spec.id, "ONNX file")

    def fingerprint(self) -> str:
        try:
            return content_hash(self._path())
        except OnnxSourceError as e:
            raise CheckpointError(self.spec.id, str(e)) from e

    def load(self) -> Loaded:
        path = self._path()
        try:
            extracted = extract_onnx(path)
            digest = content_hash(path)
        except (OnnxSourceError, NoDepthwiseError) as e:
            raise CheckpointError(self.spec.id, str(e)) from e
        return Loaded(None, None, path, extracted=extracted, meta=dict(format="onnx", sha256=digest))
