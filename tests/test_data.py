"""Tests for localsgd_fx.data: dataset loading (on small files written here), downloads via
file:// URLs only, error messages, and the Batches iterator."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from localsgd_fx.data import Batches, DatasetError, ImageDataset, cifar, fashion_mnist, list_datasets, load_dataset

REAL_FMNIST_DIR = fashion_mnist.FASHION_MNIST_SYSTEM_DIR  # captured before the fixture hides it
TRAIN_IMG, TRAIN_LBL = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMG, TEST_LBL = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache in tmp_path, no $LOCALSGD_DATA, no system copy, and no network at all."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(fashion_mnist.DATA_ENV, raising=False)
    monkeypatch.delenv(fashion_mnist.FASHION_MNIST_URL_ENV, raising=False)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_URL", (tmp_path / "no-server").as_uri() + "/")
    real_urlopen = urllib.request.urlopen

    def file_only(url, *args, **kwargs):
        assert str(url).startswith("file:"), f"test tried to reach the network: {url}"
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", file_only)
    return tmp_path


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------
# IDX helpers
# ------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    return head + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def fake_fmnist(n_train: int = 12, n_test: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMG: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LBL: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMG: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LBL: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_fmnist(directory: Path, arrays: dict) -> Path:
    for name, arr in arrays.items():
        write_gz(directory / name, idx_bytes(arr))
    return directory


# ------------------------------------------------------------------------------------------
# names and splits
# ------------------------------------------------------------------------------------------


def test_list_datasets_and_unknown_names():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist"]
    with pytest.raises(ValueError, match="fashion-mnist") as exc:
        load_dataset("mnist")
    assert "cifar10" in str(exc.value) and "cifar100" in str(exc.value)
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("fashion-mnist", "validation")


# ------------------------------------------------------------------------------------------
# Fashion-MNIST from local files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["fashion-mnist", "fashion_mnist", "fmnist", "FMNIST"])
def test_fmnist_loads_idx_gz(tmp_path, alias):
    arrays = fake_fmnist()
    root = write_fmnist(tmp_path / "fm", arrays)
    train = load_dataset(alias, "train", root, download=False)
    test = load_dataset(alias, "test", root, download=False)
    assert train.name == "fashion-mnist" and train.num_classes == 10
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (12,)
    assert test.images.shape == (5, 1, 28, 28) and len(test) == 5
    assert np.array_equal(train.images[:, 0].numpy(), arrays[TRAIN_IMG])
    assert np.array_equal(train.labels.numpy(), arrays[TRAIN_LBL])
    assert np.array_equal(test.images[:, 0].numpy(), arrays[TEST_IMG])
    assert train.mean == pytest.approx((0.2860,)) and train.std == pytest.approx((0.3530,))
    assert len(train.classes) == 10
    assert cache_files(tmp_path) == []  # nothing downloaded or cached


def test_fmnist_search_order_and_layouts(tmp_path, monkeypatch):
    a, b, c = fake_fmnist(seed=1), fake_fmnist(seed=2), fake_fmnist(seed=3)
    write_fmnist(tmp_path / "root" / "fashion-mnist", a)  # subfolder of root
    write_fmnist(tmp_path / "env", b)  # directly in $LOCALSGD_DATA
    # uncompressed IDX in the "system" folder
    sysdir = tmp_path / "sys"
    sysdir.mkdir()
    for name, arr in c.items():
        (sysdir / name[:-3]).write_bytes(idx_bytes(arr))
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", sysdir)
    monkeypatch.setenv(fashion_mnist.DATA_ENV, str(tmp_path / "env"))

    def first_label_image(**kw):
        return load_dataset("fmnist", "train", download=False, **kw).images[0, 0].numpy()

    assert np.array_equal(first_label_image(root=tmp_path / "root"), a[TRAIN_IMG][0])
    assert np.array_equal(first_label_image(), b[TRAIN_IMG][0])
    # an explicit root is used or refused, never replaced by another copy (nor by a download)
    for root, state in ((tmp_path / "empty", "it exists"), (tmp_path / "typo", "it does not exist")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        for download in (False, True):
            with pytest.raises(DatasetError, match=f"not in the data folder {root} \\({state}\\)"):
                load_dataset("fmnist", "train", root, download=download)
    assert cache_files(tmp_path) == []
    monkeypatch.delenv(fashion_mnist.DATA_ENV)
    assert np.array_equal(first_label_image(), c[TRAIN_IMG][0])


def test_fmnist_missing_without_download(tmp_path):
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", "test", tmp_path / "nowhere", download=False)
    msg = str(exc.value)
    assert TEST_IMG in msg and TEST_LBL in msg
    assert str(tmp_path / "nowhere") in msg and "dataset-fashion-mnist" in msg
    assert isinstance(exc.value, ValueError)


def _truncated(d: Path):
    blob = gzip.compress(idx_bytes(fake_fmnist()[TRAIN_IMG]))
    (d / TRAIN_IMG).write_bytes(blob[: len(blob) // 2])
    return TRAIN_IMG, "decompress"


def _not_gzip(d: Path):
    (d / TRAIN_LBL).write_bytes(b"this is not gzip data at all" * 10)
    return TRAIN_LBL, "decompress"


def _wrong_magic(d: Path):
    write_gz(d / TRAIN_IMG, idx_bytes(fake_fmnist()[TRAIN_IMG], magic=b"\x00\x00\x08\x01"))
    return TRAIN_IMG, "magic"


def _short_data(d: Path):
    write_gz(d / TRAIN_IMG, idx_bytes(fake_fmnist()[TRAIN_IMG])[:-100])
    return TRAIN_IMG, "bytes"


def _count_mismatch(d: Path):
    write_gz(d / TRAIN_LBL, idx_bytes(np.zeros(11, np.uint8)))
    return TRAIN_LBL, "12 images"


def _label_range(d: Path):
    write_gz(d / TRAIN_LBL, idx_bytes(np.full(12, 10, np.uint8)))
    return TRAIN_LBL, "outside"


@pytest.mark.parametrize(
    "corrupt", [_truncated, _not_gzip, _wrong_magic, _short_data, _count_mismatch, _label_range]
)
def test_fmnist_corrupt_files_raise_clear_error(tmp_path, corrupt):
    root = write_fmnist(tmp_path / "fm", fake_fmnist())
    fname, reason = corrupt(root)
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", "train", root, download=False)
    msg = str(exc.value)
    assert str(root / fname) in msg and reason in msg
    assert "Delete" in msg or "delete" in msg.lower()
    # the test split is untouched and still loads
    assert len(load_dataset("fashion-mnist", "test", root, download=False)) == 5


def test_fmnist_corrupt_system_copy_suggests_reinstall(tmp_path, monkeypatch):
    sysdir = write_fmnist(tmp_path / "sys", fake_fmnist())
    _wrong_magic(sysdir)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", sysdir)
    with pytest.raises(DatasetError, match="reinstall dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


# ------------------------------------------------------------------------------------------
# Fashion-MNIST download (file:// only)
# ------------------------------------------------------------------------------------------


def serve(tmp_path: Path, arrays: dict, monkeypatch) -> Path:
    """Write .gz files to a 'server' folder and register their md5s as the official ones."""
    srv = write_fmnist(tmp_path / "server", arrays)
    for name in arrays:
        md5 = hashlib.md5((srv / name).read_bytes()).hexdigest()
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_MD5, name, md5)
    return srv


@pytest.mark.parametrize("via", ["env", "constant"])
def test_download_good(tmp_path, monkeypatch, via):
    arrays = fake_fmnist()
    srv = serve(tmp_path, arrays, monkeypatch)
    if via == "env":
        monkeypatch.setenv(fashion_mnist.FASHION_MNIST_URL_ENV, srv.as_uri())  # no trailing slash
    else:
        monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_URL", srv.as_uri() + "/")
    train = load_dataset("fashion-mnist", "train")
    assert np.array_equal(train.images[:, 0].numpy(), arrays[TRAIN_IMG])
    target = tmp_path / "cache" / "localsgd_fx" / "fashion-mnist"
    assert cache_files(tmp_path) == [target / TRAIN_IMG, target / TRAIN_LBL]
    for name in (TRAIN_IMG, TRAIN_LBL):
        assert (target / name).read_bytes() == (srv / name).read_bytes()
    # the cached copy is used from now on: no server needed
    for name in arrays:
        (srv / name).unlink()
    assert len(load_dataset("fashion-mnist", "train")) == 12
    with pytest.raises(DatasetError, match="could not download"):
        load_dataset("fashion-mnist", "test")  # not cached, server gone
    assert cache_files(tmp_path) == [target / TRAIN_IMG, target / TRAIN_LBL]


def test_download_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    srv = write_fmnist(tmp_path / "server", fake_fmnist())  # md5s stay the official ones
    monkeypatch.setenv(fashion_mnist.FASHION_MNIST_URL_ENV, srv.as_uri() + "/")
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", "train")
    msg = str(exc.value)
    assert "checksum" in msg and fashion_mnist.FASHION_MNIST_MD5[TRAIN_IMG] in msg and TRAIN_IMG in msg
    assert cache_files(tmp_path) == []


def test_download_missing_file_leaves_nothing(tmp_path):
    with pytest.raises(DatasetError, match="could not download") as exc:
        load_dataset("fashion-mnist", "train")  # URL points at a folder that does not exist
    assert "dataset-fashion-mnist" in str(exc.value)
    assert cache_files(tmp_path) == []


# ------------------------------------------------------------------------------------------
# real Fashion-MNIST (Debian package dataset-fashion-mnist)
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not all((REAL_FMNIST_DIR / f).is_file() for f in (TRAIN_IMG, TRAIN_LBL, TEST_IMG, TEST_LBL)),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", REAL_FMNIST_DIR)
    train = load_dataset("fashion-mnist", "train", download=False)
    test = load_dataset("fashion-mnist", "test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.num_classes == 10 and ds.labels.min() >= 0 and ds.labels.max() <= 9
        assert torch.equal(ds.labels.bincount(), torch.full((10,), len(ds) // 10))
    # content identical to the official release
    for name in (TRAIN_IMG, TRAIN_LBL, TEST_IMG, TEST_LBL):
        raw = gzip.decompress((REAL_FMNIST_DIR / name).read_bytes())
        assert hashlib.md5(raw).hexdigest() == fashion_mnist.FASHION_MNIST_RAW_MD5[name]
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(train.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(train.std[0], abs=1e-3)


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


def py2_pickle(rows: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """A batch pickled the way Python 2 / numpy 1 wrote the official CIFAR files (protocol 2,
    py2 ``str`` keys, ``numpy.core.multiarray._reconstruct``)."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n = rows.shape[0]
    out = b"\x80\x02}(" + s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", n) + b"M" + struct.pack("<H", 3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", rows.nbytes) + rows.tobytes() + b"tb"
    out += s(label_key) + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return out + s(b"batch_label") + s(b"a batch") + b"u."


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"],
                 "meta", b"fine_labels", b"fine_label_names", 100),
}


def write_cifar(parent: Path, name: str, n: int = 4, py2: bool = False, seed: int = 0):
    """Write a small CIFAR folder in the official layout; return (folder, train, test) arrays."""
    folder, _, train_files, test_files, meta, lkey, nkey, k = CIFAR_LAYOUT[name]
    d = parent / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        rows, labs = [], []
        for fname in files:
            r = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            lab = rng.integers(0, k, n).tolist()
            if py2:
                (d / fname).write_bytes(py2_pickle(r, lab, lkey))
            else:
                batch = {b"batch_label": b"x", lkey: lab, b"data": r,
                         b"filenames": [b"f%d.png" % i for i in range(n)]}
                if name == "cifar100":
                    batch[b"coarse_labels"] = [v // 5 for v in lab]
                (d / fname).write_bytes(pickle.dumps(batch))
            rows.append(r)
            labs += lab
        out[split] = (np.concatenate(rows), np.array(labs))
    names = [b"class%d" % i for i in range(k)]
    (d / meta).write_bytes(pickle.dumps({nkey: names, b"num_cases_per_batch": n}))
    return d, out


def check_cifar(ds: ImageDataset, name: str, expected) -> None:
    rows, labs = expected
    k = CIFAR_LAYOUT[name][-1]
    assert ds.name == name and ds.num_classes == k
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labs), 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and torch.equal(ds.labels, torch.from_numpy(labs))
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert np.array_equal(ds.images[1, 2].numpy(), rows[1, 2048:].reshape(32, 32))
    assert np.array_equal(ds.images.reshape(len(labs), -1).numpy(), rows)
    assert len(ds.mean) == 3 and len(ds.std) == 3
    assert ds.classes == tuple(f"class{i}" for i in range(k))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("py2", [False, True])
def test_cifar_loads_folder_or_parent(tmp_path, name, py2):
    folder, expected = write_cifar(tmp_path / "data", name, py2=py2)
    train = load_dataset(name, "train", folder)
    check_cifar(train, name, expected["train"])
    assert len(train) == (20 if name == "cifar10" else 4)
    check_cifar(load_dataset(name, "test", tmp_path / "data"), name, expected["test"])
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_archive(tmp_path, monkeypatch, name):
    folder, expected = write_cifar(tmp_path / "src", name)
    archive_name = CIFAR_LAYOUT[name][1]
    dl = tmp_path / "downloads"
    dl.mkdir()
    with tarfile.open(dl / archive_name, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    check_cifar(load_dataset(name, "train", dl), name, expected["train"])
    extracted = tmp_path / "cache" / "localsgd_fx" / folder.name
    assert sorted(p.name for p in extracted.iterdir() if p.name != cifar.SOURCE_NAME) == sorted(   # + the archive's
        p.name for p in folder.iterdir())                                                         # identity
    assert [p.name for p in (tmp_path / "cache" / "localsgd_fx").iterdir()] == [folder.name]
    # the archive path itself works too, and the cache is found without root afterwards
    check_cifar(load_dataset(name, "test", dl / archive_name), name, expected["test"])
    check_cifar(load_dataset(name, "test"), name, expected["test"])
    # $LOCALSGD_DATA pointing at the parent of the extracted folder
    monkeypatch.setenv(fashion_mnist.DATA_ENV, str(tmp_path / "src"))
    check_cifar(load_dataset(name, "train"), name, expected["train"])


def test_cifar_corrupt_archive_leaves_nothing(tmp_path):
    dl = tmp_path / "downloads"
    dl.mkdir()
    (dl / "cifar-10-python.tar.gz").write_bytes(gzip.compress(b"not a tar file" * 1000)[:300])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz") as exc:
        load_dataset("cifar10", "train", dl)
    assert "cs.toronto.edu" in str(exc.value)
    assert cache_files(tmp_path) == []
    assert not any((tmp_path / "cache" / "localsgd_fx").iterdir())


def test_cifar_missing_path_lists_expected_files(tmp_path):
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", "train", tmp_path / "nothing-here")
    msg = str(exc.value)
    for part in ["cifar-10-batches-py", "data_batch_1", "data_batch_5", "batches.meta",
                 "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html",
                 str(tmp_path / "nothing-here")]:
        assert part in msg
    with pytest.raises(DatasetError, match="cifar-100-python.*train.*meta"):
        load_dataset("cifar100", "train", tmp_path / "nothing-here")


def test_cifar_explicit_root_is_never_replaced(tmp_path, monkeypatch):
    write_cifar(tmp_path / "env", "cifar10")
    monkeypatch.setenv(fashion_mnist.DATA_ENV, str(tmp_path / "env"))
    assert len(load_dataset("cifar10", "test")) == 4                  # found through $LOCALSGD_DATA
    with pytest.raises(DatasetError, match="not found in any of:\n  " + str(tmp_path / "typo") + "\n"):
        load_dataset("cifar10", "test", tmp_path / "typo")           # a named folder is not replaced by it


def test_cifar_missing_batch_named(tmp_path):
    folder, _ = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset("cifar10", "train", tmp_path)
    assert len(load_dataset("cifar10", "test", tmp_path)) == 4


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x80\x04garbage", "not a valid CIFAR python pickle"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "N x 3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "1 labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "outside"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "missing key"),
    ],
)
def test_cifar_corrupt_pickle_names_file(tmp_path, content, reason):
    folder, _ = write_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DatasetError, match=reason) as exc:
        load_dataset("cifar10", "test", tmp_path)
    assert str(folder / "test_batch") in str(exc.value)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path, capsys):
    folder, _ = write_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match="not allowed"):
        load_dataset("cifar10", "test", tmp_path)
    assert "pwned" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# ImageDataset
# ------------------------------------------------------------------------------------------


def toy(n: int = 10, c: int = 1, h: int = 5, w: int = 6, mean=None, std=None) -> ImageDataset:
    """Images whose pixels are all distinct (within an image) and nonzero; label = index."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ImageDataset("toy", imgs, torch.arange(n), n, mean or (0.5,) * c, std or (0.25,) * c)


def test_subset_is_deterministic():
    ds = toy(50)
    a, b, c = ds.subset(7), ds.subset(7), ds.subset(7, seed=1)
    assert len(a) == 7 and torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)
    assert torch.equal(a.labels, a.labels.sort().values) and len(a.labels.unique()) == 7
    assert torch.equal(a.images, ds.images[a.labels])
    assert a.num_classes == ds.num_classes and a.mean == ds.mean
    assert len(ds.subset(1000)) == 50
    with pytest.raises(ValueError):
        ds.subset(0)


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("x", torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long), 2, (0.0,),
                     (1.0,))
    with pytest.raises(ValueError, match="int64"):
        ImageDataset("x", torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3).long(), 2,
                     (0.0,), (1.0,))


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def collect(batches: Batches, e: int):
    xs, ys = zip(*batches.epoch(e))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("augment", [False, True])
def test_batches_deterministic_per_seed_and_epoch(augment):
    ds = toy(37)
    b1 = Batches(ds, 8, augment=augment, crop_padding=2, seed=3)
    b2 = Batches(ds, 8, augment=augment, crop_padding=2, seed=3)
    x3, y3 = collect(b1, 3)
    collect(b1, 0)  # other epochs in between change nothing
    for b in (b1, b2):
        x, y = collect(b, 3)
        assert torch.equal(x, x3) and torch.equal(y, y3)
    x4, y4 = collect(b1, 4)
    assert not torch.equal(y4, y3)
    x3s, y3s = collect(Batches(ds, 8, augment=augment, crop_padding=2, seed=4), 3)
    assert not torch.equal(y3s, y3)
    if augment:  # the same sample is augmented differently in another epoch
        assert not torch.equal(x4[y4.argsort()], x3[y3.argsort()])


def test_batches_cover_every_sample_once():
    ds = toy(37)
    b = Batches(ds, 8, seed=0)
    assert len(b) == 5
    sizes = [len(y) for _, y in b.epoch(0)]
    assert sizes == [8, 8, 8, 8, 5]
    for e in range(3):
        _, y = collect(b, e)
        assert sorted(y.tolist()) == list(range(37))
    _, y = collect(Batches(ds, 8, shuffle=False), 7)
    assert y.tolist() == list(range(37))
    assert [len(y) for _, y in Batches(ds, 100)] == [37]


def test_batches_drop_last():
    ds = toy(37)
    b = Batches(ds, 8, drop_last=True, seed=1)
    assert len(b) == 4
    sizes = [len(y) for _, y in b.epoch(2)]
    assert sizes == [8, 8, 8, 8]
    _, y = collect(b, 2)
    assert len(set(y.tolist())) == 32
    # the kept samples are the first 32 of the same shuffled order
    _, y_all = collect(Batches(ds, 8, drop_last=False, seed=1), 2)
    assert torch.equal(y, y_all[:32])
    assert len(Batches(toy(32), 8, drop_last=True)) == 4
    tiny = Batches(toy(5), 8, drop_last=True)
    assert len(tiny) == 0 and list(tiny.epoch(0)) == []


def test_batches_normalisation():
    ds = toy(10, c=3, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    x, y = collect(Batches(ds, 4, shuffle=False), 0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.images.float() / 255 - mean) / std)


def reference_augment(img: torch.Tensor, dy: int, dx: int, flip: bool, p: int) -> torch.Tensor:
    c, h, w = img.shape
    padded = torch.nn.functional.pad(img, (p, p, p, p))
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_augment_matches_reference_crop_and_flip():
    ds = toy(6, c=2, h=5, w=6)
    b = Batches(ds, 6, augment=True, crop_padding=2)
    offsets = torch.tensor([[0, 0], [4, 4], [2, 2], [1, 3], [4, 0], [0, 4]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = b._augment(ds.images, offsets, flips)
    for i in range(6):
        ref = reference_augment(ds.images[i], int(offsets[i, 0]), int(offsets[i, 1]),
                                bool(flips[i]), 2)
        assert torch.equal(out[i], ref), i
    assert torch.equal(out[2], ds.images[2])  # centred, not flipped: identity


@pytest.mark.parametrize("padding, flip", [(2, True), (2, False), (0, True)])
def test_augmented_batches_are_valid_crops(padding, flip):
    ds = toy(40, c=3, h=5, w=6)
    b = Batches(ds, 16, augment=True, crop_padding=padding, flip=flip, seed=5)
    x, y = collect(b, 1)
    assert x.shape == (40, 3, 5, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    # undo the normalisation to recover the uint8 pixels
    raw = torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)
    changed = used_flip = 0
    for img, label in zip(raw, y.tolist()):
        src = ds.images[label]
        options = [(dy, dx, f) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   for f in ((False, True) if flip else (False,))]
        matches = [o for o in options if torch.equal(img, reference_augment(src, *o, padding))]
        assert matches, f"sample {label} is not a crop/flip of its source"
        changed += not torch.equal(img, src)
        used_flip += any(o[2] for o in matches)
    assert changed > 10  # augmentation does something
    assert (used_flip > 5) == flip


def test_batches_iter_is_epoch0_and_device():
    ds = toy(9)
    b = Batches(ds, 4, augment=True, seed=2, device="cpu")
    for (xa, ya), (xb, yb) in zip(b, b.epoch(0)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.device.type == "cpu"
    with pytest.raises(ValueError):
        Batches(ds, 0)


def test_cifar_cache_follows_the_archive_it_came_from(tmp_path):
    """Issue 22: a run with archive B after one with archive A used A's extracted cache."""
    archives = {}
    for key, seed in (("a", 0), ("b", 1)):
        folder, expected = write_cifar(tmp_path / f"src-{key}", "cifar10", seed=seed)
        (tmp_path / key).mkdir()
        with tarfile.open(tmp_path / key / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        archives[key] = (tmp_path / key / "cifar-10-python.tar.gz", expected)
    for key in ("a", "b", "a"):
        archive, expected = archives[key]
        check_cifar(load_dataset("cifar10", "train", archive), "cifar10", expected["train"])
    # the same archive at another path: the cache is used again, not extracted anew
    extracted = tmp_path / "cache" / "localsgd_fx" / "cifar-10-batches-py"
    before = extracted.stat().st_ino
    copy = tmp_path / "copy" / "cifar-10-python.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(archives["a"][0].read_bytes())
    check_cifar(load_dataset("cifar10", "test", copy), "cifar10", archives["a"][1]["test"])
    assert extracted.stat().st_ino == before


def test_a_file_as_data_folder_is_named_as_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="it is a file, not a folder"):
        load_dataset("fashion-mnist", "train", tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match=r"is a file, not a folder nor a \.tar\.gz archive"):
        load_dataset("cifar10", "train", tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="with --data-dir"):
        load_dataset("cifar10", "train", tmp_path)
