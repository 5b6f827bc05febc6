from __future__ import annotations

from spatialdata import SpatialData

from spade_sd.config import PatchConfig
from spade_sd.spots.patches import SpotPatches, resolve_patches


def spot_patches(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    size_um: float = PatchConfig.size_um,
    size_px: int = PatchConfig.size_px,
    mpp: float | None = None,
) -> SpotPatches:
    """Lazy square H&E patches centered on every spot.

    Each patch covers ``size_um`` µm (the HEST convention: 112 µm at 224 px, i.e. 0.5 µm/px), is read from the
    coarsest pyramid level at least as fine as needed, resampled to ``size_px`` and padded with white beyond the
    image border. Nothing is read until a patch is asked for.

    Parameters
    ----------
    sdata
        SpatialData holding an H&E image, spots (circles or polygons) and a table annotating them.
    image_key, shapes_key, table_key
        Element names; inferred when unambiguous (an error lists the candidates otherwise).
    size_um
        Side of the square patch in µm.
    size_px
        Side of the returned patch in pixels.
    mpp
        µm per pixel of the image element's own full-resolution level (level 0 of its pyramid, as stored in the
        SpatialData; for spatialdata-io's Visium low-resolution image, its own ~13 µm pixels, not Space Ranger's
        full-resolution ones). Inferred from the table's ``uns['spade_sd']`` metadata or from the spots: Visium's
        100 µm grid (also recognised in spatialdata-io's and scanpy's tables), or a spot diameter (legacy ST
        100 µm, ``obs['spot_diameter_um']``) and the circles' radius. A value more than 20 % off the spots' is
        refused (see ``docs/method.md``).

    Returns
    -------
    A :class:`~spade_sd.spots.patches.SpotPatches`: ``len(ds)`` spots in the table's row order, ``ds[i]`` a uint8
    ``(size_px, size_px, 3)`` array, ``ds.read(indices)`` a batch; usable as a torch ``Dataset``.

    Examples
    --------
    >>> import spade_sd as sd
    >>> sdata = sd.datasets.mouse_olfactory_bulb("MOB1")
    >>> patches = sd.pp.spot_patches(sdata)
    >>> patches[0].shape
    (224, 224, 3)
    """
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    return resolve_patches(sdata, size_um=size_um, size_px=size_px, mpp=mpp, **elements)[1]
