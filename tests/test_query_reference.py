"""``sd.tl.query(..., reference=...)``: marker genes select the spots of a given table, any gene it measures.

On real data a model trained on MOB1 + MOB2 is queried on the held-out MOB3 with the top Wilcoxon markers of MOB3's
expression domains, genes the model's bank does not hold; the bank's own spots given as a table reproduce the bank's
profile. Bad input is refused on synthetic slides, before a backbone that counts its calls encodes anything.
"""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from helpers import CountingMeans

import spade_sd as sd
from spade_sd import metrics

PATCH = {"size_um": 64.0, "size_px": 64}
N_MARKERS = 5


def _marker_score(measured: np.ndarray) -> np.ndarray:
    """The markers' mean z-score over the spots: where the markers are measured high."""
    return ((measured - measured.mean(axis=0)) / measured.std(axis=0)).mean(axis=1)


# --- real data: MOB1 + MOB2 teach, MOB3 is held out


@pytest.fixture(scope="module")
def mob(data_dir, one_thread):
    slides = [sd.datasets.mouse_olfactory_bulb(s) for s in ("MOB1", "MOB2", "MOB3")]
    # the bank keeps the panel genes only: MOB's sections measure the same 1,000 genes, all of which the default
    # bank (2,000 genes) would hold, so no domain marker would lie outside it
    model = sd.tl.pretrain(slides[:2], n_experts=2, max_epochs=5, reference_genes=1, quiet=True)
    return model, slides


@pytest.fixture(scope="module")
def domain_markers(mob):
    """MOB3's expression domains and each one's top Wilcoxon markers among the genes outside the model's bank."""
    model, slides = mob
    table = slides[2].tables["table"]
    genes = list(table.var_names)
    measured = sd.GenePanel(genes).transform(table)
    domains = metrics.expression_domains(measured, seed=0).astype(str)
    outside = ~np.isin(genes, model.reference.genes)
    ranked = ad.AnnData(measured[:, outside], obs={"domain": domains})
    ranked.var_names = np.asarray(genes)[outside]
    sc.tl.rank_genes_groups(ranked, "domain", method="wilcoxon")
    names = ranked.uns["rank_genes_groups"]["names"]
    markers = {d: [str(g) for g in names[d][:N_MARKERS]] for d in np.unique(domains)}
    return markers, measured, genes


def test_markers_outside_the_bank_select_spots_of_a_held_out_sections_table(mob, domain_markers):
    model, slides = mob
    mob3 = slides[2]
    table = mob3.tables["table"]
    markers, measured, genes = domain_markers
    assert len(markers) >= 3
    first = next(iter(markers.values()))
    assert not set(first) & set(model.reference.genes)
    with pytest.raises(KeyError, match=r"not in the model's reference bank.*pass reference="):
        sd.tl.query(mob3, model, genes=first)
    correlations = {}
    for domain, chosen in markers.items():
        sd.tl.query(mob3, model, genes=chosen, reference=table, key_added="domain_query")
        score = table.obs["domain_query"].to_numpy()
        assert np.isfinite(score).all()
        expressed = _marker_score(measured[:, [genes.index(g) for g in chosen]])
        correlations[domain] = np.corrcoef(score, expressed)[0, 1]
    # measured r = 0.44, 0.48, 0.14, 0.64 over MOB3's 4 domains (mean 0.43): the H&E finds where the markers are
    assert min(correlations.values()) > 0.05, correlations
    assert np.mean(list(correlations.values())) > 0.3, correlations
    params = table.uns["domain_query"]["params"]
    assert params["reference"] == "AnnData" and params["n_reference"] == table.n_obs
    assert params["genes"] == chosen and params["markers"] == "spots"


def test_a_spatialdata_reference_and_a_counts_layer_read_the_same_spots(mob, domain_markers):
    model, slides = mob
    mob3 = slides[2]
    table = mob3.tables["table"]
    chosen = next(iter(domain_markers[0].values()))
    sd.tl.query(mob3, model, genes=chosen, reference=table, key_added="from_table")
    sd.tl.query(mob3, model, genes=chosen, reference=mob3, key_added="from_slide")
    counts = table.copy()
    counts.layers["counts"] = counts.X.copy()
    counts.X = counts.X / 3  # not counts any more
    with pytest.raises(ValueError, match=r"non-integer values.*layer="):
        sd.tl.query(mob3, model, genes=chosen, reference=counts, key_added="from_layer")
    sd.tl.query(mob3, model, genes=chosen, reference=counts, layer="counts", key_added="from_layer")
    uns = table.uns
    assert uns["from_slide"]["params"]["reference"] == "SpatialData"
    for key in ("from_slide", "from_layer"):
        np.testing.assert_array_equal(uns[key]["profile"], uns["from_table"]["profile"])
        np.testing.assert_array_equal(table.obs[key], table.obs["from_table"])


def _bank_spots(model, slides) -> ad.AnnData:
    """The raw counts of the bank's spots, in the bank's order, all genes (the library sizes the bank saw)."""
    bank, tables = model.reference, {s.tables["table"].uns["spade_sd"]["sample"]: s.tables["table"] for s in slides}
    names = np.asarray(bank.obs_names)
    parts = [tables[slide][names[bank.slide == slide]] for slide in dict.fromkeys(bank.slide)]
    spots = ad.concat(parts, index_unique="-")
    assert spots.n_obs == len(bank)
    return spots


def test_the_banks_own_spots_as_reference_give_the_banks_profile(mob):
    model, slides = mob
    mob3 = slides[2]
    table = mob3.tables["table"]
    spots = _bank_spots(model, slides[:2])
    panel = model.panel.genes
    for chosen in (panel[:1], panel[3:6], panel[-2:]):
        sd.tl.query(mob3, model, genes=chosen, key_added="bank_query")
        sd.tl.query(mob3, model, genes=chosen, reference=spots, key_added="spots_query")
        # the bank stores its expression as float16 (three significant digits); measured difference ≤ 2.4e-4
        bank_profile, spots_profile = table.uns["bank_query"]["profile"], table.uns["spots_query"]["profile"]
        np.testing.assert_allclose(spots_profile, bank_profile, atol=1e-3)
        np.testing.assert_allclose(table.obs["spots_query"], table.obs["bank_query"], atol=1e-3)
    # a panel gene the reference lacks takes the bank's mean; the others are still the selected spots'. The gene is
    # renamed, not dropped, so that the library sizes, and so the other genes' values, stay the same
    lacking = spots.copy()
    lacking.var_names = ["renamed" if g == panel[0] else g for g in lacking.var_names]
    sd.tl.query(mob3, model, genes=chosen, reference=lacking, key_added="lacking_query")
    profile = np.asarray(table.uns["lacking_query"]["profile"])
    bank_mean = model.reference.expression[:, : len(panel)].astype(np.float32).mean(axis=0)
    assert profile[0] == pytest.approx(bank_mean[0])
    np.testing.assert_allclose(profile[1:], np.asarray(table.uns["spots_query"]["profile"])[1:], rtol=1e-6)


# --- synthetic slides: bad input refused before any patch is encoded, nothing written


@pytest.fixture(scope="module")
def counted(synthetic_slides, one_thread):
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, **PATCH}
    model = sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(counter), seed=0, **options)
    return counter, model


def _reference(synthetic_slides, change: str | None, model) -> ad.AnnData:
    """A fresh slide's table of raw counts (not embedded), changed as a case needs."""
    table = synthetic_slides(1, seed=7)[0].tables["table"]
    if change == "few spots":
        return table[:10]
    if change == "no panel gene":
        return table[:, table.var_names != model.panel.genes[0]]
    if change == "normalized":
        table.X = table.X / 3
    return table


REFUSED = [
    (
        "marker not in the reference",
        {"genes": ["GENE_0001", "Xist"]},
        None,
        KeyError,
        r"2 of the 2 genes asked for are not in the reference AnnData's table \(60 genes, e.g. gene_0000.*"
        r"GENE_0001, Xist.*Did you mean 'gene_0001'",
    ),
    ("with profile", {"profile": "mean"}, None, ValueError, r"profile= is already the expression.*drop reference="),
    ("with values", {"genes": {"gene_0001": 2.0}}, None, ValueError, r"genes= is a mapping.*pass genes=\[\.\.\.\]"),
    ("raised", {"markers": "raised"}, None, ValueError, r"markers='raised'.*Pass markers='spots'.*or drop reference="),
    ("layer alone", {"reference": None, "layer": "counts"}, None, ValueError, r"no reference was given"),
    ("missing layer", {"layer": "counts"}, None, KeyError, r"has no layer 'counts'"),
    ("normalized counts", {}, "normalized", ValueError, r"non-integer values.*layer="),
    ("few spots", {}, "few spots", ValueError, r"holds 10: fewer than one spot.*at least 20 spots.*quantile ≤ 0\.9"),
    ("quantile 1", {"quantile": 1.0}, None, ValueError, r"no number of spots would do"),
    ("few bank spots", {"reference": None, "quantile": 0.999}, None, ValueError, r"model's reference bank holds 128"),
    (
        "panel gene lacking, no bank",
        {"model": "no bank"},
        "no panel gene",
        ValueError,
        r"lacks 1 of the model's \d+ panel genes \(gene_\d+\), which would take the reference bank's mean",
    ),
    ("not a table", {"reference": "table.csv"}, None, TypeError, r"reference must be None .* found str"),
]


@pytest.mark.parametrize(
    ("arguments", "change", "error", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_bad_input_is_refused_before_any_patch_is_encoded(counted, synthetic_slides, arguments, change, error, match):
    counter, model = counted
    # markers of the panel but its first gene, which one case removes from the reference
    markers = model.panel.genes[1:3]
    arguments = {"genes": markers, "reference": _reference(synthetic_slides, change, model)} | dict(arguments)
    if arguments.pop("model", None) == "no bank":
        model = dataclasses.replace(model, reference=None)
    if arguments.get("profile") == "mean":
        arguments["profile"] = model.reference.expression[:, : len(model.panel)].mean(axis=0)
        del arguments["genes"]
    sdata = synthetic_slides(1, seed=3)[0]
    table = sdata.tables["table"]
    before = (set(sdata.tables), set(table.obs), set(table.obsm), set(table.uns))
    counter.calls = 0
    with pytest.raises(error, match=match):
        sd.tl.query(sdata, model, cache=False, **arguments)
    assert counter.calls == 0, "the backbone ran before the error"
    assert (set(sdata.tables), set(table.obs), set(table.obsm), set(table.uns)) == before


def test_a_reference_measuring_every_panel_gene_needs_no_bank(counted, synthetic_slides):
    counter, model = counted
    reference = _reference(synthetic_slides, None, model)
    sdata = synthetic_slides(1, seed=3)[0]
    table = sdata.tables["table"]
    sd.tl.query(sdata, model, genes=["gene_0001"], reference=reference, cache=False, key_added="with_bank")
    counter.calls = 0
    without = dataclasses.replace(model, reference=None)
    sd.tl.query(sdata, without, genes=["gene_0001"], reference=reference, cache=False, key_added="without_bank")
    assert counter.calls > 0
    np.testing.assert_array_equal(table.uns["without_bank"]["profile"], table.uns["with_bank"]["profile"])
    assert table.uns["without_bank"]["params"]["n_reference"] == reference.n_obs == 64
