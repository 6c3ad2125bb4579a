"""Image sources (``dinoflow.data.sources``: Fashion-MNIST, a folder of images, tar shards, by
name) and the
shared train/val/test split."""

from dinoflow.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, read_idx
from dinoflow.data.image_folder import IMAGE_EXTENSIONS, list_image_folder
from dinoflow.data.sources import SOURCES, ImageSource, get_source
from dinoflow.data.splits import (
    Split,
    channel_stats,
    data_identity,
    load_data,
    load_splits,
    split_data,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "FashionMNISTNotFound",
    "ImageSource",
    "Split",
    "channel_stats",
    "data_identity",
    "find_fashion_mnist",
    "get_source",
    "list_image_folder",
    "load_data",
    "load_splits",
    "read_idx",
    "split_data",
]
