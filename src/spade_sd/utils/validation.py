"""Checks of user arguments, run at the public entry points before any patch is read.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, outside the valid range)
whose message names the parameter, the value found and what is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable
from numbers import Integral, Real
from typing import Any

import numpy as np

# µm per pixel a microscope image can plausibly have: 1 nm (beyond any light microscope) to 1 mm per pixel
MPP_RANGE = (1e-3, 1e3)
# The side of a patch in µm: up to a centimetre
SIZE_UM_RANGE = (1e-2, 1e4)
# Keys that become zarr group names when the SpatialData is written (spatialdata's rule for element names)
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SEED_MAX = 2**32 - 1
# Names suggested at most in one "did you mean"
_MAX_SUGGESTED = 10


def _found(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools, floats and strings are refused."""
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer{bounds}; found {_found(value)}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{bounds}; found {value!r}.")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    unit: str = "",
) -> float:
    """``value`` as a finite float within the bounds; bools and strings are refused."""
    low = "" if minimum is None else f"{'>' if exclusive_minimum else '≥'} {minimum:g}"
    high = "" if maximum is None else f"{'<' if exclusive_maximum else '≤'} {maximum:g}"
    bounds = " and ".join(b for b in (low, high) if b)
    what = f"a finite number{' of ' + unit if unit else ''}{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {what}; found {_found(value)}.")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name} must be {what}; found {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; found {_found(value)}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` included)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False; found {_found(value)}.")
    return bool(value)


def check_seed(seed: Any) -> int:
    """A seed: an integer in ``[0, 2**32 - 1]`` (``None`` would make runs irreproducible)."""
    return check_int("seed", seed, minimum=0, maximum=_SEED_MAX)


def check_key(name: str, value: Any) -> str:
    """A key for ``obsm``/``obs``/``uns`` or an element name that survives ``SpatialData.write``.

    Letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` or ``-``: the keys become folder names in the
    zarr store, where ``""``, ``/`` or a leading dot give a store that cannot be read back.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty string; found {_found(value)}.")
    if not _KEY_PATTERN.fullmatch(value):
        raise ValueError(
            f"{name} must be a non-empty string of letters, digits, '_', '-' and '.', not starting with '.' or '-' "
            f"(it names a folder in the zarr store); found {value!r}."
        )
    return value


def check_mpp(name: str, value: Any) -> float:
    """µm per pixel within :data:`MPP_RANGE`."""
    return check_number(name, value, minimum=MPP_RANGE[0], maximum=MPP_RANGE[1], unit="µm per pixel")


def check_patch_geometry(size_um: Any, size_px: Any) -> tuple[float, int]:
    """A patch side in µm within :data:`SIZE_UM_RANGE` and in pixels (8 to 4096)."""
    size_um = check_number("size_um", size_um, minimum=SIZE_UM_RANGE[0], maximum=SIZE_UM_RANGE[1], unit="µm")
    return size_um, check_int("size_px", size_px, minimum=8, maximum=4096)


def did_you_mean(unknown: Iterable[Any], known: Iterable[Any]) -> str:
    """A hint naming the ``known`` names that ``unknown`` ones spell in another letter case (``Gapdh``, ``GAPDH``).

    Parameters
    ----------
    unknown
        Names that were not found.
    known
        The names that exist.

    Returns
    -------
    ``" Did you mean 'Gapdh'? …"`` to append to an error message, or ``""`` when no unknown name matches a known
    one with letter case ignored.
    """
    by_folded: dict[str, str] = {}
    for name in known:
        by_folded.setdefault(str(name).casefold(), str(name))
    matches = list(dict.fromkeys(by_folded[f] for f in (str(n).casefold() for n in unknown) if f in by_folded))
    if not matches:
        return ""
    shown = ", ".join(map(repr, matches[:_MAX_SUGGESTED]))
    more = f" … ({len(matches) - _MAX_SUGGESTED} more)" if len(matches) > _MAX_SUGGESTED else ""
    return f" Did you mean {shown}{more}? Names are matched with their letter case."


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" ≥ {minimum}"
    if maximum is not None:
        return f" ≤ {maximum}"
    return ""
