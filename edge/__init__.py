"""edge-inspect: teach a camera station what good parts look like and flag the bad ones."""

import os

__version__ = "0.1.0"

# onnxruntime 1.29 and later, on Linux too, write a device id under ~/.cache/Microsoft and
# send usage events to Microsoft unless this is set before it is imported. A station talks
# to its broker and nothing else; a user who wants the events can set it to 0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
