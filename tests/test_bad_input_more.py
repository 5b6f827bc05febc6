"""Errors that say what to do (issue 21, item 5): a cache folder that cannot hold files, Lightning keyword typos,
counts that leave no gene, one-spot runs and gene names in another letter case.

Each case is hit as a new user would, through the public functions; "before any work" is measured with a backbone
that counts its calls (it must stay at 0) or, for ``tl.finetune``, a prefix encoder that refuses to run.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import CountingMeans
from scipy import sparse

import spade_sd as sd
from spade_sd.encoders import finetuned

PATCH = {"size_um": 64.0, "size_px": 64}
FAST = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, **PATCH}


def _slides(n: int = 2, seed: int = 0, **options) -> list:
    slides = sd.datasets.synthetic(n_slides=n, mpp=1.0, **{"grid": (8, 8), "n_genes": 60, "seed": seed, **options})
    return slides if n > 1 else [slides]


def _one_spot_slide():
    """A slide of a single spot, named apart from the 8 × 8 slides of :func:`_slides`."""
    (slide,) = _slides(1, seed=5, grid=(1, 1), n_types=1)
    slide.tables["table"].uns["spade_sd"]["sample"] = "one_spot"
    return slide


@pytest.fixture
def counting():
    fn = CountingMeans()
    return fn, sd.Backbone(fn)


@pytest.fixture
def no_prefix_pass(monkeypatch):
    """tl.finetune encodes patches with its prefix encoder first: make that refuse to run."""

    def refuse(self, patches):
        raise AssertionError("a patch was encoded before the input was checked")

    monkeypatch.setattr(finetuned.PrefixEncoder, "__call__", refuse)


def _refused(error, match, call, counter: CountingMeans):
    with pytest.raises(error, match=match) as caught:
        call()
    assert counter.calls == 0, "the backbone ran before the error"
    return caught.value


# --- a cache folder that is a file, lies under a file or is not writable


@pytest.fixture
def cache_setting(monkeypatch):
    """Whatever a test sets as sd.settings.cache_dir is forgotten afterwards (the environment variable rules)."""
    monkeypatch.delenv("SPADE_SD_CACHE_DIR", raising=False)
    yield
    sd.settings.cache_dir = None


@contextmanager
def _unprivileged():
    """Act as a user without root's right to write anywhere: as root, folder permissions would not bind.

    That user may not read root's Python installation either, so whatever the block imports must be imported before.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)  # nobody: a user who owns none of the folders
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _as_setting(folder: Path, monkeypatch, how: str) -> str:
    """Point the cache at ``folder`` as a user would; the message must say where the folder came from."""
    if how == "settings":
        sd.settings.cache_dir = folder
        return "It comes from sd.settings.cache_dir;"
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(folder))
    return "It comes from the environment variable SPADE_SD_CACHE_DIR;"


CACHE_PROBLEMS = [
    ("a file", "settings", lambda file: file, r"the cache folder .*notes\.txt is a file, not a folder"),
    ("under a file", "environment", lambda file: file / "cache", r"the cache folder .*cache lies under the file"),
]


@pytest.mark.parametrize("tool", ["features", "pretrain"])
@pytest.mark.parametrize(("case", "how", "folder", "problem"), CACHE_PROBLEMS, ids=[c[0] for c in CACHE_PROBLEMS])
def test_a_cache_folder_that_is_a_file_is_refused_before_any_work(
    counting, cache_setting, monkeypatch, tmp_path, tool, case, how, folder, problem
):
    fn, backbone = counting
    file = tmp_path / "notes.txt"
    file.write_text("a user's file")
    source = _as_setting(folder(file), monkeypatch, how)
    slides = _slides()

    def call():
        if tool == "features":
            return sd.tl.features(slides[0], backbone=backbone, **PATCH)
        return sd.tl.pretrain(slides, backbone=backbone, **{**FAST, "cache": True})

    message = str(_refused(NotADirectoryError, problem, call, fn))
    assert source in message
    assert "point sd.settings.cache_dir (or the environment variable SPADE_SD_CACHE_DIR) at a folder" in message
    assert "or pass cache=False" in message
    assert file.read_text() == "a user's file" and sorted(tmp_path.iterdir()) == [file]
    assert "X_backbone" not in slides[0].tables["table"].obsm


def test_a_cache_folder_that_is_not_writable_is_refused_before_any_work(counting, cache_setting, monkeypatch):
    fn, backbone = counting
    sdata = _slides(1)[0]
    # a session that computed features without the cache before: everything tl.features imports is imported
    sd.tl.features(sdata, backbone=sd.Backbone(CountingMeans()), cache=False, key_added="X_before", **PATCH)
    with tempfile.TemporaryDirectory() as parent:  # not under pytest's tmp_path, which only its owner may enter
        folder = Path(parent) / "cache"
        folder.mkdir()
        Path(parent).chmod(0o755)
        folder.chmod(0o555)
        source = _as_setting(folder, monkeypatch, "environment")
        try:
            with _unprivileged():
                error = _refused(
                    PermissionError,
                    r"the cache folder .*cache/features is not writable .*point sd\.settings\.cache_dir .*cache=False",
                    lambda: sd.tl.features(sdata, backbone=backbone, **PATCH),
                    fn,
                )
            assert source in str(error)
            assert list(folder.iterdir()) == []  # nothing was written
            assert "X_backbone" not in sdata.tables["table"].obsm
        finally:
            folder.chmod(0o755)


# --- Lightning keyword typos


@pytest.mark.parametrize(
    ("typo", "hint"),
    [
        ("max_epoch", r"Did you mean max_epochs=\?"),  # one of pretrain's own keywords
        ("gradient_clip_vall", r"Did you mean gradient_clip_val=\?"),  # a lightning.Trainer argument
        ("colour", r"lightning\.Trainer's arguments"),  # nothing close: where to look
    ],
)
def test_pretrain_refuses_a_lightning_keyword_typo_before_any_work(counting, typo, hint):
    fn, backbone = counting
    _refused(
        TypeError,
        rf"pretrain\(\) got an unexpected keyword argument '{typo}': .*lightning\.Trainer.*{hint}",
        lambda: sd.tl.pretrain(_slides(), backbone=backbone, **{**FAST, typo: 3}),
        fn,
    )


def test_finetune_refuses_a_lightning_keyword_typo_before_any_work(no_prefix_pass):
    with pytest.raises(TypeError, match=r"finetune\(\) got an unexpected keyword argument 'max_epoch'.*max_epochs="):
        sd.tl.finetune(_slides(), max_epoch=2, quiet=True, **PATCH)


# --- counts that leave no gene for the panel


def _zero_counts(sdata):
    table = sdata.tables["table"]
    table.X = sparse.csr_matrix(table.X.shape, dtype=np.float32)
    return sdata


def test_pretrain_refuses_all_zero_counts_before_any_work(counting):
    fn, backbone = counting
    slides = [_zero_counts(s) for s in _slides()]
    _refused(
        ValueError,
        r"No gene can enter the panel: .*min_counts=3.*'synthetic_0' 0, 'synthetic_1' 0.*Check that X holds raw counts",
        lambda: sd.tl.pretrain(slides, backbone=backbone, **FAST),
        fn,
    )


def test_finetune_refuses_all_zero_counts_before_any_work(no_prefix_pass):
    slides = [_zero_counts(s) for s in _slides()]
    with pytest.raises(ValueError, match=r"No gene can enter the panel: .*; counts in all: 'synthetic_0' 0, "):
        sd.tl.finetune(slides, max_epochs=1, quiet=True, min_spots=8, **PATCH)


# --- one-spot runs


@pytest.mark.parametrize("flavor", ["union", "global"])
def test_a_panel_from_one_spot_says_why_it_cannot_be_fitted(flavor):
    table = _one_spot_slide().tables["table"]
    with pytest.raises(ValueError, match=r"Highly variable genes need at least 2 spots .*'one_spot' has 1"):
        sd.GenePanel.fit(table, flavor=flavor, n_top_genes=5)


ONE_SPOT_RUNS = [
    # the one spot joins a group of the other slide's spots, so only the gene panel sees it alone
    ({"standardize": "global", "groupby": "tissue_type"}, r"Highly variable genes need at least 2 spots .*'one_spot'"),
    ({"standardize": "global"}, r"Group 'one_spot' has 1 spot; stage-1 k-means needs at least 2 per group"),
    ({}, r"standardize='slide' needs at least 30 spots per slide; found \{'one_spot': 1\}"),
]


@pytest.mark.parametrize(("options", "match"), ONE_SPOT_RUNS, ids=["groupby", "global", "slide"])
def test_pretrain_refuses_a_one_spot_slide_before_any_work(counting, options, match):
    fn, backbone = counting
    slides = [_slides(1)[0], _one_spot_slide()]
    _refused(ValueError, match, lambda: sd.tl.pretrain(slides, backbone=backbone, **{**FAST, **options}), fn)


def test_pretrain_on_one_spot_alone_is_refused_before_any_work(counting):
    fn, backbone = counting
    _refused(
        ValueError,
        r"n_comps must be at most the number of training spots \(1\); found 16",
        lambda: sd.tl.pretrain([_one_spot_slide()], backbone=backbone, **{**FAST, "standardize": "global"}),
        fn,
    )


# --- gene names in another letter case


def test_a_panel_gene_in_another_letter_case_gets_did_you_mean(counting):
    fn, backbone = counting
    panel = sd.GenePanel(["GENE_0001", "gene_0002"])
    _refused(
        ValueError,
        r"lacks 1 of the 2 panel genes, e.g. GENE_0001\..* Did you mean 'gene_0001'\?",
        lambda: sd.tl.pretrain(_slides(), backbone=backbone, panel=panel, **FAST),
        fn,
    )


def test_slides_naming_genes_in_another_letter_case_are_told_so(counting):
    fn, backbone = counting
    slides = _slides()
    table = slides[1].tables["table"]
    table.var_names = table.var_names.str.upper()
    _refused(
        ValueError,
        r"share no gene: .* They share 60 genes when letter case is ignored, e.g. 'gene_0000' and 'GENE_0000'",
        lambda: sd.tl.pretrain(slides, backbone=backbone, **FAST),
        fn,
    )


def test_predicted_genes_in_another_letter_case_get_did_you_mean(small_model):
    gene = small_model.reference.genes[0]
    sdata = _slides(1, seed=3)[0]
    with pytest.raises(KeyError, match=rf"{gene.upper()}.* Did you mean '{gene}'\?"):
        sd.tl.predict_expression(sdata, small_model, genes=[gene.upper()], cache=False)
    assert "spade_predicted" not in sdata.tables


def test_queried_genes_in_another_letter_case_get_did_you_mean(small_model):
    genes = small_model.panel.genes[:2]
    sdata = _slides(1, seed=3)[0]
    with pytest.raises(KeyError, match=rf"Did you mean '{genes[0]}', '{genes[1]}'\?"):
        sd.tl.query(sdata, small_model, genes=[g.upper() for g in genes], cache=False)
    assert not any(key.startswith("spade_query") for key in sdata.tables["table"].obs)
