"""Where frames come from (folder or video replay, OpenCV capture, the Pi camera); newest wins."""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from edge.config import FolderSource, OpenCVSource, Picamera2Source, SourceConfig
from edge.images import ImageError, list_images, read_image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


@dataclass(frozen=True)
class Frame:
    """One camera frame, the program's single pixel contract.

    `image` is uint8 HxWx3 BGR, C-contiguous and owned (never a view into a camera buffer).
    `seq` counts every frame the source produced since open(), from 1: a gap is a dropped frame.
    `captured` is time.monotonic() at the start of exposure; `wall` is time.time() then.
    """

    image: np.ndarray
    seq: int
    captured: float
    wall: float


class SourceError(RuntimeError):
    """A source that gives no usable frame; the message names the source and the reason."""


class SourceEnded(SourceError):
    """A replay that does not loop has handed out its last frame."""


class SourceTimeout(SourceError):
    """No frame came within the time asked for (the camera may only be slow, or waiting for
    a part: one triggered by hardware)."""


class FrameSource(Protocol):
    """A camera, or something that behaves like one: it runs on its own and newest frame wins.

    >>> source = open_source(cfg.source)  # doctest: +SKIP
    >>> source.open(); frame = source.read(); source.close()  # doctest: +SKIP
    """

    name: str
    """What to call it in messages, e.g. "folder demo/data/test", "opencv 0", "picamera2 0"."""
    dropped: int
    """Frames produced but never handed out because the caller was slower than the camera (or
    held back on purpose, by rate_hz). Frames passed over by a read(after=...) are not
    counted: nobody asked for them."""

    def open(self) -> None:
        """Start the camera; raise SourceError saying why it cannot start."""

    def read(self, after: float | None = None, timeout_s: float = 2.0) -> Frame:
        """Return the newest frame not handed out yet, waiting for the next one if need be.

        after (a time.monotonic()): a frame whose exposure started at or after it, for a
        trigger (when it arrived). Raises SourceError when no frame comes within timeout_s or
        the frame is garbage.
        """

    def newest_at(self) -> float | None:
        """time.monotonic() of the newest frame the camera has made, handed out or not; None
        when the source cannot tell (it makes frames only as they are read)."""

    def close(self) -> None:
        """Stop the camera and let go of it; closing twice is harmless."""


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build (not open) the source a config section describes.

    Example: `open_source(FolderSource(kind="folder", path=Path("demo/data/test/normal")))`.
    """
    if isinstance(cfg, FolderSource):
        return FolderReplay(cfg)
    if isinstance(cfg, OpenCVSource):
        return OpenCVCamera(cfg)
    return PiCamera(cfg)


def check_frame(image: object, source: str) -> np.ndarray:
    """Return image as C-contiguous uint8 HxWx3 BGR: a grey (HxW, HxWx1) or BGRA frame is
    converted, as the same picture saved to a file would be when read; SourceError otherwise."""
    if not isinstance(image, np.ndarray):
        raise SourceError(f"{source} gave {type(image).__name__} instead of an image")
    channels = image.shape[2] if image.ndim == 3 else 1
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise SourceError(
            f"{source} gave a {image.dtype} frame of shape {image.shape}, not 8-bit grey, BGR "
            "or BGRA"
        )
    if image.size == 0:
        raise SourceError(f"{source} gave an empty frame")
    if channels == 1:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)


def _wall(captured: float) -> float:
    return time.time() - (time.monotonic() - captured)


class FolderReplay:
    """A folder of images (name order) or a video file, replayed as a camera running at `fps`.

    Frame k (from 0) is exposed at open() + k/fps, so a slow caller skips frames as it would
    with a real camera. Only the frame handed out is decoded: a large folder costs no memory.
    """

    def __init__(self, cfg: FolderSource) -> None:
        self.cfg = cfg
        self._is_video = cfg.path.suffix.lower() in VIDEO_SUFFIXES
        self.name = f"{'video' if self._is_video else 'folder'} {cfg.path}"
        self.dropped = 0
        self._period = 1.0 / cfg.fps
        self._images: list[Path] = []
        self._video: Any = None  # cv2.VideoCapture
        self._video_pos = 0  # the frame the video capture returns next
        self._count = 0  # frames in the folder or video
        self._t0: float | None = None
        self._next = 0  # the first frame number neither handed out nor skipped

    def open(self) -> None:
        """Start the replay; a reopen goes on from where it was, as a camera would (a few
        unreadable images in a row must not send it back to the first one for ever)."""
        resume = self._next
        self.close()
        path = self.cfg.path
        if self._is_video:
            if not path.is_file():
                raise SourceError(f"video file {path} does not exist")
            video = cv2.VideoCapture(str(path))
            if not video.isOpened():
                video.release()
                raise SourceError(f"video file {path} cannot be read by OpenCV")
            # The container's frame count can be missing or wrong; _load learns the truth.
            count = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
            self._video, self._video_pos = video, 0
            self._count = count if count > 0 else sys.maxsize
        else:
            try:
                self._images = list_images(path)
            except ImageError as exc:
                raise SourceError(str(exc)) from None
            except OSError as exc:  # no permission, or out of file descriptors
                raise SourceError(f"folder {path} cannot be listed: {exc.strerror}") from None
            self._count = len(self._images)
        if self._is_video:
            resume = 0  # reaching the frame again would mean decoding every one before it
        elif self.cfg.loop:
            resume %= max(1, self._count)
        self._t0, self._next = time.monotonic() - resume * self._period, resume
        logger.info("%s: replaying at %g frames/s", self.name, self.cfg.fps)

    def read(self, after: float | None = None, timeout_s: float = 2.0) -> Frame:
        if self._t0 is None:
            raise SourceError(f"{self.name} is not open")
        fresh = after is not None
        due = int((time.monotonic() - self._t0) / self._period)  # the newest exposed by now
        if after is not None:  # the first frame exposed at or after `after`
            due = max(0, -int((self._t0 - after) // self._period))
        first = self._next
        image = None
        while image is None:
            k = max(first, due)
            if not self.cfg.loop and k >= self._count:
                if fresh or first >= self._count:
                    raise SourceEnded(f"{self.name} has no more frames")
                k = self._count - 1  # the last frame is the newest one: hand it out
            exposed = self._t0 + k * self._period
            wait = exposed - time.monotonic()
            if wait > timeout_s:
                time.sleep(timeout_s)
                raise SourceTimeout(f"{self.name} gave no frame within {timeout_s:g} s")
            if wait > 0:
                time.sleep(wait)
            try:
                image = self._load(k % self._count)  # None: the video was shorter than it said
            except ImageError as exc:
                self._skip_to(k, first, fresh)
                raise SourceError(str(exc)) from None
        self._skip_to(k, first, fresh)
        return Frame(check_frame(image, self.name), k + 1, exposed, _wall(exposed))

    def newest_at(self) -> float | None:
        """A replay is a camera that never stops: its newest frame is the last one due."""
        if self._t0 is None:
            return None
        return self._t0 + int((time.monotonic() - self._t0) / self._period) * self._period

    def _skip_to(self, k: int, first: int, fresh: bool) -> None:
        """Frame k is taken: frames first..k-1 were skipped (dropped, unless fresh)."""
        if not fresh:
            self.dropped += k - first
        self._next = k + 1

    def _load(self, i: int) -> np.ndarray | None:
        if not self._is_video:
            return read_image(self._images[i])
        video = self._video
        if i < self._video_pos:  # looped round: start the video again
            video.open(str(self.cfg.path))
            self._video_pos = 0
        while self._video_pos < i:  # grab() skips a frame without converting it
            if not video.grab():
                self._video_ended()
                return None
            self._video_pos += 1
        ok, image = video.read()
        if not ok:
            self._video_ended()
            return None
        self._video_pos += 1
        return image  # type: ignore[no-any-return]

    def _video_ended(self) -> None:
        if self._video_pos == 0:
            raise SourceError(f"{self.name} holds no frames OpenCV can read")
        self._count = self._video_pos

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None
        self._t0 = None


_BACKENDS = {
    "any": cv2.CAP_ANY,
    "v4l2": cv2.CAP_V4L2,
    "gstreamer": cv2.CAP_GSTREAMER,
    "ffmpeg": cv2.CAP_FFMPEG,
}
_MAX_FAILURES = 10  # consecutive failed reads before the camera counts as gone
_RETRY_S = 0.05
_SLOW_RETRY_S = 0.5  # between reads once it counts as gone
_JOIN_S = 5.0
OPEN_TIMEOUT_S = 10.0  # for network URLs through FFmpeg, which honours them
READ_TIMEOUT_S = 5.0


class _Grabbed(NamedTuple):
    image: np.ndarray
    seq: int
    started: float  # monotonic time the read() that returned it began
    captured: float
    wall: float


class OpenCVCamera:
    """A USB/V4L2 camera, a network stream or a GStreamer pipeline, read through OpenCV.

    A reader thread drains the capture continuously and keeps only the newest frame, so the
    driver's buffers never go stale. OpenCV gives no exposure time that holds across backends:
    `captured` is when the frame reached us, and read(after=t) takes a frame read by a
    grab that began at or after t (its exposure may have started up to a frame earlier).
    """

    def __init__(self, cfg: OpenCVSource) -> None:
        self.cfg = cfg
        self.name = f"opencv {cfg.device}"
        self.dropped = 0
        self._capture: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: _Grabbed | None = None
        self._error: str | None = None
        self._handed = 0  # seq of the last frame handed out

    def open(self) -> None:
        self.close()
        device = self.cfg.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)  # "0" in a config means the first camera, not a file named 0
        backend = _BACKENDS[self.cfg.backend]
        if backend != cv2.CAP_ANY and not cv2.videoio_registry.hasBackend(backend):
            hint = (
                " (the PyPI opencv-python-headless wheels have none: on a Jetson, make the venv "
                "with --system-site-packages and remove opencv-python-headless from it, so that "
                "the system's python3-opencv is used)"
                if backend == cv2.CAP_GSTREAMER
                else ""
            )
            raise SourceError(f"{self.name}: this OpenCV has no {self.cfg.backend} backend{hint}")
        # A network camera that accepts the connection and then says nothing would block the
        # loop, and so the watchdog, for 30 s or more: bound the open and each read. Only for
        # a URL: FFmpeg takes these, but V4L2 (every USB camera) refuses to open with them.
        timeouts: list[int] = []
        if isinstance(device, str) and "://" in device and backend in (cv2.CAP_ANY, cv2.CAP_FFMPEG):
            timeouts = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(OPEN_TIMEOUT_S * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(READ_TIMEOUT_S * 1000),
            ]
        capture = cv2.VideoCapture(device, backend, timeouts)
        if not capture.isOpened():
            capture.release()
            raise SourceError(
                f"{self.name} cannot be opened with OpenCV's {self.cfg.backend} backend"
            )
        for prop, label, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, "width", self.cfg.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, "height", self.cfg.height),
            (cv2.CAP_PROP_FPS, "fps", self.cfg.fps),
        ):
            if value is not None and not capture.set(prop, value):
                logger.warning("%s: the camera did not accept %s=%s", self.name, label, value)
        self._capture, self._latest, self._error = capture, None, None
        self._handed = 0  # `dropped` goes on counting across reopens
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(capture, self._stop),
            name=f"edge-source {self.name}",
            daemon=True,
        )
        self._thread.start()
        logger.info("%s: open", self.name)

    def _run(self, capture: Any, stop: threading.Event) -> None:
        seq = failures = 0
        reason = "the capture returned no frame"
        while not stop.is_set():
            started = time.monotonic()
            try:
                ok, image = capture.read()
            except cv2.error as exc:
                ok, image, reason = False, None, f"OpenCV failed: {exc}"
            if not ok or image is None:
                failures += 1
                if failures >= _MAX_FAILURES:
                    # Said, and tried again more slowly: a glitch of a USB camera or a network
                    # stream passes, and its frames are taken as soon as they come back.
                    with self._cond:
                        if stop.is_set():  # a capture already replaced must not speak
                            return
                        self._error = (
                            f"{self.name} gave no frame in {failures} tries ({reason}; "
                            "camera unplugged or stream ended?)"
                        )
                        self._cond.notify_all()
                stop.wait(_RETRY_S if failures < _MAX_FAILURES else _SLOW_RETRY_S)
                continue
            failures, seq = 0, seq + 1
            grabbed = _Grabbed(image, seq, started, time.monotonic(), time.time())
            with self._cond:
                if stop.is_set():
                    return
                self._latest, self._error = grabbed, None
                self._cond.notify_all()

    def read(self, after: float | None = None, timeout_s: float = 2.0) -> Frame:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                latest = self._latest
                if (
                    latest is not None
                    and latest.seq > self._handed
                    and (after is None or latest.started >= after)
                ):
                    break
                if self._error is not None:
                    raise SourceError(self._error)
                if self._thread is None:
                    raise SourceError(f"{self.name} is not open")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SourceTimeout(f"{self.name} gave no frame within {timeout_s:g} s")
                self._cond.wait(left)
            if after is None:
                self.dropped += latest.seq - self._handed - 1
            self._handed = latest.seq
        image = check_frame(latest.image, self.name)
        return Frame(image, latest.seq, latest.captured, latest.wall)

    def newest_at(self) -> float | None:
        with self._cond:
            return self._latest.captured if self._latest is not None else None

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_JOIN_S)
            if thread.is_alive():
                # Releasing a capture another thread is reading from can crash OpenCV.
                logger.warning("%s: the reader is stuck in the capture; leaving it", self.name)
                self._capture = None
                return
        if self._capture is not None:
            self._capture.release()
            self._capture = None
            logger.info("%s: closed", self.name)


def camera_controls(cfg: Picamera2Source) -> dict[str, Any]:
    """The libcamera controls that fix exposure, gain, white balance and focus, as configured.

    Example: `camera_controls(cfg)` -> `{"AeEnable": False, "ExposureTime": 8000, ...}`.
    """
    controls: dict[str, Any] = {}
    if cfg.exposure_us is not None:
        controls |= {"AeEnable": False, "ExposureTime": cfg.exposure_us}
    if cfg.analogue_gain is not None:
        controls["AnalogueGain"] = cfg.analogue_gain
    if cfg.colour_gains is not None:
        controls |= {"AwbEnable": False, "ColourGains": tuple(cfg.colour_gains)}
    if cfg.lens_position is not None:
        # 0 is libcamera's controls.AfModeEnum.Manual; the int spares us importing libcamera.
        controls |= {"AfMode": 0, "LensPosition": cfg.lens_position}
    return controls


def _owns_memory(image: np.ndarray) -> bool:
    base = image
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base.base is None


class PiCamera:
    """A Raspberry Pi camera through picamera2 (installed from the OS, so imported in open())."""

    def __init__(self, cfg: Picamera2Source) -> None:
        self.cfg = cfg
        self.name = f"picamera2 {cfg.camera_num}"
        self.dropped = 0
        self._camera: Any = None
        self._seq = 0
        self._last_start_ns: int | None = None
        self._last_sensor_ns: int | None = None

    def open(self) -> None:
        self.close()
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise SourceError(
                f"{self.name} needs picamera2 ({exc}): apt install python3-picamera2 and "
                "make the venv with --system-site-packages"
            ) from None
        camera = None
        try:
            camera = Picamera2(self.cfg.camera_num)
            # picamera2's "RGB888" is BGR in memory, which is our contract: no conversion.
            # Four buffers keep the pipeline running without exhausting CMA memory.
            config = camera.create_video_configuration(
                main={"size": (self.cfg.width, self.cfg.height), "format": "RGB888"},
                buffer_count=4,
            )
            camera.configure(config)
            controls = camera_controls(self.cfg)
            if controls:
                camera.set_controls(controls)
            camera.start()
        except Exception as exc:
            if camera is not None:
                camera.close()
            raise SourceError(f"{self.name} cannot be started: {exc}") from exc
        self._camera, self._seq = camera, 0
        self._last_start_ns = self._last_sensor_ns = None
        logger.info("%s: open at %dx%d", self.name, self.cfg.width, self.cfg.height)

    def read(self, after: float | None = None, timeout_s: float = 2.0) -> Frame:
        camera = self._camera
        if camera is None:
            raise SourceError(f"{self.name} is not open")
        # picamera2 keeps the newest completed frame; flush (a time.monotonic_ns()) makes it
        # wait for one whose exposure started at or after it, so we never get the same frame
        # twice, and a trigger gets a frame exposed after it came.
        fresh = after is not None
        flush: int | None = None
        if self._last_start_ns is not None:
            flush = self._last_start_ns + 1
        if after is not None:
            flush = max(flush or 0, int(after * 1e9))
        try:
            with camera.captured_request(wait=timeout_s, flush=flush) as request:
                image = request.make_array("main")
                metadata = request.get_metadata()
        except (TimeoutError, FutureTimeoutError):
            camera.cancel_all_and_flush()  # or the abandoned job would take a buffer later
            raise SourceTimeout(f"{self.name} gave no frame within {timeout_s:g} s") from None
        except Exception as exc:
            raise SourceError(f"{self.name} failed to capture: {exc}") from exc
        image = check_frame(image, self.name)
        # make_array already copies out of the camera's buffer; copy only if a version did not.
        if not _owns_memory(image):
            image = image.copy()
        sensor_ns = metadata.get("SensorTimestamp")
        if not isinstance(sensor_ns, int):
            raise SourceError(f"{self.name} gave a frame without a SensorTimestamp")
        # SensorTimestamp is when the first row was read out; picamera2's own flush test
        # subtracts the exposure time to get the start of exposure, and so do we.
        start_ns = sensor_ns - 1000 * int(metadata.get("ExposureTime", 0))
        skipped = 0
        frame_us = metadata.get("FrameDuration")
        if self._last_sensor_ns is not None and frame_us:
            skipped = max(0, round((sensor_ns - self._last_sensor_ns) / (frame_us * 1000)) - 1)
        self._seq += 1 + skipped
        if not fresh:
            self.dropped += skipped
        self._last_start_ns, self._last_sensor_ns = start_ns, sensor_ns
        return Frame(image, self._seq, start_ns / 1e9, _wall(start_ns / 1e9))

    def newest_at(self) -> float | None:
        return None  # picamera2 is asked for each frame; what it made meanwhile is not known

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        try:
            camera.stop()
            camera.close()
        except Exception as exc:
            logger.warning("%s: closing failed: %s", self.name, exc)
        logger.info("%s: closed", self.name)
