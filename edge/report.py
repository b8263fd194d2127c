"""The evaluation report: one static HTML page with the metrics and a card per image."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePath
from urllib.parse import quote

from edge.files import write_atomically

# Metric keys as metrics.summarize writes them, in the order and wording the table shows.
_METRICS = {
    "auroc": "AUROC",
    "average_precision": "Average precision",
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "threshold": "Threshold",
}
# Other keys metrics_of adds, and how the table names them.
_EXTRA = {
    "normal_images": "Good images",
    "anomaly_images": "Defective images",
    "ms_p50": "Inference ms p50 (one thread)",
    "ms_p95": "Inference ms p95",
    "model_id": "Model id",
}
# Shares read best with fixed decimals; a threshold can be any size.
_SIGNIFICANT = {"threshold"}
_COUNTS = ("tp", "fp", "tn", "fn")
_LABELS = ("ok", "ng")

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 1rem; max-width: 80rem;
       color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; margin: 0 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 0.5rem; }
.tables { display: flex; flex-wrap: wrap; gap: 1rem 2rem; align-items: flex-start; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; gap: 0.8rem; grid-template-columns: repeat(auto-fill, minmax(15rem, 1fr)); }
.card { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }
.card img { display: block; width: 100%; height: auto; background: #eee; }
.card figcaption { padding: 0.4rem 0.6rem; font-size: 0.9rem; }
.card .name { font-weight: 600; overflow-wrap: anywhere; }
.wrong { border: 3px solid #c62828; }
.wrong .flag { color: #fff; background: #c62828; padding: 0 0.4rem; border-radius: 3px; }
.ok { color: #2e7d32; font-weight: 600; }
.ng { color: #c62828; font-weight: 600; }
.none { padding: 2rem 0.6rem; color: #777; text-align: center; }
.about th { font-weight: normal; color: #555; }
.failed { color: #c62828; }
"""


@dataclass(frozen=True)
class _Card:
    name: str
    label: str | None
    verdict: str
    score: float
    src: str | None

    @property
    def wrong(self) -> bool:
        return self.label is not None and self.label != self.verdict


def write_report(
    path: Path,
    title: str,
    metrics: Mapping[str, object],
    rows: Sequence[Mapping[str, object]],
    about: Mapping[str, str] | None = None,
    failed: Sequence[tuple[str, str]] = (),
) -> None:
    """Write the report to `path` in one step, replacing any old one only when complete.

    `metrics` holds the keys of `metrics.summarize` (others are listed after them); each row
    holds `name`, `label` ("ok", "ng" or None when unknown), `verdict` ("ok" or "ng"),
    `score` and `overlay`, a path to the overlay image relative to the report's folder.
    `about` says what was evaluated (test data, date, threshold rule), one line a key, and
    `failed` lists (name, reason) of images that could not be judged.
    Missed defects come first, the lowest score (the worst miss) first; then false alarms,
    the highest first; then the rest by score. Example:
    `write_report(Path("out/report.html"), "Brackets", summarize(n, a, t), rows)`.
    """
    cards = sorted(map(_card, rows), key=_order)
    missed = sum(card.wrong and card.verdict == "ok" for card in cards)
    alarms = sum(card.wrong and card.verdict == "ng" for card in cards)
    summary = (
        f"{len(cards)} images judged: {missed} missed defect{'' if missed == 1 else 's'}, "
        f"{alarms} false alarm{'' if alarms == 1 else 's'}"
        + (f"; {len(failed)} could not be judged (listed at the end)." if failed else ".")
    )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            _about_table(about or {}),
            f"<p>{escape(summary)}</p>",
            '<div class="tables">',
            _metrics_table(metrics),
            _confusion_table(metrics),
            "</div>",
            "<h2>Images</h2>",
            '<div class="grid">',
            *map(_card_html, cards),
            "</div>",
            _failed_list(failed),
            "</body></html>",
            "",
        ]
    )
    write_atomically(path, page)


def _order(card: _Card) -> tuple[int, float, str]:
    if card.wrong:
        return (0, card.score, card.name) if card.verdict == "ok" else (1, -card.score, card.name)
    return 2, -card.score, card.name


def _about_table(about: Mapping[str, str]) -> str:
    if not about:
        return ""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in about.items())
    return f'<table class="about">{rows}</table>'


def _failed_list(failed: Sequence[tuple[str, str]]) -> str:
    if not failed:
        return ""
    items = "".join(
        f'<li><span class="name">{escape(n)}</span>: <span class="failed">{escape(why)}</span></li>'
        for n, why in failed
    )
    return f"<h2>Not judged</h2><ul>{items}</ul>"


def _card(row: Mapping[str, object]) -> _Card:
    name = row.get("name")
    if not isinstance(name, str):
        raise ValueError(f"report row {row!r} has no name")
    label = row.get("label")
    if label is not None and label not in _LABELS:
        raise ValueError(f"report row {name!r} has label {label!r}; expected 'ok', 'ng' or None")
    verdict = row.get("verdict")
    if verdict not in _LABELS:
        raise ValueError(f"report row {name!r} has verdict {verdict!r}; expected 'ok' or 'ng'")
    score = row.get("score")
    if not isinstance(score, numbers.Real):
        raise ValueError(f"report row {name!r} has score {score!r}; expected a number")
    overlay = row.get("overlay")
    src = None
    if overlay is not None:
        if not isinstance(overlay, (str, PurePath)):
            raise ValueError(f"report row {name!r} has overlay {overlay!r}; expected a path")
        relative = PurePath(overlay)
        if relative.is_absolute() or relative.as_posix().startswith("/"):
            raise ValueError(f"report row {name!r} has overlay {overlay}, which is not relative")
        src = quote(relative.as_posix())
    return _Card(name, None if label is None else str(label), str(verdict), float(score), src)


def _card_html(card: _Card) -> str:
    name = escape(card.name)
    if card.src is None:
        picture = '<div class="none">no overlay</div>'
    else:
        picture = f'<img src="{escape(card.src)}" alt="overlay of {name}" loading="lazy">'
    flag = ""
    if card.wrong:
        flag = " missed defect" if card.verdict == "ok" else " false alarm"
        flag = f' <span class="flag">{flag.strip()}</span>'
    truth = card.label.upper() if card.label else "unknown"
    return (
        f'<figure class="card{" wrong" if card.wrong else ""}">{picture}<figcaption>'
        f'<div class="name">{name}</div>'
        f'<div>label {truth} · verdict <span class="{card.verdict}">'
        f"{card.verdict.upper()}</span>{flag}</div>"
        f"<div>score {card.score:.4g}</div></figcaption></figure>"
    )


def _metrics_table(metrics: Mapping[str, object]) -> str:
    keys = [k for k in _METRICS if k in metrics]
    keys += [k for k in metrics if k not in _METRICS and k not in _COUNTS]
    rows = ""
    for key in keys:
        value = _number(metrics[key], significant=key in _SIGNIFICANT or key not in _METRICS)
        rows += (
            f"<tr><th>{escape(_METRICS.get(key, _EXTRA.get(key, key)))}</th>"
            f'<td class="n">{escape(value)}</td></tr>'
        )

    return f"<table><caption>Metrics</caption>{rows}</table>"


def _confusion_table(metrics: Mapping[str, object]) -> str:
    if not all(k in metrics for k in _COUNTS):
        return ""
    tp, fp, tn, fn = (escape(_number(metrics[k])) for k in _COUNTS)
    return (
        "<table><caption>Confusion matrix</caption>"
        "<tr><th></th><th>verdict OK</th><th>verdict NG</th></tr>"
        f'<tr><th>label OK</th><td class="n">{tn}</td><td class="n">{fp}</td></tr>'
        f'<tr><th>label NG</th><td class="n">{fn}</td><td class="n">{tp}</td></tr>'
        "</table>"
    )


def _number(value: object, significant: bool = False) -> str:
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        return f"{number:.4g}" if significant else f"{number:.4f}"
    return str(value)
