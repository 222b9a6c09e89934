"""python -m export: ONNX files with the engine's metadata, checked against torch on real images.

Every registered model is trained for 2 steps by its real trainer (tests/trained_models.py, cached) and
exported; the torch model rebuilt from the checkpoint is the oracle.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import Encoder
from engine.modelfile import FORMAT_VERSION, PREFIX
from engine.preprocess import Preprocess
from export import verify
from export.__main__ import main as export_main
from export.onnx import ExportError, export_run, resolve
from train import registry
from train.checkpoint import MAGIC, CheckpointError, checkpoint_sha256, load_checkpoint, save_checkpoint
from train.common import encoder_spec
from train.registry import MODEL_NAMES, load_encoder
from trained_models import ModelCache, digest_by_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cache(request) -> ModelCache:
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models"))


@pytest.fixture(scope="module")
def photos():
    images, _ = verify.real_images(13)
    return images


def ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}



def file_opset(proto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# On x86 without VNNI (AVX2, AVX-512 before Cascade Lake) onnxruntime multiplies uint8 activations (0..255) by int8
# weights with VPMADDUBSW, which adds each pair of products into a saturating int16: the file's answers are the same
# on every x86 CPU only when 2 * 255 * |weight| <= 32767, i.e. every int8 weight lies in -64..64.
NO_SATURATION = 32767 // (2 * 255)


def int8_weight_extreme(proto) -> int:
    """The largest |integer| among the int8 weights that the file's DequantizeLinear nodes read."""
    init = {t.name: t for t in proto.graph.initializer}
    weights = [onnx.numpy_helper.to_array(init[n.input[0]]) for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in init
               and init[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weights, "no int8 weights in the file"
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


def reference_evaluator_run(path, x) -> np.ndarray:
    """Oracle for an int8 file's own arithmetic: onnx's reference implementation (numpy; Q/DQ, Conv, Gemm as the
    ONNX spec defines them, no fused int8 kernel, nothing saturates). It implements DequantizeLinear from opset 19
    only, so the file is converted to opset 19 first (the same operators in its Q/DQ / Conv / Gemm subset)."""
    from onnx import version_converter
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(path))
    proto = version_converter.convert_version(proto, max(19, file_opset(proto)))
    return ReferenceEvaluator(proto).run(None, {"images": x})[0]


# -- every registered model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_every_model(cache, photos, name):
    run = cache.run(name)
    path = cache.onnx(name)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert file_opset(proto) >= 17

    # the metadata says everything the engine needs, and it matches the checkpoint
    ckpt = load_checkpoint(run / "checkpoint.pt")
    enc = ckpt["encoder"]
    meta = metadata(path)
    assert meta[PREFIX + "format_version"] == str(FORMAT_VERSION)
    assert meta[PREFIX + "name"] == name
    assert meta[PREFIX + "arch"] == enc["arch"]
    assert int(meta[PREFIX + "dim"]) == enc["dim"]
    pre = Preprocess.from_dict(enc["preprocess"])
    assert Preprocess.from_json(meta[PREFIX + "preprocess"]) == pre
    assert json.loads(meta[PREFIX + "input_size"]) == list(pre.size)
    assert meta[PREFIX + "checkpoint_sha256"] == checkpoint_sha256(run / "checkpoint.pt")
    assert meta[PREFIX + "precision"] == "float32"
    assert meta[PREFIX + "exporter"].endswith(f"opset {file_opset(proto)}")
    assert meta[PREFIX + "sha256"] == digest_by_onnx(path)
    # how it was trained travels with it: the run folder's own config.json and metrics.json
    training = json.loads(meta[PREFIX + "training"])
    assert training == {key: json.loads((run / f"{key}.json").read_text()) for key in ("config", "metrics")}

    # the encoder alone: one input with a dynamic batch axis, no decoder or unpooling in the graph
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, *pre.size]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"MaxUnpool", "ConvTranspose"}, ops
    assert len(proto.graph.output) == 1

    # onnxruntime == torch on real photos, at batch sizes 1 and 13 (the export traced batch 2)
    model, info = load_encoder(run)
    x = pre(photos)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = ort_session(path)
    one = sess.run(None, {"images": x[:1]})[0]
    many = sess.run(None, {"images": x})[0]
    assert many.shape == (len(photos), info.dim) and many.dtype == np.float32
    np.testing.assert_allclose(one, ref[:1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(many, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)


# -- the command line with variants and the report ------------------------------------------------------------

def overlap_loops(a, b, k):
    """Slow reference for overlap@k: explicit loops over every image and its neighbours (self excluded)."""
    n = len(a)
    total = 0.0
    for i in range(n):
        sa = [(float(np.dot(a[i], a[j])), j) for j in range(n) if j != i]
        sb = [(float(np.dot(b[i], b[j])), j) for j in range(n) if j != i]
        top_a = {j for _, j in sorted(sa, key=lambda t: (-t[0], t[1]))[:k]}
        top_b = {j for _, j in sorted(sb, key=lambda t: (-t[0], t[1]))[:k]}
        total += len(top_a & top_b) / k
    return total / n


def test_cli_all_with_fp16_and_int8(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("mpnn", "siamese"):
        shutil.copytree(cache.run(name), runs / name)
    (runs / "notes").mkdir()  # a folder without checkpoint.pt is not a run: 'all' skips it
    out = tmp_path / "models"
    rc = export_main(["all", "--runs", str(runs), "--out", str(out), "--fp16", "--int8", "--check-images", "24",
                      "--allow-incomplete"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["export_report.json"] + [f"{n}{s}" for n in ("mpnn", "siamese") for s in (".onnx", ".fp16.onnx", ".int8.onnx")])
    report = json.loads((out / "export_report.json").read_text())
    images, _ = verify.real_images(24)
    evaluation = images[1::2]  # the report's held-out half (the other half calibrates int8)
    for name in ("mpnn", "siamese"):
        entry = report["models"][name]
        assert entry["images"] == {"source": entry["images"]["source"], "evaluation": 12, "calibration": 12}
        assert entry["float32"]["max_abs_diff_vs_torch"] <= 1e-4
        pre = Preprocess.from_json(metadata(out / f"{name}.onnx")[PREFIX + "preprocess"])
        x = pre(evaluation)
        f32 = ort_session(out / f"{name}.onnx").run(None, {"images": x})[0]
        assert metadata(out / f"{name}.onnx")[PREFIX + "sha256"] == digest_by_onnx(out / f"{name}.onnx")
        for variant, precision in (("fp16", "float16"), ("int8", "int8")):
            path = out / f"{name}.{variant}.onnx"
            proto = onnx.load(str(path))
            onnx.checker.check_model(proto, full_check=True)
            meta = metadata(path)
            assert meta[PREFIX + "precision"] == precision
            assert meta[PREFIX + "checkpoint_sha256"] == entry["checkpoint_sha256"]
            assert meta[PREFIX + "sha256"] == digest_by_onnx(path)
            assert Encoder(path).info.precision == precision  # the engine's own damage check passes
            sess = ort_session(path)
            assert sess.get_inputs()[0].type == sess.get_outputs()[0].type == "tensor(float)"
            got = sess.run(None, {"images": x})[0]
            got = got / np.linalg.norm(got, axis=1, keepdims=True)
            measured = entry[variant]
            # the report's figures are what an independent recomputation finds
            assert measured["max_abs_diff_vs_float32"] == pytest.approx(np.abs(got - f32).max(), rel=1e-3, abs=1e-7)
            assert measured["overlap@10_vs_float32"] == pytest.approx(overlap_loops(got, f32, 10), abs=1e-9)
            # the same on every x86 CPU: int8 weights in -64..64 never saturate onnxruntime's int16 pair sums
            # (measured 0.999+ here), and fp16 runs in float32 after its weights are rounded (MLAS has float16
            # arithmetic only on ARM64; measured 0.99999+)
            assert measured["mean_cosine_vs_float32"] > 0.99
            assert f"{name}.{variant}.onnx" in printed
        types = {t.data_type for t in onnx.load(str(out / f"{name}.fp16.onnx")).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types
        int8 = onnx.load(str(out / f"{name}.int8.onnx"))
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
        assert int8_weight_extreme(int8) <= NO_SATURATION
        assert 0.999 <= entry["int8"]["min_cosine_kernels_vs_reference"] <= 1 + 1e-6

    # exporting one model again updates its entry and keeps the other's
    rc = export_main(["siamese", "--runs", str(runs), "--out", str(out), "--check-images", "24"])
    assert rc == 0
    report2 = json.loads((out / "export_report.json").read_text())
    assert set(report2["models"]) == {"mpnn", "siamese"}
    assert "fp16" not in report2["models"]["siamese"] and "fp16" in report2["models"]["mpnn"]


def test_overlap_helper_matches_loops():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(23, 7)).astype(np.float32)
    b = a + rng.normal(scale=0.3, size=a.shape).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    assert verify.overlap_at_k(a, b, 10) == pytest.approx(overlap_loops(a, b, 10), abs=1e-12)
    assert verify.overlap_at_k(a, a, 5) == 1.0
    with pytest.raises(ValueError, match="more than 10"):
        verify.overlap_at_k(a[:10], b[:10], 10)


# -- failures: loud, clear, and nothing written -----------------------------------------------------------------

def test_unknown_name_lists_known_ones(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ExportError, match="unknown model 'nope'") as e:
        resolve(["nope"], tmp_path / "runs")
    for name in MODEL_NAMES:
        assert name in str(e.value)
    rc = export_main(["nope", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "models")])
    assert rc == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_missing_runs(tmp_path):
    with pytest.raises(ExportError, match="no trained runs under"):
        resolve(["all"], tmp_path)
    with pytest.raises(ExportError, match=r"model 'la' has no run folder .*python -m train\.la"):
        resolve(["la"], tmp_path)
    (tmp_path / "mpnn").mkdir()
    with pytest.raises(ExportError, match="has no checkpoint.pt"):
        resolve(["mpnn"], tmp_path)


def test_checkpoint_of_another_version_is_refused(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    raw = (cache.run("siamese") / "checkpoint.pt").read_bytes()
    nl = raw.index(b"\n")
    header = json.loads(raw[len(MAGIC):nl])
    header["version"] = 99
    (runs / "siamese").mkdir(parents=True)
    (runs / "siamese" / "checkpoint.pt").write_bytes(MAGIC + json.dumps(header).encode() + raw[nl:])
    with pytest.raises(CheckpointError, match="version 99"):
        export_run(runs / "siamese", tmp_path / "models", images=verify.real_images(4)[0])
    rc = export_main(["siamese", "--runs", str(runs), "--out", str(tmp_path / "models"), "--check-images", "4"])
    assert rc == 1
    assert "version 99" in capsys.readouterr().err
    assert not list((tmp_path / "models").glob("*.onnx"))


def test_damaged_checkpoint_is_refused(cache, tmp_path):
    (tmp_path / "siamese").mkdir()
    raw = (cache.run("siamese") / "checkpoint.pt").read_bytes()
    (tmp_path / "siamese" / "checkpoint.pt").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        export_run(tmp_path / "siamese", tmp_path / "models", images=verify.real_images(4)[0])
    assert not (tmp_path / "models").exists()


class BatchMean(nn.Module):
    """An encoder whose output depends on the other images of the batch: its trace cannot match torch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        f = self.conv(x).mean(dim=(2, 3))
        if x.shape[0] > 1:  # Python control flow on the batch size: frozen into the trace
            f = f - f.mean(0, keepdim=True)
        return F.normalize(f, dim=1)


def test_parity_failure_writes_nothing(tmp_path):
    arch = "test-batch-mean"
    registry.register_encoder(arch)(lambda: BatchMean())
    try:
        torch.manual_seed(0)
        model = BatchMean().eval()
        pre = Preprocess(size=(16, 16))
        save_checkpoint(tmp_path / "run" / "checkpoint.pt",
                        {"name": "bm", "encoder": encoder_spec(arch, {}, model, 4, pre), "config": {}})
        images = verify.real_images(6)[0]
        with pytest.raises(ExportError, match=r"disagree .* max abs difference .* nothing written"):
            export_run(tmp_path / "run", tmp_path / "models", images=images)
        assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    finally:
        registry._ENCODERS.pop(arch, None)


def test_tolerance_is_enforced(cache, tmp_path):
    images = verify.real_images(4)[0]
    with pytest.raises(ExportError, match="tolerance -1"):
        export_run(cache.run("siamese"), tmp_path / "models", images=images, tolerance=-1.0)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--fp16", "--int8", "--runs", "--out", "metadata", "export_report.json", *MODEL_NAMES):
        assert word in text


# -- the dynamo exporter, with the variants -------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamo_exporter_with_fp16_and_int8(cache, tmp_path, name):
    images, source = cache.images()
    entry = export_run(cache.run(name), tmp_path, name=name, images=images, image_source=source,
                       variants=("fp16", "int8"), exporter="dynamo", allow_incomplete=True, log=lambda *_: None)
    assert "errors" not in entry, entry["errors"]
    assert "dynamo exporter" in entry["exporter"]
    model, info = load_encoder(cache.run(name))
    x = info.preprocess(images[1::2])  # the evaluation half (the other half calibrates int8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    # bounds for every x86 CPU: float16 files run in float32 once their weights are rounded (onnxruntime's CPU
    # provider has float16 arithmetic only on ARM64; measured 0.99999+); int8 files never saturate onnxruntime's
    # int16 pair sums (weights in -64..64, checked below), so every CPU gives the file's own arithmetic
    # (measured 0.991+ on every model; saturating AVX2 kernels with 8-bit weights gave 0.88-0.98)
    for suffix, precision, min_cos in ((".onnx", "float32", 0.9999), (".fp16.onnx", "float16", 0.999),
                                       (".int8.onnx", "int8", 0.98)):
        path = tmp_path / f"{name}{suffix}"
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert entry["exporter"].endswith(f"opset {file_opset(proto)}")
        enc = Encoder(path)
        assert enc.info.precision == precision
        got = enc.encode_preprocessed(x)
        cos = (got * ref).sum(1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= min_cos, (precision, cos)
    types = {t.data_type for t in onnx.load(str(tmp_path / f"{name}.fp16.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    int8 = onnx.load(str(tmp_path / f"{name}.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    assert int8_weight_extreme(int8) <= NO_SATURATION


# -- int8: the same answers on every CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ae-conv", "ae-vgg16bn", "la", "siamese"])  # mpnn: 50 s in the reference
def test_int8_answers_are_the_files_own_arithmetic(cache, tmp_path, name):
    """onnxruntime's int8 kernels on this CPU give what onnx's reference implementation gives for the int8 file,
    so a CPU with other int8 kernels (VNNI or not) gives it too."""
    images, source = cache.images()
    entry = export_run(cache.run(name), tmp_path, name=name, images=images, image_source=source,
                       variants=("int8",), allow_incomplete=True, log=lambda *_: None)
    assert "errors" not in entry, entry["errors"]
    _, info = load_encoder(cache.run(name))
    x = info.preprocess(images[1::2])
    path = tmp_path / f"{name}.int8.onnx"
    assert int8_weight_extreme(onnx.load(str(path))) <= NO_SATURATION
    oracle = reference_evaluator_run(path, x)
    kernels = ort_session(path).run(None, {"images": x})[0]
    unfused = verify.qdq_reference_session(path).run(None, {"images": x})[0]
    # the fused kernels and the reference differ only where a requantized activation rounds the other way
    # (measured 0.99995+); the saturating kernels of 8-bit weights on AVX2 gave 0.88-0.98
    assert verify.row_cosines(kernels, oracle).min() >= 0.9995
    assert verify.row_cosines(unfused, oracle).min() >= 0.9995  # the export's own check compares with this
    assert entry["int8"]["min_cosine_kernels_vs_reference"] == pytest.approx(
        verify.row_cosines(kernels, unfused).min(), abs=1e-6)


def test_int8_kernels_that_disagree_with_the_file_are_refused(cache, tmp_path, monkeypatch):
    import export.onnx as export_onnx

    # no cosine reaches 1.01: the check must refuse the int8 file and keep the others
    monkeypatch.setattr(export_onnx, "KERNEL_AGREEMENT", 1.01)
    images, source = cache.images()
    entry = export_run(cache.run("siamese"), tmp_path, name="siamese", images=images, image_source=source,
                       variants=("fp16", "int8"), allow_incomplete=True, log=lambda *_: None)
    (error,) = entry["errors"]
    assert "int8 kernels on this CPU disagree with the int8 file's own arithmetic: min cosine" in error
    assert "< 1.01 on 12 real images" in error and "siamese.int8.onnx not written" in error
    assert "int8" not in entry and "fp16" in entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["siamese.fp16.onnx", "siamese.onnx"]


# -- what is exported under which name --------------------------------------------------------------------------

def test_run_folder_named_after_another_model_is_refused(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(cache.run("siamese"), runs / "la")  # the siamese checkpoint in la's run folder
    shutil.copytree(cache.run("mpnn"), runs / "my-mpnn")  # a folder name that is no model name: used as given
    out = tmp_path / "models"
    rc = export_main(["all", "--runs", str(runs), "--out", str(out), "--check-images", "4", "--allow-incomplete"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "expected a checkpoint of model 'la'" in err and "got one of model 'siamese' (arch 'siamese')" in err
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "my-mpnn.onnx"]
    meta = metadata(out / "my-mpnn.onnx")
    assert (meta[PREFIX + "name"], meta[PREFIX + "arch"]) == ("my-mpnn", "mpnn")
    with pytest.raises(ExportError, match=r"expected a checkpoint of model 'la'.*got one of model 'siamese'"):
        export_run(runs / "la", out, name="la", images=verify.real_images(4)[0])
    assert not (out / "la.onnx").exists()


# -- output folders that cannot be written --------------------------------------------------------------------

def test_output_that_cannot_be_written_is_refused_first(cache, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(cache.run("siamese"), runs / "siamese")
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder\n")
    for out in (taken, taken / "models"):
        rc = export_main(["siamese", "--runs", str(runs), "--out", str(out), "--check-images", "4"])
        printed = capsys.readouterr()
        assert rc == 2
        assert printed.err.startswith(f"error: cannot write to {out}/: ") and "is not a folder" in printed.err
        assert "checking on" not in printed.out  # refused before the work
    assert taken.read_text() == "a file, not a folder\n"
    # any other OSError ends as one line, exit status 2
    import export.__main__ as cli

    def refuse(*_, **__):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "x.onnx"))

    monkeypatch.setattr(cli, "export_many", refuse)
    assert export_main(["siamese", "--runs", str(runs), "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {tmp_path / 'ro' / 'x.onnx'} (PermissionError: Permission denied)\n"


def test_a_model_that_cannot_be_written_does_not_stop_the_others(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("mpnn", "siamese"):
        shutil.copytree(cache.run(name), runs / name)
    out = tmp_path / "models"
    (out / "mpnn.onnx").mkdir(parents=True)  # a folder where mpnn.onnx goes: its write fails
    rc = export_main(["all", "--runs", str(runs), "--out", str(out), "--check-images", "4", "--allow-incomplete"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"error: mpnn: cannot write {out / 'mpnn.onnx'} (IsADirectoryError")
    assert (out / "mpnn.onnx").is_dir() and (out / "siamese.onnx").is_file()
    assert set(json.loads((out / "export_report.json").read_text())["models"]) == {"siamese"}
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "mpnn.onnx", "siamese.onnx"]  # no temp


# -- opsets ---------------------------------------------------------------------------------------------------

def test_unsupported_opset_is_refused(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(cache.run("siamese"), runs / "siamese")
    out = tmp_path / "models"
    newest = onnx.defs.onnx_opset_version()
    for opset in (99, newest + 1, 16):
        rc = export_main(["siamese", "--runs", str(runs), "--out", str(out), "--opset", str(opset),
                          "--check-images", "4"])
        printed = capsys.readouterr()
        assert rc == 2
        assert f"opset must be between 17 and {newest} for the auto exporter, got {opset}" in printed.err
        assert "graph(" not in printed.out and "Traceback" not in printed.err
        assert not out.exists()
    # the TorchScript exporter stops at the newest opset torch supports for it
    from torch.onnx import _constants

    limit = min(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET, newest)
    with pytest.raises(ExportError, match=f"between 17 and {limit} for the torchscript exporter, got {limit + 1}"):
        export_run(runs / "siamese", out, images=verify.real_images(4)[0], opset=limit + 1, exporter="torchscript")
    assert not out.exists()


def test_recorded_opset_is_the_files(cache, tmp_path, monkeypatch):
    images = verify.real_images(4)[0]
    # the dynamo exporter writes no opset below 18: asked for 17, the file and its records say 18
    entry = export_run(cache.run("mpnn"), tmp_path / "a", images=images, opset=17, exporter="dynamo",
                       allow_incomplete=True, log=lambda *_: None)
    assert file_opset(onnx.load(str(tmp_path / "a" / "mpnn.onnx"))) == 18
    assert entry["exporter"].endswith("opset 18")
    assert metadata(tmp_path / "a" / "mpnn.onnx")[PREFIX + "exporter"] == entry["exporter"]
    # an exporter that keeps an opset other than the one asked for (onnx's version converter failing) is caught
    real = torch.onnx.export

    def keeps_18(*args, **kwargs):
        if kwargs.get("dynamo"):
            kwargs["opset_version"] = 18
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", keeps_18)
    with pytest.raises(ExportError, match="asked the dynamo exporter for opset 20, it wrote opset 18"):
        export_run(cache.run("mpnn"), tmp_path / "b", images=images, opset=20, exporter="dynamo", allow_incomplete=True,
                   log=lambda *_: None)
    assert not (tmp_path / "b").exists()
