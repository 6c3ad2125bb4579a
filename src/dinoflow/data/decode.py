"""The one image decoder: a file (or its bytes) -> uint8 (C, H, W), as curation decodes it.

Interim body (branch ``serve``): it calls curation's ``decode_file`` (EXIF orientation, CMYK,
RGBA / LA / palette transparency on white, 16-bit and float grey, animations: frame 0,
decompression-bomb guard) and converts the RGB result to the wanted channels. The lead replaces
the body when ``dinoflow.data.decode`` lands from issue 17; the signature stays.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

# curation's default max_pixels (dinoflow.curation.config): a larger image is refused, not decoded
MAX_PIXELS = 40_000_000

__all__ = ["MAX_PIXELS", "decode_image"]


def _grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luma, as curation computes grey (Pillow's "L": ITU-R 601-2).

    An RGB image whose three channels are equal (a decoded grey file) gives its grey levels back
    exactly.
    """
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def decode_image(source: str | Path | bytes, channels: int) -> torch.Tensor:
    """Decode an image file (path) or encoded file bytes to uint8 (C, H, W), C = ``channels``.

    channels 1: luma (grey files give their own levels); 3: RGB (grey repeated). Anything Pillow
    opens works. Raises ValueError naming the file (or "image bytes") when it cannot be decoded.
    """
    from dinoflow.curation.ingest import decode_file

    if channels not in (1, 3):
        raise ValueError(f"decode_image: channels must be 1 or 3, got {channels}")
    if isinstance(source, bytes | bytearray | memoryview):
        name = f"image bytes ({len(source)} bytes)"
        # curation's decoder reads files (it stats them first): a private temporary file
        fd, tmp = tempfile.mkstemp(prefix="dinoflow-decode-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(source))
            decoded = decode_file(tmp, MAX_PIXELS)
        finally:
            os.unlink(tmp)
    else:
        name = str(source)
        decoded = decode_file(source, MAX_PIXELS)
    if decoded.rgb is None:
        raise ValueError(f"cannot read image {name}: {decoded.reason}: {decoded.detail}")
    rgb = decoded.rgb
    if channels == 1:
        return torch.from_numpy(_grey(rgb).copy()).unsqueeze(0)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
