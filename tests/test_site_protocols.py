"""The two sides of a site (hf_snp.units.protocols): every site kind provides both; allocation, preflight and
the method's SiteInputs read only the method side (SiteUnits), seen here through a view that refuses any other
member; a site kind that leaves out a member cannot be built."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_moe import sites_of as moe_sites_of
from test_moe import tiny_moe

from hf_snp.adapters import get_adapter
from hf_snp.config import PruneConfig
from hf_snp.methods import get_method
from hf_snp.passes.engine import StreamingEngine
from hf_snp.setup.preflight import _predicted_shapes
from hf_snp.units.allocation import SiteCurve, WidthRules, allocate_steps, nearest_steps, site_budget
from hf_snp.units.protocols import Site, SiteCut, SiteUnits
from hf_snp.units.sites import ConsumerSite
from hf_snp.units.stats import SiteStatistics

SITE_KINDS = {"MlpSite", "HeadSite", "ExpertSite", "SharedExpertSite", "ExpertSetSite"}


def members(protocol: type) -> set[str]:
    """The members a protocol declares (its own and its bases')."""
    names = set()
    for cls in protocol.__mro__:
        if cls.__module__ == protocol.__module__:
            names |= {n for n in vars(cls) if not n.startswith("_")} | set(vars(cls).get("__annotations__", {}))
    return names


class UnitsOnly:
    """A site seen through ``SiteUnits`` alone: reading any other member fails."""

    def __init__(self, site):
        self._site = site

    def __getattr__(self, name: str):
        if name not in members(SiteUnits):
            raise AttributeError(f"{name!r} is not a member of SiteUnits")
        return getattr(self._site, name)


def llama_sites(model):
    adapter = get_adapter(model.config)
    return [site for index, layer in enumerate(adapter.layers(model))
            for site in adapter.sites(layer, index, ("heads", "mlp"), model.config, "per_group")]


def test_the_two_sides_split_the_site():
    units, cut = members(SiteUnits), members(SiteCut)
    assert not units & cut
    assert members(Site) == units | cut
    assert {"plan", "consumer_weight", "params_removed", "shape_after"} <= units
    assert {"observe", "new_statistics", "apply", "describe", "reshape_like"} <= cut


def test_every_site_kind_provides_both_sides():
    sites = llama_sites(tiny_llama()) + moe_sites_of(tiny_moe("qwen2_moe"), ("mlp", "experts"))
    assert {type(site).__name__ for site in sites} == SITE_KINDS
    for site in sites:
        assert [name for name in sorted(members(Site)) if not hasattr(site, name)] == [], type(site).__name__
        assert isinstance(site, SiteUnits) and isinstance(site, SiteCut)


@pytest.mark.parametrize("mode", ["per_group", "kv_groups", "mha"])
def test_every_site_kinds_step_table_is_its_widths_and_parameters_step_by_step(mode):
    """``step_table`` (read once per site by allocation and preflight) gives ``width_after`` and ``params_removed``
    of every step count, for every site kind (the single-unit kinds take their shortcut)."""
    model = tiny_llama()
    adapter = get_adapter(model.config)
    sites = [site for index, layer in enumerate(adapter.layers(model))
             for site in adapter.sites(layer, index, ("heads", "mlp"), model.config, mode)]
    sites += moe_sites_of(tiny_moe("qwen2_moe"), ("mlp", "experts"))
    assert {type(site).__name__ for site in sites} == SITE_KINDS
    for site in sites:
        steps = range(site.max_steps() + 1)
        widths, params = site.step_table()
        assert widths == [site.width_after(s) for s in steps], type(site).__name__
        assert params == [site.params_removed(s) for s in steps], type(site).__name__
    assert any(site.single_units for site in sites) and not all(site.single_units for site in sites)


def test_a_site_kind_that_leaves_out_a_member_cannot_be_built():
    model = tiny_llama()

    class Partial(ConsumerSite):
        kind = "mlp"

        @property
        def consumer_linear(self):
            return self.layer.mlp.down_proj

    with pytest.raises(TypeError, match="abstract"):
        Partial(model.model.layers[0], 0)
    assert {"plan", "max_steps", "apply", "shape_after", "reshape_to"} <= ConsumerSite.__abstractmethods__


def test_allocation_and_preflight_read_only_the_method_side():
    model = tiny_llama()
    sites = llama_sites(model)
    views = [UnitsOnly(site) for site in sites]
    config = PruneConfig(sparsity=0.4, targets=("heads", "mlp"))
    rules = WidthRules.build({"mlp": 4}, None)
    steps_for, _ = allocate_steps(config, rules)
    for site, view in zip(sites, views):
        assert site_budget(view, config) == site_budget(site, config) > 0
        target = 0.3 * site.num_params()
        assert nearest_steps(view, target, rules) == nearest_steps(site, target, rules)
        assert steps_for(view) == steps_for(site)
        costs = [float(c) for c in range(1, len(site.plan(site.curve_steps()).schedule) + 1)]  # one per group
        assert SiteCurve.from_site(view, None, costs, rules) == SiteCurve.from_site(site, None, costs, rules)
    method = get_method("vbp")
    layers = len(get_adapter(model.config).layers(model))
    predicted = _predicted_shapes(model.config, layers, views, config, method, rules)
    assert predicted == _predicted_shapes(model.config, layers, sites, config, method, rules)
    assert any(shape.intermediate_size is not None for shape in predicted)


def test_site_inputs_are_built_from_the_method_side():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    config = PruneConfig(sparsity=0.4, targets=("heads", "mlp"))
    engine = StreamingEngine(model, adapter, config, get_method("vbp"), torch.device("cpu"), torch.device("cpu"))
    for site in llama_sites(model):
        stats = SiteStatistics(site.name, site.num_units, torch.device("cpu"))
        view, real = engine.site_inputs(UnitsOnly(site), stats, 2), engine.site_inputs(site, stats, 2)
        assert view.plan == real.plan and view.key == real.key and view.bias_available == real.bias_available
        assert torch.equal(view.consumer_weight, real.consumer_weight)
