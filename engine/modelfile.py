"""What an ONNX file must carry to be a lookalike encoder: the contract between ``export/`` (which writes it)
and the engine (which reads it). Both import it from here; nothing else defines a key or a rule.

A lookalike model file is an ONNX model with:

- **metadata** (``metadata_props``, string -> string) under the ``lookalike.`` prefix: format version, model
  name, architecture, embedding size, network input size, the exact preprocessing (``Preprocess`` as JSON),
  sha256 of the source checkpoint, precision, and optionally whether the source run was complete and how far
  it got and what "similar" meant to its trainer (``lookalike.similar``: copies / content). ``model_metadata`` writes exactly these entries; ``ModelInfo.from_metadata`` reads and checks them.
  ``FORMAT_VERSION`` is bumped when their meaning changes: an engine refuses a file of another version.
- **a seal**: ``lookalike.sha256`` is the sha256 of the serialised file with that value written as 64 ``0``
  characters (``DIGEST_PLACEHOLDER``). The exporter serialises with the placeholder, hashes and writes the
  digest in its place (same length: only those 64 bytes change); ``check_file_digest`` puts the placeholder back
  over the digest's one occurrence in the file bytes, hashes and compares, so no ONNX parser is needed.
- **one input and one output** (``check_signature``): input (batch, 3, H, W) float32 with H, W the metadata's
  input size, output (batch, dim) float32.
- **every weight inside the file**: a tensor kept in an external file is refused before onnxruntime sees the
  model (``engine.onnxfile.refuse_external_data``, a minimal protocol-buffer reader beside this module).

Imports no onnx, onnxruntime or torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from engine.errors import InputError, ModelError
from engine.preprocess import Preprocess

FORMAT_VERSION = 2  # bump when the metadata's meaning changes; older engines refuse newer files
# (2: lookalike.sha256 added; files of version 1 carry no digest and are refused with a "re-export" message)
PREFIX = "lookalike."
KEY_FORMAT = PREFIX + "format_version"  # "2"
KEY_NAME = PREFIX + "name"  # model name, e.g. "la"
KEY_ARCH = PREFIX + "arch"  # registered architecture, e.g. "ae-vgg16bn"
KEY_DIM = PREFIX + "dim"  # embedding size, e.g. "512"
KEY_INPUT_SIZE = PREFIX + "input_size"  # JSON [height, width] of the network input
KEY_PREPROCESS = PREFIX + "preprocess"  # Preprocess.to_json()
KEY_CHECKPOINT_SHA256 = PREFIX + "checkpoint_sha256"  # sha256 of the source checkpoint's payload
KEY_PRECISION = PREFIX + "precision"  # "float32", "float16" or "int8"
KEY_KWARGS = PREFIX + "kwargs"  # JSON of the architecture's constructor arguments (informative)
KEY_EXPORTER = PREFIX + "exporter"  # what wrote the file (informative)
KEY_SHA256 = PREFIX + "sha256"  # sha256 of the serialised file with this value set to DIGEST_PLACEHOLDER
# Optional (files written before they existed load as from a complete run):
KEY_COMPLETE = PREFIX + "complete"  # "true" / "false": the source run did all its configured training
KEY_PROGRESS = PREFIX + "progress"  # how far the source run got, in words (informative)
# JSON {"config": the run's config.json, "metrics": its metrics.json}, when the run folder holds them: how the
# model was trained and what its trainer measured (informative; the engine shows it, never executes it)
KEY_TRAINING = PREFIX + "training"
# what "similar" meant to the trainer (train.la --similar): "copies" (edited copies of one photo: crops, flips,
# rotation, grey, colour, blur, downscaling) or "content" (look-alike content: categories); absent when the
# trainer had no such choice (informative: the engine reports it)
KEY_SIMILAR = PREFIX + "similar"
SIMILAR_LIMIT = 64  # characters: a longer value is refused as damaged metadata
REQUIRED_KEYS = (KEY_FORMAT, KEY_NAME, KEY_ARCH, KEY_DIM, KEY_INPUT_SIZE, KEY_PREPROCESS, KEY_CHECKPOINT_SHA256,
                 KEY_PRECISION, KEY_SHA256)
DIGEST_PLACEHOLDER = "0" * 64  # the value of KEY_SHA256 while the file is hashed
PRECISIONS = ("float32", "float16", "int8")

@dataclass(frozen=True)
class ModelInfo:
    """The lookalike metadata of an exported model."""

    name: str
    arch: str
    dim: int
    input_size: tuple[int, int]
    preprocess: Preprocess
    checkpoint_sha256: str
    precision: str
    format_version: int
    extra: dict  # every other metadata entry, as strings
    complete: bool = True  # False: exported from a run that stopped before the end of its training
    progress: str = ""  # how far that run got, in words
    similar: str = ""  # what similar meant to its trainer ("copies", "content"); "" when not recorded

    @classmethod
    def from_metadata(cls, meta: dict, where: str) -> "ModelInfo":
        # the format version first: a file of another version may lack keys this version requires
        if KEY_FORMAT in meta:
            try:
                version = int(meta[KEY_FORMAT])
            except ValueError:
                raise ModelError(f"{where}: metadata {KEY_FORMAT} must be an int, got {meta[KEY_FORMAT]!r}") from None
            if version != FORMAT_VERSION:
                raise ModelError(f"{where} has lookalike model format version {version}; this engine reads version "
                                 f"{FORMAT_VERSION}. Re-export it with this lookalike version.")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            have = sorted(k for k in meta if k.startswith(PREFIX))
            if KEY_FORMAT in meta:
                raise ModelError(
                    f"{where}: damaged lookalike metadata: format version {FORMAT_VERSION} requires {missing}, "
                    f"absent (found {have}); re-export it with `python -m export NAME`")
            raise ModelError(
                f"{where} is an ONNX model but not a lookalike encoder: its metadata lacks {missing} "
                f"(found {have or 'no lookalike keys'}); export it with `python -m export NAME`")
        try:
            dim = int(meta[KEY_DIM])
            size = tuple(int(s) for s in json.loads(meta[KEY_INPUT_SIZE]))
            preprocess = Preprocess.from_json(meta[KEY_PREPROCESS])
        except (ValueError, TypeError, KeyError, InputError) as e:
            raise ModelError(f"{where}: damaged lookalike metadata ({type(e).__name__}: {e})") from None
        if dim < 1 or len(size) != 2 or size != preprocess.size:
            raise ModelError(f"{where}: inconsistent metadata: dim={dim}, input_size={size}, "
                             f"preprocess size={preprocess.size}")
        if meta[KEY_PRECISION] not in PRECISIONS:
            raise ModelError(f"{where}: metadata precision must be one of {PRECISIONS}, got {meta[KEY_PRECISION]!r}")
        if not _is_sha256(meta[KEY_SHA256]):
            raise ModelError(f"{where}: metadata {KEY_SHA256} must be 64 lowercase hex digits, "
                             f"got {meta[KEY_SHA256]!r}")
        complete = meta.get(KEY_COMPLETE, "true")
        if complete not in ("true", "false"):
            raise ModelError(f"{where}: metadata {KEY_COMPLETE} must be 'true' or 'false', got {complete!r}")
        similar = meta.get(KEY_SIMILAR, "")
        if len(similar) > SIMILAR_LIMIT or not similar.isprintable():
            raise ModelError(f"{where}: metadata {KEY_SIMILAR} must be a short printable word (at most "
                             f"{SIMILAR_LIMIT} characters), got {similar[:SIMILAR_LIMIT + 1]!r}")
        extra = {k: v for k, v in meta.items() if k not in REQUIRED_KEYS}
        return cls(name=meta[KEY_NAME], arch=meta[KEY_ARCH], dim=dim, input_size=size, preprocess=preprocess,
                   checkpoint_sha256=meta[KEY_CHECKPOINT_SHA256], precision=meta[KEY_PRECISION],
                   format_version=version, extra=extra, complete=complete == "true",
                   progress=meta.get(KEY_PROGRESS, ""), similar=similar)


def model_metadata(info_name: str, *, arch: str, dim: int, preprocess: Preprocess, checkpoint_sha256: str,
                   precision: str = "float32", kwargs: dict | None = None, exporter: str = "",
                   complete: bool = True, progress: str = "", training: dict | None = None,
                   similar: str = "") -> dict[str, str]:
    """The metadata entries (string -> string) an exported model carries; export/ writes exactly these.
    ``complete`` / ``progress``: whether the source run did all its configured training, and how far it got;
    ``training``: the run's recorded configuration and metrics (``KEY_TRAINING``); ``similar``: what similar
    meant to its trainer (``KEY_SIMILAR``; "" writes no entry)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    meta = {
        KEY_FORMAT: str(FORMAT_VERSION),
        KEY_NAME: str(info_name),
        KEY_ARCH: str(arch),
        KEY_DIM: str(int(dim)),
        KEY_INPUT_SIZE: json.dumps(list(preprocess.size)),
        KEY_PREPROCESS: preprocess.to_json(),
        KEY_CHECKPOINT_SHA256: str(checkpoint_sha256),
        KEY_PRECISION: precision,
        KEY_KWARGS: json.dumps(kwargs or {}, sort_keys=True, default=str),
        KEY_SHA256: DIGEST_PLACEHOLDER,  # the writer replaces it with file_digest() of the serialised model
        KEY_COMPLETE: "true" if complete else "false",
    }
    if progress:
        meta[KEY_PROGRESS] = str(progress)
    if exporter:
        meta[KEY_EXPORTER] = exporter
    if similar:
        meta[KEY_SIMILAR] = str(similar)
    if training:
        meta[KEY_TRAINING] = json.dumps(training, sort_keys=True, default=str)
    return meta


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def file_digest(data: bytes, recorded: str) -> str:
    """sha256 (hex) of the serialised model ``data`` whose metadata holds ``recorded`` as ``lookalike.sha256``:
    the hash of ``data`` with that value's one occurrence replaced by ``DIGEST_PLACEHOLDER``.

    Raises ``ModelError`` when ``recorded`` does not occur exactly once (then the file cannot be checked).
    """
    needle = recorded.encode("ascii")
    count = data.count(needle)
    if count != 1:
        raise ModelError(f"expected the recorded {KEY_SHA256} {recorded} once in the file, found it {count} times")
    return hashlib.sha256(data.replace(needle, DIGEST_PLACEHOLDER.encode("ascii"))).hexdigest()


def check_file_digest(data: bytes, meta: dict, where: str) -> None:
    """Refuse (``ModelError`` naming ``where``) a model file whose bytes are not what its exporter wrote."""
    recorded = meta.get(KEY_SHA256)
    if recorded is None:
        raise ModelError(f"{where}: its metadata lacks {KEY_SHA256}, so it cannot be checked for damage; "
                         f"re-export it with `python -m export NAME`")
    if recorded == DIGEST_PLACEHOLDER or not _is_sha256(recorded):
        raise ModelError(f"{where}: metadata {KEY_SHA256} must be the sha256 of the file, got {recorded!r} "
                         f"(a file written by something other than `python -m export`?)")
    try:
        got = file_digest(data, recorded)
    except ModelError as e:
        raise ModelError(f"{where} is damaged or was edited after export: {e}; re-export it") from None
    if got != recorded:
        raise ModelError(f"{where} is damaged or was edited after export: its content sha256 is {got}, its "
                         f"metadata {KEY_SHA256} expects {recorded}; re-export it with `python -m export NAME`")




def check_signature(inputs, outputs, info: ModelInfo, where: str) -> tuple[str, str]:
    """The names of the network's input and output, given an onnxruntime session's ``get_inputs()`` /
    ``get_outputs()``; ``ModelError`` naming ``where`` unless there is one input (batch, 3, H, W) float32 with
    the metadata's input size and an output (batch, dim) float32."""
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelError(f"{where}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    shape = list(inputs[0].shape)
    h, w = info.input_size
    fixed = [None if not isinstance(d, int) else d for d in shape]
    if len(shape) != 4 or fixed[1:] != [3, h, w]:
        raise ModelError(f"{where}: the network input must be (batch, 3, {h}, {w}) as its metadata says, "
                         f"got {shape}")
    out_shape = list(outputs[0].shape)
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != info.dim):
        raise ModelError(f"{where}: the output must be (batch, {info.dim}), got {out_shape}")
    if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
        raise ModelError(f"{where}: input and output must be float32 tensors, got {inputs[0].type} and "
                         f"{outputs[0].type}")
    return inputs[0].name, outputs[0].name
