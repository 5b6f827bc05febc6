"""The onnxruntime CPU engine of a :class:`~spade_sd.Backbone`: exported once, checked against PyTorch, kept current.

The pooled module is exported to ONNX in the cache folder (``settings.cache_dir / "onnx"``, named by the
backbone's identity, so other processes reuse it), run by onnxruntime on every CPU core, checked against the
PyTorch output before its first use, and exported again whenever the module's weights or attributes change.
With ``precision="int8"`` it runs the int8 quantization of that export (:mod:`~spade_sd.encoders.precision`),
cached next to it and checked against PyTorch by the cosine gate instead.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch

from spade_sd.encoders import precision as low
from spade_sd.encoders.modules import Pooled, eval_mode
from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

# A single ONNX protobuf cannot hold more; larger models stay on eager PyTorch
_ONNX_MAX_BYTES = 2**31 - 1
_ONNX_TOLERANCE = 1e-3
# The subfolder of settings.cache_dir holding the exports
_CACHE_FOLDER = "onnx"


def onnx_path(identity: str) -> Path:
    """Where the ONNX export of the backbone with this :meth:`~spade_sd.Backbone.identity` is cached."""
    return settings.cache_dir / _CACHE_FOLDER / f"{identity}.onnx"


def _num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _num_threads() -> int:
    """The session's threads: ``sd.settings.n_jobs`` if set, else every core this process may use."""
    return settings.threads() or _num_cores()


class OnnxEngine:
    """Runs a pooled backbone module in onnxruntime on the CPU.

    Parameters
    ----------
    pooled
        The module to export, on the CPU; its inner module is put in eval mode while exporting and checking.
    name
        The backbone's name, for messages.
    input_size
        Side of the square input images.
    identity
        Returns the backbone's identity, which names the exported file.
    state
        Returns a token that changes whenever the module's weights or attributes do (see
        :func:`~spade_sd.encoders.identity.state_token`); a changed token exports again.
    preprocess
        Turns uint8 ``(batch, height, width, 3)`` patches into the module's normalised input.
    reference
        The PyTorch forward pass, preprocessed images to ``(batch, dim)`` features, that the export must match.
    precision
        ``"fp32"`` runs the export itself; ``"int8"`` its int8 quantization
        (:func:`~spade_sd.encoders.precision.quantize_int8`), exported with a fixed batch so that every shape is
        constant (shape arithmetic, such as TensorFlow-style padding, would be quantized otherwise), run on batches
        padded to it, and checked against PyTorch by the median cosine
        (:data:`~spade_sd.encoders.precision.GATE_COSINE`).
    calibration
        Real uint8 patches: half of them calibrate the static int8 scheme, the other half check it
        (:func:`~spade_sd.encoders.precision.split_calibration`); they name its cached file.
    """

    # onnxruntime runs on the CPU in sub-batches of this many patches: its memory arena grows with the largest run,
    # and ViT-S/16 ran ~5 % faster in 8s than 16s (EfficientNet-Lite0 alike within noise; benchmarks/throughput.py)
    max_batch = 8

    def __init__(
        self,
        pooled: Pooled,
        *,
        name: str,
        input_size: int,
        identity: Callable[[], str],
        state: Callable[[], Any],
        preprocess: Callable[[np.ndarray], torch.Tensor],
        reference: Callable[[torch.Tensor], np.ndarray],
        precision: Literal["fp32", "int8"] = "fp32",
        calibration: np.ndarray | None = None,
    ) -> None:
        self.pooled, self.name, self.input_size = pooled, name, input_size
        self._identity, self._state, self._preprocess, self._reference = identity, state, preprocess, reference
        self.precision, self.calibration = precision, calibration
        self._session: ort.InferenceSession | None = None
        self._session_state: Any = None
        self._threads: int | None = None

    def load(self) -> None:
        """Export the module (unless its export is cached), open an onnxruntime session and check it.

        Raises
        ------
        ValueError
            If the module is not on the CPU or its weights exceed ONNX's 2 GiB limit.
        RuntimeError
            If the session's output differs from PyTorch's; export errors propagate as they are.
        """
        self._session = self._open()
        # the token is taken after exporting, which runs forward (a module may record things there)
        self._session_state = self._state()

    def runner(self) -> Callable[[torch.Tensor], np.ndarray]:
        """A function running preprocessed images through the session, exported again if the module changed."""
        if self._session is None or self._session_state != self._state():
            if self._session is not None:
                logger.info(
                    "backbone %s: weights or attributes changed since the ONNX export, exporting again", self.name
                )
            self.load()
        elif self._threads != _num_threads():  # sd.settings.n_jobs changed: the same export, other threads
            self._session = self._open()
        return self._runner_of(self._session)

    def _runner_of(self, session: ort.InferenceSession) -> Callable[[torch.Tensor], np.ndarray]:
        """A function running preprocessed images through ``session``, in the int8 graph's fixed batches."""
        input_name, fixed = session.get_inputs()[0].name, self._fixed_batch()

        def run(x: torch.Tensor) -> np.ndarray:
            x, n = x.contiguous().cpu().numpy(), len(x)
            if fixed is None:
                return session.run(None, {input_name: x})[0]
            padded = np.concatenate([x, np.zeros((-n % fixed, *x.shape[1:]), dtype=x.dtype)])
            runs = [session.run(None, {input_name: padded[s : s + fixed]})[0] for s in range(0, n, fixed)]
            return np.concatenate(runs)[:n]

        return run

    def _fixed_batch(self) -> int | None:
        """The int8 graph's fixed batch; ``None`` (any batch) for float32.

        1 for dynamic quantization, whose activation scales span the whole batch, so that a patch's features never
        depend on its neighbours' (one at a time also ran ViT-S/16 ~2× faster than 8); else :attr:`max_batch`.
        """
        if self.precision != "int8":
            return None
        return 1 if low.int8_scheme(self.pooled.module) == "dynamic" else self.max_batch

    def _open(self) -> ort.InferenceSession:
        device = next((p.device for p in self.pooled.parameters()), torch.device("cpu"))
        if device.type != "cpu":
            raise ValueError(f"onnxruntime runs on the CPU, found device {device}")
        size = sum(t.numel() * t.element_size() for t in self.pooled.module.state_dict().values())
        if size > _ONNX_MAX_BYTES:
            raise ValueError(f"the model's {size / 2**30:.1f} GiB of weights exceed ONNX's 2 GiB single-file limit")
        path = onnx_path(self._identity())
        if not path.is_file():
            self._export(path)
        if self.precision == "int8":
            path = self._quantized(path)
        options = ort.SessionOptions()
        self._threads = options.intra_op_num_threads = _num_threads()
        # idle worker threads sleep instead of spinning: with the patch reader (and anything else) sharing the
        # cores, spinning cost 1.4× (EfficientNet-Lite0) to 2× (ViT-S/16) throughput (benchmarks/throughput.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.precision == "int8":
            session = low.int8_session(path, options)
        else:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._verify(session)
        logger.info("backbone %s runs in onnxruntime from %s", self.name, path)
        return session

    def _quantized(self, source: Path) -> Path:
        """The int8 model of this export (quantized now unless cached), named by its scheme and calibration."""
        scheme = low.int8_scheme(self.pooled.module)
        named = low.int8_name(scheme, self.calibration)
        path = source.with_name(f"{source.stem}.int8-{named[:24]}.onnx")
        if path.is_file():
            return path
        calibration = None
        if self.calibration is not None:
            with eval_mode(self.pooled.module), torch.inference_mode():
                calibration = self._preprocess(low.split_calibration(self.calibration)[0]).contiguous().numpy()
            # whole batches: the fixed-batch graph takes no other
            calibration = calibration[: len(calibration) // self.max_batch * self.max_batch]
        with tempfile.TemporaryDirectory(dir=path.parent) as folder:
            fixed = Path(folder) / "fixed_batch.onnx"
            self._export(fixed, batch=self._fixed_batch())
            low.quantize_int8(fixed, path, scheme=scheme, calibration=calibration)
        logger.info("backbone %s quantized to int8 (%s) in %s", self.name, scheme, path)
        return path

    def _export(self, path: Path, *, batch: int | None = None) -> None:
        settings.cache_folder(
            _CACHE_FOLDER, instead=', or run the backbone in PyTorch: sd.Backbone(..., engine="torch")'
        )
        dummy = torch.zeros(batch or 2, 3, self.input_size, self.input_size)
        # written next to the target and renamed, so concurrent processes never load a half-written file
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            with eval_mode(self.pooled.module), torch.no_grad(), warnings.catch_warnings():
                # tracer warnings about shapes frozen into the graph are expected: only the batch axis is dynamic
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    self.pooled,
                    (dummy.contiguous(memory_format=torch.channels_last),),
                    tmp_path,
                    dynamo=False,
                    input_names=["images"],
                    output_names=["features"],
                    dynamic_axes=None if batch else {"images": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17,
                )
            tmp_path.replace(path)
        finally:
            tmp_path.unlink(missing_ok=True)
        logger.info("backbone %s exported to %s", self.name, path)

    def _verify(self, session: ort.InferenceSession) -> None:
        if self.precision == "int8":
            self._verify_int8(session)
            return
        dummy = np.random.default_rng(0).integers(0, 256, (3, self.input_size, self.input_size, 3), dtype=np.uint8)
        with eval_mode(self.pooled.module), torch.inference_mode():
            x = self._preprocess(dummy)
            expected = self._reference(x)
        found = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]
        scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
        error = float(np.abs(found - expected).max()) / scale
        if not error < _ONNX_TOLERANCE:
            raise RuntimeError(
                f"the ONNX export of {self.name} differs from PyTorch by {error:.2e} of the feature scale "
                f"(tolerance {_ONNX_TOLERANCE}); pass engine='torch'"
            )

    def _verify_int8(self, session: ort.InferenceSession) -> None:
        """The int8 features of the judging calibration patches (else of noise) keep the cosine gate to PyTorch's."""
        if self.calibration is None:
            side = self.input_size
            patches = np.random.default_rng(0).integers(0, 256, (self.max_batch, side, side, 3), dtype=np.uint8)
        else:
            patches = low.split_calibration(self.calibration)[1]
        run = self._runner_of(session)
        with eval_mode(self.pooled.module), torch.inference_mode():
            found, expected = [], []
            for start in range(0, len(patches), self.max_batch):
                x = self._preprocess(patches[start : start + self.max_batch])
                found.append(run(x))
                expected.append(self._reference(x))
        cosine = low.median_cosine(np.concatenate(found), np.concatenate(expected))
        measured = (
            f"the int8 quantization of {self.name} keeps a median cosine of {cosine:.4f} to PyTorch's features on "
            f"{len(patches)} {'held-out calibration' if self.calibration is not None else 'random'} patches"
        )
        if not cosine >= low.BROKEN_COSINE:
            raise RuntimeError(f"{measured}: it is broken; pass engine='onnxruntime' (float32)")
        if cosine < low.GATE_COSINE:
            logger.warning(
                "%s, under the gate %s that engine='auto' asks of it; engine='onnxruntime' runs float32",
                measured,
                low.GATE_COSINE,
            )
        else:
            logger.info(measured)
