"""Stand-in for the Pi camera, which cannot be here; it mimics only the calls edge.sources makes.

Install it with `monkeypatch.setitem(sys.modules, "picamera2", fake_picamera2)`. The camera
runs on its own clock from start(): frame k starts exposing at start + k * frame_ns and is read
out `ExposureTime` later, which is its SensorTimestamp (time.monotonic_ns(), as on the Pi).
Like picamera2, a request without flush is the newest completed frame not yet taken, and
flush (True: now, or a time in ns) waits for a frame whose exposure started at or after it.
Every call the station makes is recorded so that tests can check what reached the camera.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, ClassVar

import numpy as np

BLUE_BGR = (255, 0, 0)


class Request:
    """A completed request: one frame and its metadata."""

    def __init__(self, camera: Picamera2, k: int) -> None:
        self.camera = camera
        self.k = k

    def make_array(self, name: str) -> np.ndarray:
        assert name == "main"
        # Like picamera2's make_buffer, hand out a copy, never the camera's own buffer.
        return self.camera.buffer.copy()

    def get_metadata(self) -> dict[str, Any]:
        cam = self.camera
        start = cam.started_ns + self.k * cam.frame_ns
        return {
            "SensorTimestamp": start + cam.exposure_us * 1000,
            "ExposureTime": cam.exposure_us,
            "FrameDuration": cam.frame_ns // 1000,
        }


class Picamera2:
    """The camera: `instances` holds every one made, newest last."""

    instances: ClassVar[list[Picamera2]] = []
    cameras = 1  # how many cameras are "attached"

    def __init__(self, camera_num: int = 0) -> None:
        if camera_num >= self.cameras:
            raise IndexError("list index out of range")  # what picamera2 says with no camera
        Picamera2.instances.append(self)
        self.camera_num = camera_num
        self.configured: dict[str, Any] | None = None
        self.controls: list[dict[str, Any]] = []
        self.flushes: list[object] = []
        self.entered = self.exited = self.cancelled = 0
        self.started = self.closed = False
        self.stalled = False  # True: no frame ever comes (cable pulled)
        self.frame_ns = 10_000_000  # 100 frames/s
        self.exposure_us = 5000
        self.buffer = np.zeros((1, 1, 3), np.uint8)
        self.started_ns = 0
        self._taken = -1  # the last frame number handed out

    def create_video_configuration(
        self,
        main: dict[str, Any] | None = None,
        buffer_count: int = 6,
        controls: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {"main": dict(main or {}), "buffer_count": buffer_count, "controls": controls or {}}

    def configure(self, config: dict[str, Any]) -> None:
        self.configured = config
        width, height = config["main"]["size"]
        assert config["main"]["format"] == "RGB888"  # BGR in memory, as on the Pi
        self.buffer = np.empty((height, width, 3), np.uint8)
        self.buffer[:] = BLUE_BGR

    def set_controls(self, controls: dict[str, Any]) -> None:
        self.controls.append(dict(controls))
        if "ExposureTime" in controls:
            self.exposure_us = controls["ExposureTime"]

    def start(self) -> None:
        assert self.configured is not None, "start() before configure()"
        self.started, self.started_ns = True, time.monotonic_ns()

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True

    def cancel_all_and_flush(self) -> None:
        self.cancelled += 1

    @contextlib.contextmanager
    def captured_request(
        self, wait: float | None = None, flush: bool | int | None = None
    ) -> Iterator[Request]:
        self.flushes.append(flush)
        self.entered += 1
        try:
            assert self.started, "captured_request() on a camera that is not running"
            if self.stalled:
                time.sleep(wait or 0)
                raise FutureTimeoutError()
            now = time.monotonic_ns()
            exposure_ns = self.exposure_us * 1000
            newest = (now - self.started_ns - exposure_ns) // self.frame_ns  # read out by now
            k = max(newest, self._taken + 1)
            if flush:
                after = now if flush is True else int(flush)
                k = max(k, -(-(after - self.started_ns) // self.frame_ns))
            ready_ns = self.started_ns + k * self.frame_ns + exposure_ns
            time.sleep(max(0, ready_ns - time.monotonic_ns()) / 1e9)
            self._taken = k
            yield Request(self, k)
        finally:
            self.exited += 1
