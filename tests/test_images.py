"""Reading image files: the pixel contract, and refusing what the program cannot use."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.images import IMAGE_SUFFIXES, ImageError, decode_image, list_images, read_image


def part_image(height: int = 64, width: int = 80) -> np.ndarray:
    """A grey part with a blue square and a red disc, so colour order shows."""
    image = np.full((height, width, 3), 128, np.uint8)
    cv2.rectangle(image, (4, 4), (24, 24), (255, 0, 0), -1)
    cv2.circle(image, (width - 16, height - 16), 10, (0, 0, 255), -1)
    return image


def textured_image(height: int = 96, width: int = 96) -> np.ndarray:
    """Smooth noise: compresses to a file long enough to truncate at many places."""
    noise = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (7, 7), 0)


def encode(image: np.ndarray, suffix: str, params: tuple[int, ...] = ()) -> bytes:
    ok, data = cv2.imencode(suffix, image, list(params))
    assert ok
    return data.tobytes()


def write(path: Path, image: np.ndarray) -> Path:
    path.write_bytes(encode(image, path.suffix))
    return path


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (absent) pixel data does not have."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with the frame header rewritten to claim another size."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_formats_read_back_exactly_as_bgr(tmp_path: Path, suffix: str) -> None:
    image = part_image()
    read = read_image(write(tmp_path / f"part{suffix}", image))
    assert read.dtype == np.uint8
    assert read.shape == (64, 80, 3)
    assert read.flags.c_contiguous
    np.testing.assert_array_equal(read, image)
    assert tuple(read[10, 10]) == (255, 0, 0)  # blue square: BGR order


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_lossy_formats_read_back_close_as_bgr(tmp_path: Path, suffix: str) -> None:
    image = part_image()
    read = read_image(write(tmp_path / f"part{suffix}", image))
    assert read.dtype == np.uint8
    assert read.shape == (64, 80, 3)
    assert np.abs(read.astype(int) - image).mean() < 4
    blue, green, red = read[12, 12]
    assert blue > 200 and green < 60 and red < 60


def test_format_comes_from_the_bytes_not_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(part_image(), ".png"))
    np.testing.assert_array_equal(read_image(path), part_image())


def test_phone_photos_are_read_the_way_up_the_phone_shows_them(tmp_path: Path) -> None:
    # Phones store a portrait photo as landscape pixels plus an EXIF orientation tag; training
    # on sideways parts and then judging upright ones would fail. Orientation 6: turn 90 deg
    # clockwise to display.
    stored = part_image(60, 100)
    ok, jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", 0)
    exif = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    path = tmp_path / "portrait.jpg"
    path.write_bytes(jpeg.tobytes()[:2] + app1 + jpeg.tobytes()[2:])
    image = read_image(path)
    assert image.shape == (100, 60, 3)
    upright = cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE)
    assert np.abs(image.astype(int) - upright.astype(int)).mean() < 3


def test_non_ascii_paths_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "Prüfteile 検査"
    folder.mkdir()
    path = write(folder / "Teil_ä_日本.png", part_image())
    np.testing.assert_array_equal(read_image(path), part_image())


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif", ".webp"])
def test_grey_images_become_three_equal_channels(tmp_path: Path, suffix: str) -> None:
    grey = np.zeros((48, 48), np.uint8)
    cv2.circle(grey, (24, 24), 12, 200, -1)
    read = read_image(write(tmp_path / f"grey{suffix}", grey))
    assert read.shape == (48, 48, 3)
    np.testing.assert_array_equal(read[..., 0], read[..., 1])
    np.testing.assert_array_equal(read[..., 0], read[..., 2])
    if suffix in (".png", ".bmp", ".tif"):
        np.testing.assert_array_equal(read[..., 0], grey)


def test_alpha_is_dropped(tmp_path: Path) -> None:
    image = part_image()
    alpha = np.full(image.shape[:2], 100, np.uint8)
    read = read_image(write(tmp_path / "alpha.png", np.dstack([image, alpha])))
    np.testing.assert_array_equal(read, image)


def test_grey_with_alpha_becomes_bgr(tmp_path: Path) -> None:
    grey = np.full((40, 40), 90, np.uint8)
    read = read_image(write(tmp_path / "grey_alpha.png", np.dstack([grey, grey, grey, grey])))
    assert read.shape == (40, 40, 3)
    assert (read == 90).all()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_refused(tmp_path: Path, suffix: str) -> None:
    deep = np.full((40, 40, 3), 1000, np.uint16)
    path = write(tmp_path / f"deep{suffix}", deep)
    with pytest.raises(ImageError, match=r"deep\.(png|tif).* is 16-bit; edge-inspect takes 8-bit"):
        read_image(path)


def test_16_bit_grey_png_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "deep_grey.png", np.full((40, 40), 1000, np.uint16))
    with pytest.raises(ImageError, match="is 16-bit"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nothere\.png does not exist"):
        read_image(tmp_path / "nothere.png")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    with pytest.raises(ImageError, match=r"looks_like\.png is not a file"):
        read_image(folder)


@pytest.mark.parametrize(
    "content", [b"", b"hello, this is a text file\n", b"\x00" * 5000, b"BM" + b"\x01" * 200]
)
def test_files_that_are_not_images(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"notes\.png is not a readable image file"):
        read_image(path)


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = encode(textured_image(), ".jpg")
    for cut in (len(data) - 2, len(data) - 1, len(data) * 3 // 4, len(data) // 2):
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=r"cut\d+\.jpg is truncated"):
            read_image(path)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    data = encode(textured_image(), ".png")
    for cut in (len(data) - 12, len(data) * 3 // 4, len(data) // 2, 40):
        path = tmp_path / f"cut{cut}.png"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=r"cut\d+\.png is truncated"):
            read_image(path)


def test_truncated_jpeg_with_a_complete_exif_thumbnail_is_refused() -> None:
    # A thumbnail in APP1 carries its own end-of-image marker early in the file.
    data = encode(textured_image(), ".jpg")
    thumbnail = encode(part_image(), ".jpg")
    body = b"Exif\x00\x00" + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    with_thumbnail = data[:2] + app1 + data[2:]
    assert decode_image(with_thumbnail, "thumb.jpg").shape == (96, 96, 3)
    with pytest.raises(ImageError, match="is truncated"):
        decode_image(with_thumbnail[: len(with_thumbnail) - 100], "thumb.jpg")


def test_jpeg_with_bytes_after_the_end_marker_is_read() -> None:
    # Some cameras append padding or vendor data after the image.
    data = encode(textured_image(), ".jpg") + b"\x00" * 64 + b"vendor trailer"
    assert decode_image(data, "trailer.jpg").shape == (96, 96, 3)


def test_a_motion_photo_is_read_whatever_its_video_holds() -> None:
    # Phones append a video after the picture's end marker; its bytes hold FF DA (a start of
    # scan, to a careless search) with no FF D9 after it.
    picture = encode(textured_image(), ".jpg")
    rng = np.random.default_rng(0)
    for seed in range(6):
        video = bytearray(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
        video[5000 + seed : 5002 + seed] = b"\xff\xda"
        video = video.replace(b"\xff\xd9", b"\xff\x00")
        data = picture + b"\x00\x00\x00\x18ftypmp42" + bytes(video)
        image = decode_image(data, f"motion{seed}.jpg")
        assert np.array_equal(image, decode_image(picture, "still.jpg"))


def test_stray_bytes_between_segments_are_passed_over_as_decoders_do() -> None:
    picture = encode(textured_image(), ".jpg")
    app0 = 4 + int.from_bytes(picture[4:6], "big")  # SOI, then APP0 and its length
    stray = picture[:app0] + b"\xff\x00\x00" + picture[app0:]
    assert np.array_equal(decode_image(stray, "stray.jpg"), decode_image(picture, "p.jpg"))


def test_progressive_jpeg_is_read_and_its_truncation_refused() -> None:
    data = encode(textured_image(), ".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    assert data.count(b"\xff\xda") > 1
    assert decode_image(data, "progressive.jpg").shape == (96, 96, 3)
    with pytest.raises(ImageError, match="is truncated"):
        decode_image(data[: len(data) - 50], "progressive.jpg")


@pytest.mark.parametrize("size", [(31, 40), (40, 31), (8, 8)])
def test_images_smaller_than_32_pixels_are_refused(tmp_path: Path, size: tuple[int, int]) -> None:
    height, width = size
    path = write(tmp_path / "tiny.png", np.zeros((height, width, 3), np.uint8))
    with pytest.raises(
        ImageError, match=rf"tiny\.png is {width}x{height} pixels, smaller than 32x32"
    ):
        read_image(path)


def test_32_by_32_is_large_enough(tmp_path: Path) -> None:
    assert read_image(write(tmp_path / "small.bmp", np.zeros((32, 32, 3), np.uint8))).shape == (
        32,
        32,
        3,
    )


def test_png_size_is_checked_before_decoding() -> None:
    # No pixel data at all: only the header check can produce the size message.
    bomb = png_header_only(100_000, 100_000)
    with pytest.raises(ImageError, match=r"bomb\.png is 100000x100000 pixels, more than the limit"):
        decode_image(bomb, "bomb.png")


def test_jpeg_size_is_checked_before_decoding() -> None:
    bomb = jpeg_with_size(encode(part_image(), ".jpg"), 60_000, 60_000)
    with pytest.raises(ImageError, match=r"bomb\.jpg is 60000x60000 pixels, more than the limit"):
        decode_image(bomb, "bomb.jpg")


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    """The file with only its header's image size changed, its pixels left as they are."""
    b = bytearray(data)
    if data[:4] == b"RIFF" and data[12:16] == b"VP8L":
        old = struct.unpack_from("<I", b, 21)[0] & ~0xFFFFFFF
        struct.pack_into("<I", b, 21, old | (width - 1) | (height - 1) << 14)
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8 ":
        struct.pack_into("<HH", b, 26, width, height)
    elif data[:4] == b"II*\0":
        (ifd,) = struct.unpack_from("<I", b, 4)
        for k in range(struct.unpack_from("<H", b, ifd)[0]):
            tag, kind = struct.unpack_from("<HH", b, ifd + 2 + 12 * k)
            if tag in (256, 257):
                fmt = "<H" if kind == 3 else "<I"
                struct.pack_into(fmt, b, ifd + 10 + 12 * k, width if tag == 256 else height)
    elif data[:2] == b"BM":
        struct.pack_into("<ii", b, 18, width, height)
    return bytes(b)


@pytest.mark.parametrize(
    ("suffix", "params"),
    [
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".tif", []),
        (".bmp", []),
    ],
    ids=["webp-lossy", "webp-lossless", "tiff", "bmp"],
)
def test_other_formats_are_sized_from_their_header_before_decoding(
    suffix: str, params: list[int]
) -> None:
    # A 16000x16000 WebP is a few hundred kB and decodes to 768 MB: more than a Pi can spare.
    _, buf = cv2.imencode(suffix, textured_image(64, 64), params)
    data = buf.tobytes()
    assert decode_image(data, f"part{suffix}").shape == (64, 64, 3)
    bomb = _claim_size(data, 16000, 16000)
    with pytest.raises(ImageError, match=rf"bomb{suffix} is 16000x16000 pixels, more than"):
        decode_image(bomb, f"bomb{suffix}")


def test_extended_webp_is_sized_from_its_header() -> None:
    header = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0"
    bomb = header + (16000 - 1).to_bytes(3, "little") + (9000 - 1).to_bytes(3, "little")
    with pytest.raises(ImageError, match=r"is 16000x9000 pixels, more than"):
        decode_image(bomb + b"\0" * 64, "bomb.webp")


def test_formats_without_a_header_check_are_refused_undecoded() -> None:
    """OpenCV also reads GIF, HDR, PNM and more; a 35-byte GIF of 20000x20000 made the
    station decode 2.8 GB before it was refused. They are refused by their first bytes."""
    gif = b"GIF89a" + (20000).to_bytes(2, "little") * 2 + b"\x00\x00\x00"
    gif += b",\0\0\0\0" + (20000).to_bytes(2, "little") * 2 + b"\x00\x02\x02D\x01\x00;"
    _, pnm = cv2.imencode(".ppm", textured_image(64, 64))
    for name, data in (("bomb.gif", gif), ("part.ppm", pnm.tobytes())):
        with pytest.raises(ImageError, match=rf"^image {name} is not a readable image file \("):
            decode_image(data, name)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp"])
def test_pixel_limit_can_be_lowered(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"part{suffix}", part_image())  # 80 x 64 = 5120 pixels
    assert read_image(path, max_pixels=5120).shape == (64, 80, 3)
    with pytest.raises(ImageError, match="80x64 pixels, more than the limit of 5119"):
        read_image(path, max_pixels=5119)


def test_byte_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "part.bmp", part_image())
    size = path.stat().st_size
    assert read_image(path, max_bytes=size).shape == (64, 80, 3)
    with pytest.raises(ImageError, match=rf"part\.bmp has {size} bytes, more than the limit"):
        read_image(path, max_bytes=size - 1)
    with pytest.raises(ImageError, match=rf"upload has {size} bytes, more than the limit"):
        decode_image(path.read_bytes(), "upload", max_bytes=size - 1)


def test_decode_image_names_the_upload_in_errors() -> None:
    with pytest.raises(ImageError) as refused:
        decode_image(b"GIF89a not really", "camera-7 upload")
    assert str(refused.value) == (
        "image camera-7 upload is not a readable image file (PNG, JPEG, WebP, TIFF or BMP)"
    )
    assert decode_image(encode(part_image(), ".png"), "upload").shape == (64, 80, 3)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.floats(min_value=0.0, max_value=1.0), suffix=st.sampled_from([".png", ".jpg"]))
def test_any_truncation_is_refused(cut: float, suffix: str) -> None:
    data = encode(textured_image(64, 64), suffix)
    # PNG: up to the IEND chunk's type; JPEG: up to the end-of-image marker.
    keep = int(cut * (len(data) - (8 if suffix == ".png" else 1)))
    with pytest.raises(ImageError):
        decode_image(data[:keep], f"cut{suffix}")


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"BM", b"II*\x00", b"RIFF"]),
    body=st.binary(max_size=400),
)
def test_garbage_raises_only_image_error(prefix: bytes, body: bytes) -> None:
    try:
        image = decode_image(prefix + body, "garbage")
    except ImageError:
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_list_images_is_sorted_flat_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.webp", "d.tiff", ".hidden.png", "notes.txt", "e.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "c.webp", "d.tiff", "e.jpeg"]
    # A subfolder of images beside labelled images would be left out of training and the
    # figures: refused there. A camera's replay folder or photos for detect may keep one.
    (tmp_path / "sub" / "nested.png").write_bytes(b"x")
    with pytest.raises(ImageError, match=r"holds images and subfolders of images \(sub\)"):
        list_images(tmp_path, labelled=True)
    assert [p.name for p in list_images(tmp_path)] == names
    # A subfolder it may not read (lost+found at a disk's root) is not ours: passed over.
    (tmp_path / "sub").chmod(0)
    try:
        if os.geteuid() != 0:  # root reads it anyway
            assert [p.name for p in list_images(tmp_path, labelled=True)] == names
    finally:
        (tmp_path / "sub").chmod(0o755)


def test_list_images_covers_every_suffix(tmp_path: Path) -> None:
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        (tmp_path / f"{i}{suffix.upper() if i % 2 else suffix}").write_bytes(b"x")
    assert len(list_images(tmp_path)) == len(IMAGE_SUFFIXES)


def test_list_images_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"folder .*missing does not exist"):
        list_images(tmp_path / "missing")


def test_list_images_of_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "one.png", part_image())
    with pytest.raises(ImageError, match=r"folder .*one\.png is not a folder"):
        list_images(path)


def test_list_images_of_a_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no pictures here")
    (tmp_path / ".secret.png").write_bytes(b"x")
    with pytest.raises(ImageError, match=r"holds no images \(\.png, \.jpg, \.jpeg, .*\.webp\)"):
        list_images(tmp_path)


def test_listed_images_read_back(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / f"{i:02d}.png", part_image())
    images = [read_image(p) for p in list_images(tmp_path)]
    assert len(images) == 3
    assert all(image.shape == (64, 80, 3) for image in images)
