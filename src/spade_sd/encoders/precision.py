"""Low-precision CPU engines of a :class:`~spade_sd.Backbone`, and the fidelity gate that admits them.

Two engines trade precision for speed on the CPU:

``"int8"``
    The backbone's ONNX export quantized by onnxruntime (per-channel int8 weights), from a second export whose
    shapes are all fixed. Models made mostly of linear layers (vision transformers) are quantized dynamically:
    activations are scaled as they come, one patch at a time, so no calibration is needed. Convolutional models are
    quantized statically in QDQ format, their activation ranges calibrated on real patches
    (``Backbone(calibration=...)``). Three parts stay in float32: the graph up to the first eighth of the
    convolutions (the stem and the high-resolution blocks, the most sensitive layers); the other convolutions that
    cost most, each measured quantized alone on the calibration patches, until the rest's summed cost fits a budget;
    and the last convolution or matrix product with all after it (head, pooling). Measuring costs one quantization
    per convolution on first use (EfficientNet-Lite0: 27-70 s on one busy core), cached with the model.
``"bf16"``
    A bfloat16 copy of the PyTorch module, channels-last, run by oneDNN. Fast only where the CPU multiplies bfloat16
    natively (AVX512-BF16 or AMX, see :func:`bf16_native`); elsewhere it is emulated and many times slower.

``engine="auto"`` considers them only when given real patches to judge them by: each must keep the median per-patch
cosine to the float32 features at or above :data:`AUTO_COSINE` on those patches (stricter than the :data:`GATE_COSINE`
an engine asked for explicitly must keep, as a stand-in for the downstream scores) and run faster on this CPU than
the float32 onnxruntime engine. The patches are split (:func:`split_calibration`): one half calibrates the int8
quantization, the other judges every engine, so the gate is never measured on what was fitted. The measurement is
made once per backbone, patches and machine, and cached next to the ONNX export. Measured speeds and fidelity:
``docs/scale.md``, section "On a CPU"; what was tried: ``benchmarks/results/scale_log.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spade_sd.encoders.modules import Pooled, eval_mode
from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

LOW_PRECISIONS = ("int8", "bf16")
# The least median per-patch cosine to the float32 features that a low-precision engine must keep (under it, an engine
# asked for explicitly runs with a warning)
GATE_COSINE = 0.995
# The least median cosine at which engine="auto" takes a low-precision engine: the downstream scores must stay within
# 0.005 too, and a runtime gate cannot score them (no expression), so it takes only what kept them on every engine
# measured. MOB, kNN retrieval and tuned-alpha probe leaving one section out (throughput_precision*.md): ViT-S/16 int8
# (0.9997) and bf16 (0.99995) moved them by at most 0.001; EfficientNet-Lite0 int8 (0.9978) moved the probe by +0.035
# and bf16 (0.997) by -0.093
AUTO_COSINE = 0.999
# Under this median cosine an explicitly requested int8 engine is refused as broken (above it, under GATE_COSINE, it
# runs with a warning): e.g. quantized shape arithmetic fell to 0.55-0.92 (benchmarks/results/scale_log.md)
BROKEN_COSINE = 0.95
# How much faster than float32 onnxruntime a low-precision engine must measure for engine="auto" to take it: timings
# of a few seconds on shared cores vary by ~5 %, so a smaller lead could be noise
GATE_SPEEDUP = 1.1
# Patches timed per engine when engine="auto" measures speed (the first judging patches)
_TIMED_PATCHES = 16
# The share of the first convolutions that static quantization keeps in float32, with every node before them (a
# prefix of the graph). EfficientNet-Lite0, 32 MOB1 patches calibrating, 128 held-back MOB2-3 patches judging
# (benchmarks/results/scale_log.md, "Lite0 int8, session 2026-12-05"): quantized alone, each of the stem's and the
# first two blocks' convolutions cost 0.001-0.005 of median cosine to float32, every later one under 0.001; the first
# 6 of 49 convolutions (an eighth) in float32 kept 0.9955, the first 3 kept 0.9937, 9 to 15 kept 0.9947-0.9950
_FLOAT_FRONT = 0.125
# Activations that a quantized convolution absorbs (its output takes their range): the float32 prefix ends after the
# one that alone reads its last convolution's output, which would otherwise be quantized apart, over the
# convolution's wide output range
_FUSED_ACTIVATIONS = ("Clip", "Relu")
# The summed cost (1 - median cosine to float32, each convolution quantized alone) that static quantization may leave
# in its quantized convolutions: 60 % of what the gate allows, the rest a margin for patches other than the
# calibration's. EfficientNet-Lite0 (scale_log.md, "Lite0 int8, session 2026-12-05"): after the front, the 3, 5 and 8
# costliest of 42 in float32 kept 0.9978, 0.9970 and 0.9987 at 2.1x, 2.0x and 1.7x float32's rate (one thread); in
# the benchmark, 6 kept (this budget) ran 1.64x float32, 7 (half the allowance) 1.42x
_SENSITIVITY_BUDGET = 0.6 * (1 - GATE_COSINE)
# onnxruntime's level-1 WeightBiasQuantization quantizes the float32 weights of a convolution between a
# DequantizeLinear and a QuantizeLinear, per tensor: a depthwise convolution kept in float32 that way fell from 0.97
# to 0.57 median cosine (EfficientNet-Lite0), so int8 sessions run without it
_INT8_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
# The version of the rule choosing the float32 nodes (v1: the first fifth of the convolutions, without what lies
# between them): a quantization made under another rule is another file, feature identity and gate measurement
_STATIC_RULE = "v2"

Int8Scheme = Literal["dynamic", "static"]


def bf16_native() -> bool:
    """Whether oneDNN multiplies bfloat16 natively on this CPU (AVX512-BF16 or AMX), rather than emulating it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query: assume emulation, the safe side
        return False


def median_cosine(found: np.ndarray, expected: np.ndarray) -> float:
    """Median over rows of the cosine similarity between ``found`` and ``expected`` features, ``(n, dim)`` each."""
    found, expected = np.asarray(found, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    norms = np.linalg.norm(found, axis=1) * np.linalg.norm(expected, axis=1)
    return float(np.median(np.sum(found * expected, axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)))


def check_calibration(patches: Any) -> np.ndarray:
    """``patches`` as a uint8 ``(n, height, width, 3)`` array of at least 16 patches, or a clear error."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8 or len(patches) < 16:
        raise ValueError(
            "expected calibration to be at least 16 real uint8 RGB patches of shape (n, height, width, 3), e.g. "
            f"sd.pp.spot_patches(sdata).read(np.arange(64)); found {patches.dtype} {patches.shape}"
        )
    return patches


def split_calibration(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patches that calibrate an int8 quantization (even rows) and those that judge engines (odd rows)."""
    return patches[0::2], patches[1::2]


def patches_digest(patches: np.ndarray) -> str:
    """SHA-256 hex digest of uint8 patches (shape and bytes): names what a calibration was made on."""
    digest = hashlib.sha256(f"{patches.shape}".encode())
    digest.update(np.ascontiguousarray(patches).tobytes())
    return digest.hexdigest()


def int8_scheme(module: torch.nn.Module) -> Int8Scheme:
    """``"dynamic"`` for a module with more linear layers than convolutions (transformers), else ``"static"``.

    Measured on MOB patches (``benchmarks/results/throughput_precision.md``): for ViT-S/16 dynamic quantization kept
    a median cosine of 0.9997 to float32 and ran faster than static, which fell to 0.976; for EfficientNet-Lite0
    dynamic quantization of the convolutions ran several times slower than float32, at a cosine of 0.47.
    """
    layers = list(module.modules())
    linear = sum(isinstance(layer, torch.nn.Linear) for layer in layers)
    conv = sum(isinstance(layer, torch.nn.modules.conv._ConvNd) for layer in layers)
    return "dynamic" if linear > conv else "static"


def check_int8(module: torch.nn.Module, calibration: np.ndarray | None) -> None:
    """Refuse int8 for a convolutional ``module`` without calibration patches, before any work."""
    if calibration is None and int8_scheme(module) == "static":
        raise ValueError(
            "engine='int8' quantizes a convolutional backbone statically, its activations calibrated on real "
            "patches: pass Backbone(..., calibration=patches), e.g. sd.pp.spot_patches(sdata).read(np.arange(64))"
        )


def int8_name(scheme: Int8Scheme, calibration: np.ndarray | None) -> str:
    """What tells int8 quantizations of one backbone apart: the scheme, and the calibration patches of a static one."""
    return "dynamic" if scheme == "dynamic" else f"static-{_STATIC_RULE}-{patches_digest(calibration)}"


def quantize_int8(source: Path, target: Path, *, scheme: Int8Scheme, calibration: np.ndarray | None) -> None:
    """Write the int8 quantization of the float32 ONNX model ``source`` to ``target`` (atomically).

    Parameters
    ----------
    source
        The float32 export, with one input named ``"images"``.
    scheme
        ``"dynamic"`` or ``"static"`` (:func:`int8_scheme`).
    target
        Where the quantized model goes; written next to it and renamed, so other processes never see half of it.
    calibration
        Preprocessed float32 ``(n, 3, size, size)`` images of real patches, for the static scheme; unused by the
        dynamic one.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if scheme == "static" and calibration is None:
        raise ValueError("static int8 quantization calibrates its activations on real patches; none were given")
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "quantized.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if scheme == "dynamic":
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8, per_channel=True)
        else:
            ranges = Path(folder) / "ranges.json"  # calibrated once, read by every quantization below
            front = _float_nodes(prepared)
            sensitive = _sensitive_nodes(prepared, calibration, front=front, ranges=ranges)
            _quantize_static(prepared, quantized, calibration, exclude=front + sensitive, ranges=ranges)
        quantized.replace(target)


def _quantize_static(source: Path, target: Path, calibration: np.ndarray, *, exclude: list[str], ranges: Path) -> None:
    """Static QDQ quantization of ``source`` but the nodes ``exclude``, activation ranges cached in ``ranges``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[start : start + 8] for start in range(0, len(calibration), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    quantize_static(
        source,
        target,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibration_cache_path=ranges,
    )


def int8_session(path: Path, options: Any = None) -> Any:
    """An onnxruntime CPU session of an int8 model, without the optimizers in :data:`_INT8_DISABLED_OPTIMIZERS`."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(_INT8_DISABLED_OPTIMIZERS)
    )


def _sensitive_nodes(prepared: Path, calibration: np.ndarray, *, front: list[str], ranges: Path) -> list[str]:
    """The convolutions (with their activations) that static quantization keeps in float32 for their measured cost.

    Each convolution outside ``front``, with the activation that alone reads its output, is quantized alone, and the
    median cosine of the features of the ``calibration`` images to float32's measures what it costs. Costs add up
    (EfficientNet-Lite0: 0.0203 summed over its units, 0.0196 measured with all quantized): the costliest stay in
    float32 until the others' sum is at most :data:`_SENSITIVITY_BUDGET`.
    """
    import onnx

    nodes = onnx.load(str(prepared)).graph.node
    units = _conv_units(nodes, exclude=set(front))
    if not units:
        return []
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads() or 0  # 0: onnxruntime's own choice
    expected = _run(int8_session(prepared, options), calibration)
    costs = []
    with tempfile.TemporaryDirectory(dir=prepared.parent) as folder:
        alone = Path(folder) / "alone.onnx"
        for unit in units:
            others = [node.name for node in nodes if node.name not in unit]
            _quantize_static(prepared, alone, calibration, exclude=others, ranges=ranges)
            costs.append(1 - median_cosine(_run(int8_session(alone, options), calibration), expected))
    kept, left = [], sum(costs)
    for i in sorted(range(len(units)), key=lambda i: (-costs[i], i)):
        if left <= _SENSITIVITY_BUDGET:
            break
        kept.append(i)
        left -= costs[i]
    logger.info(
        "static int8: %d of %d convolutions kept in float32 for their measured cost (%s), the rest's summed cost %.4f",
        len(kept),
        len(units),
        ", ".join(f"{units[i][0]} {costs[i]:.4f}" for i in kept),
        left,
    )
    return [name for i in sorted(kept) for name in units[i]]


def _conv_units(nodes: Any, *, exclude: set[str]) -> list[list[str]]:
    """Each convolution not in ``exclude``, with the activation in :data:`_FUSED_ACTIVATIONS` that alone reads it."""
    units = []
    for node in nodes:
        if node.op_type != "Conv" or node.name in exclude:
            continue
        readers = [other for other in nodes if node.output[0] in other.input]
        fused = len(readers) == 1 and readers[0].op_type in _FUSED_ACTIVATIONS and readers[0].name not in exclude
        units.append([node.name, readers[0].name] if fused else [node.name])
    return units


def _run(session: Any, images: np.ndarray) -> np.ndarray:
    """The session's output on ``images``, in its fixed batch (the images a multiple of it) or all at once."""
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(images)
    return np.concatenate([session.run(None, {"images": images[s : s + step]})[0] for s in range(0, len(images), step)])


def _float_nodes(model_path: Path) -> list[str]:
    """The nodes static quantization leaves in float32.

    Every node up to the first :data:`_FLOAT_FRONT` of the convolutions (at least one) and the activation in
    :data:`_FUSED_ACTIVATIONS` that alone reads the last one's output, and the last convolution or matrix product with
    every node after it (the head and the pooling). The front is a prefix of the (topologically sorted) graph, so no
    float32 node there reads a quantized tensor: with the first fifth of the convolutions alone in float32, the
    quantized residual additions between them cost EfficientNet-Lite0 0.9949 → 0.9926 of median cosine once
    onnxruntime optimized the graph, and a depthwise convolution kept in float32 amid quantized ones fell to 0.57.
    """
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    products = [i for i, node in enumerate(nodes) if node.op_type in ("Conv", "MatMul", "Gemm")]
    if not products:
        return []
    end = convs[max(1, round(_FLOAT_FRONT * len(convs))) - 1] if convs else -1
    readers = [i for i, node in enumerate(nodes) if end >= 0 and nodes[end].output[0] in node.input]
    if len(readers) == 1 and nodes[readers[0]].op_type in _FUSED_ACTIVATIONS:
        end = readers[0]
    return [node.name for node in nodes[: end + 1]] + [node.name for node in nodes[products[-1] :]]


class Bf16Engine:
    """Runs a bfloat16, channels-last copy of a pooled backbone module on the CPU, copied again when it changes.

    Parameters
    ----------
    pooled
        The float32 module; it is left as it is.
    state
        Returns a token that changes whenever the module's weights or attributes do; a changed token copies again.
    """

    def __init__(self, pooled: Pooled, *, state: Callable[[], Any]) -> None:
        self.pooled, self._state = pooled, state
        self._copy: Pooled | None = None
        self._copy_state: Any = None

    def runner(self) -> Callable[[torch.Tensor], np.ndarray]:
        """A function running preprocessed float32 images through the bfloat16 copy, returning float32 features."""
        if self._copy is None or self._copy_state != self._state():
            with eval_mode(self.pooled.module):
                self._copy = copy.deepcopy(self.pooled).to(torch.bfloat16, memory_format=torch.channels_last).eval()
            self._copy_state = self._state()
        module = self._copy

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return module(x.to(torch.bfloat16)).float().numpy()

        return run


def machine_key() -> dict[str, Any]:
    """What a speed measurement holds for: the CPU, its bfloat16 support, the threads and the library versions."""
    import onnxruntime as ort

    model = platform.processor() or platform.machine()
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": cores,
        "bf16_native": bf16_native(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def measure(
    encode: Callable[[str, np.ndarray], np.ndarray], patches: np.ndarray, candidates: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Median cosine to float32 onnxruntime and patches/s of each engine on ``patches``.

    Parameters
    ----------
    encode
        ``encode(engine, patches)`` runs the backbone with that engine.
    patches
        Real uint8 patches, not those a quantization was calibrated on; all are compared, the first
        :data:`_TIMED_PATCHES` are timed (best of 2 runs).
    candidates
        The low-precision engines to measure.

    Returns
    -------
    ``{engine: {"median_cosine": ..., "patches_per_s": ...}}`` for ``"onnxruntime"`` and every candidate, where a
    candidate that could not be built or failed its own check has ``{"error": "..."}`` instead.
    """
    expected = encode("onnxruntime", patches)
    timed = patches[:_TIMED_PATCHES]
    results = {}
    for engine in ("onnxruntime", *candidates):
        try:
            found = expected if engine == "onnxruntime" else encode(engine, patches)
        # quantization and export fail in model-specific ways; such an engine is simply not a candidate
        except Exception as err:
            if engine == "onnxruntime":
                raise
            results[engine] = {"error": f"{type(err).__name__}: {err}"[:500]}
            logger.info("engine %r not usable: %s", engine, results[engine]["error"])
            continue
        times = []
        for _ in range(2):
            start = time.perf_counter()
            encode(engine, timed)
            times.append(time.perf_counter() - start)
        results[engine] = {"median_cosine": median_cosine(found, expected), "patches_per_s": len(timed) / min(times)}
    return results


def choose(measurements: Mapping[str, Mapping[str, float]]) -> str:
    """The fastest engine that keeps :data:`AUTO_COSINE` and beats float32 onnxruntime by :data:`GATE_SPEEDUP`.

    Parameters
    ----------
    measurements
        What :func:`measure` returns; an engine missing from it is not considered.

    Returns
    -------
    ``"onnxruntime"`` when no low-precision engine passes both tests.
    """
    floor = measurements["onnxruntime"]["patches_per_s"] * GATE_SPEEDUP
    passing = {
        engine: found["patches_per_s"]
        for engine, found in measurements.items()
        if engine in LOW_PRECISIONS
        and "error" not in found
        and found["median_cosine"] >= AUTO_COSINE
        and found["patches_per_s"] >= floor
    }
    return max(passing, key=passing.get) if passing else "onnxruntime"


def cached_measurements(
    path: Path, key: Mapping[str, Any], compute: Callable[[], dict[str, dict[str, float]]]
) -> dict[str, dict[str, float]]:
    """The measurements stored in ``path`` for ``key``, else ``compute()``'s, stored there (atomically)."""
    key = json.loads(json.dumps(key))  # as stored: tuples become lists
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["measurements"]
    measurements = compute()
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".json.tmp", delete=False) as tmp:
        json.dump({"key": key, "measurements": measurements}, tmp, indent=1)
    Path(tmp.name).replace(path)
    logger.info("precision gate measured and stored in %s: %s", path, measurements)
    return measurements
