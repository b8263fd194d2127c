"""Train on DATASET/train and evaluate on DATASET/test with the default options; print a table.

    python scripts/benchmark.py ../shared/datasets/*/

Every data set gets the same defaults; nothing is tuned per set. Training runs in a fresh
process so its peak memory (max RSS) is its own. Inference is timed per image with one
onnxruntime thread, after the model's warm-up, and reported as p50/p95/p99.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.evaluate import metrics_of, score_folder
from edge.model import Model

TRAIN = """
import json, resource, sys, time
from pathlib import Path
from edge.train import train
t0 = time.monotonic()
r = train(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"seconds": time.monotonic() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "normals": r.meta.train_normal_count, "anomalies": r.meta.train_anomaly_count,
                  "calibration": r.meta.calibration}))
"""


def bench(data: Path, workdir: Path) -> dict[str, object]:
    model_path = workdir / f"{data.name}.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN, str(data / "train"), str(model_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        sys.exit(f"benchmark: training on {data} failed:\n{proc.stderr}")
    trained = json.loads(proc.stdout.strip().splitlines()[-1])
    model = Model(model_path, threads=1)
    results = score_folder(model, data / "test")
    m = metrics_of(model, results)
    ms = np.array([r.ms for r in results])
    return {
        "set": data.name,
        **{k: m[k] for k in ("auroc", "average_precision", "accuracy", "f1", "threshold")},
        "train_s": trained["seconds"],
        "train_rss_mb": trained["rss_mb"],
        "train_images": f"{trained['normals']}+{trained['anomalies']}",
        "calibration": trained["calibration"],
        "ms_p50": float(np.percentile(ms, 50)),
        "ms_p95": float(np.percentile(ms, 95)),
        "ms_p99": float(np.percentile(ms, 99)),
        "model_mb": model_path.stat().st_size / 1e6,
        "test_images": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.datasets:
            t0 = time.monotonic()
            rows.append(bench(data.resolve(), Path(tmp)))
            print(f"{data.name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(
        "| set | train imgs (good+defect) | AUROC | AP | accuracy | F1 | train s "
        "| train peak RSS MB "
        "| infer ms p50 | p95 | p99 | model MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['train_images']} | {r['auroc']:.4f} | {r['average_precision']:.4f} "
            f"| {r['accuracy']:.3f} | {r['f1']:.3f} | {r['train_s']:.1f} | {r['train_rss_mb']:.0f} "
            f"| {r['ms_p50']:.1f} | {r['ms_p95']:.1f} | {r['ms_p99']:.1f} | {r['model_mb']:.1f} |"
        )
    print()
    for r in rows:
        print(f"- {r['set']}: threshold {r['threshold']:.2f} by {r['calibration']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
