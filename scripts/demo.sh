#!/usr/bin/env bash
# The demo, no camera needed: draw a synthetic data set of good and defective metal parts,
# train a model on it, evaluate it on the held-out split, inspect one good and one bad part,
# then run the whole station: a folder of test images replayed as a camera at 5 frames/s,
# verdicts published to a private Mosquitto broker, and `edge-inspect watch` showing them as
# the line controller sees them. Everything it writes goes under demo/ (git-ignored).
#   bash scripts/demo.sh          # the station replays the test images once, then stops
#   bash scripts/demo.sh --page   # the station keeps running with its page open on localhost
#                                 # (label, train, swap models in a browser); Ctrl-C stops it
# Needs Mosquitto; on Debian it installs it with apt-get (through sudo when not root).
set -euo pipefail
cd "$(dirname "$0")/.."
page=0
case "${1:-}" in
--page) page=1 ;;
"") ;;
*)
    echo "usage: bash scripts/demo.sh [--page]" >&2
    exit 64
    ;;
esac

sudo=()
((EUID == 0)) || sudo=(sudo)
pids=()
remove_policy=0
cleanup() {
    for pid in "${pids[@]}"; do { kill "$pid" && wait "$pid"; } 2>/dev/null || true; done
    ((!remove_policy)) || "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
}
trap cleanup EXIT

# System packages first, so that a missing one fails in seconds, not after training.
packages=()
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || packages+=(mosquitto)
python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv) # Debian's python3
if ((${#packages[@]})) && ! command -v apt-get >/dev/null; then
    echo "demo.sh: needs ${packages[*]}: install it with your package manager" >&2
    exit 69
fi
if ((${#packages[@]})); then
    echo "installing ${packages[*]} with ${sudo[*]:+sudo }apt-get"
    # We start our own broker on a free port: policy-rc.d answering 101 keeps the package's
    # service from starting (as in .ci/run).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
        remove_policy=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${packages[@]}"
    ((!remove_policy)) || "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    remove_policy=0
fi

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

rm -rf demo/data # drawn afresh each time; the same seed gives the same images
python scripts/make_demo_data.py demo/data
edge-inspect train demo/data/train -o demo/model.onnx
edge-inspect evaluate demo/model.onnx demo/data/test --report demo/report
edge-inspect detect demo/model.onnx --overlays demo/detections \
    demo/data/test/normal/good_000.png demo/data/test/anomaly/scratch_000.png

echo
echo "=== the station: replaying demo/replay as a camera, publishing to a local broker ==="
# Parts pass the camera good, bad, good, bad...: the test split's images interleaved by name.
rm -rf demo/replay demo/state
mkdir -p demo/replay
goods=(demo/data/test/normal/*.png)
bads=(demo/data/test/anomaly/*.png)
for i in "${!goods[@]}"; do
    cp "${goods[i]}" "demo/replay/$(printf %03d "$i")a-$(basename "${goods[i]}")"
    bad=${bads[i]:-}
    [[ -z "$bad" ]] || cp "$bad" "demo/replay/$(printf %03d "$i")b-$(basename "$bad")"
done

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
web_port=8080
(exec 3<>"/dev/tcp/127.0.0.1/$web_port") 2>/dev/null && web_port=$(free_port) # 8080 is taken
cat >demo/mosquitto.conf <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
# Logging through our own redirection: run as root, mosquitto drops to its own user, which
# may not be allowed to open a file under demo/.
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c demo/mosquitto.conf 2>demo/mosquitto.log &
pids+=($!)
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat demo/mosquitto.log >&2; exit 69; }
    sleep 0.1
done
echo "mosquitto on 127.0.0.1:$port (log demo/mosquitto.log)"

cat >demo/config.toml <<EOF
# Written by scripts/demo.sh: the station with a folder of images standing in for the camera.
[station]
name = "demo"
budget_ms = 200
state_dir = "demo/state"

[model]
path = "demo/model.onnx"

[source]
kind = "folder"
path = "demo/replay"
fps = 5
loop = $( ((page)) && echo true || echo false )   # false: the station stops after the last image

[trigger]
mode = "free"

[mqtt]
host = "127.0.0.1"
port = $port
prefix = "demo/line1/station1"
stats_interval_s = 5

[web]
enabled = true                    # the station page, on this machine only (127.0.0.1)
port = $web_port
EOF
edge-inspect check-config demo/config.toml

# The station's own dataset (the page's Dataset tab) starts with the training images, one in
# five held back for testing, as the page does with the frames you label.
for label in normal anomaly; do
    i=0
    for f in demo/data/train/$label/*.png; do
        split=train
        (((++i) % 5)) || split=test
        mkdir -p "demo/state/dataset/$split/$label"
        cp "$f" "demo/state/dataset/$split/$label/"
    done
done

if ((page)); then
    echo
    echo "=== the station page: open http://127.0.0.1:$web_port/ in a browser; Ctrl-C stops ==="
    echo "(Train: train a new model from the dataset, compare it, use it; Try: upload images)"
    edge-inspect run --config demo/config.toml
    exit 0
fi

# The line controller's view, in the background; the station in the foreground.
edge-inspect watch --config demo/config.toml --seconds 120 &
pids+=($!)
watch_pid=$!
sleep 1 # let watch subscribe before the first verdict
echo "the station page is at http://127.0.0.1:$web_port/ while the station runs (demo.sh --page keeps it)"
edge-inspect run --config demo/config.toml
sleep 0.5 # the last messages (stats, offline) reach watch
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true

echo
echo "=== the journal ==="
edge-inspect records --config demo/config.toml --limit 5
echo
ng=$(find demo/state/frames -name '*-ng.jpg' | wc -l)
echo "journal:    demo/state/journal.sqlite  (all of it: edge-inspect records --config demo/config.toml --csv -)"
echo "NG frames:  $ng in demo/state/frames/<UTC date>/, as <seq>-ng.jpg"
echo "overlays:   the same folder, as <seq>-ng-overlay.jpg"
echo "config:     demo/config.toml, broker log demo/mosquitto.log"
echo "the page:   bash scripts/demo.sh --page   keeps the station running, with its page on localhost"
