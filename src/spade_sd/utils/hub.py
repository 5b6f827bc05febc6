"""Sharing saved folders through the Hugging Face Hub: model cards, downloads and uploads (no torch).

A folder written by ``save_pretrained`` (:meth:`SpadeModel.save_pretrained <spade_sd.SpadeModel.save_pretrained>`,
:meth:`FineTunedBackbone.save_pretrained <spade_sd.FineTunedBackbone.save_pretrained>`) is the folder their ``save``
writes plus a model card, ``README.md``: YAML metadata between ``---`` lines (what the Hub indexes) and a Markdown
body. ``from_pretrained`` reads a local folder as it is, offline, and anything else as a Hub repository id, downloaded
with :func:`huggingface_hub.snapshot_download` (which keeps a cache, so a downloaded revision loads offline too).
``huggingface_hub`` is imported only to download or upload.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spade_sd.utils.constants import SOURCE_PATH, SOURCE_REPO, SOURCE_REVISION

MODEL_CARD = "README.md"
LIBRARY_NAME = "spade_sd"
# The license a card names unless the caller passes another: the package's own (pyproject's BSD-3-Clause)
DEFAULT_LICENSE = "bsd-3-clause"


def card(metadata: Mapping[str, Any], title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A model card: ``metadata`` as YAML front matter, then ``# title`` and ``## heading`` sections.

    Scalars are written as JSON strings and numbers (valid YAML), lists as YAML block sequences, so no YAML
    library is needed to write it.
    """
    lines = ["---"]
    for key, value in metadata.items():
        if isinstance(value, list | tuple):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", "", f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.strip(), ""]
    return "\n".join(lines)


def is_card(path: Path) -> bool:
    """Whether ``path`` is a model card spade_sd wrote (a user's own ``README.md`` is never replaced)."""
    try:
        with path.open(encoding="utf-8") as file:
            head = [file.readline() for _ in range(2)]
    except (OSError, UnicodeDecodeError):
        return False
    return head[0].strip() == "---" and head[1].strip() == f"library_name: {json.dumps(LIBRARY_NAME)}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table."""
    cells = [list(map(str, header)), ["---"] * len(header), *[[_cell(v) for v in row] for row in rows]]
    return "\n".join("| " + " | ".join(row) + " |" for row in cells)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(metrics: Any) -> str | None:
    """``metrics`` as Markdown: a mapping of names to values, or a DataFrame (e.g. from :func:`spade_sd.tl.evaluate`).

    A tidy DataFrame with ``metric`` and ``value`` columns is summarised as the mean, standard deviation and
    count of ``value`` per encoder, task and metric; any other DataFrame is shown as it is (its first 50 rows).
    """
    if metrics is None:
        return None
    if isinstance(metrics, Mapping):
        return table(sorted(metrics.items()), ("metric", "value"))
    columns = getattr(metrics, "columns", None)
    if columns is None:
        raise TypeError(
            f"metrics must be a mapping of metric names to values or a pandas DataFrame (e.g. from sd.tl.evaluate); "
            f"found {type(metrics).__name__}."
        )
    if {"metric", "value"} <= set(columns):
        keys = [column for column in ("encoder", "task", "metric") if column in columns]
        summary = metrics.groupby(keys, observed=True, sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
        return table(summary.itertuples(index=False), [*keys, "mean", "std", "n"])
    shown = metrics.head(50)
    return table(shown.itertuples(index=False), list(shown.columns)) + (
        f"\n\n({len(metrics) - 50} more rows)" if len(metrics) > 50 else ""
    )


def versions_table(versions: Mapping[str, str]) -> str:
    """The package versions a model was trained with, as a Markdown table."""
    return table(sorted(versions.items()), ("package", "version")) if versions else "Not recorded."


def saved_folder(
    source: str | os.PathLike,
    *,
    files: Sequence[str],
    loader: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> tuple[Path, dict[str, str]]:
    """The folder holding ``files``: ``source`` itself if it is a local folder, else a Hub repository's snapshot.

    Parameters
    ----------
    source
        A local folder, or a Hugging Face Hub repository id (``"owner/name"``).
    files
        The files to download (the card is downloaded too).
    loader
        What reads the folder (e.g. ``"SpadeModel.from_pretrained"``), named in errors.
    revision, cache_dir, token
        Passed to :func:`huggingface_hub.snapshot_download` for a repository id.

    Returns
    -------
    The folder and where it came from: ``{"path": folder}`` or ``{"repo_id": …, "revision": commit}``.

    Raises
    ------
    FileNotFoundError
        ``source`` is a file, or neither a folder nor a repository id.
    OSError
        The download failed (no network and no cached copy, an unknown repository, no access); the message says
        how to load a copy downloaded elsewhere.
    """
    path = Path(source)
    if path.is_dir():
        return path, {SOURCE_PATH: str(path.resolve())}
    if path.exists():
        raise FileNotFoundError(f"{loader} reads a folder (or a Hugging Face Hub repository id); {path} is a file.")
    repo_id = os.fspath(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{loader}: there is no folder {repo_id!r} here, and it is not a Hugging Face Hub repository id either "
            f"('owner/name'; {error}). Pass the folder written by save_pretrained, or a repository id."
        ) from None
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[*files, MODEL_CARD],
            library_name=LIBRARY_NAME,
        )
    except OSError as error:  # huggingface_hub's network, offline, not-found and access errors all are
        raise OSError(
            f"{loader}: {repo_id!r} is not a folder here, so it was read as a Hugging Face Hub repository id, and "
            f"downloading it failed ({type(error).__name__}: {str(error).strip().splitlines()[0]}). Offline? On a "
            f"machine with network run `hf download {repo_id} --local-dir <folder>` (or snapshot_download), copy the "
            f"folder here and pass its path to {loader}. A local folder is always read offline."
        ) from error
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{loader}: the Hugging Face Hub repository {repo_id!r} holds no {' or '.join(missing)}: it was not "
            "written by save_pretrained or push_to_hub of spade_sd."
        )
    return folder, {SOURCE_REPO: repo_id, SOURCE_REVISION: folder.name}


def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str,
) -> dict[str, str]:
    """Write a folder with ``write`` (into a temporary folder) and upload it to the Hub repository ``repo_id``.

    The repository is created if it does not exist. Returns where the upload went:
    ``{"repo_id": …, "revision": commit}``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"Expected a Hugging Face Hub repository id ('owner/name'); found {repo_id!r}: {error}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="spade_sd-push-") as staging:
        folder = Path(staging) / "upload"
        write(folder)  # everything is written before anything is sent
        api = HfApi(token=token, library_name=LIBRARY_NAME)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        except OSError as error:
            raise OSError(
                f"Uploading to the Hugging Face Hub repository {repo_id!r} failed ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0]}). It needs a network and a token with write access "
                "(`hf auth login`, or token=); offline, save_pretrained(folder) and upload the folder later."
            ) from error
    revision = getattr(commit, "oid", None)
    return {SOURCE_REPO: repo_id} | ({SOURCE_REVISION: str(revision)} if revision else {})
