"""Image files in, pixels out: the one place that reads images (uint8, HxWx3, BGR)."""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = "PNG, JPEG, WebP, TIFF or BMP"  # the formats whose size is checked before decoding
MAX_PIXELS = 50_000_000
MAX_BYTES = 100_000_000
MIN_SIDE = 32

log = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageError(ValueError):
    """An image file that edge-inspect cannot use; the message names the file and the reason."""


def list_images(folder: Path, labelled: bool = False) -> list[Path]:
    """Return the image files directly inside `folder`, sorted by name, hidden files skipped.

    `labelled`: a folder of labelled images (normal/, anomaly/), which is refused when it also
    has subfolders of images, since those would be left out.
    Example: `list_images(Path("data/good"))` -> `[Path("data/good/001.png"), ...]`.
    """
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ImageError(f"folder {folder} {what}")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if images and others:  # an iPhone's HEIC photos, say: said, not silently left out
        log.warning(
            "folder %s: %d file%s not read, not being %s: %s%s",
            folder,
            len(others),
            " is" if len(others) == 1 else "s are",
            FORMATS,
            ", ".join(others[:3]),
            ", ..." if len(others) > 3 else "",
        )
    if not images:
        nested = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        hint = "; images in its subfolders are not read: put them in it directly" if nested else ""
        raise ImageError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}){hint}")
    if not labelled:
        return images
    # A labelled folder (normal/, anomaly/) with some defects sorted into a subfolder and
    # others not: training and the figures would silently leave out the sorted ones. (A
    # camera's replay folder or photos for `detect` may keep an archive beside them.)
    holding = sorted(
        p.name for p in folder.iterdir() if not p.name.startswith(".") and _holds_images(p)
    )
    if holding:
        raise ImageError(
            f"folder {folder} holds images and subfolders of images ({', '.join(holding[:3])}"
            f"{', ...' if len(holding) > 3 else ''}), which are not read: put their images in "
            "it directly, or move the subfolders out"
        )
    return images


def has_entries(folder: Path) -> bool:
    """True if `folder` exists and holds anything but hidden files (a Mac's .DS_Store, say).

    Optional folders such as anomaly/ are read when this is true, so one that holds files but
    no images is refused by list_images() rather than silently left out.
    """
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


def _holds_images(folder: Path) -> bool:
    try:
        return has_images(folder)
    except OSError:  # lost+found, say: not ours to read, and not a folder of our images
        return False


def has_images(folder: Path) -> bool:
    """True if `folder` exists and holds at least one image file."""
    return folder.is_dir() and any(
        not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        for p in folder.iterdir()
    )


def read_image(
    path: Path, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> np.ndarray:
    """Read an image file as uint8 HxWx3 BGR, or raise ImageError saying what is wrong.

    Grey images come back with three equal channels and alpha is dropped.
    Example: `read_image(Path("data/good/001.png")).shape` -> `(480, 640, 3)`.
    """
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"image {path} is not a file")
        if size > max_bytes:
            raise ImageError(f"image {path} has {size} bytes, more than the limit of {max_bytes}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except OSError as e:
        raise ImageError(f"image {path} cannot be read: {e.strerror or e}") from None
    return decode_image(data, str(path), max_pixels=max_pixels, max_bytes=max_bytes)


def decode_image(
    data: bytes, name: str, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> np.ndarray:
    """Decode the bytes of an image file (an upload, say) with the same checks as read_image.

    `name` is only used in error messages.
    Example: `decode_image(request_body, "upload.jpg")`.
    """
    if len(data) > max_bytes:
        raise ImageError(f"image {name} has {len(data)} bytes, more than the limit of {max_bytes}")
    _check_size(*_check_header(data, name), name, max_pixels)
    try:
        # ANYDEPTH keeps 16-bit data 16-bit so it can be refused rather than silently scaled.
        image = cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
        )
    except cv2.error:
        image = None
    if image is None:
        raise ImageError(_unreadable(name))
    if image.dtype != np.uint8:
        bits = image.dtype.itemsize * 8
        raise ImageError(f"image {name} is {bits}-bit; edge-inspect takes 8-bit images")
    _check_size(image.shape[1], image.shape[0], name, max_pixels)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)


def _unreadable(name: str) -> str:
    return f"image {name} is not a readable image file ({FORMATS})"


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(
            f"image {name} is {width}x{height} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}"
        )
    if width * height > max_pixels:
        raise ImageError(
            f"image {name} is {width}x{height} pixels, more than the limit of {max_pixels}"
        )


def _check_header(data: bytes, name: str) -> tuple[int, int]:
    """Return (width, height) from the file's header, so that a small file that would decode
    to gigabytes (a 450 kB WebP of 16000x16000, say) is refused before it is decoded.

    Other formats OpenCV reads (GIF, HDR, JPEG 2000, PNM ...) are refused: without this check
    a 35-byte GIF took 2.8 GB to be refused after decoding.
    """
    try:
        if data.startswith(_PNG_SIGNATURE):
            return _png_size(data, name)
        if data.startswith(_JPEG_SOI):
            return _jpeg_size(data, name)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data, name)
        if data[:4] in (b"II*\0", b"MM\0*"):
            return _tiff_size(data, name)
        if data[:2] == b"BM":
            return _bmp_size(data, name)
    except struct.error:
        raise ImageError(f"image {name} is truncated (its header is cut short)") from None
    raise ImageError(_unreadable(name))


def _webp_size(data: bytes, name: str) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one
        if len(data) < 30:
            raise struct.error
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, after the 0x2f signature
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key frame's start code
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    raise ImageError(f"image {name} is not a valid WebP file (unknown chunk {chunk!r})")


def _tiff_size(data: bytes, name: str) -> tuple[int, int]:
    """The first page's size (the one OpenCV reads): ImageWidth (256), ImageLength (257)."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    size: dict[int, int] = {}
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG
            size[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, entry + 8)[0]
    if len(size) != 2:
        raise ImageError(f"image {name} is not a valid TIFF file (no image size)")
    return size[256], size[257]


def _bmp_size(data: bytes, name: str) -> tuple[int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # the old OS/2 header: 16-bit sizes
        w, h = struct.unpack_from("<HH", data, 18)
        return w, h
    if header not in (40, 52, 56, 64, 108, 124):
        raise ImageError(_unreadable(name))
    w, h = struct.unpack_from("<ii", data, 18)
    return abs(w), abs(h)  # a negative height is a top-down bitmap


def _png_size(data: bytes, name: str) -> tuple[int, int]:
    if len(data) < 29 or data[12:16] != b"IHDR":
        raise ImageError(f"image {name} is not a valid PNG file (no IHDR header)")
    width, height, depth = struct.unpack(">IIB", data[16:25])
    if depth == 16:
        raise ImageError(f"image {name} is 16-bit; edge-inspect takes 8-bit images")
    if b"IEND" not in data:
        raise ImageError(f"image {name} is truncated (the PNG has no IEND chunk)")
    return width, height


def _jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """The frame size, after walking the file's segments and scans to its end-of-image marker.

    The walk follows the markers from the start, as a decoder does, so neither an EXIF
    thumbnail's end marker (inside a segment) nor what a phone appends after the picture (the
    video of a "motion photo", which holds marker-like bytes of its own) is taken for the end.
    """
    size: tuple[int, int] | None = None
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:  # stray bytes between segments: decoders skip them, and so do we
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xD9:  # end of image
            if size is None:
                break
            return size
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):  # no length
            i += 1 if marker == 0xFF else 2  # a fill byte; a restart; FF 00 (stray) or TEM
            continue
        if i + 4 > n:
            break
        end = i + 2 + struct.unpack_from(">H", data, i + 2)[0]
        if marker in _JPEG_SOF and i + 9 <= n and size is None:
            height, width = struct.unpack_from(">HH", data, i + 5)
            size = (width, height)
        i = end
        if marker == 0xDA:  # a scan: its coded data escapes FF as FF 00 and holds restarts
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    break
                if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7:
                    i += 2
                else:
                    break
            if i < 0:
                break
    if size is None and i + 1 < n:
        raise ImageError(f"image {name} is not a valid JPEG file (no frame header)")
    raise ImageError(f"image {name} is truncated (the JPEG has no end-of-image marker)")


def pixel_hash(image: np.ndarray) -> str:
    """A short hash of an image's pixels: the same picture in any file format hashes alike."""
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()[:16]
