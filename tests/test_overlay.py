"""Overlay pictures: heatmap only where it matters, boxes in red, a strip with the verdict."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from edge.detection import Box, Detection
from edge.overlay import draw_overlay

HEIGHT, WIDTH = 240, 320
ROI = (40, 30, 240, 180)


def part_image() -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), 150, np.uint8)
    cv2.rectangle(image, (60, 50), (260, 190), (80, 90, 100), -1)
    return image


def detection(anomaly_map: np.ndarray, boxes: list[Box] | None = None) -> Detection:
    score = float(anomaly_map.max())
    return Detection(
        score=score,
        threshold=1.0,
        anomaly_map=anomaly_map.astype(np.float32),
        roi=ROI,
        area=float((anomaly_map > 1.0).mean()),
        boxes=boxes or [],
    )


def hot_corner_map() -> np.ndarray:
    """A 12x16 map at 0.2 of the threshold with a 3x3 patch at 3x in its top-left corner."""
    anomaly_map = np.full((12, 16), 0.2, np.float32)
    anomaly_map[1:4, 1:4] = 3.0
    return anomaly_map


def split(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    strip_height = picture.shape[0] - HEIGHT
    return picture[:strip_height], picture[strip_height:]


def test_shape_type_and_input_untouched() -> None:
    image = part_image()
    before = image.copy()
    picture = draw_overlay(image, detection(hot_corner_map()))
    assert picture.dtype == np.uint8
    assert picture.shape[1:] == (WIDTH, 3)
    assert picture.shape[0] > HEIGHT
    np.testing.assert_array_equal(image, before)


def test_deterministic() -> None:
    det = detection(hot_corner_map(), [Box(50, 40, 50, 40, 3.0)])
    np.testing.assert_array_equal(draw_overlay(part_image(), det), draw_overlay(part_image(), det))


def test_good_areas_stay_untouched() -> None:
    _, body = split(draw_overlay(part_image(), detection(np.full((12, 16), 0.45, np.float32))))
    x, y, w, h = ROI
    inside = (slice(y + 3, y + h - 3), slice(x + 3, x + w - 3))
    np.testing.assert_array_equal(body[inside], part_image()[inside])
    outside = (slice(0, y - 2), slice(None))
    np.testing.assert_array_equal(body[outside], part_image()[outside])


@pytest.mark.parametrize("threshold", [1.0, 0.0, -0.26])
def test_hot_areas_are_red_and_cold_areas_untouched(threshold: float) -> None:
    # The same map relative to the threshold, which labelled defects can set at or below 0
    # (scores are standardised distances).
    det = replace(detection(hot_corner_map() - 1.0 + threshold), threshold=threshold)
    _, body = split(draw_overlay(part_image(), det))
    x, y, w, h = ROI
    # Patch (1..3, 1..3) of a 16x12 map over a 240x180 ROI covers ROI pixels 15..60.
    blue, green, red = body[y + 37, x + 37].astype(int)
    assert red > blue + 60 and red > green + 40
    far = (slice(y + 120, y + h - 3), slice(x + 120, x + w - 3))
    np.testing.assert_array_equal(body[far], part_image()[far])


def test_colour_scale_is_fixed_relative_to_the_threshold() -> None:
    # The same map in other units (threshold and map both x10) gives the same picture.
    det = detection(hot_corner_map())
    scaled = Detection(
        score=det.score * 10,
        threshold=det.threshold * 10,
        anomaly_map=det.anomaly_map * 10,
        roi=det.roi,
        area=det.area,
    )
    _, body = split(draw_overlay(part_image(), det))
    _, body_scaled = split(draw_overlay(part_image(), scaled))
    # Equal up to float rounding in the interpolation.
    assert np.abs(body.astype(int) - body_scaled).max() <= 1


def test_hotter_than_twice_the_threshold_looks_the_same() -> None:
    hot = hot_corner_map()
    hotter = hot.copy()
    hotter[1:4, 1:4] = 30.0
    x, y = ROI[:2]
    centre = (y + 37, x + 37)
    _, body = split(draw_overlay(part_image(), detection(hot)))
    _, body_hotter = split(draw_overlay(part_image(), detection(hotter)))
    np.testing.assert_array_equal(body[centre], body_hotter[centre])


def test_boxes_are_red() -> None:
    box = Box(x=100, y=80, w=60, h=50, score=3.0)
    _, body = split(draw_overlay(part_image(), detection(np.zeros((12, 16)), [box])))
    for point in [(box.y, box.x + 30), (box.y + box.h - 1, box.x + 30), (box.y + 25, box.x)]:
        assert tuple(body[point]) == (0, 0, 255)
    assert tuple(body[box.y + 25, box.x + 30]) == tuple(part_image()[box.y + 25, box.x + 30])


def test_roi_is_outlined() -> None:
    _, body = split(draw_overlay(part_image(), detection(np.zeros((12, 16)))))
    x, y, w, h = ROI
    assert tuple(body[y, x + w // 2]) == (255, 255, 255)
    assert tuple(body[y + h - 1, x + w // 2]) == (255, 255, 255)
    assert tuple(body[y + h // 2, x]) == (255, 255, 255)
    assert tuple(body[y + h // 2, x + w - 1]) == (255, 255, 255)


def test_strip_colour_says_ok_or_ng() -> None:
    ok_strip, _ = split(draw_overlay(part_image(), detection(np.full((12, 16), 0.5))))
    ng_strip, _ = split(draw_overlay(part_image(), detection(hot_corner_map())))
    ok_b, ok_g, ok_r = ok_strip[1, -2].astype(int)
    ng_b, ng_g, ng_r = ng_strip[1, -2].astype(int)
    assert ok_g > ok_r and ok_g > ok_b
    assert ng_r > ng_g and ng_r > ng_b
    # The text is there: white pixels in the strip.
    assert (ok_strip == 255).all(axis=2).any()
    assert (ng_strip == 255).all(axis=2).any()


def test_full_image_roi_and_odd_sizes() -> None:
    image = np.full((37, 53, 3), 100, np.uint8)
    det = Detection(
        score=2.0,
        threshold=1.0,
        anomaly_map=np.full((3, 5), 2.0, np.float32),
        roi=(0, 0, 53, 37),
        area=1.0,
    )
    picture = draw_overlay(image, det)
    assert picture.shape[1:] == (53, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((HEIGHT, WIDTH), np.uint8), "uint8 HxWx3"),
        (np.zeros((HEIGHT, WIDTH, 3), np.float32), "uint8 HxWx3"),
        (np.zeros((HEIGHT, WIDTH, 4), np.uint8), "uint8 HxWx3"),
        (
            np.zeros((100, 100, 3), np.uint8),
            r"region of interest \(40, 30, 240, 180\) is not inside",
        ),
    ],
)
def test_refuses_what_it_cannot_draw(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw_overlay(image, detection(hot_corner_map()))


def test_refuses_a_threshold_that_is_not_finite() -> None:
    det = Detection(score=0.0, threshold=np.nan, anomaly_map=np.zeros((4, 4)), roi=ROI, area=0.0)
    with pytest.raises(ValueError, match="finite threshold"):
        draw_overlay(part_image(), det)


def test_live_preview_is_the_overlay_shrunk_with_its_boxes_in_place() -> None:
    from edge.overlay import draw_preview

    image = part_image()
    box = Box(x=300, y=220, w=20, h=20, score=3.0)  # in the image's bottom-right corner
    det = detection(hot_corner_map(), [box])
    assert draw_preview(image, det, 640).shape == draw_overlay(image, det).shape  # no upscaling
    small = draw_preview(image, det, 160)
    strip = small.shape[0] - HEIGHT // 2
    assert small.shape[1] == WIDTH // 2 and strip > 0
    picture = small[strip:]
    # The box is drawn in red at half size, still inside the picture's corner.
    corner = picture[105:120, 145:160]
    red = (corner[..., 2] > 150) & (corner[..., 0] < 80) & (corner[..., 1] < 80)
    assert red.any()
    # A box reaching the image's edge still fits after rounding.
    edge = Box(x=0, y=0, w=WIDTH, h=HEIGHT, score=3.0)
    assert draw_preview(image, detection(hot_corner_map(), [edge]), 97).shape[1] == 97
