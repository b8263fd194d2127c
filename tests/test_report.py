"""The HTML report: figures, one card per image with misjudged ones first, written safely."""

from __future__ import annotations

import math
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from edge.detection import Detection
from edge.images import read_image
from edge.metrics import summarize
from edge.overlay import draw_overlay
from edge.report import write_report

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """What a reader of the report sees: the cards in order, the images, the tags used."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self.open: list[str] = []
        self.text: list[str] = []
        self._in_name = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = {k: v or "" for k, v in attrs}
        if tag not in VOID:
            self.open.append(tag)
        if tag == "figure":
            self.cards.append({"class": attributes["class"], "src": "", "name": "", "text": ""})
        if tag == "img" and self.cards:
            self.cards[-1]["src"] = attributes["src"]
        self._in_name = attributes.get("class") == "name"

    def handle_endtag(self, tag: str) -> None:
        assert self.open.pop() == tag, f"</{tag}> closes another element"
        self._in_name = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.cards:
            self.cards[-1]["text"] += data
            if self._in_name:
                self.cards[-1]["name"] += data


def make_rows(folder: Path) -> tuple[list[dict[str, object]], list[float], list[float]]:
    """Draw six parts, score them by hand, and write their overlays under folder/overlays."""
    (folder / "overlays").mkdir(parents=True)
    # (name, true label, score): one missed defect, one false alarm.
    cases = [
        ("good_1.png", "ok", 0.4),
        ("good_2.png", "ok", 0.7),
        ("good_3 <b>&amp;.png", "ok", 1.6),
        ("bad_1.png", "ng", 3.0),
        ("bad_2.png", "ng", 2.2),
        ("bad_3.png", "ng", 0.9),
    ]
    rows: list[dict[str, object]] = []
    normal: list[float] = []
    anomaly: list[float] = []
    for name, label, score in cases:
        image = np.full((120, 160, 3), 140, np.uint8)
        cv2.circle(image, (80, 60), 30, (60, 70, 80), -1)
        anomaly_map = np.zeros((8, 8), np.float32)
        anomaly_map[2, 3] = score
        det = Detection(score, 1.0, anomaly_map, (10, 10, 140, 100), 0.0)
        overlay = f"overlays/{name}.png"
        ok, data = cv2.imencode(".png", draw_overlay(image, det))
        assert ok
        (folder / overlay).write_bytes(data.tobytes())
        rows.append(
            {
                "name": name,
                "label": label,
                "verdict": det.verdict,
                "score": score,
                "overlay": overlay,
            }
        )
        (anomaly if label == "ng" else normal).append(score)
    return rows, normal, anomaly


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, Page]:
    rows, normal, anomaly = make_rows(tmp_path)
    path = tmp_path / "report.html"
    write_report(path, "Brackets <line 2>", summarize(normal, anomaly, 1.0), rows)
    return path, Page(path.read_text(encoding="utf-8"))


def test_every_image_has_a_card_and_its_overlay_exists(report: tuple[Path, Page]) -> None:
    path, page = report
    assert len(page.cards) == 6
    for card in page.cards:
        overlay = path.parent / unquote(card["src"])
        assert overlay.is_file()
        assert read_image(overlay).shape[1] == 160


def test_misjudged_images_come_first_and_are_flagged(report: tuple[Path, Page]) -> None:
    _, page = report
    names = [card["name"] for card in page.cards]
    # Missed defects first, then false alarms, then the rest by score, highest first.
    assert names == [
        "bad_3.png",
        "good_3 <b>&amp;.png",
        "bad_1.png",
        "bad_2.png",
        "good_2.png",
        "good_1.png",
    ]
    assert [("wrong" in card["class"]) for card in page.cards] == [True, True] + [False] * 4
    assert "missed defect" in page.cards[0]["text"]
    assert "label NG" in page.cards[0]["text"] and "verdict OK" in page.cards[0]["text"]
    assert "score 0.9" in page.cards[0]["text"]
    assert "false alarm" in page.cards[1]["text"]


def test_the_worst_misses_come_first(tmp_path: Path) -> None:
    """The defect the model scored lowest is the one to look at first; then the good part it
    scored highest. Each count is said."""
    rows = [
        {"name": n, "label": label, "verdict": verdict, "score": score}
        for n, label, verdict, score in [
            ("barely-missed.png", "ng", "ok", 0.95),
            ("badly-missed.png", "ng", "ok", 0.2),
            ("mild-alarm.png", "ok", "ng", 1.1),
            ("loud-alarm.png", "ok", "ng", 4.0),
            ("caught.png", "ng", "ng", 3.0),
        ]
    ]
    write_report(tmp_path / "r.html", "Order", {}, rows)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert [c["name"] for c in Page(text).cards] == [
        "badly-missed.png",
        "barely-missed.png",
        "loud-alarm.png",
        "mild-alarm.png",
        "caught.png",
    ]
    assert "5 images judged: 2 missed defects, 2 false alarms." in text


def test_the_report_says_what_was_evaluated_and_what_was_not(tmp_path: Path) -> None:
    about = {"Test data": "/data/brackets/test", "Threshold": "3.8884 (best separation)"}
    failed = [("anomaly/cut.png", "image anomaly/cut.png is truncated")]
    write_report(tmp_path / "r.html", "Traced", {"normal_images": 4}, [], about, failed)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<tr><th>Test data</th><td>/data/brackets/test</td></tr>" in text
    assert "<tr><th>Threshold</th><td>3.8884 (best separation)</td></tr>" in text
    assert '<th>Good images</th><td class="n">4</td>' in text
    assert "1 could not be judged (listed at the end)" in text
    assert "<h2>Not judged</h2>" in text and "image anomaly/cut.png is truncated" in text


def test_metrics_and_confusion_matrix(report: tuple[Path, Page]) -> None:
    path, _ = report
    text = path.read_text(encoding="utf-8")
    # Scores: normal 0.4 0.7 1.6, anomaly 3.0 2.2 0.9; 8 of 9 pairs ranked right.
    for label, value in [("AUROC", "0.8889"), ("Accuracy", "0.6667"), ("F1", "0.6667")]:
        assert f'<th>{label}</th><td class="n">{value}</td>' in text
    assert '<th>Threshold</th><td class="n">1</td>' in text
    assert '<tr><th>label OK</th><td class="n">2</td><td class="n">1</td></tr>' in text
    assert '<tr><th>label NG</th><td class="n">1</td><td class="n">2</td></tr>' in text


def test_strings_are_escaped_and_the_page_is_well_formed(report: tuple[Path, Page]) -> None:
    path, page = report
    text = path.read_text(encoding="utf-8")
    assert "<title>Brackets &lt;line 2&gt;</title>" in text
    assert "<b>" not in text
    assert "good_3 &lt;b&gt;&amp;amp;.png" in text
    assert page.open == []
    assert "b" not in page.tags


def test_self_contained(report: tuple[Path, Page]) -> None:
    path, page = report
    text = path.read_text(encoding="utf-8").lower()
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert "http:" not in text and "https:" not in text and "url(" not in text
    assert all(not card["src"].startswith(("/", "//")) for card in page.cards)
    assert 'name="viewport"' in text


def test_report_is_readable_by_others(report: tuple[Path, Page]) -> None:
    path, _ = report
    assert path.stat().st_mode & 0o777 == 0o644


def test_odd_characters_in_overlay_paths_are_quoted(tmp_path: Path) -> None:
    rows = [
        {"name": n, "label": "ok", "verdict": "ok", "score": 0.1, "overlay": f"overlays/{n}"}
        for n in ["a#1.png", "b?.png", "c 100%.png", 'd"e.png', "Prüfteil.png"]
    ]
    write_report(tmp_path / "r.html", "Quoting", {}, rows)
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    srcs = sorted(unquote(card["src"]) for card in page.cards)
    assert srcs == sorted(str(row["overlay"]) for row in rows)
    assert all("#" not in c["src"] and "?" not in c["src"] for c in page.cards)


def test_rows_without_label_or_overlay(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"name": "unlabelled.png", "label": None, "verdict": "ng", "score": np.float32(2.5)},
        {"name": "plain.png", "verdict": "ok", "score": 1},
    ]
    write_report(tmp_path / "r.html", "Inspection", {}, rows)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page(text)
    assert [c["name"] for c in page.cards] == ["unlabelled.png", "plain.png"]
    assert all("wrong" not in c["class"] for c in page.cards)
    assert "label unknown" in page.cards[0]["text"]
    assert text.count("no overlay") == 2
    assert "2 images judged: 0 missed defects, 0 false alarms." in text


def test_undefined_and_extra_metrics(tmp_path: Path) -> None:
    metrics: dict[str, object] = {"auroc": math.nan, "images": 12, "backbone": "lite0 <v2>"}
    write_report(tmp_path / "r.html", "Only good parts", metrics, [])
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert '<th>AUROC</th><td class="n">n/a</td>' in text
    assert '<th>images</th><td class="n">12</td>' in text
    assert "lite0 &lt;v2&gt;" in text
    assert "Confusion matrix" not in text


def test_empty_report(tmp_path: Path) -> None:
    write_report(tmp_path / "deep" / "folder" / "r.html", "Nothing yet", {}, [])
    page = Page((tmp_path / "deep" / "folder" / "r.html").read_text(encoding="utf-8"))
    assert page.cards == []


def test_replaces_an_old_report(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    path.write_text("old")
    write_report(path, "New", {}, [])
    assert "<h1>New</h1>" in path.read_text(encoding="utf-8")
    assert os.listdir(tmp_path) == ["r.html"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"label": "ok", "verdict": "ok", "score": 1.0}, "has no name"),
        ({"name": "a", "label": "good", "verdict": "ok", "score": 1.0}, "label 'good'"),
        ({"name": "a", "label": "ok", "verdict": "NG", "score": 1.0}, "verdict 'NG'"),
        ({"name": "a", "label": "ok", "verdict": "ok", "score": "1.0"}, "score '1.0'"),
        ({"name": "a", "label": "ok", "verdict": "ok"}, "score None"),
        ({"name": "a", "verdict": "ok", "score": 1.0, "overlay": "/tmp/a.png"}, "not relative"),
        ({"name": "a", "verdict": "ok", "score": 1.0, "overlay": 7}, "expected a path"),
    ],
)
def test_bad_rows_leave_the_old_report_alone(
    tmp_path: Path, row: dict[str, object], message: str
) -> None:
    path = tmp_path / "r.html"
    path.write_text("old")
    with pytest.raises(ValueError, match=message):
        write_report(path, "New", {}, [row])
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.html"]


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for a full disk: the rename fails after the temporary file is written.
    path = tmp_path / "r.html"
    path.write_text("old")

    def no_space(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_report(path, "New", {}, [])
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.html"]
