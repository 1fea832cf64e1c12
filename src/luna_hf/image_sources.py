"""Fashion-MNIST, the image set that is at hand offline (Debian's `dataset-fashion-mnist`: `apt-get download
dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb .`, files in usr/share/datasets/fashion-mnist): read by
the LRA image task's builder (scripts/lra/build_data.py) and the ViT conversion's measurement
(scripts/vision_posthoc.py). Not part of the remote code."""

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic with the number of dimensions, big-endian sizes, then uint8 data."""
    data = gzip.decompress(Path(path).read_bytes())
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an uint8 IDX file: delete it and fetch it again.")
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def fashion_mnist(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...}: uint8 images (n, 28, 28) and labels (n,) from `folder`."""
    folder = Path(folder)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: `apt-get download dataset-fashion-mnist`, unpack it with "
                                "`dpkg -x`, and pass its usr/share/datasets/fashion-mnist folder.")  # fmt: skip
    return {split: (read_idx(folder / images), read_idx(folder / labels))
            for split, (images, labels) in FASHION_MNIST_FILES.items()}  # fmt: skip
