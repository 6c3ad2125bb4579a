"""The image sources, looked up by their ``data.source`` name.

One module per source, each giving an object of the ``ImageSource`` protocol; a new source is
one module here, registered in ``SOURCES`` below, with its name in
``dinoflow.config.SOURCE_NEEDS_PATH`` (the configuration accepts exactly those names).
"""

from __future__ import annotations

from dinoflow.data.sources.base import ImageSource, Members, Split, carve, carve_test
from dinoflow.data.sources.fashion_mnist import FASHION_MNIST
from dinoflow.data.sources.image_folder import IMAGE_FOLDER
from dinoflow.data.sources.shards import SHARDS
from dinoflow.errors import DataError

SOURCES: dict[str, ImageSource] = {
    source.name: source for source in (FASHION_MNIST, IMAGE_FOLDER, SHARDS)
}


def get_source(name: str) -> ImageSource:
    """The source registered as ``name`` (the value of ``data.source``)."""
    try:
        return SOURCES[name]
    except KeyError:
        known = ", ".join(SOURCES)
        raise DataError(f"data.source: unknown source {name!r} (known: {known})") from None


__all__ = ["SOURCES", "ImageSource", "Members", "Split", "carve", "carve_test", "get_source"]
