"""Dataset loading: built-in splits, user formats, and one-line errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ftcnn import data


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


def test_mnist5k_split() -> None:
    train, test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert ytr.bincount().tolist() == [400] * 10
    assert yte.bincount().tolist() == [100] * 10
    # the 5,000 source images are all distinct, so disjoint rows == disjoint indices
    assert not rows(xtr) & rows(xte)
    assert len(rows(xtr)) == 4000 and len(rows(xte)) == 1000
    # normalised with train statistics
    assert abs(float(xtr.mean())) < 1e-3 and abs(float(xtr.std()) - 1) < 1e-3
    assert abs(float(xte.mean())) < 0.1
    # shuffled, not sorted by class
    assert len(set(yte[:50].tolist())) > 5
    assert data.info("mnist5k") == data.DataInfo(1, 28, 10, "mnist5k")


def test_mnist5k_seeded() -> None:
    a = data.load("mnist5k", "test", seed=0).tensors
    b = data.load("mnist5k", "test", seed=0).tensors
    c = data.load("mnist5k", "test", seed=1).tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert rows(a[0]) != rows(c[0])
    # same normalisation constants for train and test: un-normalised pixels stay on the grid
    tr = data.load("mnist5k", "train", seed=1).tensors[0]
    assert float(tr.min()) == pytest.approx(float(c[0].min()))


def test_load_returns_fresh_tensors() -> None:
    a = data.load("digits", "train").tensors[0]
    a.fill_(123.0)
    assert float(data.load("digits", "train").tensors[0].max()) < 100


def test_digits() -> None:
    (xtr, ytr), (xte, yte) = data.load("digits", "train").tensors, data.load("digits", "test").tensors
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(xtr) + len(xte) == 1797
    assert abs(len(xte) - 0.2 * 1797) < 10
    assert set(yte.tolist()) == set(range(10))
    assert not rows(xtr) & rows(xte)
    assert data.info("digits") == data.DataInfo(1, 8, 10, "digits")


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        data.load("digits", "val")


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(1, 6):
        _write_pickle(root / f"data_batch_{i}", {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, per_batch)),
        })
    _write_pickle(root / "test_batch", {
        b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        b"labels": list(range(n_test)),
    })
    return root


def test_cifar10(tmp_path: Path) -> None:
    root = _cifar10(tmp_path / "cifar-10-batches-py")
    spec = f"cifar10:{root}"
    x, y = data.load(spec, "train").tensors
    assert x.shape == (30, 3, 32, 32) and y.shape == (30,)
    assert abs(float(x.mean())) < 1e-3
    xt, yt = data.load(spec, "test").tensors
    assert xt.shape == (5, 3, 32, 32) and yt.tolist() == [0, 1, 2, 3, 4]
    assert data.info(spec) == data.DataInfo(3, 32, 10, "cifar10")
    # the parent folder works too
    assert data.load(f"cifar10:{tmp_path}", "test").tensors[0].shape == (5, 3, 32, 32)


def test_cifar100(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tmp_path.joinpath("c100").mkdir()
    for name, n in (("train", 8), ("test", 4)):
        _write_pickle(tmp_path / "c100" / name, {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [99] * n, b"coarse_labels": [0] * n})
    spec = f"cifar100:{tmp_path / 'c100'}"
    assert data.load(spec, "train").tensors[0].shape == (8, 3, 32, 32)
    assert data.info(spec).num_classes == 100


def test_cifar_malformed(tmp_path: Path) -> None:
    root = _cifar10(tmp_path / "c10")
    _write_pickle(root / "data_batch_3", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load(f"cifar10:{root}", "train")
    other = _cifar10(tmp_path / "c10b")
    (other / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.load(f"cifar10:{other}", "train")


@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_npz_without_test(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 12, 12)) * 255
    y = np.repeat(np.arange(5), 10)
    if layout == "nchw":
        x = np.repeat(x[:, None], 3, axis=1)
    elif layout == "nhwc":
        x = np.repeat(x[..., None], 3, axis=3)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    spec = f"npz:{tmp_path / 'd.npz'}"
    xtr, ytr = data.load(spec, "train", seed=3).tensors
    xte, yte = data.load(spec, "test", seed=3).tensors
    c = 1 if layout == "nhw" else 3
    assert xtr.shape == (40, c, 12, 12) and xte.shape == (10, c, 12, 12)
    assert ytr.bincount().tolist() == [8] * 5 and yte.bincount().tolist() == [2] * 5
    assert not rows(xtr) & rows(xte)
    assert data.info(spec) == data.DataInfo(c, 12, 5, "d")


def test_npz_with_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", x=rng.random((20, 1, 6, 6)), y=np.arange(20) % 4,
             x_test=rng.random((7, 1, 6, 6)), y_test=np.arange(7) % 3)
    spec = f"npz:{tmp_path / 't.npz'}"
    assert data.load(spec, "train").tensors[0].shape == (20, 1, 6, 6)
    xt, yt = data.load(spec, "test").tensors
    assert xt.shape == (7, 1, 6, 6) and yt.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert data.info(spec).num_classes == 4


@pytest.mark.parametrize("arrays,pattern", [
    ({"x": np.zeros((4, 5, 5))}, "missing array 'y'"),
    ({"x": np.zeros((4, 5, 5)), "y": np.zeros(3)}, "'y' has shape"),
    ({"x": np.zeros((4, 5, 5, 7)), "y": np.zeros(4)}, "'x' has shape"),
    ({"x": np.zeros((4, 5, 6)), "y": np.zeros(4)}, "square"),
    ({"x": np.zeros((4, 5, 5)), "y": np.array([0.5, 1, 2, 3])}, "integer"),
    ({"x": np.zeros((4, 5, 5)), "y": np.zeros(4), "x_test": np.zeros((2, 5, 5))}, "y_test"),
])
def test_npz_malformed(tmp_path: Path, arrays: dict, pattern: str) -> None:
    file = tmp_path / "bad.npz"
    np.savez(file, **arrays)
    with pytest.raises(ValueError, match=pattern) as info:
        data.load(f"npz:{file}", "train")
    assert str(file) in str(info.value) and "\n" not in str(info.value)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    file = tmp_path / "junk.npz"
    file.write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        data.info(f"npz:{file}")


def test_imagefolder(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                size = 10 if i else 12  # a differently sized image gets resized
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    spec = f"imagefolder:{tmp_path}"
    x, y = data.load(spec, "train").tensors
    xt, yt = data.load(spec, "test").tensors
    first = sorted((tmp_path / "train" / "ant").glob("*.png"))[0]
    side = Image.open(first).size[0]
    assert x.shape == (6, 3, side, side) and xt.shape == (4, 3, side, side)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]  # classes sorted: ant=0, cat=1
    assert data.info(spec) == data.DataInfo(3, side, 2, tmp_path.name)


def test_imagefolder_missing_test_split(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test"):
        data.load(f"imagefolder:{tmp_path}", "train")


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*mnist5k"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="unknown dataset 'svhn:/x'"):
        data.info("svhn:/x")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for kind in ("cifar10", "cifar100", "imagefolder", "npz"):
        with pytest.raises(FileNotFoundError, match=str(missing)) as info:
            data.load(f"{kind}:{missing}", "train")
        assert isinstance(info.value, ValueError)  # a CLI catching ValueError sees it too


def test_pad_to() -> None:
    x = torch.ones(5, 1, 28, 28)
    out = data.pad_to(x, 32, 3)
    assert out.shape == (5, 3, 32, 32)
    assert float(out[:, :, 2:30, 2:30].min()) == 1.0
    assert float(out.sum()) == 5 * 3 * 28 * 28
    assert data.pad_to(torch.ones(1, 28, 28), 32, 1).shape == (1, 32, 32)
    assert data.pad_to(torch.ones(2, 3, 32, 32), 32, 3).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        data.pad_to(x, 16, 3)
    with pytest.raises(ValueError):
        data.pad_to(torch.ones(2, 2, 8, 8), 8, 3)
