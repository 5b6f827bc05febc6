"""Digests that name what a backbone computes: its configuration, its tensors and its modules' plain attributes.

A :class:`~spade_sd.Backbone`'s identity names its cached features and is checked when a saved model is loaded,
so it must be equal across processes and change whenever the features can; :func:`state_token` is the cheap
in-process check that tells when it has to be computed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

# What nn.Module.__init__ puts in every module's __dict__ (the training flag, parameter, buffer, submodule and hook
# registries): not part of a module's configuration, so left out of the attributes a module's identity hashes
_TORCH_BOOKKEEPING = frozenset(vars(nn.Module()))
_PLAIN_TYPES = (bool, int, float, str, type(None))
_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as a hashable plain value (tuples for lists), or ``_NOT_PLAIN`` for anything else."""
    if isinstance(value, np.generic) and isinstance(value.item(), _PLAIN_TYPES):
        value = value.item()
    if isinstance(value, float) and value != value:
        return "nan"  # equal to itself, so change detection does not see a NaN attribute change on every call
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, tuple | list):
        items = tuple(_plain(item) for item in value)
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items
    return _NOT_PLAIN


def module_attributes(module: nn.Module) -> tuple[list[tuple[str, str, Any]], list[tuple[str, torch.Tensor]]]:
    """The non-parameter state of ``module`` and its submodules that a forward pass may read.

    Parameters
    ----------
    module
        The module to describe.

    Returns
    -------
    ``(submodule, attribute, value)`` for every plain attribute (bool, int, float, str, None, numpy scalars and
    tuples or lists of them) in a submodule's ``__dict__``, and ``("submodule.attribute", tensor)`` for every
    tensor kept there without being registered as a parameter or buffer, both in sorted order. The training flag
    and torch's registries (what :meth:`torch.nn.Module.__init__` puts in every module's ``__dict__``) are left
    out.
    """
    plain, tensors = [], []
    for prefix, submodule in module.named_modules():
        for key, value in sorted(vars(submodule).items()):
            if key in _TORCH_BOOKKEEPING:
                continue
            if isinstance(value, torch.Tensor):
                tensors.append((f"{prefix}.{key}", value))
            elif (found := _plain(value)) is not _NOT_PLAIN:
                plain.append((prefix, key, found))
    return plain, tensors


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes to ``digest``."""
    digest.update(f"\n{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
    # a uint8 view hashes any dtype (bfloat16 has no numpy equivalent); contiguous() undoes channels-last so the
    # digest does not depend on memory format
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def stable_repr(value: Any) -> str:
    """``value`` as text that is equal across processes: its qualified name if it has one, else its ``repr``.

    The JSON fallback for configurations: classes and functions by qualified name, as their ``repr`` contains
    memory addresses.
    """
    if hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def identity_digest(config: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 hex digest of a JSON-able configuration and of named tensors, in the order given.

    Parameters
    ----------
    config
        Serialised as JSON with sorted keys; values JSON cannot hold go through :func:`stable_repr`.
    tensors
        ``(name, tensor)`` pairs; each contributes its name, dtype, shape and bytes.

    Returns
    -------
    64 hexadecimal digits.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=stable_repr).encode())
    for key, tensor in tensors:
        _hash_tensor(digest, key, tensor)
    return digest.hexdigest()


def precision_identity(identity: str, precision: str, *, calibration: str | None = None) -> str:
    """The identity of features computed at a lower precision by the backbone with this ``identity``.

    Parameters
    ----------
    identity
        The backbone's :meth:`~spade_sd.Backbone.identity` (its weights and configuration).
    precision
        The engine's precision, e.g. ``"int8"`` or ``"bf16"``.
    calibration
        What else the features depend on, e.g. the scheme of an int8 quantization and the digest of the patches it
        was calibrated on.

    Returns
    -------
    64 hexadecimal digits, unequal to ``identity`` and to the identity of every other precision or calibration.
    """
    return identity_digest({"identity": identity, "precision": precision, "calibration": calibration}, [])


def state_token(module: nn.Module | None, *, attributes: bool) -> Any:
    """Cheap change detector for what is derived from a module's state (a cached identity, an ONNX export).

    In-place updates (optimiser steps, ``load_state_dict``) bump a tensor's version counter, moves and
    reassignments change its storage.

    Parameters
    ----------
    module
        The module; ``None`` gives ``None``.
    attributes
        Count the plain attributes and unregistered tensors of :func:`module_attributes` too.

    Returns
    -------
    A value that compares equal as long as nothing it covers changed.
    """
    if module is None:
        return None
    tensors = [*module.parameters(), *module.buffers()]
    plain: list[tuple[str, str, Any]] = []
    if attributes:
        plain, extra = module_attributes(module)
        tensors += [t for _, t in extra]
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), tuple(plain)


# What a backbone's recorded description (Backbone.saved_config) holds besides its identity
_DESCRIBED = ("name", "kind", "input_size", "mean", "std", "dim", "model_kwargs")


def backbone_difference(recorded: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """What tells two backbones apart, from their descriptions (``Backbone.saved_config()``), for an error message.

    Returns
    -------
    Every described field that differs, as ``"input_size: 96 recorded, 224 found"``; when none does, that the two
    have the same name and configuration but other weights, with both identities.
    """
    differing = [
        f"{key}: {recorded[key]!r} recorded, {found.get(key)!r} found"
        for key in _DESCRIBED
        if key in recorded and json.dumps(recorded[key], sort_keys=True) != json.dumps(found.get(key), sort_keys=True)
    ]
    if differing:
        return "; ".join(differing)
    return (
        f"the same name and configuration but other weights (identity {str(recorded.get('identity'))[:12]} "
        f"recorded, {str(found.get('identity'))[:12]} found), e.g. pretrained=False or another weights= file"
    )
