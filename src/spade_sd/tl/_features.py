from __future__ import annotations

from spatialdata import SpatialData

from spade_sd.config import PatchConfig
from spade_sd.spots.grid import check_grid_options, per_shape, resolve_shape_patches
from spade_sd.tl._common import accepts_legacy_anndata, as_backbone, backbone_record, claim_outputs, rows_filled
from spade_sd.tl._embed import grid_record
from spade_sd.utils.constants import BACKBONE_KEY, SEAL_ATTACHMENT, SEAL_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_int, check_key

TOOL = "tl.features"


@accepts_legacy_anndata(TOOL)
def features(
    sdata: SpatialData,
    *,
    backbone=None,
    size_um: float = PatchConfig.size_um,
    size_px: int = PatchConfig.size_px,
    mpp: float | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    key_added: str = BACKBONE_KEY,
    seal_key: str = SEAL_KEY,
    batch_size: int = 64,
    cache: bool = True,
    num_workers: int = 0,
    grid: bool | None = None,
    stride_um: float | None = None,
) -> None:
    """Frozen backbone features of every spot's patch.

    Features are cached on disk (``$SPADE_SD_CACHE_DIR/features``), keyed by the image content under the spots,
    the spot geometry, the backbone's architecture and weights and the patch geometry: a second run reads them.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image, spots and a table annotating them; or scanpy's legacy spatial AnnData
        (``uns['spatial']``), converted with spatialdata-io (logged), the outputs written to it.
    backbone
        A :class:`~spade_sd.Backbone`, or what its constructor takes (a timm name, a module, a callable);
        ``None`` is the offline default EfficientNet-Lite0 (ImageNet).
    size_um, size_px, mpp
        Patch geometry, as in :func:`spade_sd.pp.spot_patches`.
    image_key, shapes_key, table_key
        Element names; inferred when unambiguous.
    key_added
        Where the features go. A key holding an earlier output of this tool is replaced (logged); one holding
        anything else (another tool's output, the user's own data) is an error, before any patch is encoded.
    seal_key
        Where SEAL's image embedding goes, for a backbone fine-tuned by :func:`spade_sd.tl.finetune` (which carries
        SEAL's heads); unused for other backbones. The same rule as for ``key_added`` applies.
    batch_size
        Patches encoded at a time.
    cache
        Use the on-disk feature cache.
    num_workers
        Processes reading patches while the backbone encodes; 0 reads in a thread (see :func:`spade_sd.tl.embed`).
    grid, stride_um
        Shapes much smaller than a patch (bins, cells) take the features of the nearest patch of a grid, encoded
        once each, as in :func:`spade_sd.tl.embed`; ``grid=False`` encodes one patch per shape.

    Returns
    -------
    Nothing; adds to the table:

    ``.obsm[key_added]``
        ``(n_obs, backbone.dim)`` float32 features (NaN for rows annotating other elements).
    ``.uns[key_added]``
        ``params`` (elements, patch geometry, µm per pixel, ``grid``: whether a grid was used, with its
        ``stride_um`` and ``n_patches``) and ``backbone`` (its configuration and identity, the ``precision`` of the
        features, ``"float32"``, ``"int8"`` or ``"bf16"``, and their ``feature_identity``).
    ``.obsm[seal_key]``
        For a backbone fine-tuned by :func:`spade_sd.tl.finetune`: SEAL's image embedding of every patch, the
        features projected into the space SEAL aligned with expression
        (:meth:`SealAlignment.embed_images <spade_sd.model.seal_heads.SealAlignment.embed_images>`).
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of these keys.
    """
    from spade_sd.encoders.features import check_num_workers, extract_features

    check_key("key_added", key_added)
    check_key("seal_key", seal_key)
    if seal_key == key_added:
        raise ValueError(f"seal_key and key_added must differ; both are {key_added!r}.")
    check_int("batch_size", batch_size, minimum=1)
    check_bool("cache", cache)
    num_workers = check_num_workers(num_workers)
    check_grid_options(grid, stride_um)
    backbone = as_backbone(backbone)
    geometry, patches = resolve_shape_patches(
        sdata,
        size_um=size_um,
        size_px=size_px,
        mpp=mpp,
        grid=grid,
        stride_um=stride_um,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
    )
    table = sdata.tables[geometry.table_key]
    seal = SEAL_ATTACHMENT in getattr(backbone, "attachments", {})
    slots = [("obsm", key_added), ("uns", key_added), *([("obsm", seal_key)] if seal else [])]
    claimed = claim_outputs(table, geometry.table_key, TOOL, slots)
    values = extract_features(patches, backbone, batch_size=batch_size, cache=cache, num_workers=num_workers)
    if seal:
        from spade_sd.model.seal_heads import SealAlignment

        aligned = SealAlignment.from_backbone(backbone, SEAL_ATTACHMENT).embed_images(values)
        table.obsm[seal_key] = rows_filled(table, geometry.table_rows, per_shape(patches, aligned), seal_key)
    values = per_shape(patches, values)
    table.obsm[key_added] = rows_filled(table, geometry.table_rows, values, key_added)
    table.uns[key_added] = {
        "params": {
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
            "size_um": size_um,
            "size_px": size_px,
            "mpp": geometry.mpp,
            **grid_record(patches),
        },
        "backbone": backbone_record(backbone),
    }
    claimed.record()
    logger.info("Added .obsm[%r] (%d × %d) to table %r", key_added, *values.shape, geometry.table_key)
    if seal:
        logger.info("Added SEAL's image embedding .obsm[%r] to table %r", seal_key, geometry.table_key)
