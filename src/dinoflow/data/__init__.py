"""Image sources (Fashion-MNIST IDX files, a folder of images) and the shared train/val/test split."""

from dinoflow.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, read_idx
from dinoflow.data.image_folder import IMAGE_EXTENSIONS, list_image_folder
from dinoflow.data.splits import Split, channel_stats, data_identity, load_data, load_splits

__all__ = [
    "IMAGE_EXTENSIONS",
    "FashionMNISTNotFound",
    "Split",
    "channel_stats",
    "data_identity",
    "find_fashion_mnist",
    "list_image_folder",
    "load_data",
    "load_splits",
    "read_idx",
]
