"""The commands as a user runs them: exit codes, what they print, what they write."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from edge.cli import EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, EX_USAGE
from edge.images import FORMATS, list_images


def run(
    *args: object, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=300,
    )


def test_train_prints_progress_and_a_summary(tmp_path: Path, textures: Path) -> None:
    out = tmp_path / "m.onnx"
    r = run("train", textures / "train", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "features: 80/80 views" in r.stderr  # 20 good images and 3 shifted copies of each
    assert "threshold" in r.stdout and "expected false rejects" in r.stdout
    # the fitted rate, and what the held-out images themselves show
    assert re.search(r"held-out good images above the threshold: \d+ of 20", r.stdout)
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))
    assert out.stat().st_mode & 0o777 == 0o644, "the station's own user must be able to read it"


def test_evaluate_writes_metrics_report_and_overlays(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    report, js = tmp_path / "report", tmp_path / "metrics.json"
    r = run("evaluate", parts_model, parts / "test", "--report", report, "--json", js)
    assert r.returncode == 0, r.stderr
    assert "AUROC" in r.stdout and "actually bad" in r.stdout
    doc = json.loads(js.read_text())
    for key in ("auroc", "average_precision", "accuracy", "precision", "recall", "f1", "threshold"):
        assert isinstance(doc[key], float)
    assert doc["auroc"] >= 0.95 and doc["accuracy"] >= 0.85
    n = len(list_images(parts / "test" / "normal")) + len(list_images(parts / "test" / "anomaly"))
    assert len(doc["images"]) == n
    assert {img["verdict"] for img in doc["images"]} == {"ok", "ng"}
    assert len(list((report / "overlays").glob("*.jpg"))) == n
    assert all(Path(img["overlay"]).is_file() for img in doc["images"])
    with (report / "scores.csv").open() as f:
        assert len(list(csv.DictReader(f))) == n
    html = (report / "report.html").read_text()
    assert "overlays/" in html and "AUROC" in html


def test_detect_reports_verdict_area_and_boxes(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    bad = list_images(parts / "test" / "anomaly")[0]
    good = list_images(parts / "test" / "normal")[0]
    r = run("detect", parts_model, bad, good, "--json", "-", "--overlays", tmp_path / "ov")
    assert r.returncode == 0, r.stderr
    images = json.loads(r.stdout)["images"]
    assert [i["verdict"] for i in images] == ["ng", "ok"]
    assert images[0]["area"] > 0 and images[0]["boxes"]
    assert images[1]["area"] == 0 and images[1]["boxes"] == []
    assert all(Path(i["overlay"]).is_file() for i in images)


def test_detect_takes_folders_and_keeps_every_overlay(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    good = list_images(parts / "test" / "normal")[0]
    twin = other / list_images(parts / "test" / "anomaly")[0].name  # a defect's name, good part
    twin.write_bytes(good.read_bytes())
    r = run(
        "detect",
        parts_model,
        parts / "test" / "anomaly",
        other,
        "--json",
        "-",
        "--overlays",
        tmp_path / "ov",
    )
    assert r.returncode == 0, r.stderr
    images = json.loads(r.stdout)["images"]
    n_bad = len(list_images(parts / "test" / "anomaly"))
    assert [i["verdict"] for i in images] == ["ng"] * n_bad + ["ok"]
    overlays = {i["overlay"] for i in images}
    assert len(overlays) == n_bad + 1 and all(Path(o).is_file() for o in overlays)
    # The good twin's overlay did not overwrite the defect's: that one still says NG.
    first = cv2.imread(images[0]["overlay"])
    assert first[5, 5, 2] > first[5, 5, 1]  # the label strip is red (BGR), not green
    r = run("detect", parts_model, tmp_path / "ov" / "nothing-here")
    assert r.returncode == EX_NOINPUT and "does not exist" in r.stderr


def test_detect_goes_on_past_an_unreadable_image_and_says_which(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    good = list_images(parts / "test" / "normal")[0]
    r = run("detect", parts_model, bad, good, "--json", "-", "--overlays", tmp_path / "ov")
    assert r.returncode == EX_DATAERR
    assert r.stderr.strip() == f"edge-inspect: image {bad} is not a readable image file ({FORMATS})"
    doc = json.loads(r.stdout)
    assert [i["verdict"] for i in doc["images"]] == ["ok"]
    assert doc["failed"] == [
        {"file": str(bad), "error": f"image {bad} is not a readable image file ({FORMATS})"}
    ]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == [f"{good.stem}.jpg"]


def test_detect_never_writes_an_overlay_over_a_photo(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    # Overlays are JPEG: pointed at the photos' own folder, part.jpg would be overwritten.
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in list_images(parts / "test" / "anomaly")[:2]:
        cv2.imwrite(str(photos / f"{p.stem}.jpg"), cv2.imread(str(p)))
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    r = run("detect", parts_model, photos, "--overlays", photos)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir() if p.name in before} == before
    assert sorted(p.name for p in photos.iterdir() if p.name not in before) == sorted(
        f"{Path(n).stem}-1.jpg" for n in before
    )


def test_info_prints_the_contract(parts_model: Path) -> None:
    r = run("info", parts_model, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["colour_order"] == "BGR" and info["threshold"] > 0 and len(info["model_id"]) == 12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not an image", "not.png"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not.png"),
    ],
)
def test_bad_training_image_names_the_file(
    tmp_path: Path, textures: Path, content: bytes, message: str
) -> None:
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    for p in list_images(textures / "train" / "normal"):
        (data / "normal" / p.name).write_bytes(p.read_bytes())
    (data / "normal" / "not.png").write_bytes(content)
    out = tmp_path / "m.onnx"
    r = run("train", data, "-o", out)
    assert r.returncode == EX_DATAERR
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_empty_and_missing_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    r = run("train", tmp_path / "empty", "-o", tmp_path / "m.onnx")
    assert r.returncode == EX_DATAERR and "holds no images" in r.stderr
    r = run("train", tmp_path / "nowhere", "-o", tmp_path / "m.onnx")
    assert r.returncode == EX_NOINPUT and "does not exist" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_defects_sorted_into_subfolders_are_not_silently_left_out(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    # An MVTec-style layout, anomaly/<defect type>/*.png: evaluating without the defects
    # would report figures for good parts alone.
    data = tmp_path / "test"
    (data / "normal").mkdir(parents=True)
    (data / "anomaly" / "stain").mkdir(parents=True)
    for p in list_images(parts / "train" / "normal"):
        (data / "normal" / p.name).write_bytes(p.read_bytes())
    for p in list_images(parts / "test" / "anomaly"):
        (data / "anomaly" / "stain" / p.name).write_bytes(p.read_bytes())
    hint = "images in its subfolders are not read: put them in it directly"
    r = run("evaluate", parts_model, data, "--report", tmp_path / "report")
    assert r.returncode == EX_DATAERR
    assert f"folder {data / 'anomaly'} holds no images" in r.stderr and hint in r.stderr
    assert not (tmp_path / "report" / "report.html").exists()
    r = run("train", data, "-o", tmp_path / "m.onnx")
    assert r.returncode == EX_DATAERR and hint in r.stderr
    # Some sorted, some not: the sorted ones were left out without a word.
    loose = list_images(parts / "test" / "anomaly")[0]
    (data / "anomaly" / loose.name).write_bytes(loose.read_bytes())
    r = run("evaluate", parts_model, data, "--report", tmp_path / "report")
    assert r.returncode == EX_DATAERR
    assert r.stderr.strip() == (
        f"edge-inspect: folder {data / 'anomaly'} holds images and subfolders of images "
        "(stain), which are not read: put their images in it directly, or move the "
        "subfolders out"
    )


def test_evaluate_judges_the_rest_past_a_bad_image_and_says_which(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    """One unreadable file among hundreds ended the whole evaluation, with no report."""
    data = tmp_path / "test"
    shutil.copytree(parts / "test", data)
    cut = data / "anomaly" / "cut.png"
    cut.write_bytes(list_images(data / "anomaly")[0].read_bytes()[:300])
    report, js = tmp_path / "report", tmp_path / "metrics.json"
    r = run("evaluate", parts_model, data, "--report", report, "--json", js)
    assert r.returncode == EX_DATAERR
    assert f"edge-inspect: image {cut} is truncated" in r.stderr
    assert "1 image(s) could not be judged" in r.stdout
    doc = json.loads(js.read_text())
    why = f"image {cut} is truncated (the PNG has no IEND chunk)"
    assert doc["failed"] == [{"file": str(cut), "error": why}]
    n = len(list_images(parts / "test" / "normal")) + len(list_images(parts / "test" / "anomaly"))
    assert len(doc["images"]) == n  # all the others, judged
    assert doc["test_data"] == str(data.resolve()) and doc["tool_version"]
    assert doc["threshold_rule"].startswith("best separation")
    html = (report / "report.html").read_text()
    assert "<h2>Not judged</h2>" in html and "anomaly/cut.png" in html
    assert f"<tr><th>Test data</th><td>{data.resolve()}</td></tr>" in html


def test_evaluate_without_defects_leaves_their_figures_undefined(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    """Recall and F1 read 0.0000 with no defective images, as if measured and awful."""
    data = tmp_path / "test"
    shutil.copytree(parts / "test" / "normal", data / "normal")
    js = tmp_path / "metrics.json"
    r = run("evaluate", parts_model, data, "--report", tmp_path / "report", "--json", js)
    assert r.returncode == 0, r.stderr
    doc = json.loads(js.read_text())
    assert doc["auroc"] is None and doc["recall"] is None and doc["f1"] is None
    assert isinstance(doc["accuracy"], float)
    assert re.search(r"recall +n/a", r.stdout) and re.search(r"F1 +n/a", r.stdout)
    assert "no defective images: AUROC, recall and F1 need some in anomaly/" in r.stdout


def test_model_that_is_not_ours_is_refused(tmp_path: Path, parts: Path) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x08\x07garbage")
    r = run("detect", fake, list_images(parts / "test" / "normal")[0])
    assert r.returncode == EX_DATAERR and "fake.onnx" in r.stderr
    r = run("info", tmp_path / "missing.onnx")
    assert r.returncode == EX_NOINPUT and "missing.onnx does not exist" in r.stderr


def test_bad_roi_is_a_usage_error(tmp_path: Path, textures: Path) -> None:
    r = run("train", textures / "train", "-o", tmp_path / "m.onnx", "--roi", "1,2,3")
    assert r.returncode == 2 and "x,y,w,h" in r.stderr
    r = run("train", textures / "train", "-o", tmp_path / "m.onnx", "--roi", "0,0,5000,100")
    assert r.returncode == EX_DATAERR and "does not fit" in r.stderr
    r = run("train", textures / "train", "-o", tmp_path / "m.onnx", "--roi", "0,0,10,10")
    assert r.returncode == EX_USAGE and "smaller than 16x16 pixels" in r.stderr


def test_train_writes_only_a_model_file(tmp_path: Path, textures: Path) -> None:
    # A slip of the keyboard must not replace a training image, a folder or a device.
    image = list_images(textures / "train" / "normal")[0]
    before = image.read_bytes()
    r = run("train", textures / "train", "-o", image)
    assert r.returncode == EX_USAGE and "must end in .onnx" in r.stderr
    assert image.read_bytes() == before
    (tmp_path / "dir.onnx").mkdir()
    r = run("train", textures / "train", "-o", tmp_path / "dir.onnx")
    assert r.returncode == EX_DATAERR and "dir.onnx exists and is not a file" in r.stderr
    r = run("train", image, "-o", tmp_path / "m.onnx")
    assert r.returncode == EX_DATAERR and "is a file; give the folder" in r.stderr


def test_a_failed_evaluation_leaves_no_partial_report(
    tmp_path: Path, parts: Path, parts_model: Path
) -> None:
    report, js = tmp_path / "report", tmp_path / "metrics.json"
    js.mkdir()  # the JSON file cannot be written: found after every overlay was drawn
    r = run("evaluate", parts_model, parts / "test", "--report", report, "--json", js)
    assert r.returncode == EX_CANTCREAT
    assert r.stderr.splitlines()[-1] == f"edge-inspect: cannot write {js}: it is a folder"
    assert list(report.iterdir()) == []  # no overlays, no scores, no staging folder


def test_output_cut_short_by_the_reader_ends_quietly(parts_model: Path) -> None:
    # `edge-inspect info model.onnx | head -1`: no traceback, no "cannot write" message.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "info", str(parts_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has started writing
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == ""


def test_turned_copies_are_asked_for_on_the_command_line(tmp_path: Path, textures: Path) -> None:
    out = tmp_path / "m.onnx"
    r = run("train", textures / "train", "-o", out, "--augment", "2", "--rotate", "8")
    assert r.returncode == 0, r.stderr
    assert "shifted up to 3 % and turned up to 8 degrees" in r.stdout
    assert "20 held-out good images and 40 turned copies" in r.stdout
    info = json.loads(run("info", out, "--json").stdout)
    assert (info["augment"], info["shift"], info["rotate_deg"]) == (2, 0.03, 8.0)
    r = run("train", textures / "train", "-o", tmp_path / "x.onnx", "--shift", "30")
    assert r.returncode == EX_USAGE and "shift 30 % must be between 0 and 20 %" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_hash_password_makes_a_line_for_the_config(tmp_path: Path) -> None:
    from edge.access import verify_password
    from edge.config import parse_config

    r = run("hash-password", stdin="line three secret\n")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[-1]
    assert line.startswith('password_hash = "scrypt$') and "line three secret" not in r.stdout
    cfg = parse_config(
        '[model]\npath = "m.onnx"\n[source]\nkind = "folder"\npath = "x"\n'
        f'[web]\nenabled = true\nhost = "0.0.0.0"\n{line}\n'
    )
    assert cfg.web.password_hash is not None
    assert verify_password("line three secret", cfg.web.password_hash)
    assert not verify_password("line three secreT", cfg.web.password_hash)
    short = run("hash-password", stdin="short\n")
    assert short.returncode == 64
    assert short.stderr == "edge-inspect: the password must have 8 to 1024 characters\n"


def test_onnxruntime_keeps_no_device_id_and_sends_no_usage_events(
    tmp_path: Path, textures: Path
) -> None:
    """onnxruntime (1.29 and later) writes a device id under ~/.cache/Microsoft and uploads
    usage events unless told not to; a station on a factory network must do neither."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    plain, ours = tmp_path / "plain", tmp_path / "ours"
    plain.mkdir(), ours.mkdir()
    code = "import onnxruntime; onnxruntime.InferenceSession"
    subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(plain)}, check=True)
    if not (plain / ".cache" / "Microsoft").exists():
        pytest.skip("this onnxruntime keeps no device id, so there is nothing to check")
    model = tmp_path / "m.onnx"
    for args in (["train", textures / "train", "-o", model], ["info", model]):
        r = subprocess.run(
            [sys.executable, "-m", "edge.cli", *map(str, args)],
            env={**env, "HOME": str(ours)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
    assert not (ours / ".cache").exists()


def test_detect_draws_a_large_photo_s_overlay_at_1600_px(tmp_path: Path, parts: Path) -> None:
    """A 12-megapixel photo's full-size overlay took 575 MB to draw; the boxes stay in the
    photo's own pixels."""
    scale = 2400 / 160
    data = tmp_path / "big"
    for label, folder in (("normal", "train/normal"), ("anomaly", "test/anomaly")):
        (data / label).mkdir(parents=True)
        for p in list_images(parts / folder)[:10]:
            small = cv2.imread(str(p))
            big = cv2.resize(small, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(data / label / f"{p.stem}.png"), big)
    model = tmp_path / "big.onnx"
    assert run("train", data, "-o", model).returncode == 0
    defect = list_images(data / "anomaly")[0]
    r = run("detect", model, defect, "--json", "-", "--overlays", tmp_path / "ov")
    assert r.returncode == 0, r.stderr
    (found,) = json.loads(r.stdout)["images"]
    overlay = cv2.imread(found["overlay"])
    assert found["overlay"].endswith(".jpg") and overlay.shape[1] == 1600
    assert found["verdict"] == "ng" and found["boxes"]
    assert all(b["x"] + b["w"] <= 2400 and b["y"] + b["h"] <= 1800 for b in found["boxes"])


def test_files_in_other_formats_are_named_not_silently_left_out(
    tmp_path: Path, textures: Path
) -> None:
    # An iPhone's photos are HEIC: training on the rest is fine, but the user must hear of it.
    data = tmp_path / "data"
    shutil.copytree(textures / "train", data)
    for k in range(5):
        (data / "normal" / f"IMG_{k}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    r = run("train", data, "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert (
        f"folder {data / 'normal'}: 5 files are not read, not being {FORMATS}: "
        "IMG_0.HEIC, IMG_1.HEIC, IMG_2.HEIC, ..." in r.stderr
    )
    assert re.search(r"trained on +20 good images", r.stdout), r.stdout
