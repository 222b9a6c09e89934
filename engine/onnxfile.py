"""What the engine checks in a serialised ONNX model before onnxruntime sees it, without the onnx package.

ONNX lets a tensor keep its values in another file (``data_location = EXTERNAL`` and ``external_data``
entries ``location``, ``offset``, ``length``); onnxruntime then reads that file, resolved against the model's
folder or, for a model given as bytes (as ``engine.encoder`` does), the working directory. A crafted model
could so pull any readable file into its weights (``../../home/me/.ssh/id_rsa``, an absolute path, a
symbolic link leaving the folder), and older onnxruntime versions do not check where the file is.

lookalike encoders never use external data: ``python -m export`` writes every weight into the ``.onnx`` file,
whose ``lookalike.sha256`` covers them, and the engine runs the bytes it hashed. So ``refuse_external_data``
refuses any model with a tensor stored outside the file, naming the tensor and the location.

The model is walked with a minimal protocol-buffer reader along the messages that can hold tensors (field
numbers from onnx.proto): ModelProto.graph (7), .training_info (20), .functions (25); GraphProto.node (1),
.initializer (5), .sparse_initializer (15); NodeProto.attribute (5); AttributeProto.t (5), .g (6),
.tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23); FunctionProto.node (7),
.attribute_proto (11); TrainingInfoProto.initialization (1), .algorithm (2); SparseTensorProto.values (1),
.indices (2); TensorProto.name (8), .external_data (13, StringStringEntryProto key 1 / value 2),
.data_location (14, 1 = EXTERNAL). Other fields are skipped by their wire type, so nothing else is parsed.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

from engine.errors import ModelError

_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_HOLDS = {  # message kind -> {field number: kind of the message in that field}
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(b: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end:
            raise ValueError("a varint runs past the end of its message")
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(b: memoryview, start: int, end: int):
    """(field number, wire type, value) of the message ``b[start:end]``: value is the int of a varint, the
    (start, end) of a length-delimited field, None for fixed-size ones."""
    i = start
    while i < end:
        key, i = _varint(b, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i, end)
        elif wire == 2:
            n, i = _varint(b, i, end)
            value, i = (i, i + n), i + n
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} (field {field}) at byte {i}")
        if i > end:
            raise ValueError(f"field {field} runs past the end of its message")
        yield field, wire, value


def external_tensors(model) -> list[tuple[str, str | None]]:
    """``(tensor name, location or None)`` of every tensor in the serialised ONNX ``model`` (bytes) that keeps
    its values in an external file (``data_location`` EXTERNAL or any ``external_data`` entry).

    Raises ``ValueError`` when the bytes are not a well-formed protocol buffer."""
    b = memoryview(model).cast("B")
    found = []
    todo = [(_MODEL, 0, len(b))]
    while todo:
        kind, start, end = todo.pop()
        if kind == _TENSOR:
            name, location, external = "", None, False
            for field, wire, value in _fields(b, start, end):
                if field == 8 and wire == 2:
                    name = bytes(b[value[0] : value[1]]).decode("utf-8", "replace")
                elif field == 14 and wire == 0:
                    external = external or value == _EXTERNAL
                elif field == 13 and wire == 2:
                    external = True
                    entry = {f: bytes(b[v[0] : v[1]]).decode("utf-8", "replace")
                             for f, w, v in _fields(b, *value) if w == 2 and f in (1, 2)}
                    if entry.get(1) == "location":
                        location = entry.get(2, "")
            if external:
                found.append((name, location))
            continue
        holds, inner = _HOLDS[kind], []
        for field, wire, value in _fields(b, start, end):
            if field in holds:
                if wire != 2:
                    raise ValueError(f"field {field} should hold a message, has wire type {wire}")
                inner.append((holds[field], *value))
        todo += reversed(inner)  # depth first, in file order
    return found


def _escapes(location: str) -> bool:
    """True when ``location`` is absolute or climbs out of the folder it is resolved in."""
    for path in (PurePosixPath(location), PureWindowsPath(location)):
        if path.is_absolute() or path.anchor or ".." in path.parts:
            return True
    return False


def refuse_external_data(model, where: str) -> None:
    """``ModelError`` naming ``where``, the tensor and its location when the serialised ``model`` stores any
    tensor in an external file; ``ModelError`` "not a valid ONNX model" when it is not a protocol buffer."""
    try:
        found = external_tensors(model)
    except ValueError as e:
        raise ModelError(f"{where} is not a valid ONNX model (damaged protocol buffer: {e})") from None
    if not found:
        return
    name, location = found[0]
    if location is None:
        what = "an external file whose location it does not give"
    else:
        what = f"the external file {location!r}" + (", outside the model's folder" if _escapes(location) else "")
    more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
    raise ModelError(f"{where}: tensor {name!r} keeps its values in {what}{more}; lookalike models carry every "
                     f"weight inside the .onnx file (covered by its lookalike.sha256), so a model with external "
                     f"data is refused. Re-export it with `python -m export NAME`")
