"""The ``spade-sd`` command line: the public tools over SpatialData ``.zarr`` stores, one job a scheduler runs.

Every command reads its stores with :func:`spatialdata.read_zarr`, runs one ``sd.pp``/``sd.tl`` function and writes
back only the elements that function added or changed (shapes and tables; images are never rewritten). The
elements are first written in full, with spatialdata's writers, into a hidden staging store beside the store; they
are then renamed into place and the store's consolidated metadata rewritten. A failure at any point before that
renames back what was moved, so the store is as it was. Exit codes: 0 done, 2 bad input (the message says what was
expected and what was found), 1 anything else (with its traceback).
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import inspect
import os
import pickle
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from spade_sd.utils.constants import BACKBONE_KEY, EMBEDDING_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

# exit codes, as click's own usage errors exit 2
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
# raised by the package's checks of what the user passed: shown as one line, exit EXIT_BAD_INPUT
BAD_INPUT = (ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError)
# the element kinds the tools add to a store; images, labels and points are only ever read
WRITTEN_KINDS = ("shapes", "tables")
STAGING_PREFIX = ".spade_sd-staging-"

app = typer.Typer(
    name="spade-sd",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Stores = Annotated[list[Path], typer.Argument(help="SpatialData .zarr stores, one per slide.", show_default=False)]
Store = Annotated[Path, typer.Argument(help="A SpatialData .zarr store.", show_default=False)]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Folder of a model saved by `spade-sd pretrain` (or a Hub id owner/name).")
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder to save to; it must not exist.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a folder this command saved earlier at --out.")]
Params = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="Any other keyword of the Python function, NAME=VALUE (a Python literal, else a string); repeatable.",
        show_default=False,
    ),
]
ImageKey = Annotated[str | None, typer.Option(help="Image element; inferred when there is one.", show_default=False)]
ShapesKey = Annotated[str | None, typer.Option(help="Spots (shapes) element; inferred.", show_default=False)]
TableKey = Annotated[str | None, typer.Option(help="Table element; inferred.", show_default=False)]
Backbone = Annotated[
    str | None,
    typer.Option(
        help="Patch encoder: a timm name (hf-hub: names included) or a folder saved by `spade-sd finetune` "
        "(default: the offline EfficientNet-Lite0).",
        show_default=False,
    ),
]
MaxEpochs = Annotated[int | None, typer.Option("--max-epochs", "--epochs", help="Training epochs.")]
Seed = Annotated[int | None, typer.Option(help="Random seed.", show_default=False)]
Accelerator = Annotated[str | None, typer.Option(help="Lightning accelerator (cpu, gpu, auto).")]
Devices = Annotated[
    str | None,
    typer.Option(
        help="Lightning devices per node: a number, -1 for all, indices such as 0,1, or auto. Under srun: as many as "
        "--ntasks-per-node.",
        show_default=False,
    ),
]
NumNodes = Annotated[
    int | None, typer.Option(min=1, help="Lightning nodes; under srun: as many as --nodes.", show_default=False)
]
Strategy = Annotated[
    str | None,
    typer.Option(help="Lightning strategy: ddp (under srun or torchrun), ddp_fork, auto, …", show_default=False),
]
BatchSize = Annotated[int | None, typer.Option(help="Feature extraction batch size.", show_default=False)]
SizeUm = Annotated[float | None, typer.Option(help="Side of a patch in µm [112].", show_default=False)]
SizePx = Annotated[int | None, typer.Option(help="Side of a patch in pixels, as encoded [224].", show_default=False)]


# --- the whole application: version, verbosity, exit codes


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"spade-sd {version('spade_sd')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details (sd.settings.verbosity='debug').")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log warnings and errors only, no progress bars.")
    ] = False,
    progress: Annotated[
        bool, typer.Option(help="Progress bars on feature extraction and training, where a terminal shows them.")
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of the backbone (sd.settings.n_jobs; -1: every core); in a SLURM task, "
            "$SLURM_CPUS_PER_TASK [every core this process may use].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """SPADE data experts over SpatialData .zarr stores, for batch jobs (Snakemake, Nextflow, SLURM arrays).

    Each command reads its stores, runs one spade_sd function and writes back only what it added (atomically: a
    failure leaves a store as it was). Exit codes: 0 done, 2 bad input, 1 unexpected failure.

    \b
    spade-sd features MOB1.zarr MOB2.zarr --cache-only
    spade-sd pretrain MOB1.zarr MOB2.zarr --out mob_model
    spade-sd embed MOB3.zarr --model mob_model
    spade-sd predict MOB3.zarr --model mob_model --genes Penk --genes Doc2g
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    if verbose and quiet:
        raise typer.BadParameter("pass --verbose or --quiet, not both.")
    settings.verbosity = "debug" if verbose else "warning" if quiet else settings.verbosity
    settings.progress = progress and not quiet
    if threads is not None:
        try:
            settings.n_jobs = threads
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--threads") from None


def _exit_codes(command: Callable[..., None]) -> Callable[..., None]:
    """Run ``command``; bad input exits 2 with its message only, anything else 1 with the traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BAD_INPUT as error:
            logger.debug("Refused", exc_info=True)
            # KeyError's str() quotes its message
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as error:  # noqa: BLE001 - a batch job needs the traceback in its log and exit code 1
            traceback.print_exc()
            typer.echo(f"spade-sd {command.__name__} failed unexpectedly: {error!r}", err=True)
            raise typer.Exit(EXIT_FAILURE) from None

    return run


# --- arguments


def _params(
    function: Callable[..., Any], given: list[str] | None, options: dict[str, Any], fixed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``options`` (those not given dropped, so the function's own defaults apply) and the ``--param`` keywords.

    ``fixed`` names keywords the command sets itself (objects, or what a store-to-store job must not change).
    """
    keywords = {name: value for name, value in options.items() if value is not None}
    fixed = (*fixed, "quiet")
    accepted = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in options and name not in fixed
    ]
    for item in given or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--param expects NAME=VALUE; found {item!r}. Example: --param n_fine=8")
        if name not in accepted:
            tool = f"{function.__module__.split('._')[0]}.{function.__name__}"
            if name in options:
                why = f"{name!r} has its own option: pass --{name.replace('_', '-')} instead"
            elif name in fixed:
                why = f"this command sets {name!r} of {tool} itself"
            else:
                why = f"{tool} has no keyword {name!r}"
            raise ValueError(f"--param {item!r}: {why}. Keywords --param takes: {', '.join(accepted)}.")
        try:
            keywords[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            keywords[name] = text  # a bare word: a string, as a shell user would write it
    return keywords


def _checked_store(path: Path) -> Path:
    """``path`` if it is a SpatialData store this command can update, else an error saying what was found."""
    if not path.exists():
        raise FileNotFoundError(f"Expected a SpatialData .zarr store at {path}; nothing is there.")
    if not path.is_dir():
        raise NotADirectoryError(f"Expected a SpatialData .zarr store (a folder) at {path}; found a file.")
    if not (path / "zarr.json").is_file():
        found = "a Zarr v2 store (.zgroup)" if (path / ".zgroup").is_file() else "a folder without zarr.json"
        raise ValueError(
            f"Expected a SpatialData .zarr store in Zarr format 3 (as spatialdata ≥ 0.5 writes it) at {path}; found "
            f"{found}. Rewrite it once with spatialdata.read_zarr(path).write(new_path)."
        )
    return path


def _checked_out(path: Path, overwrite: bool) -> Path:
    """Refuse, before any work, an ``--out`` that the save at the end would refuse."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"--out {path} exists; pass --overwrite to replace a model saved there, or a new folder.")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file; expected a folder saved by spade-sd, or a new one.")
    return path


def _model(model: str) -> str:
    """A local folder as an absolute path (recorded in the store), else a Hub id ``owner/name``."""
    path = Path(model)
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"--model expects a folder saved by `spade-sd pretrain` or a Hugging Face Hub id owner/name; found "
            f"{'a file' if path.exists() else 'no folder'} at {model!r}."
        )
    return model


def _backbone(backbone: str | None):
    """The ``backbone=`` of a tool: a folder of fine-tuned adapters loaded, anything else as ``sd.Backbone`` takes it."""
    if backbone is not None and Path(backbone).is_dir():
        from spade_sd.encoders.finetuned import FineTunedBackbone

        return FineTunedBackbone.load(backbone)
    return backbone


def _devices(text: str) -> int | str | list[int]:
    """``--devices`` as Lightning takes it: ``"auto"``, a number of devices (``-1``: all) or a list of indices."""
    value = text.strip().lower()
    if value == "auto":
        return value
    try:
        if "," in value:
            indices = [int(index) for index in value.split(",") if index.strip()]
            if indices and min(indices) >= 0:
                return indices
        elif (number := int(value)) >= 1 or number == -1:
            return number
    except ValueError:
        pass
    raise ValueError(
        f"--devices expects a number of devices per node (e.g. 4), -1 for all of them, device indices (e.g. 0,1) or "
        f"auto; found {text!r}."
    )


def _named(option: str, value: str, known: list[str]) -> str:
    """``value`` if Lightning knows it by that name, else an error listing the names (the closest first)."""
    if value in known:
        return value
    close = difflib.get_close_matches(value, known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ValueError(f"--{option} expects one of {', '.join(known)}; found {value!r}.{hint}")


def _lightning(
    accelerator: str | None, devices: str | None, num_nodes: int | None, strategy: str | None
) -> dict[str, Any]:
    """The Lightning Trainer's hardware options given, checked before any work.

    Lightning itself checks them only when the Trainer is built, after every patch was encoded.
    """
    given = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy}
    given = {name: value for name, value in given.items() if value is not None}
    if "accelerator" in given or "strategy" in given:
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        accelerators = ["auto", "cpu", "gpu", *sorted(set(AcceleratorRegistry.available_accelerators()) - {"cpu"})]
        if "accelerator" in given:
            given["accelerator"] = _named("accelerator", accelerator, accelerators)
        if "strategy" in given:
            given["strategy"] = _named("strategy", strategy, ["auto", *StrategyRegistry.available_strategies()])
    if "devices" in given:
        given["devices"] = _devices(devices)
    if "devices" in given or "num_nodes" in given:
        _check_slurm(given.get("devices"), given.get("num_nodes"))
    return given


def _check_slurm(devices: int | str | list[int] | None, num_nodes: int | None) -> None:
    """Under srun, Lightning's own check of ``--devices`` and ``--num-nodes`` against the processes SLURM started.

    Lightning makes it when the Trainer is built, after every slide was read and clustered.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or devices is None or isinstance(devices, str) or devices == -1:
        return  # not under srun, or devices that Lightning counts itself
    per_node = len(devices) if isinstance(devices, list) else devices
    try:
        SLURMEnvironment(auto_requeue=False).validate_settings(per_node, num_nodes or 1)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"--devices and --num-nodes must match the processes srun starts: {error}") from None


def _global_rank() -> int:
    """The rank of this process among the training processes (0 outside distributed training), as Lightning sets it."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank


def _save(model, out: Path, overwrite: bool) -> None:
    """``model.save_pretrained(out)``, by the first training process only.

    Every process of a DDP job launched by srun or torchrun (or by Lightning's ``ddp`` strategy) runs the whole
    command and ends with the same weights.
    """
    rank = _global_rank()
    if rank != 0:
        logger.info("Training process %d: the model is saved by process 0", rank)
        return
    model.save_pretrained(out, overwrite=overwrite)


def _read(stores: list[Path]) -> list[SpatialData]:
    import spatialdata

    logger.info("Reading %d store%s", len(stores), "s" if len(stores) > 1 else "")
    return [spatialdata.read_zarr(path) for path in stores]


# --- writing back: only what changed, all or nothing


def _digest(value: Any) -> Any:
    try:
        return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    except Exception:  # noqa: BLE001 - what cannot be pickled counts as changed, and is rewritten
        return object()


def _fingerprint(table: AnnData) -> tuple[list[tuple[str, Any]], list[Any]]:
    """What tells whether a tool changed ``table``: its arrays by identity (tools assign new ones), the rest by value.

    The arrays themselves are kept, so that no new array can take the identity of one the tool dropped.
    """
    objects = [("table", table), ("X", table.X)]
    for slot in ("obsm", "varm", "obsp", "varp", "layers"):
        objects += [(f"{slot}/{key}", value) for key, value in getattr(table, slot).items()]
    frames = [_digest((frame.index, frame.columns, frame.dtypes, frame)) for frame in (table.obs, table.var)]
    return objects, [*frames, _digest(dict(table.uns))]


def _unchanged(before: tuple[list[tuple[str, Any]], list[Any]], after: tuple[list[tuple[str, Any]], list[Any]]) -> bool:
    (objects, values), (new_objects, new_values) = before, after
    same_objects = [(k, id(v)) for k, v in objects] == [(k, id(v)) for k, v in new_objects]
    return same_objects and values == new_values


def _fingerprints(sdata: SpatialData) -> dict[str, tuple]:
    return {name: _fingerprint(table) for name, table in sdata.tables.items()}


def _changed(sdata: SpatialData, before: dict[str, tuple]) -> list[str]:
    """Element paths (``kind/name``) added since reading the store, and its tables changed since ``before``."""
    on_disk = set(sdata.elements_paths_on_disk())
    added = [path for path in sdata.elements_paths_in_memory() if path not in on_disk]
    odd = [path for path in added if path.split("/")[0] not in WRITTEN_KINDS]
    if odd:
        raise RuntimeError(f"spade-sd writes only shapes and tables back to a store; the tool added {odd}.")
    changed = [
        f"tables/{name}"
        for name, table in sdata.tables.items()
        if name in before and not _unchanged(before[name], _fingerprint(table))
    ]
    return added + [path for path in changed if path not in added]


def _move(source: Path, target: Path) -> None:
    """One rename within a file system: atomic."""
    source.replace(target)


def _metadata_files(store: Path) -> dict[Path, bytes]:
    """The store's own and its element groups' ``zarr.json``: consolidating metadata rewrites them."""
    files = [
        store / "zarr.json",
        *(store / kind / "zarr.json" for kind in ("images", "labels", "points", *WRITTEN_KINDS)),
    ]
    return {file: file.read_bytes() for file in files if file.is_file()}


def _restore(files: dict[Path, bytes], staging: Path) -> None:
    for file, content in files.items():
        if not file.is_file() or file.read_bytes() != content:
            copy = staging / f"restore-{len(content)}-{file.parent.name}.json"
            copy.write_bytes(content)
            _move(copy, file)


def write_back(sdata: SpatialData, paths: list[str]) -> None:
    """Write the elements ``paths`` (``kind/name``) of ``sdata`` into its store, all of them or none.

    The elements are written in full by :meth:`spatialdata.SpatialData.write` into a hidden staging store beside the
    store (same file system, so renames are atomic); the elements they replace are renamed aside into it, the new
    ones renamed into place, and the consolidated metadata rewritten. Any failure renames back what was moved and
    restores the metadata, so the store is as it was; the staging store is always removed. Only a killed process,
    between two renames, can leave a replaced element in the staging store (``.spade_sd-staging-*`` beside it).
    """
    from spatialdata import SpatialData

    if not paths:
        logger.info("Nothing to write back to %s", sdata.path)
        return
    store = Path(sdata.path)
    staging = Path(tempfile.mkdtemp(prefix=f".{store.name}{STAGING_PREFIX}", dir=store.parent))
    moved: list[tuple[Path, Path]] = []

    def move(source: Path, target: Path) -> None:
        _move(source, target)
        moved.append((source, target))

    metadata = _metadata_files(store)
    try:
        elements = {kind: {} for kind in WRITTEN_KINDS}
        for path in paths:
            kind, name = path.split("/")
            elements[kind][name] = sdata[name]
        new = staging / "new.zarr"
        with warnings.catch_warnings():
            # the staging store holds a table without the shapes it annotates, which stay in the store
            warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
            SpatialData(**elements).write(new)
        for kind in dict.fromkeys(path.split("/")[0] for path in paths):
            if not (store / kind).exists():
                move(new / kind, store / kind)
                continue
            for name in elements[kind]:
                if (store / kind / name).exists():
                    (staging / "old" / kind).mkdir(parents=True, exist_ok=True)
                    move(store / kind / name, staging / "old" / kind / name)
                move(new / kind / name, store / kind / name)
        if sdata.has_consolidated_metadata():
            sdata.write_consolidated_metadata()
    except BaseException as error:
        try:
            for source, target in reversed(moved):
                _move(target, source)
            _restore(metadata, staging)
        except OSError as restore_error:
            raise OSError(
                f"Writing to {store} failed ({error!r}) and so did putting it back as it was ({restore_error!r}): "
                f"the elements replaced are kept in {staging / 'old'}; move them back into the store by hand."
            ) from error
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote %s to %s", ", ".join(paths), store)


def _update(store: Path, tool: Callable[[SpatialData], None]) -> None:
    """Read ``store``, run ``tool`` on it, write back what it added or changed."""
    (sdata,) = _read([store])
    before = _fingerprints(sdata)
    tool(sdata)
    write_back(sdata, _changed(sdata, before))


# --- the commands


@app.command()
@_exit_codes
def pretrain(
    stores: Stores,
    out: OutOption,
    max_epochs: MaxEpochs = None,
    n_experts: Annotated[int | None, typer.Option(help="Data experts.", show_default=False)] = None,
    backbone: Backbone = None,
    image_key: ImageKey = None,
    shapes_key: ShapesKey = None,
    table_key: TableKey = None,
    seed: Seed = None,
    size_um: SizeUm = None,
    size_px: SizePx = None,
    accelerator: Accelerator = None,
    devices: Devices = None,
    num_nodes: NumNodes = None,
    strategy: Strategy = None,
    overwrite: Overwrite = False,
    param: Params = None,
) -> None:
    """Train a model on one or several slides (tl.pretrain) and save it to --out.

    The stores are only read; features already in the cache (`spade-sd features`) are read from it. Options not
    given take tl.pretrain's defaults; every other keyword goes through --param. Under srun or torchrun every
    process runs this command (Lightning DDP) and process 0 saves the model.

    \b
    Example:
        spade-sd pretrain MOB1.zarr MOB2.zarr --out mob_model --epochs 20 --n-experts 4
        spade-sd pretrain her2st/*.zarr --out her2st_model --param n_fine=8 --param 'val_slides=["C5"]'
        srun spade-sd pretrain cohort/*.zarr --out model --accelerator gpu --devices 4 --num-nodes 2 --strategy ddp
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    _checked_out(out, overwrite)
    stores = [_checked_store(path) for path in stores]
    trainer = _lightning(accelerator, devices, num_nodes, strategy)
    import spade_sd.tl as tl

    options = {"max_epochs": max_epochs, "n_experts": n_experts, "image_key": image_key, "shapes_key": shapes_key}
    options |= {"table_key": table_key, "seed": seed, "size_um": size_um, "size_px": size_px, "backbone": None}
    options |= dict.fromkeys(("accelerator", "devices", "num_nodes", "strategy")) | trainer
    keywords = _params(tl.pretrain, param, options, fixed=("panel",))
    slides = _read(stores)
    model = tl.pretrain(slides, backbone=_backbone(backbone), quiet=not settings.progress, **keywords)
    _save(model, out, overwrite)


@app.command()
@_exit_codes
def finetune(
    stores: Stores,
    out: OutOption,
    max_epochs: MaxEpochs = None,
    n_blocks: Annotated[int | None, typer.Option(help="Last backbone blocks adapted.", show_default=False)] = None,
    backbone: Backbone = None,
    image_key: ImageKey = None,
    shapes_key: ShapesKey = None,
    table_key: TableKey = None,
    seed: Seed = None,
    accelerator: Accelerator = None,
    devices: Devices = None,
    num_nodes: NumNodes = None,
    strategy: Strategy = None,
    overwrite: Overwrite = False,
    param: Params = None,
) -> None:
    """Fine-tune the image encoder on expression (SEAL, tl.finetune) and save its adapters to --out.

    The stores are only read. Pass the folder as --backbone of `spade-sd pretrain` to train experts on it.

    \b
    Example:
        spade-sd finetune MOB1.zarr MOB2.zarr --out mob_seal --epochs 10
        spade-sd pretrain MOB1.zarr MOB2.zarr --backbone mob_seal --out mob_model
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    _checked_out(out, overwrite)
    stores = [_checked_store(path) for path in stores]
    trainer = _lightning(accelerator, devices, num_nodes, strategy)
    import spade_sd.tl as tl

    options = {"max_epochs": max_epochs, "n_blocks": n_blocks, "image_key": image_key, "shapes_key": shapes_key}
    options |= {"table_key": table_key, "seed": seed, "backbone": None}
    options |= dict.fromkeys(("accelerator", "devices", "num_nodes", "strategy")) | trainer
    keywords = _params(tl.finetune, param, options)
    slides = _read(stores)
    tuned = tl.finetune(slides, backbone=_backbone(backbone), quiet=not settings.progress, **keywords)
    _save(tuned, out, overwrite)


@app.command()
@_exit_codes
def features(
    stores: Stores,
    write_back: Annotated[
        bool,
        typer.Option(
            "--write-back/--cache-only",
            help=f"Also write .obsm['{BACKBONE_KEY}'] to each store's table, as tl.features does; --cache-only fills "
            "the feature cache alone and leaves the stores as they are.",
        ),
    ] = True,
    backbone: Backbone = None,
    size_um: SizeUm = None,
    size_px: SizePx = None,
    image_key: ImageKey = None,
    shapes_key: ShapesKey = None,
    table_key: TableKey = None,
    batch_size: BatchSize = None,
    param: Params = None,
) -> None:
    """Encode every spot's patch into the feature cache (tl.features), so that pretrain and embed encode nothing.

    The features are cached in $SPADE_SD_CACHE_DIR/features, one file per slide, backbone and patch geometry, which
    appears complete or not at all: processes sharing the folder (one per slide, as SLURM array tasks) never read
    a half-written file. Pass later commands the same --backbone and patch size. The stores are done one after the
    other, each written back on its own.

    \b
    Example:
        spade-sd features MOB1.zarr MOB2.zarr
        spade-sd features cohort/slide_0042.zarr --cache-only --batch-size 256
        spade-sd pretrain MOB1.zarr MOB2.zarr --out mob_model
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    stores = [_checked_store(path) for path in stores]
    import spade_sd.tl as tl
    from spade_sd.tl._common import as_backbone

    options = {"size_um": size_um, "size_px": size_px, "image_key": image_key, "shapes_key": shapes_key}
    options |= {"table_key": table_key, "batch_size": batch_size, "backbone": None}
    keywords = _params(tl.features, param, options)
    if not write_back and keywords.get("cache", True) is not True:
        raise ValueError(
            f"--cache-only keeps the features in the cache alone; found --param cache={keywords['cache']!r}, which "
            "would keep them nowhere. Drop --param cache, or pass --write-back."
        )
    encoder = as_backbone(_backbone(backbone))  # one for every store
    for store in stores:
        if write_back:
            _update(store, lambda sdata: tl.features(sdata, backbone=encoder, **keywords))
            continue
        (sdata,) = _read([store])
        tl.features(sdata, backbone=encoder, **keywords)
        logger.info("Cached the features of %s; the store is unchanged (--cache-only)", store)


@app.command()
@_exit_codes
def embed(
    store: Store,
    model: ModelOption,
    key_added: Annotated[str | None, typer.Option(help=f"obsm key of the embedding [{EMBEDDING_KEY}].")] = None,
    image_key: ImageKey = None,
    shapes_key: ShapesKey = None,
    table_key: TableKey = None,
    batch_size: BatchSize = None,
    param: Params = None,
) -> None:
    """Embed every spot or tile (tl.embed) and write the table back to the store.

    Adds .obsm['X_spade'], .obs['spade_expert'], … to the table annotating the spots (or --shapes-key tiles).

    \b
    Example:
        spade-sd embed MOB3.zarr --model mob_model
        spade-sd embed slide.zarr --model mob_model --shapes-key tiles
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    store, model = _checked_store(store), _model(model)
    import spade_sd.tl as tl

    options = {"key_added": key_added, "image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    keywords = _params(tl.embed, param, options | {"batch_size": batch_size})
    _update(store, lambda sdata: tl.embed(sdata, model, **keywords))


@app.command()
@_exit_codes
def tile(
    store: Store,
    size_um: Annotated[float | None, typer.Option(help="Side of a tile in µm [112].", show_default=False)] = None,
    stride_um: Annotated[float | None, typer.Option(help="Distance between tiles in µm [size].")] = None,
    image_key: ImageKey = None,
    key_added: Annotated[str | None, typer.Option(help="Shapes element of the tiles [tiles].")] = None,
    param: Params = None,
) -> None:
    """Cover the H&E with square tiles over tissue (sd.pp.tile_image) and write them to the store.

    Adds the shapes 'tiles' and the table 'tiles_table', so that slides without ST embed like spots.

    \b
    Example:
        spade-sd tile slide.zarr --size-um 112
        spade-sd embed slide.zarr --model mob_model --shapes-key tiles
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    store = _checked_store(store)
    import spade_sd.pp as pp

    options = {"size_um": size_um, "stride_um": stride_um, "image_key": image_key, "key_added": key_added}
    keywords = _params(pp.tile_image, param, options, fixed=("copy",))
    _update(store, lambda sdata: pp.tile_image(sdata, **keywords))


@app.command()
@_exit_codes
def predict(
    store: Store,
    model: ModelOption,
    genes: Annotated[
        list[str] | None, typer.Option("--genes", "-g", help="Genes to predict (repeat, or comma-separated) [all].")
    ] = None,
    method: Annotated[str | None, typer.Option(help="knn or ridge [knn].", show_default=False)] = None,
    key_added: Annotated[str | None, typer.Option(help="Name of the new table [spade_predicted].")] = None,
    image_key: ImageKey = None,
    shapes_key: ShapesKey = None,
    table_key: TableKey = None,
    batch_size: BatchSize = None,
    param: Params = None,
) -> None:
    """Predict expression from the H&E alone (tl.predict_expression) and write the new table to the store.

    \b
    Example:
        spade-sd predict MOB3.zarr --model mob_model --genes Penk,Doc2g
        spade-sd predict slide.zarr --model mob_model --shapes-key tiles --method ridge
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    store, model = _checked_store(store), _model(model)
    import spade_sd.tl as tl

    genes = None if genes is None else [gene.strip() for item in genes for gene in item.split(",") if gene.strip()]
    options = {"genes": genes, "method": method, "key_added": key_added, "image_key": image_key}
    options |= {"shapes_key": shapes_key, "table_key": table_key, "batch_size": batch_size}
    keywords = _params(tl.predict_expression, param, options, fixed=("reference",))
    _update(store, lambda sdata: tl.predict_expression(sdata, model, **keywords))


@app.command()
@_exit_codes
def evaluate(
    stores: Stores,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results file: .json (records) or .csv; must not exist.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Embed the stores with this model first (in memory; stores unchanged)."),
    ] = None,
    use_rep: Annotated[
        list[str] | None, typer.Option(help=f".obsm keys to compare (repeat) [{BACKBONE_KEY}, {EMBEDDING_KEY}].")
    ] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Tasks (repeat) [all].")] = None,
    table_key: TableKey = None,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    param: Params = None,
) -> None:
    """Compare embeddings leave-one-slide-out (tl.evaluate) and write the tidy results to --out.

    The stores are only read. With --model, every store is first embedded (and its backbone features computed) in
    memory; else the stores hold them already (`spade-sd embed`).

    \b
    Example:
        spade-sd evaluate MOB1.zarr MOB2.zarr MOB3.zarr --model mob_model --out results.json
        spade-sd evaluate *.zarr --use-rep X_spade --tasks probe --tasks knn --out results.csv
    """  # noqa: D301 - click keeps a paragraph after \b unwrapped
    if out.suffix not in (".json", ".csv"):
        raise ValueError(f"--out must end in .json or .csv; found {out.name!r}.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or another file.")
    stores, model = [_checked_store(path) for path in stores], None if model is None else _model(model)
    import spade_sd.tl as tl

    options = {"use_rep": use_rep or None, "tasks": tasks or None, "table_key": table_key, "seed": seed}
    keywords = _params(tl.evaluate, param, options)
    if model is not None:
        from spade_sd.model.spade_model import SpadeModel

        model = SpadeModel.from_pretrained(model)
    slides = _read(stores)
    if model is not None:
        reps = keywords.get("use_rep", inspect.signature(tl.evaluate).parameters["use_rep"].default)
        for sdata in slides:
            tl.embed(sdata, model, table_key=table_key)
            if BACKBONE_KEY in reps:
                patches = model.config.patches
                tl.features(sdata, backbone=model.backbone, size_um=patches.size_um, size_px=patches.size_px)
    results = tl.evaluate(slides, **keywords)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}{STAGING_PREFIX}{os.getpid()}")
    try:
        if out.suffix == ".csv":
            results.to_csv(partial, index=False)
        else:
            results.to_json(partial, orient="records", indent=1)
        _move(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Wrote %d results to %s", len(results), out)


if __name__ == "__main__":
    app(prog_name="spade-sd")
