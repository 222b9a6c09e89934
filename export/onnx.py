"""Export trained encoders to ONNX files the engine can run without torch.

``export_run`` takes one checkpoint (``runs/<name>/checkpoint.pt``) and writes ``<out>/<name>.onnx``:

1. the checkpoint is read once: ``train.registry.encoder_from_checkpoint`` rebuilds the encoder alone (decoders,
   heads and unpooling stay out), and its kwargs and completeness come from the same payload;
2. ``torch.onnx.export`` (TorchScript exporter; the dynamo exporter when that one fails) with a dynamic batch
   axis, input ``images`` (n, 3, H, W) float32, output ``embeddings`` (n, dim) float32, opset 17 up to what
   the installed onnx and torch exporter write (``opset_limits``; the opset recorded is the one the file has);
3. the metadata the engine needs (``engine.modelfile.model_metadata``: name, arch, dim, input size, the
   ``Preprocess`` JSON, format version, sha256 of the source checkpoint, whether the run is complete and how far
   it got, what "similar" meant to its trainer) goes into ``metadata_props``, and
   ``lookalike.sha256`` seals the file (``_seal``: the sha256 of its serialisation with that value as 64 zeros,
   which ``engine.Encoder`` checks on load);
4. ``onnx.checker.check_model(full_check=True)``, then onnxruntime is compared with torch on real images
   (``export.verify.real_images``): a max abs difference above ``tolerance`` (1e-4) raises ``ExportError``
   and nothing is written; otherwise the file is written atomically (temp file + ``os.replace``).

A run folder named after a model (``runs/la/``) must hold that model's checkpoint; the output folder is checked
to be writable before any work. A run that stopped before the end of its training (``--max-steps``, a signal:
the checkpoint's ``complete`` is false) is refused, naming how far it got, unless ``allow_incomplete``
(``--allow-incomplete``); the file then records it and ``engine.Encoder`` warns when it loads it.

Optional variants, measured against the float32 file on held-out real images (max abs difference, mean
cosine, overlap@10 of the neighbour lists) and written as ``<name>.fp16.onnx`` / ``<name>.int8.onnx``:

- float16: ``onnxruntime.transformers.float16`` with float32 inputs and outputs and the final L2
  normalisation kept in float32;
- int8: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights in the 7-bit range -64..64,
  uint8 activations), calibrated on real images disjoint from the ones it is measured on; the normalisation stays
  float32. The 7-bit weights make its answers the same on every x86 CPU (``_int8`` says why); each export checks
  that onnxruntime's int8 kernels on the exporting CPU agree with the file's own arithmetic
  (``verify.qdq_reference_session``) and records the agreement.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from engine.encoder import CPU, make_session
from engine.modelfile import (DIGEST_PLACEHOLDER, KEY_ARCH, KEY_DIM, KEY_NAME, KEY_PRECISION, KEY_SHA256, ModelInfo,
                              check_file_digest, model_metadata)
from engine.errors import LookalikeError, ModelError
from engine.fileio import unwritable
from engine.validate import is_int
from export import verify
from export.options import DEFAULT_OPSET, EXPORTERS, MIN_OPSET, TOLERANCE  # defined without torch, for --help
from train.checkpoint import CheckpointError, atomic_write_bytes
from train.registry import MODEL_NAMES

INPUT_NAME = "images"  # (n, 3, H, W) float32, preprocessed as the metadata says
OUTPUT_NAME = "embeddings"  # (n, dim) float32, L2-normalised
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's own operator set; it writes no older one
VARIANTS = ("fp16", "int8")
SUFFIX = {"float32": ".onnx", "fp16": ".fp16.onnx", "int8": ".int8.onnx"}
OVERLAP_K = 10
# Least cosine between an int8 file's embeddings from onnxruntime's int8 kernels and from its unfused arithmetic
# (verify.qdq_reference_session) on the same images: without saturation they differ only by the rounding of a
# few requantized activations (measured 0.9998 or more on every model); saturating kernels gave 0.88-0.98.
KERNEL_AGREEMENT = 0.999

# How each model name is trained, for the hints in error messages.
TRAINERS = {
    "mpnn": "python -m train.mpnn",
    "ae-conv": "python -m train.ae --arch conv",
    "ae-vgg16bn": "python -m train.ae --arch vgg16bn",
    "la": "python -m train.la",
    "siamese": "python -m train.siamese",
}


class ExportError(LookalikeError):
    """An export could not be done or did not pass its checks; nothing was written for it."""


# -- finding runs -------------------------------------------------------------------------------------------

def find_runs(runs_dir) -> dict[str, Path]:
    """Run folders under ``runs_dir`` holding a checkpoint.pt: {name: checkpoint path}, sorted by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return {}
    return {d.name: d / "checkpoint.pt" for d in sorted(runs_dir.iterdir())
            if d.is_dir() and (d / "checkpoint.pt").is_file()}


def resolve(names, runs_dir) -> list[tuple[str, Path]]:
    """Model names (or ``all``) -> [(name, checkpoint path)]; clear errors for unknown or untrained names."""
    runs_dir = Path(runs_dir)
    names = list(names)
    if not names:
        raise ExportError(f"name the models to export, or 'all'; known model names: {', '.join(MODEL_NAMES)}")
    found = find_runs(runs_dir)
    if "all" in names:
        if len(names) > 1:
            raise ExportError(f"'all' exports every trained run; give it alone, got {names}")
        if not found:
            raise ExportError(
                f"no trained runs under {runs_dir}/ (expected {runs_dir}/<name>/checkpoint.pt for a name in "
                f"{', '.join(MODEL_NAMES)}); train one first, e.g. `{TRAINERS['la']}`, or give --runs")
        return list(found.items())
    out = []
    for name in names:
        folder = runs_dir / name
        if not folder.is_dir():
            if name in MODEL_NAMES:
                raise ExportError(f"model {name!r} has no run folder at {folder}/; train it first "
                                  f"(`{TRAINERS.get(name, 'python -m train.' + name)}`) or point --runs at its runs")
            trained = ", ".join(found) or "none"
            raise ExportError(f"unknown model {name!r}: no run folder {folder}/. Known model names: "
                              f"{', '.join(MODEL_NAMES)}; trained runs in {runs_dir}/: {trained}")
        ckpt = folder / "checkpoint.pt"
        if not ckpt.is_file():
            raise ExportError(f"run folder {folder}/ has no checkpoint.pt (a trainer writes it every "
                              f"--checkpoint-every seconds, at the end and when a signal stops it; was the run killed "
                              f"before its first one?)")
        out.append((name, ckpt))
    return out


# -- torch -> ONNX --------------------------------------------------------------------------------------------

def opset_limits() -> dict[str, int]:
    """The newest opset each exporter can write with the installed onnx and torch: the TorchScript exporter up
    to the newest torch supports for it (it warns above that), the dynamo exporter (and so ``auto``) up to onnx's
    newest opset."""
    import onnx
    import torch.onnx._constants as torch_onnx  # no public name for the TorchScript exporter's limit

    newest = onnx.defs.onnx_opset_version()
    torchscript = getattr(torch_onnx, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(torch_onnx, "ONNX_MAX_OPSET", 20))
    torchscript = min(torchscript, newest)
    return {"torchscript": torchscript, "dynamo": newest, "auto": newest}


def check_opset(opset, exporter: str) -> None:
    """Refuse (``ExportError``) an exporter or opset the installed onnx / torch cannot write."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not is_int(opset):
        raise ExportError(f"opset must be an int, got {opset!r}")
    import onnx
    import torch

    limits = opset_limits()
    if not MIN_OPSET <= opset <= limits[exporter]:
        raise ExportError(
            f"opset must be between {MIN_OPSET} and {limits[exporter]} for the {exporter} exporter, got {opset} "
            f"(onnx {onnx.__version__} defines opsets up to {limits['dynamo']}; torch {torch.__version__}'s "
            f"TorchScript exporter writes up to {limits['torchscript']}, its dynamo exporter up to onnx's)")


def _opset_of(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def to_onnx(model, example, *, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> tuple[bytes, str]:
    """The encoder as ONNX bytes with a dynamic batch axis, and a description of the exporter used with the
    opset the bytes really have."""
    import onnx
    import torch

    check_opset(opset, exporter)
    first_error = None
    # auto: the TorchScript exporter where it can write the opset, else the dynamo exporter straight away
    if exporter == "torchscript" or (exporter == "auto" and opset <= opset_limits()["torchscript"]):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                # TracerWarnings from the encoders' Python-side shape checks, and the exporter's deprecation
                # notice: the parity check below (at batch sizes other than the traced one) is what counts.
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            raw = buf.getvalue()
            _check_opset_written(onnx.load_from_string(raw), opset, "TorchScript")
            return raw, f"torch {torch.__version__} torchscript exporter, opset {opset}"
        except Exception as e:  # noqa: BLE001  (any exporter failure: try the other exporter, or report it)
            if exporter == "torchscript":
                raise ExportError(f"the TorchScript exporter failed: {type(e).__name__}: {e}") from e
            first_error = e
    wanted = max(opset, DYNAMO_MIN_OPSET)
    try:
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), opset_version=wanted, dynamo=True)
        # the exporter keeps its own opset when onnx's version converter fails: what was written is what counts
        _check_opset_written(program.model_proto, wanted, "dynamo")
        return program.model_proto.SerializeToString(), f"torch {torch.__version__} dynamo exporter, opset {wanted}"
    except Exception as e:  # noqa: BLE001
        before = f"the TorchScript exporter failed ({type(first_error).__name__}: {first_error}); " if first_error else ""
        raise ExportError(f"{before}the dynamo exporter failed: {type(e).__name__}: {e}") from e


def _check_opset_written(proto, wanted: int, exporter: str) -> None:
    got = _opset_of(proto)
    if got != wanted:
        raise ExportError(f"asked the {exporter} exporter for opset {wanted}, it wrote opset {got}")


def _seal(proto) -> bytes:
    """``proto`` serialised with ``lookalike.sha256`` set to the sha256 of its serialisation with that value as
    ``DIGEST_PLACEHOLDER`` (same length, so only those 64 bytes differ); ``engine.modelfile.check_file_digest``
    undoes the substitution on load and compares."""
    entry = next((p for p in proto.metadata_props if p.key == KEY_SHA256), None)
    if entry is None:
        entry = proto.metadata_props.add()
        entry.key = KEY_SHA256
    entry.value = DIGEST_PLACEHOLDER
    blank = proto.SerializeToString()
    digest = hashlib.sha256(blank).hexdigest()
    entry.value = digest
    data = proto.SerializeToString()
    needle = digest.encode("ascii")
    if data.count(needle) != 1 or data.replace(needle, DIGEST_PLACEHOLDER.encode("ascii")) != blank:
        raise ExportError(f"cannot seal the model with its sha256: expected its serialisation to change only in "
                          f"the 64 bytes of {KEY_SHA256}, got {len(data)} bytes vs {len(blank)} with other changes")
    return data


def _session(data: bytes, where: str):
    """An onnxruntime CPU session on ``data``, which must pass the engine's own checks (metadata and sha256)."""
    try:
        session, _ = make_session(data, providers=[CPU], where=where)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        ModelInfo.from_metadata(meta, where)
        check_file_digest(data, meta, where)
    except ModelError as e:
        raise ExportError(f"{e}; nothing written") from None
    return session


def _set_metadata(proto, meta: dict[str, str]) -> None:
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for k, v in keep + sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = (f"lookalike image encoder {meta.get(KEY_NAME)!r} ({meta.get(KEY_ARCH)}): "
                        f"{INPUT_NAME} (n, 3, H, W) float32 preprocessed as lookalike.preprocess says -> "
                        f"{OUTPUT_NAME} (n, {meta.get(KEY_DIM)}) L2-normalised float32")


def _check(proto, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001  (onnx raises several types: ValidationError, InferenceError, ...)
        raise ExportError(f"{what} fails onnx.checker.check_model(full_check=True): {type(e).__name__}: {e}") from e


def _normalisation_tail(proto) -> tuple[str | None, list[str]]:
    """The features tensor and the names of the nodes of the final L2 normalisation (every node downstream of
    the input of the last ReduceL2), topologically ordered; (None, []) when there is no ReduceL2.

    They stay float32 in the fp16 and int8 variants, so the embeddings remain unit vectors at full precision.
    """
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    reduce = [n for n in proto.graph.node if n.op_type == "ReduceL2"]
    if not reduce:
        return None, []
    feature = reduce[-1].input[0]
    tail, produced = [], {feature}
    for node in proto.graph.node:  # graph nodes are topologically sorted
        if any(i in produced for i in node.input):
            tail.append(node.name)
            produced.update(node.output)
    return feature, tail


# -- one export ---------------------------------------------------------------------------------------------

def export_run(checkpoint, out_dir, *, name: str | None = None, images: list | None = None,
               image_source: str = "", variants=(), opset: int = DEFAULT_OPSET, tolerance: float = TOLERANCE,
               exporter: str = "auto", check_images: int = 64, allow_incomplete: bool = False, log=print) -> dict:
    """Export one checkpoint (a file or a run folder) to ``<out_dir>/<name>.onnx`` (+ variants); returns its
    report entry. Raises ``ExportError`` (or ``CheckpointError`` for a damaged / foreign checkpoint), in which
    case the float32 file is not written; an incomplete run is refused unless ``allow_incomplete``. A variant
    that fails is not written either; its error is listed under the entry's ``errors`` (the float32 file
    stays)."""
    import onnx

    from train.checkpoint import load_checkpoint, run_progress
    from train.registry import encoder_from_checkpoint

    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ExportError(f"variants must be among {VARIANTS}, got {bad}")
    check_opset(opset, exporter)
    check_out_dir(out_dir)
    started = time.time()
    checkpoint = Path(checkpoint)
    path = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint
    try:  # read once: the encoder, its kwargs and how far the run got all come from this one payload
        state = load_checkpoint(path)
        model, info = encoder_from_checkpoint(state, path)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # state dict / kwargs the code does not take
        raise ExportError(f"{checkpoint}: train.registry.load_encoder cannot rebuild its encoder "
                          f"({type(e).__name__}: {str(e).strip()[:400]}); a checkpoint written by another version "
                          f"of the code needs re-training") from e
    if name and name in MODEL_NAMES and name != info.name:
        raise ExportError(f"{checkpoint}: expected a checkpoint of model {name!r} (the name asked for: its run "
                          f"folder's), got one of model {info.name!r} (arch {info.arch!r}); move it to a run folder "
                          f"named {info.name!r}, or export it under a name that is not a model name")
    name = name or info.name
    kwargs = dict(state.get("encoder", {}).get("kwargs", {}))
    complete, progress = run_progress(state)
    if not complete and not allow_incomplete:
        raise ExportError(_incomplete_message(checkpoint, info.name, progress))
    out_dir = Path(out_dir)
    if images is None:
        images, image_source = verify.real_images(check_images)
    calib, evaluation = verify.split_images(images, calibration="int8" in variants)
    if not evaluation or ("int8" in variants and not calib):
        raise ExportError(f"{name}: the checks need real images (2 at least with int8, half of them calibrate it); "
                          f"got {len(images)}")
    pre = info.preprocess
    x_eval = pre(evaluation)  # (n, 3, h, w) float32, the engine's own preprocessing
    example = x_eval[:2] if len(x_eval) >= 2 else np.concatenate([x_eval, x_eval])[:2]

    import torch

    ref = verify.torch_embed(model, x_eval)
    if ref.shape != (len(x_eval), info.dim):
        raise ExportError(f"{checkpoint}: the encoder returns shape {ref.shape}, expected ({len(x_eval)}, {info.dim})")
    # an encoder may offer an equivalent, cheaper module for inference (LA folds its linear tail); the check
    # below still compares onnxruntime with the encoder as trained
    for_export = getattr(model, "for_export", None)
    exported = for_export() if callable(for_export) else model
    raw, exporter_used = to_onnx(exported, torch.from_numpy(np.ascontiguousarray(example)), opset=opset,
                                 exporter=exporter)
    proto = onnx.load_from_string(raw)
    meta = model_metadata(name, arch=info.arch, dim=info.dim, preprocess=pre, checkpoint_sha256=info.sha256,
                          precision="float32", kwargs=kwargs, exporter=exporter_used, complete=complete,
                          progress=progress, training=run_record(path.parent), similar=similar_of(state))
    _set_metadata(proto, meta)
    _check(proto, f"the ONNX export of {checkpoint}")
    data = _seal(proto)
    session = _session(data, f"the ONNX export of {checkpoint}")
    got = verify.ort_embed(session, x_eval)
    if got.shape != ref.shape:
        raise ExportError(f"{name}: onnxruntime returns shape {got.shape} where torch returns {ref.shape}; "
                          f"nothing written")
    diff = verify.max_abs_diff(got, ref) if np.isfinite(got).all() else float("inf")
    if not diff <= tolerance:
        raise ExportError(f"{name}: onnxruntime and torch disagree on {len(x_eval)} real images: max abs difference "
                          f"{diff:.3g} > tolerance {tolerance:g}; nothing written")
    path = out_dir / f"{name}{SUFFIX['float32']}"
    atomic_write_bytes(path, data)
    entry = {
        "name": name,
        "arch": info.arch,
        "dim": info.dim,
        "input_size": list(pre.size),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": info.sha256,
        "complete": complete,
        "progress": progress,
        "exporter": exporter_used,
        "images": {"source": image_source, "evaluation": len(evaluation), "calibration": len(calib)},
        "float32": {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "max_abs_diff_vs_torch": diff, "tolerance": tolerance,
                    "min_cosine_vs_torch": float(verify.row_cosines(got, ref).min())},
    }
    log(f"{name}: wrote {path} ({len(data) / 1e6:.1f} MB, dim {info.dim}, input {pre.size[0]}x{pre.size[1]}); "
        f"max |onnxruntime - torch| = {diff:.2e} on {len(x_eval)} real images"
        + ("" if complete else f"; from an INCOMPLETE run ({progress})"))
    errors = []
    for variant in variants:
        try:
            vproto = _fp16(proto) if variant == "fp16" else _int8(proto, pre(calib), where=name)
            _set_metadata(vproto, {**meta, KEY_PRECISION: "float16" if variant == "fp16" else "int8"})
            entry[variant] = _finish_variant(vproto, variant, name, out_dir, x_eval, got, log)
        except ExportError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001  (converter / quantizer internals: report, keep the float32 file)
            errors.append(f"{name}: the {variant} variant failed: {type(e).__name__}: {e}")
    if errors:
        entry["errors"] = errors
    entry["seconds"] = round(time.time() - started, 2)
    return entry


def _incomplete_message(checkpoint: Path, model: str, progress: str) -> str:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    trainer = TRAINERS.get(model, f"python -m train.{model}")
    if "--max-steps" in progress:
        finish = f"train it again without --max-steps (`{trainer} --out {folder}`)"
    else:
        finish = f"finish it with `{trainer} --resume --out {folder}` and its other settings"
    return (f"{checkpoint}: the {model} run is incomplete ({progress}): its encoder is not what the configured "
            f"training gives. {finish[0].upper()}{finish[1:]}, or export it anyway with --allow-incomplete")


def _fp16(proto):
    """float16 weights and arithmetic, float32 input and output, the final L2 normalisation in float32.

    The normalisation tail is cut off while ``convert_float_to_float16`` runs (with ``keep_io_types`` the
    features then leave the float16 body through one Cast to float32), and put back afterwards.
    """
    import copy

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    p = copy.deepcopy(proto)
    feature, tail = _normalisation_tail(p)
    tail_nodes, outputs = [], list(p.graph.output)
    if tail:
        tail = _with_private_inputs(p.graph, set(tail), feature)
        tail_nodes = [n for n in p.graph.node if n.name in tail]
        body = [n for n in p.graph.node if n.name not in tail]
        del p.graph.node[:]
        p.graph.node.extend(body)
        del p.graph.output[:]
        p.graph.output.append(onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    # no stale float32 value_info: the dynamo exporter records every intermediate tensor's type, and the
    # converter leaves some of them float32 beside the float16 tensors it makes (the checker then refuses the
    # model); its own shape inference types what it needs
    del p.graph.value_info[:]
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        p16 = convert_float_to_float16(p, keep_io_types=True)
    if tail:
        p16.graph.node.extend(tail_nodes)
        del p16.graph.output[:]
        p16.graph.output.extend(outputs)
    _toposort(p16.graph)  # the converter appends its casts at the end of the node list
    return p16


def _with_private_inputs(graph, tail: set[str], feature: str) -> set[str]:
    """``tail`` plus the nodes (Constants, ...) off the features' path whose outputs feed only the tail, so they
    stay float32 too."""
    producer = {o: n for n in graph.node for o in n.output}
    upstream, stack = set(), [feature]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in upstream:
            upstream.add(node.name)
            stack.extend(node.input)
    consumers: dict[str, set[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.name)
    graph_outputs = {o.name for o in graph.output}
    tail = set(tail)
    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if n.name in tail or n.name in upstream or not n.output:
                continue
            users = set().union(*(consumers.get(o, set()) for o in n.output))
            if users and users <= tail and not any(o in graph_outputs for o in n.output):
                tail.add(n.name)
                changed = True
    return tail


def _toposort(graph) -> None:
    """Reorder ``graph.node`` topologically (stable: the original order wherever it is already valid)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    ordered, waiting = [], nodes
    while waiting:
        progressed, rest = False, []
        for node in waiting:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in ready})[:5]
            raise ExportError(f"the graph has a cycle or dangling inputs {missing}; cannot sort it")
        waiting = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _int8(proto, x_calib: np.ndarray, *, where: str):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(x_calib) < 1:
        raise ExportError(f"{where}: int8 calibration needs real images, got none")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{INPUT_NAME: x_calib[i : i + 8]} for i in range(0, len(x_calib), 8)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="lookalike-int8-") as tmp:
        src, pre, dst = Path(tmp) / "f32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            warnings.simplefilter("ignore")
            # no symbolic shape inference: it fails on the dynamo exporter's graphs (its value_info carries
            # symbolic batch dims it cannot map), and onnx's own shape inference still runs
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            pre_proto = onnx.load(str(pre))
            exclude = _normalisation_tail(pre_proto)[1]
            onnx.save(pre_proto, str(pre))
            # reduce_range: weights in -64..64 (7 bits), activations keep 0..255. On x86 without VNNI (AVX2,
            # AVX-512 before Cascade Lake) onnxruntime multiplies uint8 activations by int8 weights with
            # VPMADDUBSW, which adds each pair of products into a saturating int16: 2 * 255 * 127 overflows it
            # and the answers then depend on the CPU (mean cosine to float32 0.96-0.99 on AVX2 where VNNI gives
            # 0.999). 2 * 255 * 64 = 32640 fits, so every CPU computes the file exactly; it keeps the uint8 x
            # int8 kernels (uint8 weights would avoid the saturation too, but their kernels are 20-40% slower).
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude)
        return onnx.load(str(dst))


@contextlib.contextmanager
def _quiet_logging():
    """The quantizer logs shape-inference chatter on the root logger; keep it to errors meanwhile."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _finish_variant(vproto, variant: str, name: str, out_dir: Path, x_eval: np.ndarray, ref: np.ndarray, log) -> dict:
    _check(vproto, f"the {variant} variant of {name}")
    data = _seal(vproto)
    session = _session(data, f"the {variant} variant of {name}")
    got = verify.ort_embed(session, x_eval)
    if not np.isfinite(got).all():
        raise ExportError(f"{name}: the {variant} variant returns non-finite embeddings on real images "
                          f"(overflow); {name}{SUFFIX[variant]} not written")
    kernels = None
    if variant == "int8":  # onnxruntime's int8 kernels on this CPU against the file's own arithmetic
        kernels = float(verify.row_cosines(got, verify.ort_embed(verify.qdq_reference_session(data), x_eval)).min())
        if not kernels >= KERNEL_AGREEMENT:
            raise ExportError(f"{name}: onnxruntime's int8 kernels on this CPU disagree with the int8 file's own "
                              f"arithmetic: min cosine {kernels:.4f} < {KERNEL_AGREEMENT} on {len(x_eval)} real "
                              f"images (saturating int16 sums?); {name}{SUFFIX[variant]} not written")
    norms = np.linalg.norm(got, axis=1, keepdims=True)
    got_unit = got / np.maximum(norms, 1e-12)  # what engine.Encoder returns
    diff = verify.max_abs_diff(got_unit, ref)
    cos = verify.row_cosines(got_unit, ref)
    k = min(OVERLAP_K, len(ref) - 1)
    overlap = verify.overlap_at_k(got_unit, ref, k) if k >= 1 else None  # one image: no neighbours
    path = out_dir / f"{name}{SUFFIX[variant]}"
    atomic_write_bytes(path, data)
    log(f"{name}: wrote {path} ({len(data) / 1e6:.1f} MB); max |{variant} - float32| = {diff:.2e}, "
        f"mean cosine {cos.mean():.5f}, overlap@{k} with float32 = "
        f"{'-' if overlap is None else f'{overlap:.3f}'} on {len(ref)} real images"
        + ("" if kernels is None else f"; this CPU's int8 kernels vs the file's arithmetic: min cosine {kernels:.5f}"))
    entry = {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "max_abs_diff_vs_float32": diff, "mean_cosine_vs_float32": float(cos.mean()),
             "min_cosine_vs_float32": float(cos.min()), f"overlap@{k}_vs_float32": overlap,
             "method": ("onnxruntime.transformers.float16, float32 inputs/outputs and normalisation"
                        if variant == "fp16" else
                        "onnxruntime quantize_static, QDQ, per-channel int8 weights in -64..64 (reduce_range), "
                        "uint8 activations, calibrated on real images disjoint from the ones measured; "
                        "normalisation kept float32")}
    if kernels is not None:
        entry["min_cosine_kernels_vs_reference"] = kernels
    return entry


# -- several exports and the report ---------------------------------------------------------------------------

def export_many(names, *, runs_dir="runs", out_dir="models", variants=(), check_images: int = 64,
                opset: int = DEFAULT_OPSET, tolerance: float = TOLERANCE, exporter: str = "auto",
                allow_incomplete: bool = False, log=print) -> tuple[dict, list[str]]:
    """Export each named run (or ``all``); returns (report, errors). The report is merged into
    ``<out_dir>/export_report.json`` (atomically) for the models that exported. A model that fails (a file
    that cannot be written, an incomplete run without ``allow_incomplete`` included) is listed in the errors and
    the others go on."""
    check_opset(opset, exporter)
    todo = resolve(names, runs_dir)
    check_out_dir(out_dir)
    images, source = verify.real_images(check_images)
    log(f"checking on {len(images)} real images: {source}")
    done, errors = {}, []
    for name, ckpt in todo:
        try:
            done[name] = export_run(ckpt, out_dir, name=name, images=images, image_source=source, variants=variants,
                                    opset=opset, tolerance=tolerance, exporter=exporter,
                                    allow_incomplete=allow_incomplete, log=log)
            errors += done[name].get("errors", [])
        except (ExportError, CheckpointError) as e:
            errors.append(f"{name}: {e}")
        except OSError as e:
            errors.append(f"{name}: {cannot_write(e, out_dir)}")
    report = {}
    if done:
        try:
            report = update_report(Path(out_dir) / "export_report.json", done)
        except OSError as e:
            errors.append(cannot_write(e, Path(out_dir) / "export_report.json"))
    return report, errors


def cannot_write(e: OSError, default) -> str:
    """``cannot write PATH (Error: reason)`` for an OSError met while writing (an atomic write's rename names
    the temporary file first and the destination second)."""
    target = e.filename2 or e.filename or default
    return f"cannot write {target} ({type(e).__name__}: {e.strerror or e})"


def check_out_dir(out_dir) -> None:
    """Refuse (``ExportError``) an output folder that cannot be created or written, before any work is done
    (``engine.fileio.unwritable``). Creates nothing."""
    why = unwritable(out_dir)
    if why:
        raise ExportError(f"cannot write to {out_dir}/: {why}; expected a folder (or a path that can be created), "
                          f"give another --out")


def update_report(path: Path, entries: dict) -> dict:
    import json

    report = {"format_version": 1, "models": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and isinstance(old.get("models"), dict):
                report["models"].update(old["models"])
        except (ValueError, OSError):
            pass  # a damaged report is replaced
    report["models"].update(entries)
    atomic_write_bytes(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


def similar_of(state: dict) -> str:
    """What "similar" meant to the trainer of a checkpoint payload (its config's ``similar``, train.la's
    --similar), or "" when it records none (other trainers, checkpoints written before the option)."""
    value = (state.get("config") or {}).get("similar")
    return value if isinstance(value, str) else ""


RECORD_LIMIT = 256 * 1024  # a config.json or metrics.json larger than this is not carried into the model


def run_record(run_dir) -> dict:
    """``{"config": ..., "metrics": ...}`` from a run folder's config.json and metrics.json (each only when it
    exists, is plain JSON and at most ``RECORD_LIMIT`` bytes): what the exported file records of its training
    (``engine.modelfile.KEY_TRAINING``). A missing or unreadable file is left out, never fatal: the record is
    informative."""
    record = {}
    for key in ("config", "metrics"):
        path = Path(run_dir) / f"{key}.json"
        try:
            if not path.is_file() or path.stat().st_size > RECORD_LIMIT:
                continue
            with open(path, "rb") as f:
                record[key] = json.loads(f.read(RECORD_LIMIT + 1))
        except (OSError, ValueError):
            continue
    return record
