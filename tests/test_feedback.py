"""What a user sees during long work, and what the plots give back.

spade_sd's own start/finish lines at the default verbosity, Lightning silent unless debugging, progress bars that
follow ``sd.settings.progress`` and appear only where a terminal shows them, ``sd.settings.n_jobs`` threads, and
every ``sd.pl`` function returning its Axes with ``show=False`` and writing ``save=``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_PATCH
from helpers import CountingMeans
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

import spade_sd as sd

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# what Lightning says on its own in a fit, each a part of a line it prints at INFO
LIGHTNING_CHATTER = ("Seed set to", "GPU available", "TPU available", "Tip:", "Trainable params", "Trainer.fit")
# characters only a tqdm bar writes: "|" around the bar, "it/s" style rates are not needed
BAR = "%|"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_records():
    """What Lightning's loggers let through, whatever handlers (its own, pytest's) would print it."""
    import lightning  # noqa: F401  (sets its loggers' levels on import)

    handler = _Records()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
    yield handler.messages
    for log, level in zip(loggers, levels, strict=True):
        log.removeHandler(handler)
        assert log.level == level, f"{log.name}'s level was not restored"


@contextmanager
def plain_script():
    """Logging as in a plain script or a notebook: no handler on the root logger (pytest adds its own per test)."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = handlers


@pytest.fixture
def settings_restored():
    before = (sd.settings.verbosity, sd.settings.progress, sd.settings.n_jobs)
    yield sd.settings
    sd.settings.verbosity, sd.settings.progress, sd.settings.n_jobs = before


def _pretrain(slides, **options):
    backbone = sd.Backbone(sd.MorphologyFeatures())
    fast = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "n_comps": 8}
    return sd.tl.pretrain(slides, backbone=backbone, seed=0, **fast, **SMALL_PATCH, **options)


def _train_experts(quiet: bool = False):
    """The Lightning run of tl.pretrain on its own (two experts, two epochs, random spots): seconds, not minutes."""
    from spade_sd.config import TrainingConfig
    from spade_sd.training.experts import train_experts

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 8)).astype(np.float32), rng.normal(size=(80, 5)).astype(np.float32)
    expert, slide = np.arange(80) % 2, np.repeat(["a", "b"], 40)
    config = TrainingConfig(max_epochs=2, out_dim=4, expression_comps=None, batch_size=16, val_fraction=0.5)
    return train_experts(x, y, expert, slide, n_experts=2, config=config, quiet=quiet)


# --- logging ----------------------------------------------------------------------------------------------------


def test_training_shows_our_lines_and_nothing_of_lightnings(
    synthetic_slides, one_thread, cache_dir, lightning_records, settings_restored, capsys
):
    with plain_script(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _pretrain(synthetic_slides())
    err = capsys.readouterr().err
    # our own start and finish lines, at the default verbosity
    assert sd.settings.verbosity == logging.INFO
    assert "Pretraining on 2 slides" in err and f"{model.n_experts} experts" in err
    assert "Encoding 64 patches with MorphologyFeatures" in err and "Training 2 experts" in err
    assert err.count("    finished (0:00:") >= 3, err  # each slide's features, and the whole training
    assert "model.save(path)" in err
    # Lightning's banners, tips, seed lines and model summary: neither printed nor even logged
    printed = [line for line in LIGHTNING_CHATTER if line in err]
    assert not printed and not lightning_records, (printed, lightning_records)
    assert not [w for w in caught if "lightning" in w.filename], [str(w.message) for w in caught]
    # stderr is no terminal here: no progress bar, though progress is on
    assert sd.settings.progress and BAR not in err


def test_lightning_speaks_at_debug_verbosity(one_thread, lightning_records, settings_restored):
    sd.settings.verbosity = "debug"
    _train_experts()
    said = " ".join(lightning_records)
    assert "Seed set to 0" in said and "GPU available" in said
    # quiet=True silences it even then
    lightning_records.clear()
    _train_experts(quiet=True)
    assert not lightning_records


def test_timed_lines_and_durations(capsys):
    from spade_sd.utils.logging import format_duration, timed

    assert [format_duration(s) for s in (0.2, 12.4, 75, 3725)] == ["0:00:00", "0:00:12", "0:01:15", "1:02:05"]
    with plain_script():
        with timed("Doing %d things", 3) as timer:
            timer.add("%d added", 2)
        with pytest.raises(RuntimeError), timed("Failing"):
            raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert err.splitlines() == ["Doing 3 things", "    finished (0:00:00): 2 added", "Failing"]


def test_our_lines_go_to_the_applications_logging_once_configured(capsys, caplog):
    from spade_sd.utils.logging import logger

    with caplog.at_level(logging.INFO, logger="spade_sd"):
        logger.info("a line for the application's handlers")
    assert "a line for the application's handlers" in caplog.text
    assert "a line for the application's handlers" not in capsys.readouterr().err  # not printed twice


def test_settings_are_checked(settings_restored):
    sd.settings.verbosity = 1  # scanpy's "warnings"
    assert sd.settings.verbosity == logging.WARNING
    sd.settings.verbosity = "DEBUG"
    assert sd.settings.verbosity == logging.DEBUG
    for bad, error in [("verbose", ValueError), (True, ValueError), (-3, ValueError)]:
        with pytest.raises(error, match="verbosity must be one of"):
            sd.settings.verbosity = bad
    with pytest.raises(TypeError, match="progress must be True or False"):
        sd.settings.progress = "yes"
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs must be a positive number of threads"):
            sd.settings.n_jobs = bad
    sd.settings.n_jobs = -1
    assert sd.settings.threads() >= 1
    assert "progress=True" in repr(sd.settings)


# --- progress bars and threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_in_a_terminal_follow_the_setting(
    progress, synthetic_slides, one_thread, settings_restored, capsys, monkeypatch
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: tqdm's disable=None draws there
    sd.settings.progress = progress
    backbone = sd.Backbone(CountingMeans())
    sd.tl.features(synthetic_slides(1)[0], backbone=backbone, cache=False, **SMALL_PATCH)
    _train_experts()
    err = capsys.readouterr().err
    bars = [name for name in ("Encoding patches (CountingMeans)", "Training experts") if name in err]
    if progress:
        assert BAR in err and len(bars) == 2, err
    else:
        assert BAR not in err and not bars, err


class _ThreadsSeen(CountingMeans):
    """CountingMeans recording torch's threads at every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        import torch

        self.threads.append(torch.get_num_threads())
        return super().__call__(patches)


def test_n_jobs_sets_the_backbones_threads_and_restores_the_callers(synthetic_slides, settings_restored):
    import torch

    before = torch.get_num_threads()
    n_jobs = 1 if before != 1 else 2
    sd.settings.n_jobs = n_jobs
    backbone = _ThreadsSeen()
    sd.tl.features(synthetic_slides(1)[0], backbone=sd.Backbone(backbone), cache=False, **SMALL_PATCH)
    assert backbone.threads and set(backbone.threads) == {n_jobs}
    assert torch.get_num_threads() == before


# --- plots ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plotted(small_model, synthetic_slides):
    """A slide with every output a plot draws: embedding, experts, query scores, predicted expression."""
    sdata = synthetic_slides(1, seed=5)[0]
    sd.tl.embed(sdata, small_model)
    genes = list(small_model.reference.genes[:2])
    sd.tl.query(sdata, small_model, genes=genes[:1])
    sd.tl.predict_expression(sdata, small_model, genes=genes)
    rng = np.random.default_rng(0)
    results = pd.DataFrame(
        {
            "encoder": np.repeat(["spade", "backbone"], 6),
            "metric": np.tile(np.repeat(["pearson", "recall@10"], 3), 2),
            "value": rng.uniform(size=12),
        }
    )
    return sdata, genes, results


# How each plot is called on ``plotted``; a plot missing here fails the tests, so none is left out
PLOT_CALLS = {
    "benchmark": lambda sdata, genes, results, **o: sd.pl.benchmark(results, **o),
    "domains": lambda sdata, genes, results, **o: sd.pl.domains(sdata, "spade_expert", **o),
    "experts": lambda sdata, genes, results, **o: sd.pl.experts(sdata, umap=True, **o),
    "expression": lambda sdata, genes, results, **o: sd.pl.expression(sdata, genes, **o),
    "query": lambda sdata, genes, results, **o: sd.pl.query(sdata, **o),
}


def _call(name, plotted, **options):
    assert name in PLOT_CALLS, f"sd.pl.{name} is new: add how to call it to PLOT_CALLS"
    return PLOT_CALLS[name](*plotted, **options)


@pytest.mark.parametrize("name", sd.pl.__all__)
def test_every_plot_returns_its_axes_when_not_shown(name, plotted):
    axes = _call(name, plotted, show=False)
    panels = axes if isinstance(axes, list) else [axes]
    assert panels and all(isinstance(ax, Axes) for ax in panels), axes
    assert all(ax.figure is panels[0].figure for ax in panels)
    assert any(ax.has_data() or ax.images for ax in panels)
    assert isinstance(_call(name, plotted, show=False, return_fig=True), Figure)
    plt.close("all")


@pytest.mark.parametrize("name", sd.pl.__all__)
def test_every_plot_saves_a_png(name, plotted, tmp_path):
    path = tmp_path / f"{name}.png"
    _call(name, plotted, show=False, save=path)
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100, image.size
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left beside it
    plt.close("all")


def test_save_is_checked_before_drawing(plotted, tmp_path):
    sdata, _, _ = plotted
    with pytest.raises(ValueError, match="cannot write '.xyz' files"):
        sd.pl.experts(sdata, show=False, save=tmp_path / "experts.xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.pl.experts(sdata, show=False, save=tmp_path / "missing" / "experts.png")
    with pytest.raises(TypeError, match="file path"):
        sd.pl.experts(sdata, show=False, save=True)
    assert not plt.get_fignums() and not list(tmp_path.iterdir())
    sd.pl.experts(sdata, show=False, save=tmp_path / "experts")  # no suffix: matplotlib's default format
    assert [p.name for p in tmp_path.iterdir()] == ["experts.png"]
