"""engine.Encoder: exported models on real images, parity with torch, input forms, errors.

The oracle for parity is the torch encoder rebuilt from the checkpoint (train.registry.load_encoder) fed by
the same Preprocess; every registered model is trained for 2 steps by its real trainer (cached).
"""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from engine import Encoder
from engine.modelfile import FORMAT_VERSION
from engine.errors import ImageReadError, InputError, ModelError
from engine.preprocess import read_image
from train.registry import MODEL_NAMES
from trained_models import ModelCache, digest_by_onnx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache(request) -> ModelCache:
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models"))


@pytest.fixture(scope="module")
def photo_paths():
    """Real photo files: the shared fungi photos when present, else the embedded photographs."""
    from export.verify import shared_data_dir
    from train.data import photo_files

    fungi = shared_data_dir() / "fungi-sample" / "images"
    files = sorted(fungi.glob("*.jpg"))[::15] if fungi.is_dir() else photo_files()[::2]
    return [str(p) for p in files[:11]]


@pytest.fixture(scope="module")
def fast_model(cache) -> Path:
    return cache.onnx("mpnn")


# -- parity with torch, for every registered model ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parity_with_torch(cache, photo_paths, name):
    import torch

    from train.registry import load_encoder

    enc = Encoder(cache.onnx(name), batch_size=4)  # 11 photos: batches of 4, 4, 3
    got = enc.encode(photo_paths)
    model, info = load_encoder(cache.run(name))
    assert (enc.name, enc.dim, enc.preprocess) == (name, info.dim, info.preprocess)
    x = info.preprocess([read_image(p) for p in photo_paths])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (len(photo_paths), info.dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos


# -- what the encoder says about itself ---------------------------------------------------------------------

def test_identity_and_properties(fast_model):
    enc = Encoder(fast_model)
    assert enc.name == "mpnn"
    meta = {p.key: p.value for p in onnx.load(str(fast_model)).metadata_props}
    assert enc.dim == int(meta["lookalike.dim"])
    ident = enc.identity
    assert ident["model"] == "mpnn" and ident["dim"] == enc.dim
    assert ident["sha256"] == hashlib.sha256(fast_model.read_bytes()).hexdigest()
    assert ident["checkpoint_sha256"] == meta["lookalike.checkpoint_sha256"]
    assert enc.preprocess.size == (64, 64)
    assert "CPUExecutionProvider" in enc.providers
    assert "mpnn" in repr(enc)


def test_providers(fast_model):
    import onnxruntime as ort

    enc = Encoder(fast_model, providers=["CPUExecutionProvider"], threads=1)
    assert enc.providers == ["CPUExecutionProvider"]
    default = Encoder(fast_model)
    # the default asks for CUDA when onnxruntime lists it; what runs is what the session really uses
    assert set(default.providers) <= set(ort.get_available_providers())
    assert default.providers[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="NoSuchExecutionProvider"):
        Encoder(fast_model, providers=["NoSuchExecutionProvider"])
    for bad in (0, None, 2.5, "8"):
        with pytest.raises(InputError, match=f"batch_size must be a positive int, got {bad!r}"):
            Encoder(fast_model, batch_size=bad)
    with pytest.raises(InputError, match="threads must be a positive int or None, got 'two'"):
        Encoder(fast_model, threads="two")


# -- input forms ------------------------------------------------------------------------------------------

def test_input_forms_agree(fast_model, photo_paths):
    enc = Encoder(fast_model, batch_size=3)
    paths = photo_paths[:5]
    arrays = [read_image(p) for p in paths]
    ref = enc.encode(paths)
    np.testing.assert_array_equal(enc.encode(arrays), ref)
    mixed = [paths[0], arrays[1], Path(paths[2]), arrays[3], paths[4]]
    np.testing.assert_array_equal(enc.encode(mixed), ref)
    np.testing.assert_array_equal(enc.encode(arrays[2]), ref[2:3])  # one array -> (1, dim)
    np.testing.assert_array_equal(enc.encode(paths[1]), ref[1:2])  # one path -> (1, dim)
    # an (n, H, W, 3) array: the same as the list of its images
    side = min(min(a.shape[:2]) for a in arrays)
    stack = np.stack([np.ascontiguousarray(a[:side, :side]) for a in arrays])
    np.testing.assert_array_equal(enc.encode(stack), enc.encode(list(stack)))
    # batch size does not change the answer
    np.testing.assert_allclose(Encoder(fast_model, batch_size=1).encode(paths), ref, atol=1e-6)
    np.testing.assert_allclose(Encoder(fast_model, batch_size=64).encode(paths), ref, atol=1e-6)
    # the answer is the network on the model's own preprocessing
    np.testing.assert_allclose(enc.encode_preprocessed(enc.preprocess(arrays)), ref, atol=1e-6)


def test_empty_input(fast_model):
    enc = Encoder(fast_model)
    for empty in ([], np.zeros((0, 10, 10, 3), np.uint8)):
        out = enc.encode(empty)
        assert out.shape == (0, enc.dim) and out.dtype == np.float32


def test_grey_and_rgba_are_converted(fast_model, photo_paths, tmp_path):
    enc = Encoder(fast_model)
    rgb = read_image(photo_paths[0])
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(enc.encode(grey), enc.encode(as_rgb))
    np.testing.assert_array_equal(enc.encode(grey[:, :, None]), enc.encode(as_rgb))
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    np.testing.assert_array_equal(enc.encode(rgba), enc.encode(rgb))
    # the same as files: a grey PNG and an RGBA PNG
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(enc.encode([tmp_path / "grey.png", tmp_path / "rgba.png"]),
                                  enc.encode([as_rgb, rgb]))


def test_progress_bar_same_answer(fast_model, photo_paths, capsys):
    enc = Encoder(fast_model, batch_size=2)
    np.testing.assert_array_equal(enc.encode(photo_paths[:4], progress=True), enc.encode(photo_paths[:4]))


# -- errors name the culprit ------------------------------------------------------------------------------

def test_model_errors(tmp_path, fast_model):
    with pytest.raises(ModelError, match="model file not found: .*absent.onnx"):
        Encoder(tmp_path / "absent.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model at all\n")
    with pytest.raises(ModelError, match=r"notes\.onnx is not a valid ONNX model"):
        Encoder(text)
    proto = onnx.load(str(fast_model))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match=r"bare\.onnx is an ONNX model but not a lookalike encoder.*lookalike\.dim"):
        Encoder(tmp_path / "bare.onnx")
    proto = onnx.load(str(fast_model))
    for p in proto.metadata_props:
        if p.key == "lookalike.format_version":
            p.value = "99"
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(ModelError, match="format version 99"):
        Encoder(tmp_path / "future.onnx")



def test_file_carries_its_own_digest(fast_model):
    meta = {p.key: p.value for p in onnx.load(str(fast_model)).metadata_props}
    assert meta["lookalike.sha256"] == digest_by_onnx(fast_model)
    assert meta["lookalike.sha256"] != hashlib.sha256(fast_model.read_bytes()).hexdigest()


def test_damaged_weights_are_refused(tmp_path, fast_model, photo_paths):
    import onnxruntime as ort

    data = fast_model.read_bytes()
    proto = onnx.load(str(fast_model))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    at = data.find(weight.raw_data)
    assert len(weight.raw_data) >= 1024 and at > 0 and data.count(weight.raw_data) == 1
    damaged = bytearray(data)
    mid = at + len(weight.raw_data) // 2
    for i in range(mid, mid + 64):
        damaged[i] ^= 0x5A
    bad = tmp_path / "damaged.onnx"
    bad.write_bytes(bytes(damaged))
    # onnxruntime itself runs the damaged file (the damage is in the numbers, not the structure)...
    ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    # ...the engine refuses it, naming the file, with the expected and the found digest
    with pytest.raises(ModelError, match=re.escape(str(bad)) + r" is damaged or was edited after export") as e:
        Encoder(bad)
    expected = digest_by_onnx(fast_model)
    assert expected in str(e.value)
    assert hashlib.sha256(bytes(damaged).replace(expected.encode(), b"0" * 64)).hexdigest() in str(e.value)
    # an untouched copy loads and gives the original's embeddings
    good = tmp_path / "copy.onnx"
    shutil.copyfile(fast_model, good)
    np.testing.assert_array_equal(Encoder(good).encode(photo_paths[:3]), Encoder(fast_model).encode(photo_paths[:3]))


def test_edited_metadata_is_refused(tmp_path, fast_model):
    proto = onnx.load(str(fast_model))
    for p in proto.metadata_props:
        if p.key == "lookalike.name":
            p.value = "la"  # a valid name: only the digest can tell
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ModelError, match=r"renamed\.onnx is damaged or was edited after export"):
        Encoder(tmp_path / "renamed.onnx")
    # the digest itself changed, or replaced by the placeholder: refused too
    for value, why in (("f" * 64, "damaged or was edited"), ("0" * 64, "must be the sha256 of the file"),
                       ("not-a-digest", "must be 64 lowercase hex digits")):
        proto = onnx.load(str(fast_model))
        for p in proto.metadata_props:
            if p.key == "lookalike.sha256":
                p.value = value
        onnx.save(proto, str(tmp_path / "digest.onnx"))
        with pytest.raises(ModelError, match=r"digest\.onnx.*" + why):
            Encoder(tmp_path / "digest.onnx")


def test_files_of_the_previous_format_ask_for_a_re_export(tmp_path, fast_model):
    # format version 1 files (exported before lookalike.sha256 existed) carry no digest
    proto = onnx.load(str(fast_model))
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != "lookalike.sha256"]
    del proto.metadata_props[:]
    for k, v in keep:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, ("1" if k == "lookalike.format_version" else v)
    onnx.save(proto, str(tmp_path / "v1.onnx"))
    with pytest.raises(ModelError, match=r"v1\.onnx has lookalike model format version 1; this engine reads "
                                         rf"version {FORMAT_VERSION}\. Re-export it"):
        Encoder(tmp_path / "v1.onnx")
    # the current version without its digest: damaged metadata
    for p in proto.metadata_props:
        if p.key == "lookalike.format_version":
            p.value = str(FORMAT_VERSION)
    onnx.save(proto, str(tmp_path / "nodigest.onnx"))
    with pytest.raises(ModelError, match=r"nodigest\.onnx: damaged lookalike metadata.*lookalike\.sha256"):
        Encoder(tmp_path / "nodigest.onnx")


def test_image_errors(tmp_path, fast_model, photo_paths):
    enc = Encoder(fast_model)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        enc.encode([photo_paths[0], bad])
    with pytest.raises(ImageReadError, match=r"image file not found: .*missing\.png"):
        enc.encode([photo_paths[0], tmp_path / "missing.png"])
    with pytest.raises(InputError, match="image 1 must be uint8.*float32"):
        enc.encode([read_image(photo_paths[0]), np.zeros((20, 20, 3), np.float32)])
    with pytest.raises(InputError, match="images must be uint8.*float64"):
        enc.encode(np.zeros((2, 20, 20, 3)))
    with pytest.raises(InputError, match=r"\(20, 20, 2\)"):
        enc.encode(np.zeros((20, 20, 2), np.uint8))
    with pytest.raises(InputError, match="image 0 must be a file path or a uint8 array, got int"):
        enc.encode([3])
    with pytest.raises(InputError, match="preprocessed images must have shape"):
        enc.encode_preprocessed(np.zeros((1, 3, 8, 8), np.float32))


def test_every_public_name_of_engine_resolves_without_torch():
    code = ("import sys, engine; missing = [n for n in engine.__all__ if getattr(engine, n, None) is None]; "
            "assert not missing, missing; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; assert not bad, bad; "
            "print(len(engine.__all__))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 16  # Searcher, MemoryBank, Encoder, StreamComparator, the events, detect, the errors


def test_engine_imports_no_torch(fast_model, photo_paths):
    code = ("import sys, engine; from engine import Encoder; "
            f"e = Encoder({str(fast_model)!r}); e.encode([{photo_paths[0]!r}]); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # creating a session that falls back from CUDA prints nothing
    assert "CUDA" not in r.stderr, r.stderr


# -- external data: a tensor whose values onnxruntime would read from another file -------------------------

def make_external(tensor, location: str) -> None:
    """Move ``tensor``'s values out of the model: data_location EXTERNAL, external_data location / offset / length."""
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def sealed(proto) -> bytes:
    """The serialised model with lookalike.sha256 set as the exporter sets it, so its digest check passes."""
    (entry,) = [p for p in proto.metadata_props if p.key == "lookalike.sha256"]
    entry.value = "0" * 64
    entry.value = hashlib.sha256(proto.SerializeToString()).hexdigest()
    return proto.SerializeToString()


@pytest.mark.parametrize("location, said", [
    ("../secret.bin", "'../secret.bin', outside the model's folder"),
    ("sub/../../secret.bin", "'sub/../../secret.bin', outside the model's folder"),
    ("ABSOLUTE", "'ABSOLUTE', outside the model's folder"),
    ("weights.bin", "'weights.bin';"),  # inside its folder: lookalike models never have external data
])
def test_a_model_with_external_data_is_refused_naming_the_location(tmp_path, fast_model, monkeypatch, location, said):
    proto = onnx.load(str(fast_model))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    folder = tmp_path / "models"
    folder.mkdir()
    # files of the right size where each location points (onnxruntime resolves a model given as bytes against
    # the working directory): a vulnerable runtime would load them as the weights
    (tmp_path / "secret.bin").write_bytes(weight.raw_data[::-1])
    (folder / "weights.bin").write_bytes(weight.raw_data)
    monkeypatch.chdir(folder)
    location = location.replace("ABSOLUTE", str(tmp_path / "secret.bin"))
    said = said.replace("ABSOLUTE", str(tmp_path / "secret.bin"))
    make_external(weight, location)
    path = folder / "crafted.onnx"
    path.write_bytes(sealed(proto))
    with pytest.raises(ModelError) as e:
        Encoder(path)
    assert str(e.value).startswith(f"{path}: tensor {weight.name!r} keeps its values in the external file {said}")
    assert "so a model with external data is refused" in str(e.value)
    # the same model with its weights inside loads (the check refuses external data, nothing else)
    path.write_bytes(sealed(onnx.load(str(fast_model))))
    assert Encoder(path).dim > 0


def test_external_tensors_are_found_wherever_onnx_allows_a_tensor():
    from onnx import TensorProto, helper, numpy_helper

    from engine.onnxfile import external_tensors

    def tensor(name, external):
        t = numpy_helper.from_array(np.arange(4, dtype=np.float32), name)
        if external:
            make_external(t, f"{name}.bin")
        return t

    sub = helper.make_graph([], "then", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                            [tensor("in_subgraph", True), tensor("inline_sub", False)])
    half = tensor("listed_only", False)  # external_data entries without data_location EXTERNAL
    entry = half.external_data.add()
    entry.key, entry.value = "location", "half.bin"
    sparse = helper.make_sparse_tensor(tensor("sparse_values", True), numpy_helper.from_array(np.arange(4), "i"),
                                       [8])
    nodes = [helper.make_node("Constant", [], ["c"], value=tensor("in_constant", True)),
             helper.make_node("If", ["cond"], ["s"], then_branch=sub, else_branch=sub)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                              [tensor("inline", False), tensor("initializer", True), half],
                              sparse_initializer=[sparse])
    fn = helper.make_function("local", "f", [], ["o"],
                              [helper.make_node("Constant", [], ["o"], value=tensor("in_function", True))],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[fn]).SerializeToString()
    found = external_tensors(model)
    assert sorted(found) == sorted([("in_constant", "in_constant.bin"), ("in_subgraph", "in_subgraph.bin"),
                                    ("in_subgraph", "in_subgraph.bin"),  # then and else branch
                                    ("initializer", "initializer.bin"), ("listed_only", "half.bin"),
                                    ("sparse_values", "sparse_values.bin"), ("in_function", "in_function.bin")])
    with pytest.raises(ValueError):
        external_tensors(model[:-3])  # cut inside the last message
