"""Static int8's float32 nodes: a prefix of the graph, the convolutions that cost most, and the head."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spade_sd.encoders import precision as low


def _conv(name: str, source: str, channels_in: int, channels_out: int, rng: np.random.Generator) -> tuple:
    weight = numpy_helper.from_array(
        rng.normal(0, 0.3, (channels_out, channels_in, 3, 3)).astype(np.float32), f"{name}.weight"
    )
    node = helper.make_node("Conv", [source, weight.name], [name], name=name, pads=[1, 1, 1, 1])
    return node, weight


def _residual_cnn(path, *, outlier: float = 1.0) -> list[str]:
    """A tiny CNN with a residual addition between convolutions, written to ``path``; returns its node names.

    stem → Clip → (conv → Relu, added to the Clip's output) → conv → Clip → conv → Relu → head conv → pool → flatten;
    ``outlier`` scales one output channel of the convolution ``block3``, widening its output's range.
    """
    rng = np.random.default_rng(0)
    specs = [("stem", "images", 3), ("block1", "stem_act", 4), ("block2", "add", 4), ("block3", "block2_act", 4)]
    nodes, weights = [], []
    for name, source, channels_in in specs:
        conv, weight = _conv(name, source, channels_in, 4, rng)
        if name == "block3":
            values = numpy_helper.to_array(weight).copy()
            values[0] *= outlier
            weight = numpy_helper.from_array(values, weight.name)
        nodes.append(conv)
        weights.append(weight)
        activation = "Relu" if name in ("block1", "block3") else "Clip"
        bounds = ["zero", "six"] if activation == "Clip" else []
        nodes.append(helper.make_node(activation, [name, *bounds], [f"{name}_act"], name=f"{name}_act"))
        if name == "block1":
            nodes.append(helper.make_node("Add", ["block1_act", "stem_act"], ["add"], name="add"))
    head, weight = _conv("head", "block3_act", 4, 8, rng)
    values = numpy_helper.to_array(weight).copy()
    values[:, 0] = 0  # the head ignores block3's first channel: only its range matters, it narrows the others'
    weight = numpy_helper.from_array(values, weight.name)
    nodes += [
        head,
        helper.make_node("GlobalAveragePool", ["head"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
    ]
    weights += [weight, numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [8, 3, 16, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [8, 8])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return [node.name for node in nodes]


@pytest.mark.parametrize(
    ("front", "expected_front"),
    [
        # 5 convolutions: an eighth rounds to the stem alone, kept with its Clip
        (0.125, ["stem", "stem_act"]),
        # 3 convolutions: the residual addition between them is float32 too, and block2's Clip after the last one
        (0.6, ["stem", "stem_act", "block1", "block1_act", "add", "block2", "block2_act"]),
    ],
)
def test_float_nodes_are_a_prefix_and_the_head(tmp_path, monkeypatch, front, expected_front):
    names = _residual_cnn(tmp_path / "model.onnx")
    monkeypatch.setattr(low, "_FLOAT_FRONT", front)
    found = low._float_nodes(tmp_path / "model.onnx")
    assert found == expected_front + ["head", "pool", "flatten"]
    assert found[: len(expected_front)] == names[: len(expected_front)]


def test_no_float_node_of_the_front_reads_a_quantized_tensor(tmp_path, monkeypatch):
    """In the quantized graph, the float32 front's convolutions keep float32 weights and read no dequantized input.

    A float32 convolution fed through DequantizeLinear ran wrong once onnxruntime optimized the graph
    (benchmarks/results/scale_log.md, "Lite0 int8, session 2026-12-05").
    """
    _residual_cnn(tmp_path / "model.onnx")
    monkeypatch.setattr(low, "_FLOAT_FRONT", 0.6)
    monkeypatch.setattr(low, "_SENSITIVITY_BUDGET", np.inf)  # no convolution kept for its cost
    images = np.random.default_rng(1).normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    low.quantize_int8(tmp_path / "model.onnx", tmp_path / "int8.onnx", scheme="static", calibration=images)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    by_name = {node.name: node for node in graph.node}
    front = ["stem", "stem_act", "block1", "block1_act", "add", "block2"]  # block2's Clip folds into the next Q
    assert all(name in by_name for name in front)
    assert not any(set(by_name[name].input) & dequantized for name in front)
    # the rest is quantized: block3 reads a dequantized tensor and a dequantized weight
    assert set(by_name["block3"].input) <= dequantized


def _images(n: int = 16) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def _sensitive(model, budget: float, monkeypatch) -> list[str]:
    monkeypatch.setattr(low, "_SENSITIVITY_BUDGET", budget)
    front = low._float_nodes(model)
    return low._sensitive_nodes(model, _images(), front=front, ranges=model.with_name("ranges.json"))


def test_the_costliest_convolutions_stay_float32(tmp_path, monkeypatch):
    budget = low._SENSITIVITY_BUDGET
    model = tmp_path / "model.onnx"
    _residual_cnn(model)
    # front: the stem; measured: block1-3 with their activations, each costing ~0 here
    assert _sensitive(model, budget, monkeypatch) == []
    assert _sensitive(model, 0.0, monkeypatch) == [
        "block1",
        "block1_act",
        "block2",
        "block2_act",
        "block3",
        "block3_act",
    ]
    # block3's outlier channel widens its output's range: quantized alone, it costs ~0.5 of cosine, the others ~0
    outlier = tmp_path / "outlier" / "model.onnx"
    outlier.parent.mkdir()
    _residual_cnn(outlier, outlier=300.0)
    assert _sensitive(outlier, budget, monkeypatch) == ["block3", "block3_act"]
    assert _sensitive(outlier, np.inf, monkeypatch) == []


def test_int8_sessions_run_float32_convolutions_as_float32(tmp_path):
    """A float32 convolution amid quantized ones stays float32 when run (onnxruntime would quantize its weights)."""
    model = tmp_path / "model.onnx"
    _residual_cnn(model)
    images = _images(8)
    low._quantize_static(
        model,
        tmp_path / "int8.onnx",
        images,
        exclude=["block2", "block2_act", "head", "pool", "flatten"],
        ranges=tmp_path / "ranges.json",
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    found = low._run(low.int8_session(tmp_path / "int8.onnx"), images)
    expected = low._run(as_written, images)
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_int8_name_tells_rules_apart(monkeypatch):
    calibration = np.zeros((16, 8, 8, 3), dtype=np.uint8)
    name = low.int8_name("static", calibration)
    monkeypatch.setattr(low, "_STATIC_RULE", "another rule")
    assert low.int8_name("static", calibration) != name
    assert low.int8_name("dynamic", None) == "dynamic"
