"""The edge-inspect commands: parse arguments, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge import __version__

if TYPE_CHECKING:
    from edge.config import Config

# sysexits.h: the exit codes scripts and systemd can tell apart.
EX_USAGE = 64  # a command-line value that cannot be used
EX_DATAERR = 65  # bad input data: images, model files
EX_NOINPUT = 66  # an input file or folder does not exist
EX_UNAVAILABLE = 69  # the camera cannot be opened, the broker cannot be reached
EX_CANTCREAT = 73  # an output cannot be written
EX_NOPERM = 77  # a file this user may not read or write
EX_CONFIG = 78


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a finite number above 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value < float("inf"):
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what} above 0")
        return value

    return parse


def _roi(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ROI {text!r} is not x,y,w,h in pixels (e.g. 40,20,320,240)"
        ) from None
    return x, y, w, h


class _Progress:
    """One self-updating line on stderr: stage, count, and time left."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stage = ""
        self.tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.stage, self.start = stage, time.monotonic()
        elapsed = time.monotonic() - self.start
        left = elapsed / done * (total - done) if done else 0.0
        # features: each image and its shifted copies
        unit = {"calibration": "scoring passes", "scoring": "images"}.get(stage, "views")
        line = (
            f"{stage}: {done}/{total} {unit}, {left:.1f} s left"
            if stage != "memory bank"
            else f"{stage}: {'done' if done else 'choosing patches'}"
        )
        if self.tty:
            print(f"\r\033[K{line}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total:
            print(line, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from edge.train import TrainOptions, train

    opts = TrainOptions(
        size=args.size,
        roi=args.roi,
        augment=args.augment,
        shift=args.shift / 100,
        rotate_deg=args.rotate,
        false_reject_rate=args.false_reject_rate / 100,
        threads=args.threads,
    )
    r = train(args.data, args.output, opts, _Progress())
    m = r.meta
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB) in {r.seconds:.1f} s")
    print(
        f"  trained on      {m.train_normal_count} good images"
        + (
            f" x{1 + m.augment} with copies shifted up to {100 * m.shift:g} %"
            + (f" and turned up to {m.rotate_deg:g} degrees" if m.rotate_deg else "")
            if m.augment
            else ""
        )
        + (f", {m.train_anomaly_count} labelled defects" if m.train_anomaly_count else "")
    )
    print(
        f"  image size      {m.image_size}, region {m.roi or 'whole image'}, "
        f"resized to longer side {m.input_size}"
    )
    print(f"  memory bank     {m.bank_size} patches")
    print(f"  good scores     held-out {r.normal_scores.min():.2f} .. {r.normal_scores.max():.2f}")
    if len(r.anomaly_scores):
        print(f"  defect scores   {r.anomaly_scores.min():.2f} .. {r.anomaly_scores.max():.2f}")
    print(f"  threshold       {m.threshold:.2f}  ({m.calibration})")
    print(
        f"  expected false rejects {m.false_rejects} of good parts (a normal fit to the "
        "held-out scores)"
    )
    above = int((r.normal_scores > m.threshold).sum())
    print(f"  held-out good images above the threshold: {above} of {len(r.normal_scores)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from edge.evaluate import metrics_of, score_folder, write_outputs
    from edge.images import ImageError
    from edge.model import Model

    model = Model(args.model, threads=1)
    progress = _Progress()
    failed: list[tuple[Path, str]] = []  # one bad file does not lose a long run
    results = score_folder(model, args.data, lambda d, t: progress("scoring", d, t), failed)
    for _path, why in failed:
        _fail(why)
    if not results:
        raise ImageError(f"no image in {args.data} could be judged")
    metrics = metrics_of(model, results)
    report = write_outputs(
        model, results, metrics, args.report, args.json, data=args.data, failed=failed
    )
    rows = [
        ("AUROC", "auroc"),
        ("average precision", "average_precision"),
        ("accuracy", "accuracy"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("F1", "f1"),
        ("threshold", "threshold"),
    ]
    print(
        f"model {args.model} ({model.id}) on {args.data}: "
        f"{metrics['normal_images']} good, {metrics['anomaly_images']} defective images"
    )
    for label, key in rows:
        v = metrics[key]
        shown = ("n/a" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else v
        print(f"  {label:18s} {shown}")
    if not metrics["anomaly_images"]:
        print("  (no defective images: AUROC, recall and F1 need some in anomaly/)")
    if not metrics["normal_images"]:
        print("  (no good images: AUROC and false rejects need some in normal/)")
    print("  confusion          predicted OK   predicted NG")
    print(f"    actually good    {metrics['tn']:12d}   {metrics['fp']:12d}")
    print(f"    actually bad     {metrics['fn']:12d}   {metrics['tp']:12d}")
    print(
        f"  inference ms       p50 {metrics['ms_p50']:.1f}, "
        f"p95 {metrics['ms_p95']:.1f} (one thread)"
    )
    print(f"report: {report}")
    if failed:
        print(f"{len(failed)} image(s) could not be judged (listed above and in the report)")
        return EX_DATAERR
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from edge.files import write_atomically
    from edge.images import ImageError, list_images, read_image
    from edge.model import Model
    from edge.overlay import overlay_jpeg

    model = Model(args.model, threads=1)
    paths = [p for arg in args.images for p in (list_images(arg) if arg.is_dir() else [arg])]
    inputs = {p.resolve() for p in paths}
    args.overlays.mkdir(parents=True, exist_ok=True)
    out = []
    failed: list[dict[str, str]] = []  # one unreadable photo does not end a trial run
    names: set[str] = set()
    for path in paths:
        try:
            image = read_image(path)
            try:
                detection = model.detect(image)
            except ValueError as exc:
                raise ImageError(f"image {path}: {exc}") from None
        except ImageError as exc:
            _fail(str(exc))
            failed.append({"file": str(path), "error": str(exc)})
            continue
        # a/001.jpg and b/001.jpg (or 001.jpg and 001.png) each keep their own overlay
        name = next(
            n
            for k in itertools.count()
            if (n := path.stem + (f"-{k}" if k else "")) not in names
            and (args.overlays / f"{n}.jpg").resolve() not in inputs  # never over a photo
        )
        names.add(name)
        overlay = args.overlays / f"{name}.jpg"
        write_atomically(overlay, overlay_jpeg(image, detection, path))
        out.append({"file": str(path), **detection.as_dict(), "overlay": str(overlay)})
        if not args.json:
            boxes = " ".join(f"[{b.x},{b.y} {b.w}x{b.h}]" for b in detection.boxes[:5])
            if len(detection.boxes) > 5:
                boxes += f" (+{len(detection.boxes) - 5} more)"
            # four decimals: at two, a part just over the threshold read "3.89 / 3.89"
            print(
                f"{detection.verdict.upper():2s}  score {detection.score:9.4f} / "
                f"{detection.threshold:.4f}  "
                f"area {100 * detection.area:5.1f} %  {path}  {boxes}"
            )
    if args.json:
        doc = json.dumps({"model_id": model.id, "images": out, "failed": failed}, indent=2)
        if str(args.json) == "-":
            print(doc)
        else:
            write_atomically(args.json, doc + "\n")
    if not failed:
        return 0
    return EX_NOINPUT if all("does not exist" in f["error"] for f in failed) else EX_DATAERR


def cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from edge.model import Model

    model = Model(args.model)
    info = {
        "file": str(args.model),
        "model_id": model.id,
        "sha256": model.sha256,
        "bytes": args.model.stat().st_size,
        **asdict(model.meta),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:28s} {v}")
    return 0


def _config(path: Path) -> Config:
    from edge.config import load_config

    return load_config(path)


def _check_files(cfg: Config) -> None:
    """A ConfigError naming a password or TLS file that the link or the page could not use."""
    if cfg.mqtt.enabled:
        if cfg.mqtt.password_file:
            cfg.mqtt.password()
        if cfg.mqtt.tls.enabled:
            cfg.mqtt.tls.ssl_context()
    if cfg.web.enabled:
        cfg.web.ssl_context()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    _check_files(cfg)
    print(
        f"{args.config}: valid (station {cfg.station.name}, source {cfg.source.kind}, "
        f"model {cfg.model.path}, "
        + (f"broker {cfg.mqtt.host}:{cfg.mqtt.port})" if cfg.mqtt.enabled else "no broker)")
    )
    if not cfg.model.path.is_file():
        print(f"note: model file {cfg.model.path} does not exist yet")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge.station import Station

    if args.validate:
        return cmd_check_config(args)
    cfg = _config(args.config)
    # Exit 78 here, in the service's main process, where systemd's RestartPreventExitStatus
    # sees it: the station would otherwise inspect on and retry the broker for ever.
    _check_files(cfg)
    return Station(cfg).run()


def cmd_records(args: argparse.Namespace) -> int:
    from edge.files import open_atomically
    from edge.journal import Journal

    cfg = _config(args.config)
    path = cfg.station.state_dir / "journal.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"journal {path} does not exist (has the station run?)")
    journal = Journal(path)
    try:
        if args.csv:
            if str(args.csv) == "-":
                n = journal.export_csv(sys.stdout, ng_only=args.ng)
            else:
                with open_atomically(args.csv) as f:
                    n = journal.export_csv(f, ng_only=args.ng)
                print(f"wrote {n} records to {args.csv}", file=sys.stderr)
            return 0
        counts = journal.counts()
        print(
            f"{counts['total']} inspections, {counts['ng']} NG, {counts['unpublished']} not yet "
            f"delivered to the broker"
        )
        for r in journal.recent(limit=args.limit, ng_only=args.ng):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.wall))
            print(
                f"{r.seq:8d}  {when}  {r.verdict.upper():2s}  {r.score:8.2f}  "
                f"{r.part_id or '-':16s}  {r.frame_path or ''}"
            )
    finally:
        journal.close()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edge.config import MqttConfig
    from edge.watch import BrokerUnavailable, watch

    base = _config(args.config).mqtt.model_dump() if args.config else {}
    given = {"host": args.host, "port": args.port, "prefix": args.prefix}
    try:
        cfg = MqttConfig.model_validate(
            {**base, **{k: v for k, v in given.items() if v is not None}}
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = f"--{err['loc'][0]}: " if err["loc"] else ""
        print(f"edge-inspect: {where}{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return EX_USAGE
    try:
        watch(cfg, as_json=args.json, count=args.count, seconds=args.seconds)
    except BrokerUnavailable as exc:
        _fail(str(exc))
        return EX_UNAVAILABLE
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from edge.access import hash_password

    try:
        if sys.stdin.isatty():
            password = getpass.getpass("page password: ")
            if getpass.getpass("again: ") != password:
                print("edge-inspect: the two passwords differ", file=sys.stderr)
                return EX_USAGE
        else:  # from a script: echo "$PW" | edge-inspect hash-password
            password = sys.stdin.readline().rstrip("\n")
        stored = hash_password(password)
    except EOFError:
        print("\nedge-inspect: no password given", file=sys.stderr)
        return EX_USAGE
    except UnicodeError:
        print("edge-inspect: the password is not valid UTF-8 text", file=sys.stderr)
        return EX_USAGE
    except ValueError as exc:
        _fail(str(exc))
        return EX_USAGE
    print("# put this line in the [web] section of the station's config:")
    print(f'password_hash = "{stored}"')
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-inspect", description="Teach a camera station good parts; flag the bad ones."
    )
    p.add_argument("--version", action="version", version=f"edge-inspect {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from DATA/normal (and DATA/anomaly)")
    t.add_argument(
        "data", type=Path, help="folder with normal/ (good images) and optional anomaly/"
    )
    t.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.onnx)")
    t.add_argument(
        "--size",
        type=int,
        default=256,
        help="longer side of the region after resizing, px (default 256)",
    )
    t.add_argument(
        "--roi",
        type=_roi,
        help="region of interest x,y,w,h in camera pixels (default: whole image)",
    )
    t.add_argument(
        "--augment",
        type=int,
        default=3,
        help="extra shifted (and turned, with --rotate) copies per good image (default 3; 0: none)",
    )
    t.add_argument(
        "--shift",
        type=float,
        default=3.0,
        metavar="PERCENT",
        help="largest shift of a copy, %% of the region's size (default 3)",
    )
    t.add_argument(
        "--rotate",
        type=float,
        default=0.0,
        metavar="DEGREES",
        help="largest turn of a copy, for hand-placed parts that turn (default 0: none)",
    )
    t.add_argument(
        "--false-reject-rate",
        type=float,
        default=1.0,
        metavar="PERCENT",
        help="without labelled defects: share of good parts to reject at most (default 1 %%)",
    )
    t.add_argument(
        "--threads", type=int, default=0, help="threads for training (default: all cores)"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate", help="score TESTDATA/normal and TESTDATA/anomaly, write a report"
    )
    e.add_argument("model", type=Path, help="model file (.onnx)")
    e.add_argument("data", type=Path, help="folder with normal/ and anomaly/")
    e.add_argument(
        "--report",
        type=Path,
        default=Path("evaluation"),
        help="output folder (default ./evaluation)",
    )
    e.add_argument(
        "--json", type=Path, help="also write metrics and per-image results to this JSON file"
    )
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("detect", help="trial detection: verdict, score, area and regions per image")
    d.add_argument("model", type=Path, help="model file (.onnx)")
    d.add_argument("images", type=Path, nargs="+", help="image files, or folders of them")
    d.add_argument(
        "--overlays",
        type=Path,
        default=Path("detections"),
        help="folder for overlay images (default ./detections)",
    )
    d.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="write the results as JSON to FILE (- for stdout, instead of the table)",
    )
    d.set_defaults(func=cmd_detect)

    i = sub.add_parser("info", help="print a model file's metadata")
    i.add_argument("model", type=Path, help="model file (.onnx)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)
    r = sub.add_parser("run", help="run the inspection station")
    r.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/edge-inspect/config.toml"),
        help="station config (default /etc/edge-inspect/config.toml)",
    )
    r.add_argument("--validate", action="store_true", help="check the config and exit")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="validate a config file; exit 78 when it is invalid")
    c.add_argument("config", type=Path, help="station config file (.toml)")
    c.set_defaults(func=cmd_check_config)

    rec = sub.add_parser("records", help="list or export the station's inspection journal")
    rec.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/edge-inspect/config.toml"),
        help="station config (default /etc/edge-inspect/config.toml)",
    )
    rec.add_argument("--ng", action="store_true", help="NG verdicts only")
    rec.add_argument(
        "--limit", type=_positive(int), default=20, help="how many to list (default 20)"
    )
    rec.add_argument("--csv", type=Path, help="export all records to this CSV file (- for stdout)")
    rec.set_defaults(func=cmd_records)

    h = sub.add_parser(
        "hash-password", help="make the [web] password_hash for the station page's password"
    )
    h.set_defaults(func=cmd_hash_password)

    w = sub.add_parser("watch", help="print what a line controller sees on the broker")
    w.add_argument("--config", type=Path, help="take broker, prefix, TLS and login from a config")
    w.add_argument("--host", help="broker host (default localhost, or the config's)")
    w.add_argument("--port", type=int, help="broker port (default 1883, or the config's)")
    w.add_argument("--prefix", help="topic prefix (default edge-inspect/station, or the config's)")
    w.add_argument("--json", action="store_true", help="one JSON object per message")
    w.add_argument(
        "--count",
        type=_positive(int),
        metavar="N",
        help="exit after N verdicts, live or from the backlog",
    )
    w.add_argument("--seconds", type=_positive(float), metavar="S", help="exit after S seconds")
    w.set_defaults(func=cmd_watch)
    return p


def _fail(message: str) -> None:
    """The one line saying why a command failed; under systemd, at the journal's error level
    (a service that will not start must show in `journalctl -p warning`)."""
    print(f"{'<3>' if _to_journal() else ''}edge-inspect: {message}", file=sys.stderr)


class _JournalFormatter(logging.Formatter):
    """Starts each line with its syslog priority, which journald takes as the entry's level,
    so that `journalctl -p warning` finds the warnings."""

    PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        # every line: journald reads each as an entry of its own (a traceback's too)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def _to_journal() -> bool:
    """Whether stderr is systemd's journal stream ($JOURNAL_STREAM names its device:inode)."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


def main(argv: Sequence[str] | None = None) -> int:
    from edge.config import ConfigError
    from edge.images import ImageError
    from edge.journal import JournalError
    from edge.model import ModelError
    from edge.sources import SourceError
    from edge.train import OptionError, TrainError

    args = parser().parse_args(argv)
    handler = logging.StreamHandler()
    form = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_JournalFormatter(form) if _to_journal() else logging.Formatter(form))
    # The station logs its events (ready, connected, model replaced) for the journal; the
    # one-shot commands only what went wrong.
    level = logging.INFO if args.func is cmd_run else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else level, handlers=[handler])
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            _fail(problem)
        return EX_CONFIG
    except OptionError as exc:
        _fail(str(exc))
        return EX_USAGE
    except (ImageError, ModelError, TrainError) as exc:
        missing = "does not exist" in str(exc)
        _fail(str(exc))
        return EX_NOINPUT if missing else EX_DATAERR
    except SourceError as exc:
        _fail(str(exc))
        return EX_UNAVAILABLE
    except JournalError as exc:
        _fail(str(exc))
        return EX_CANTCREAT
    except FileNotFoundError as exc:
        _fail(str(exc))
        return EX_NOINPUT
    except BrokenPipeError:  # `edge-inspect records | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except PermissionError as exc:  # reading too: `records` as a user not in the station's group
        _fail(f"{exc.filename}: {exc.strerror}")
        return EX_NOPERM
    except OSError as exc:
        _fail(f"cannot write {exc.filename}: {exc.strerror}")
        return EX_CANTCREAT
    except KeyboardInterrupt:  # nothing half-written is left: outputs are written atomically
        print("\nedge-inspect: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
