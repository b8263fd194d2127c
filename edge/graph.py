"""Builds the ONNX graphs: camera image -> patch features, and patch features -> anomaly map.

One model file holds the whole path from the camera's uint8 BGR image to the image score:

    image uint8 [H, W, 3] BGR
      -> crop the region of interest; one to be shrunk over LARGE times is first shrunk (uint8)
      -> float NCHW, resized (antialiased, aspect ratio kept) so the longer side is `size`
         pixels (a thin strip: the shorter side MIN_SIDE), both sides rounded to a multiple
         of 16; BGR -> RGB
      -> the region's own mean subtracted and its spread brought to CONTRAST (see there),
         reflect-padded by PAD pixels (keeps zero padding out of the border cells)
      -> EfficientNet-Lite0 up to stride 16
      -> 3x3 average of each map, stride-16 map upsampled to stride 8, concatenated (152 channels)
      -> distance of every patch to its nearest memory-bank entry, standardised by the mean and
         spread good images show at that position class (border rings vs interior), smoothed,
         less the size allowance (see _score) when regions differ in size
      -> anomaly_map [1, 1, h, w] and score [1] (its maximum)

Training runs the same graph, cut after the features, so nothing outside it re-implements
the preprocessing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
STRIDE = 8
PAD = 32  # pixels of the resized image; a multiple of 16
STD = 128.0  # the backbone takes (x - 127) / 128: grey levels / STD are its input units
# Each region is shifted to mean 0 and scaled to a spread (standard deviation) of CONTRAST grey
# levels: about that of the ImageNet photos the backbone learnt from (0.226 x 255). A lamp that
# dims or an exposure that drifts then changes nothing, and faint marks on a dull, low-contrast
# surface reach the backbone as plainly as on a lively one. The price: a change of brightness
# or contrast over the whole region, and nothing else, is not seen.
CONTRAST = 58.0
MIN_SPREAD = 8.0  # a blank or covered view's noise is not blown up more than CONTRAST / this
MIN_SIDE = PAD + 16  # shortest side after resizing: reflect padding needs more than PAD px
LARGE = 4  # regions shrunk more than this many times are shrunk in uint8 first
SMOOTH_SIGMA = 1.0  # in map cells
BORDER_RINGS = 2  # cells 0, 1 and 2+ from each edge make the position classes
POSITION_CLASSES = (BORDER_RINGS + 1) ** 2


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(
        self,
        value: np.ndarray | list[int] | list[float] | int,
        dtype: type = np.int64,
        name: str = "",
    ) -> str:
        self._n += 1
        name = name or f"c{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str:
        self._n += 1
        outs = [f"t{self._n}_{i}" for i in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, name=f"n{self._n}")
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        self.nodes.append(node)
        return outs[0]


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) the region is resized to: longer side `size`, aspect ratio kept,
    multiples of 16. A strip too thin for that keeps its ratio with a shorter side of MIN_SIDE.

    >>> resized_size(380, 550, 256)
    (176, 256)
    >>> resized_size(100, 1000, 256)
    (48, 480)
    """
    scale = max(size / max(height, width), MIN_SIDE / min(height, width))
    return round(height * scale / 16) * 16, round(width * scale / 16) * 16


def map_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The anomaly map's (height, width) for a region of that size."""
    h, w = resized_size(height, width, size)
    return h // STRIDE, w // STRIDE


def _scale(b: _Builder, hw: str, size: int) -> str:
    """resized_size()'s scale in the graph: max(size / longer side, MIN_SIDE / shorter side)."""
    by_longer = b.op("Div", [b.const([float(size)], np.float32), b.op("ReduceMax", [hw])])
    by_shorter = b.op("Div", [b.const([float(MIN_SIDE)], np.float32), b.op("ReduceMin", [hw])])
    return b.op("Max", [by_longer, by_shorter])


def _preprocess(b: _Builder, image: str, roi: tuple[int, int, int, int] | None, size: int) -> str:
    x = image
    if roi is not None:
        rx, ry, rw, rh = roi
        x = b.op("Slice", [x, b.const([ry, rx]), b.const([ry + rh, rx + rw]), b.const([0, 1])])
    x = b.op("Unsqueeze", [x, b.const([0])])  # [1, h, w, 3]
    hw = b.op("Cast", [b.op("Slice", [b.op("Shape", [x]), b.const([1]), b.const([3])])], to=1)
    # A region to be shrunk more than LARGE times (a 12-megapixel phone photo, say) is first
    # shrunk to twice its working size while still uint8 and channels-last: it never becomes
    # a float copy of itself (145 MB), and it takes a third of the time. Others pass unchanged.
    scale = _scale(b, hw, size)
    large = b.op("Less", [scale, b.const([1.0 / LARGE], np.float32)])
    factor = b.op("Where", [large, b.op("Add", [scale, scale]), b.const([1.0], np.float32)])
    hw = b.op("Round", [b.op("Mul", [hw, factor])])
    first = b.op("Concat", [b.const([1]), b.op("Cast", [hw], to=7), b.const([3])], axis=0)
    x = b.op("Resize", [x, "", "", first], mode="linear", antialias=1)
    x = b.op("Transpose", [b.op("Cast", [x], to=TensorProto.FLOAT)], perm=[0, 3, 1, 2])
    # The working size, computed in the graph so the same file serves any region size.
    sixteenths = b.op(
        "Round",
        [b.op("Div", [b.op("Mul", [hw, _scale(b, hw, size)]), b.const([16.0], np.float32)])],
    )
    target = b.op("Cast", [b.op("Mul", [sixteenths, b.const([16.0], np.float32)])], to=7)
    sizes = b.op("Concat", [b.const([1, 3]), target], axis=0)
    x = b.op("Resize", [x, "", "", sizes], mode="linear", antialias=1)
    x = b.op("Gather", [x, b.const([2, 1, 0])], axis=1)  # BGR -> RGB, on the small image
    # One mean and one spread over all three channels, so colours keep their balance.
    x = b.op("Sub", [x, b.op("ReduceMean", [x], keepdims=1)])
    spread = b.op("Sqrt", [b.op("ReduceMean", [b.op("Mul", [x, x])], keepdims=1)])
    spread = b.op("Max", [spread, b.const([MIN_SPREAD], np.float32)])
    x = b.op("Mul", [x, b.op("Div", [b.const([CONTRAST / STD], np.float32), spread])])
    pads = b.const([0, 0, PAD, PAD, 0, 0, PAD, PAD])
    return b.op("Pad", [x, pads], mode="reflect")


def _inline_backbone(b: _Builder, backbone: onnx.ModelProto, x: str) -> tuple[str, str]:
    graph = backbone.graph
    rename = {graph.input[0].name: x}

    def name(n: str) -> str:
        return rename.get(n, f"bb/{n}") if n else ""

    for init in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = name(init.name)
        b.inits.append(copy)
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"bb/{node.name}"
        copy.input[:] = [name(i) for i in node.input]
        copy.output[:] = [name(o) for o in node.output]
        b.nodes.append(copy)
    return name(graph.output[0].name), name(graph.output[1].name)


def _features(b: _Builder, s8: str, s16: str) -> str:
    s8 = b.op("AveragePool", [s8], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    s16 = b.op("AveragePool", [s16], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    sizes = b.op("Shape", [s8])
    sizes = b.op(
        "Concat", [b.const([1, 112]), b.op("Slice", [sizes, b.const([2]), b.const([4])])], axis=0
    )
    s16 = b.op("Resize", [s16, "", "", sizes], mode="linear")
    f = b.op("Concat", [s8, s16], axis=1)
    cut = PAD // STRIDE  # drop the cells that only saw padding
    return b.op("Slice", [f, b.const([cut, cut]), b.const([-cut, -cut]), b.const([2, 3])])


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = int(np.ceil(2 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = np.outer(g, g)
    out: np.ndarray = (k / k.sum()).astype(np.float32)[None, None]
    return out


def position_classes(h: int, w: int) -> np.ndarray:
    """Each map cell's position class: 3 * rows-from-edge + columns-from-edge, both capped at 2.

    Cells at the border see padding and the part's own edges, so their nearest-neighbour
    distances run higher and wider than inside; class 8 is the interior. The model keeps a
    mean and a scale per class, learnt from held-out good images.
    """
    i, j = np.arange(h), np.arange(w)
    a = np.minimum(np.minimum(i, h - 1 - i), BORDER_RINGS)
    c = np.minimum(np.minimum(j, w - 1 - j), BORDER_RINGS)
    out: np.ndarray = a[:, None] * (BORDER_RINGS + 1) + c[None, :]
    return out


def _position_classes(b: _Builder, hw: str) -> str:
    """position_classes() in the graph, for a map whose size is only known at run time."""
    rings = b.const(BORDER_RINGS)

    def edge_distance(axis: int) -> str:
        n = b.op(
            "Squeeze", [b.op("Slice", [hw, b.const([axis]), b.const([axis + 1])]), b.const([0])]
        )
        i = b.op("Range", [b.const(0), n, b.const(1)])
        back = b.op("Sub", [b.op("Sub", [n, b.const(1)]), i])
        return b.op("Min", [i, back, rings])

    a = b.op("Unsqueeze", [edge_distance(0), b.const([1])])
    c = b.op("Unsqueeze", [edge_distance(1), b.const([0])])
    return b.op("Add", [b.op("Mul", [a, b.const(BORDER_RINGS + 1)]), c])


def _allowance(b: _Builder, cells: str) -> str:
    """sqrt(2 ln cells): about how far the highest of that many standard normal values lies
    above their mean."""
    return b.op("Sqrt", [b.op("Mul", [b.op("Log", [cells]), b.const([2.0], np.float32)])])


def _score(
    b: _Builder, fmap: str, bank_t: str, bank_sq: str, mean: str, inv_scale: str, ref_cells: str
) -> tuple[str, str, str]:
    """Nearest-neighbour distance of each patch in fmap [1, C, h, w] to bank_t [C, M],
    standardised per position class: (d - mean[class]) * inv_scale[class], then smoothed.

    The score is the map's maximum, and a larger region has more cells in which the noise of
    a good part can peak. Where regions differ in size (a model for any size), the map is
    lowered by the difference in sqrt(2 ln cells) between this map and one of ref_cells cells
    (the training images' usual map), so that a wide region and a narrow one are held to the
    same false-reject rate. A map of ref_cells cells, as every map of a one-size model is, is
    left exactly as it is."""
    shape = b.op("Shape", [fmap])
    c = b.op("Slice", [shape, b.const([1]), b.const([2])])
    q = b.op(
        "Transpose",
        [b.op("Reshape", [fmap, b.op("Concat", [c, b.const([-1])], axis=0)])],
        perm=[1, 0],
    )
    # |q - m|^2 = |q|^2 - 2 q.m + |m|^2; the minimum over m needs only the last two terms.
    cross = b.op("MatMul", [q, bank_t])
    nearest = b.op(
        "ReduceMin", [b.op("Sub", [bank_sq, b.op("Add", [cross, cross])]), b.const([1])], keepdims=0
    )
    qq = b.op("ReduceSum", [b.op("Mul", [q, q]), b.const([1])], keepdims=0)
    dist = b.op("Sqrt", [b.op("Relu", [b.op("Add", [nearest, qq])])])
    hw = b.op("Slice", [shape, b.const([2]), b.const([4])])
    raw = b.op("Reshape", [dist, b.op("Concat", [b.const([1, 1]), hw], axis=0)])
    classes = _position_classes(b, hw)
    z = b.op("Sub", [raw, b.op("Gather", [mean, classes], axis=0)])
    z = b.op("Mul", [z, b.op("Gather", [inv_scale, classes], axis=0)])
    kernel = _gaussian_kernel(SMOOTH_SIGMA)
    r = kernel.shape[-1] // 2
    padded = b.op("Pad", [z, b.const([0, 0, r, r, 0, 0, r, r])], mode="reflect")
    amap = b.op("Conv", [padded, b.const(kernel, np.float32)])
    cells = b.op("Cast", [b.op("ReduceProd", [hw], keepdims=1)], to=TensorProto.FLOAT)
    amap = b.op("Sub", [amap, b.op("Sub", [_allowance(b, cells), _allowance(b, ref_cells)])])
    score = b.op("ReduceMax", [amap, b.const([1, 2, 3])], keepdims=0)
    return b.op("Reshape", [score, b.const([1])]), amap, raw


def _image_input(image_hw: tuple[int, int] | None) -> onnx.ValueInfoProto:
    dims: list[int | str] = [*image_hw, 3] if image_hw else ["height", "width", 3]
    return helper.make_tensor_value_info("image", TensorProto.UINT8, dims)


_OUTPUT_DIMS: dict[str, list[int | str]] = {
    "features": [1, "channels", "h", "w"],
    "score": [1],
    "anomaly_map": [1, 1, "h", "w"],
    "raw_map": [1, 1, "h", "w"],
}


def _finish(
    b: _Builder, inputs: list[onnx.ValueInfoProto], outputs: dict[str, str]
) -> onnx.ModelProto:
    for public, internal in outputs.items():
        b.nodes.append(helper.make_node("Identity", [internal], [public], name=f"out/{public}"))
    graph = helper.make_graph(
        b.nodes,
        "edge_inspect",
        inputs,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, _OUTPUT_DIMS[k]) for k in outputs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # readable by onnxruntime >= 1.15
    return model


def build_feature_graph(
    backbone: onnx.ModelProto,
    image_hw: tuple[int, int] | None,
    roi: tuple[int, int, int, int] | None,
    size: int,
) -> onnx.ModelProto:
    """image [H, W, 3] uint8 BGR -> features [1, 152, h, w]."""
    b = _Builder()
    s8, s16 = _inline_backbone(b, backbone, _preprocess(b, "image", roi, size))
    return _finish(b, [_image_input(image_hw)], {"features": _features(b, s8, s16)})


def build_scoring_graph(channels: int) -> onnx.ModelProto:
    """features [1, C, h, w], bank [C, M], bank_sq [M], mean [K], inv_scale [K], ref_cells [1]
    -> score [1], anomaly_map [1, 1, h, w], raw_map [1, 1, h, w] (distances before standardising).

    Calibration runs this with parts of the bank held out.
    """
    b = _Builder()
    score, amap, raw = _score(b, "features", "bank", "bank_sq", "mean", "inv_scale", "ref_cells")
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("features", f, [1, channels, "h", "w"]),
        helper.make_tensor_value_info("bank", f, [channels, "m"]),
        helper.make_tensor_value_info("bank_sq", f, ["m"]),
        helper.make_tensor_value_info("mean", f, [POSITION_CLASSES]),
        helper.make_tensor_value_info("inv_scale", f, [POSITION_CLASSES]),
        helper.make_tensor_value_info("ref_cells", f, [1]),
    ]
    return _finish(b, inputs, {"score": score, "anomaly_map": amap, "raw_map": raw})


def build_model_graph(
    backbone: onnx.ModelProto,
    image_hw: tuple[int, int] | None,
    roi: tuple[int, int, int, int] | None,
    size: int,
    bank: np.ndarray,
    mean: np.ndarray,
    inv_scale: np.ndarray,
    ref_cells: int,
) -> onnx.ModelProto:
    """The deployable model: image -> score [1], anomaly_map [1, 1, h, w].

    bank is [M, C]; mean and inv_scale [POSITION_CLASSES] standardise the distances;
    ref_cells is the usual map size of the training images (see _score).
    """
    b = _Builder()
    s8, s16 = _inline_backbone(b, backbone, _preprocess(b, "image", roi, size))
    fmap = _features(b, s8, s16)
    bank = bank.astype(np.float32)
    bank_t = b.const(np.ascontiguousarray(bank.T), np.float32, "memory_bank_t")
    bank_sq = b.const((bank * bank).sum(axis=1), np.float32, "memory_bank_sq")
    stats = [
        b.const(mean, np.float32, "position_mean"),
        b.const(inv_scale, np.float32, "position_inv_scale"),
        b.const([float(ref_cells)], np.float32, "reference_cells"),
    ]
    score, amap, _ = _score(b, fmap, bank_t, bank_sq, *stats)
    return _finish(b, [_image_input(image_hw)], {"score": score, "anomaly_map": amap})
