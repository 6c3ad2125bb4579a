"""Image sources (Fashion-MNIST IDX files, a folder of images) and the shared train/val/test split."""

from dinoflow.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, read_idx
from dinoflow.data.image_folder import IMAGE_EXTENSIONS, list_image_folder
from dinoflow.data.splits import Split, channel_stats, load_splits

__all__ = [
    "IMAGE_EXTENSIONS",
    "FashionMNISTNotFound",
    "Split",
    "channel_stats",
    "find_fashion_mnist",
    "list_image_folder",
    "load_splits",
    "read_idx",
]
