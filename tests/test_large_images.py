"""read_image on large images: sizes read from the header, the pixel cap, JPEGs decoded at a reduced size.

Oracles: OpenCV's full decode (for the sizes, and for the pixels and embeddings a reduced decode must come
close to); peak memory as the kernel counts it (ru_maxrss of a fresh process), since OpenCV's allocations are
invisible to tracemalloc.
"""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.errors import ImageReadError, InputError
from engine.preprocess import MAX_PIXELS, MAX_PIXELS_ENV, REDUCE_ABOVE, Preprocess, image_size, read_image

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """12 real photos (BGR) at 384 x 512: the shared fungi photos when present, else the embedded ones."""
    from export.verify import real_images

    images, _ = real_images(12)
    return [cv2.resize(np.ascontiguousarray(im[:, :, ::-1]), (512, 384), interpolation=cv2.INTER_AREA)
            for im in images]


def mosaic(tiles, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) BGR picture of real photos at their own scale, each row of tiles shifted differently."""
    rows = []
    for r in range(-(-h // 384)):
        row = np.concatenate([tiles[(r * 5 + c) % len(tiles)] for c in range(-(-w // 512) + 1)], axis=1)
        rows.append(row[:, (r * 173) % 512 :][:, :w])
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:h])


def write_grey_png(path: Path, width: int, height: int, rows) -> None:
    """A grey 8-bit PNG written row by row (filter 0), so a huge one never sits in memory whole."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        for row in rows:
            data = z.compress(b"\0" + row.tobytes())
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", z.flush()) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge_png(tiles, tmp_path_factory) -> Path:
    """12000 x 12000 grey (144 MP, over the default cap; 432 MB once decoded as RGB): a band of real photos
    across the middle, flat grey elsewhere, so the file is ~10 MB."""
    side = 12000
    band = cv2.cvtColor(mosaic(tiles, 1536, side), cv2.COLOR_BGR2GRAY)
    flat = np.full(side, 128, np.uint8)
    top = (side - len(band)) // 2
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    write_grey_png(path, side, side, (band[y - top] if top <= y < top + len(band) else flat for y in range(side)))
    assert side * side > MAX_PIXELS
    return path


@pytest.fixture(scope="module")
def big_jpeg(tiles, tmp_path_factory) -> Path:
    """4608 x 5120 (23.6 MP, over REDUCE_ABOVE) real-photo mosaic, baseline JPEG."""
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    assert cv2.imwrite(str(path), mosaic(tiles, 4608, 5120), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert 4608 * 5120 > REDUCE_ABOVE
    return path


def peak_growth(code: str, *args) -> dict:
    """Run ``code`` in a fresh Python after importing engine.preprocess; it sets ``result`` (a dict). Returns it
    with "growth": how far the peak resident memory rose while ``code`` ran, in bytes."""
    script = ("import json, resource, sys\n"
              "from engine.preprocess import read_image\n"
              "from engine.errors import ImageReadError\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"{code}\n"
              "result['growth'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024\n"
              "print(json.dumps(result))\n")
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- sizes from the header --------------------------------------------------------------------------------

def test_image_size_reads_each_format_s_header_as_opencv_decodes_it(tiles):
    img = tiles[3][:301, :203]
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    lossless_webp = [cv2.IMWRITE_WEBP_QUALITY, 101]
    cases = [(".png", img, [], "png"), (".png", grey, [], "png"), (".png", img.astype(np.uint16) * 257, [], "png"),
             (".jpg", img, [], "jpeg"), (".jpg", grey, [], "jpeg"), (".bmp", img, [], "bmp"),
             (".bmp", grey, [], "bmp"), (".webp", img, [], "webp"), (".webp", img, lossless_webp, "webp"),
             (".tif", img, [], "tiff"), (".tiff", grey, [], "tiff"), (".ppm", img, [], "pnm"),
             (".pgm", grey, [], "pnm")]
    for ext, a, params, fmt in cases:
        ok, buf = cv2.imencode(ext, a, params)
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        assert image_size(buf) == (fmt, decoded.shape[1], decoded.shape[0], False) == (fmt, 203, 301, False), ext
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_size(buf) == ("jpeg", 203, 301, True)
    for junk in (b"", b"not an image at all", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00"):
        assert image_size(np.frombuffer(junk, np.uint8)) is None


# -- the pixel cap ----------------------------------------------------------------------------------------

def test_a_png_over_the_cap_is_refused_before_it_is_decoded(huge_png):
    res = peak_growth("try:\n    read_image(sys.argv[1]); result = {'error': None}\n"
                      "except ImageReadError as e:\n    result = {'error': str(e)}", huge_png)
    assert res["error"] is not None, "decoded, not refused"
    assert str(huge_png) in res["error"] and "12000 x 12000 pixels (144 MP), a PNG" in res["error"]
    assert f"over the cap of {MAX_PIXELS} pixels" in res["error"] and MAX_PIXELS_ENV in res["error"]
    assert res["growth"] < 64 * MB, res  # decoding it would take 432 MB (RGB) on top of 144 MB (grey)


def test_the_cap_is_read_from_the_environment(tiles, tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    assert cv2.imwrite(str(path), tiles[0][:301, :203])
    monkeypatch.setenv(MAX_PIXELS_ENV, str(301 * 203))
    np.testing.assert_array_equal(read_image(path), tiles[0][:301, :203, ::-1])  # at the cap: read
    monkeypatch.setenv(MAX_PIXELS_ENV, str(301 * 203 - 1))
    with pytest.raises(ImageReadError, match=r"photo\.png is 203 x 301 pixels .*over the cap of 61102 pixels"):
        read_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=f"{MAX_PIXELS_ENV} must be a positive int \\(pixels\\), got 'lots'"):
        read_image(path)


def test_a_jpeg_over_the_cap_is_decoded_reduced_unless_progressive(tiles, tmp_path, monkeypatch):
    img = mosaic(tiles, 3000, 3000)
    assert cv2.imwrite(str(tmp_path / "base.jpg"), img)
    assert cv2.imwrite(str(tmp_path / "prog.jpg"), img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    monkeypatch.setenv(MAX_PIXELS_ENV, "4000000")
    half = read_image(tmp_path / "base.jpg")
    assert half.shape == (1500, 1500, 3)  # the largest of 1/2, 1/4, 1/8 under the cap
    oracle = cv2.resize(img, (1500, 1500), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    assert np.abs(half.astype(int) - oracle).mean() < 3
    # libjpeg holds a progressive file's coefficients at full size, whatever it outputs: refused
    with pytest.raises(ImageReadError, match=r"prog\.jpg is 3000 x 3000 pixels \(9 MP\), a progressive JPEG"):
        read_image(tmp_path / "prog.jpg")
    monkeypatch.setenv(MAX_PIXELS_ENV, "100000")  # 375 x 375 = 140625 at 1/8: still over
    with pytest.raises(ImageReadError, match=r"base\.jpg is 3000 x 3000 pixels \(9 MP\) \(even decoded at 1/8\), "
                                             r"over the cap of 100000"):
        read_image(tmp_path / "base.jpg")


def test_index_skips_a_huge_png_naming_it_its_size_and_the_cap(huge_png, tiles, tmp_path, capsys, request):
    from engine.search_cli import main
    from engine.searcher import Searcher
    from trained_models import ModelCache

    model = ModelCache(request.config.cache.mkdir("lookalike-tiny-models")).onnx("mpnn")
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(huge_png, folder / "huge.png")
    for i in range(3):
        assert cv2.imwrite(str(folder / f"photo{i}.jpg"), tiles[i])
    index = tmp_path / "p.idx"
    assert main(["index", str(folder), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert f"warning: skipped {folder / 'huge.png'}: " in err and "12000 x 12000 pixels" in err, err
    assert f"over the cap of {MAX_PIXELS} pixels" in err
    assert sorted(Searcher.load(index).meta()) == [str(folder.resolve() / f"photo{i}.jpg") for i in range(3)]
    assert "3 added, 0 updated, 0 removed, 0 unchanged, 1 skipped (huge.png: " in captured.out


# -- large JPEGs decoded at a reduced size ----------------------------------------------------------------

def test_a_large_jpeg_decoded_reduced_gives_nearly_the_full_decode_s_network_input(big_jpeg):
    full = read_image(big_jpeg)  # no size asked for, under the cap: decoded whole
    assert full.shape == (4608, 5120, 3)
    for pre in (Preprocess((224, 224)), Preprocess((64, 64)), Preprocess((500, 500), resize="exact", crop="none")):
        need = pre.min_decode_size()
        small = read_image(big_jpeg, min_size=need)
        f = {224: 8, 64: 8, 500: 4}[pre.size[0]]  # the largest reduction keeping twice the network's need
        assert small.shape == (4608 // f, 5120 // f, 3) and min(small.shape[:2]) >= need[0]
        a, b = pre.resize_crop(full).astype(int), pre.resize_crop(small).astype(int)
        d = np.abs(a - b)
        assert d.mean() < 3 and np.percentile(d, 99) <= 16, (pre.size, d.mean(), np.percentile(d, 99))


def test_reduced_decoding_ignores_exif_orientation_as_the_full_decode_does(big_jpeg, tmp_path):
    # an APP1 Exif segment saying "rotate 90 degrees" (orientation 6), right after the JPEG's SOI marker
    tiff = b"MM\0*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0" * 4
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\0\0" + tiff
    data = big_jpeg.read_bytes()
    turned = tmp_path / "turned.jpg"
    turned.write_bytes(data[:2] + app1 + data[2:])
    assert cv2.imread(str(turned)).shape[:2] == (5120, 4608)  # OpenCV's default read does turn it
    full, small = read_image(turned), read_image(turned, min_size=(448, 448))
    assert full.shape == (4608, 5120, 3) and small.shape == (576, 640, 3)
    oracle = cv2.resize(full, (640, 576), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - oracle).mean() < 3


def test_a_large_jpeg_embeds_as_its_full_decode_does(big_jpeg, request):
    from engine import Encoder
    from trained_models import ModelCache

    enc = Encoder(ModelCache(request.config.cache.mkdir("lookalike-tiny-models")).onnx("mpnn"))
    by_path = enc.encode([big_jpeg])  # decoded reduced
    by_array = enc.encode(read_image(big_jpeg))  # decoded whole
    assert float(by_path[0] @ by_array[0]) >= 0.999


def test_reduced_decoding_keeps_memory_small(big_jpeg):
    res = peak_growth("img = read_image(sys.argv[1], min_size=(448, 448)); result = {'shape': img.shape}", big_jpeg)
    assert res["shape"] == [576, 640, 3]
    assert res["growth"] < 48 * MB, res  # a full decode: ~2 x 71 MB (OpenCV's BGR, then RGB)


def test_normal_size_images_decode_exactly_as_before(tiles, tmp_path):
    path = tmp_path / "photo.jpg"
    assert cv2.imwrite(str(path), mosaic(tiles, 3000, 4000))  # 12 MP: under REDUCE_ABOVE
    np.testing.assert_array_equal(read_image(path, min_size=(16, 16)),
                                  cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1])
