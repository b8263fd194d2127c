"""Training a candidate model on the station, from its own dataset, while it keeps inspecting.

The work runs in a child process (`python -m edge.trainjob`) at a lower CPU priority, with one
thread: a crash or the memory of training cannot touch the inspection loop, and the loop keeps
its core. The child trains on dataset/train with the running model's size, region and
augmentation, then evaluates the new model and the running one on dataset/test, and writes
everything into a fresh folder that the parent renames into place as <workdir>/candidate only
when it is complete. It reports progress as JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NICE = 10
CANDIDATE = "candidate"
MODEL_FILE = "model.onnx"
SUMMARY_FILE = "summary.json"


class TrainerError(RuntimeError):
    """Training cannot start; the message says why."""


class TrainerBusy(TrainerError):
    """A training run is already going."""


class Trainer:
    """Starts, follows and cancels one training child at a time; keeps the last candidate.

    >>> trainer = Trainer(state_dir / "dataset", state_dir / "training")    # doctest: +SKIP
    >>> trainer.start(Path("/var/lib/edge-inspect/models/current.onnx"))     # doctest: +SKIP
    >>> trainer.state()["state"]                                             # doctest: +SKIP
    'running'
    """

    def __init__(self, dataset: Path, workdir: Path) -> None:
        self.dataset = dataset
        self.workdir = workdir
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._follower: threading.Thread | None = None
        self._state: dict[str, Any] = {"state": "idle"}
        self._clear_unfinished()

    def _clear_unfinished(self) -> None:
        """A station killed while training (power cut, SIGKILL) leaves its run folder: remove
        it, and say on the page that the run did not finish."""
        if not self.workdir.is_dir():
            return
        left = [p for p in self.workdir.iterdir() if p.name.startswith((".run-", ".gone-"))]
        for folder in left:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                log.warning("cannot remove %s, left by an earlier training", folder)
        if any(p.name.startswith(".run-") and not p.exists() for p in left):
            why = "the last training did not finish: the station stopped during it"
            log.warning("%s", why)
            self._state = {"state": "idle", "error": why}

    @property
    def candidate_dir(self) -> Path:
        return self.workdir / CANDIDATE

    @property
    def candidate_model(self) -> Path | None:
        path = self.candidate_dir / MODEL_FILE
        return path if path.is_file() else None

    def summary(self) -> dict[str, Any] | None:
        """What the last finished run wrote: model facts and both evaluations; None if none."""
        try:
            doc: dict[str, Any] = json.loads((self.candidate_dir / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return doc

    def state(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def start(self, running_model: Path) -> None:
        """Start training; raises TrainerBusy if a run is going."""
        with self._lock:
            if self._proc is not None:
                raise TrainerBusy("a model is being trained already")
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainerError(
                    f"training folder {self.workdir} cannot be made: {exc.strerror or exc}"
                ) from None
            out = self.workdir / f".run-{os.getpid()}-{time.monotonic_ns()}"
            cmd = [sys.executable, "-m", "edge.trainjob", str(self.dataset), str(out)]
            cmd += ["--running", str(running_model)]
            self._proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one pipe: a chatty child cannot fill a second one
                stdin=subprocess.DEVNULL,
                text=True,
            )
            self._state = {
                "state": "running",
                "stage": "starting",
                "done": 0,
                "total": 0,
                "started": time.time(),
                "seconds_left": None,
            }
            proc = self._proc
            self._follower = threading.Thread(target=self._follow, args=(proc, out), daemon=True)
            self._follower.start()

    def cancel(self) -> bool:
        """Stop a running training; True if one was running."""
        with self._lock:
            if self._proc is None:
                return False
            self._proc.terminate()
            self._state["cancelled"] = True
            return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel a running training and wait until its run folder is gone (the station is
        stopping: a daemon thread would not live to clean up)."""
        self.cancel()
        follower = self._follower
        if follower is not None:
            follower.join(timeout_s)

    def discard(self) -> bool:
        """Delete the candidate; True if there was one."""
        with self._lock:
            if not self.candidate_dir.exists():
                return False
            _remove(self.candidate_dir)
            if self._state.get("state") == "done":
                self._state = {"state": "idle"}
            return True

    def _follow(self, proc: subprocess.Popen[str], out: Path) -> None:
        assert proc.stdout is not None
        stage_start = time.monotonic()
        said: deque[str] = deque(maxlen=20)  # the child's last words, for a failure
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                said.append(line.strip())
                continue
            if not isinstance(msg, dict):
                continue
            with self._lock:
                if msg.get("stage") != self._state.get("stage"):
                    stage_start = time.monotonic()
                done, total = int(msg.get("done", 0)), int(msg.get("total", 0))
                spent = time.monotonic() - stage_start
                self._state.update(
                    stage=msg.get("stage", ""),
                    done=done,
                    total=total,
                    seconds_left=round(spent / done * (total - done), 1) if done else None,
                )
        code = proc.wait()
        with self._lock:
            cancelled = self._state.get("cancelled", False)
            finished = {"started": self._state.get("started"), "ended": time.time()}
            if code == 0 and not cancelled:
                try:
                    if self.candidate_dir.exists():
                        _remove(self.candidate_dir)
                    out.rename(self.candidate_dir)
                    self._state = {"state": "done", **finished}
                except OSError as exc:
                    self._state = {"state": "failed", "error": f"candidate not kept: {exc}"}
            elif cancelled:
                self._state = {"state": "idle", "error": "training cancelled", **finished}
            else:
                why = next(
                    (w for w in reversed(said) if w.startswith("edge-inspect: ")),
                    said[-1] if said else f"training ended with exit code {code}",
                )
                self._state = {"state": "failed", "error": why.removeprefix("edge-inspect: ")}
            if out.exists():
                _remove(out)
            self._proc = None
        log.info("training %s", self._state["state"])


def _remove(folder: Path) -> None:
    """Take a folder away at once (rename), then delete it."""
    gone = folder.with_name(f".gone-{folder.name}-{time.monotonic_ns()}")
    folder.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


# --- the child ---


def _emit(stage: str, done: int, total: int) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)


def _evaluate(model_path: Path, test: Path, out: Path) -> dict[str, Any]:
    """Evaluate one model on the test split: metrics, per-image rows, report folder."""
    from edge.evaluate import json_metrics, metrics_of, score_folder, write_outputs
    from edge.model import Model

    model = Model(model_path, threads=1)
    results = score_folder(model, test, lambda d, t: _emit(f"evaluating {out.name}", d, t))
    metrics = metrics_of(model, results)
    write_outputs(model, results, metrics, out, data=test)
    images = {
        f"{r.label}/{r.path.name}": {
            "verdict": r.detection.verdict,
            "score": r.detection.score,
            "overlay": f"{out.name}/overlays/{r.overlay_name}",
        }
        for r in results
    }
    return {"model_id": model.id, "metrics": json_metrics(metrics), "images": images}


def child(dataset: Path, out: Path, running: Path | None) -> int:
    from edge.images import ImageError, has_images
    from edge.model import ModelError, read_meta
    from edge.train import TrainError, TrainOptions, train

    with contextlib.suppress(OSError):  # a sandbox may forbid it; then the CPU is shared evenly
        os.nice(NICE)
    opts = TrainOptions(threads=1)
    if running is not None:
        try:
            meta = read_meta(running)
            opts = TrainOptions(
                size=meta.input_size,
                roi=meta.roi_box,
                augment=meta.augment,
                shift=meta.shift,
                rotate_deg=meta.rotate_deg,
                threads=1,
            )
        except ModelError as exc:
            log.warning("training with default options: %s", exc)
    out.mkdir(parents=True)
    try:
        result = train(dataset / "train", out / MODEL_FILE, opts, _emit)
    except (TrainError, ImageError) as exc:
        print(f"edge-inspect: {exc}", file=sys.stderr)
        return 65
    model_bytes = (out / MODEL_FILE).read_bytes()
    summary: dict[str, Any] = {
        "model_id": hashlib.sha256(model_bytes).hexdigest()[:12],
        "meta": asdict(result.meta),
        "seconds": round(result.seconds, 2),
        "normal_scores": [round(float(s), 4) for s in result.normal_scores],
        "anomaly_scores": [round(float(s), 4) for s in result.anomaly_scores],
        "evaluation": {},
        "test_images": 0,
    }
    test = dataset / "test"
    if any(has_images(test / label) for label in ("normal", "anomaly")):
        summary["evaluation"]["candidate"] = _evaluate(out / MODEL_FILE, test, out / CANDIDATE)
        if running is not None:
            try:
                summary["evaluation"]["running"] = _evaluate(running, test, out / "running")
            except (ModelError, ImageError) as exc:
                summary["evaluation"]["running"] = {"error": str(exc)}
        summary["test_images"] = len(summary["evaluation"]["candidate"]["images"])
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.trainjob")
    p.add_argument("dataset", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--running", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return child(args.dataset, args.out, args.running)


if __name__ == "__main__":
    sys.exit(main())
