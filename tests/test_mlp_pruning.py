"""The maths on tiny models: identity at 0%, exactness on built-in redundancy, parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    TINY,
    calibration_ids,
    logits,
    make_constant_neurons,
    make_scaled_copies,
    mlp_sites,
    prune_quiet,
    sparsity_removing,
    tiny_llama,
    tiny_opt,
)

FAMILIES = ["llama", "opt"]
COPIES = 12  # of 48 neurons


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["snp", "vbp", "random"])
def test_zero_sparsity_is_identity(family, method):
    model = TINY[family]()
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_quiet(model, method=method, sparsity=0.0)
    assert torch.equal(logits(result.model), before)
    assert result.report["params_removed"] == 0
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("family", [*FAMILIES, "mistral", "qwen2"])
def test_snp_exact_when_removed_neurons_are_combinations_of_kept_ones(family):
    model = TINY[family]()
    make_scaled_copies(model, COPIES)
    reference = logits(model)
    sparsity = sparsity_removing(model, COPIES)

    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=sparsity)
    assert [record["mlp_width"] for record in result.report["layers"]] == [48 - COPIES] * 4
    assert (logits(result.model) - reference).abs().max() < 1e-4

    # the property is not vacuous: the same cut without reconstruction moves the logits
    baseline = prune_quiet(copy.deepcopy(model), method="random", sparsity=sparsity)
    assert (logits(baseline.model) - reference).abs().max() > 1e-2


def test_snp_with_added_bias_is_exact_on_bias_free_llama():
    model = tiny_llama()
    make_scaled_copies(model, COPIES)
    reference = logits(model)
    result = prune_quiet(model, method="snp", sparsity=sparsity_removing(model, COPIES), add_bias=True)
    assert result.report["save_format"] == "hf_snp"  # the added down_proj bias needs the hf_snp type
    assert (logits(result.model) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_llama(mlp_bias=True)], ids=["opt", "llama-mlp-bias"])
def test_vbp_exact_when_removed_neurons_are_constant(make):
    model = make()
    make_constant_neurons(model, COPIES)
    reference = logits(model)
    sparsity = sparsity_removing(model, COPIES)
    result = prune_quiet(copy.deepcopy(model), method="vbp", sparsity=sparsity)
    assert (logits(result.model) - reference).abs().max() < 1e-4
    # without the mean shift the same cut is wrong: VBP's fold is what makes it exact
    unfolded = prune_quiet(copy.deepcopy(model), method="random", sparsity=sparsity, seed=3)
    assert (logits(unfolded.model) - reference).abs().max() > 1e-2


@torch.no_grad()
def test_vbp_adds_the_mean_shift_bias_where_the_consumer_has_none():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    calib = calibration_ids()
    result = prune_quiet(model, method="vbp", sparsity=0.25, calibration=calib, layer_sparsity={1: 0, 2: 0, 3: 0})
    # layer 0 sees the raw embeddings in both models: recompute its unit means independently
    captured = []
    site = mlp_sites(dense)[0]
    handle = site.consumer_linear.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 48)))
    dense(calib)
    handle.remove()
    h = torch.cat(captured).double()
    variance, mean = h.var(0, unbiased=False), h.mean(0)
    drop = torch.argsort(variance)[: 48 - result.report["layers"][0]["mlp_width"]]
    expected = site.consumer_linear.weight.double()[:, drop] @ mean[drop]
    pruned = mlp_sites(result.model)[0].consumer_linear
    assert pruned.bias is not None
    assert torch.allclose(pruned.bias.double(), expected, atol=1e-5)
    assert result.report["layers"][0]["mlp_output_bias_added"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_parameter_count_matches_report(family, method):
    model = TINY[family]()
    counted_before = sum(p.numel() for p in model.parameters())
    per_unit = mlp_sites(model)[0].params_per_step()
    result = prune_quiet(model, method=method, sparsity=0.3)
    counted_after = sum(p.numel() for p in result.model.parameters())
    report = result.report
    assert report["params_before"] == counted_before
    assert report["params_after"] == counted_after
    assert report["params_removed"] == counted_before - counted_after
    removed_units = sum(record["mlp_width_before"] - record["mlp_width"] for record in report["layers"])
    added_biases = sum(record["mlp_output_bias_added"] for record in report["layers"]) * model.config.hidden_size
    assert report["params_removed"] == removed_units * per_unit - added_biases


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.9])
def test_uniform_widths_meet_the_budget_within_one_unit(sparsity):
    model = tiny_opt()
    site = mlp_sites(model)[0]
    targeted = site.num_params() * len(mlp_sites(model))
    result = prune_quiet(model, method="snp", sparsity=sparsity, allocation="uniform")
    removed = result.report["params_removed"]
    assert abs(removed - sparsity * targeted) <= len(mlp_sites(model)) * site.params_per_step() / 2
    assert len({record["mlp_width"] for record in result.report["layers"]}) == 1


def test_pruned_model_is_smaller_and_runs_generate():
    result = prune_quiet(tiny_llama(), method="snp", sparsity=0.4, allocation="uniform")
    out = result.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
    assert result.model.config.intermediate_size == result.report["layers"][0]["mlp_width"] < 48


def test_layer_sparsity_gives_per_layer_widths():
    result = prune_quiet(tiny_llama(), method="snp", sparsity=0.25, layer_sparsity={0: 0.0, 3: 0.5})
    widths = [record["mlp_width"] for record in result.report["layers"]]
    assert widths[0] == 48 and widths[3] == 24 and widths[1] == widths[2] == 36
    assert result.report["save_format"] == "hf_snp"
    assert result.model.config.model_type == "hf_snp_llama"


def test_prune_accepts_text_calibration_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and in to a was is for on as by with he at from that his it an".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    text = " ".join(words * 30)
    result = prune_quiet(tiny_llama(), tokenizer=tokenizer, calibration=[text], num_samples=4, seq_len=32,
                         sparsity=0.25)
    assert result.report["calibration_tokens"] == 4 * 32
    assert "list of 1 texts" in result.report["calibration"]


def test_padding_tokens_are_excluded_from_statistics():
    """Padded positions carry junk; with the mask they must not change the decision."""
    model = tiny_opt()
    ids = calibration_ids(8, 24)
    mask = torch.ones_like(ids)
    padded_ids = ids.clone()
    mask[:, 16:] = 0
    padded_ids[:, 16:] = 5  # junk the statistics must not see
    with_pad = prune_quiet(copy.deepcopy(model), calibration={"input_ids": padded_ids, "attention_mask": mask},
                           sparsity=0.3)
    truncated = prune_quiet(copy.deepcopy(model), calibration=ids[:, :16], sparsity=0.3)
    assert with_pad.report["calibration_tokens"] == truncated.report["calibration_tokens"] == 8 * 16
    for a, b in zip(with_pad.model.parameters(), truncated.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_members_save_and_reload_in_both_formats(family, tmp_path):
    from transformers import AutoModelForCausalLM

    uniform = prune_quiet(TINY[family](), sparsity=0.25, allocation="uniform", output_dir=str(tmp_path / "u"))
    per_layer = prune_quiet(TINY[family](), sparsity=0.25, layer_sparsity={0: 0.0}, output_dir=str(tmp_path / "p"))
    for result, folder, model_type in ((uniform, "u", family), (per_layer, "p", f"hf_snp_{family}")):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        assert reloaded.config.model_type == model_type
        assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["snp", "vbp"])
def test_second_pass_from_cached_mlp_activations_matches_recomputing(family, method, monkeypatch):
    """The cut MLP replayed from its cached kept activations gives the next blocks the same inputs."""
    import hf_snp.passes.replay

    model = TINY[family]()
    chosen = []
    original = hf_snp.passes.replay.ReplayCache.for_block.__func__
    monkeypatch.setattr(hf_snp.passes.replay.ReplayCache, "for_block",
                        classmethod(lambda cls, *a: chosen.append(original(cls, *a)) or chosen[-1]))
    replayed = prune_quiet(copy.deepcopy(model), method=method, sparsity=0.4)
    assert len(chosen) == 3 and all(cache.mlp_site is not None for cache in chosen)  # every block but the last replays
    assert all(cache.attention is not None for cache in chosen)
    monkeypatch.setattr(hf_snp.passes.replay, "REPLAY_LIMIT_BYTES", 0)  # nothing fits: every MLP is run again
    recomputed = prune_quiet(copy.deepcopy(model), method=method, sparsity=0.4)
    for (name, a), (_, b) in zip(replayed.model.state_dict().items(), recomputed.model.state_dict().items()):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name
    assert torch.allclose(logits(replayed.model), logits(recomputed.model), atol=1e-5)


@pytest.mark.parametrize("targets", [["mlp"], ["mlp", "heads"]])
def test_statistics_pass_stops_at_the_last_consumer(targets, monkeypatch):
    """A block's statistics pass ends once every consumer has its inputs: down_proj never runs there
    (only in the second pass, which the last block skips), and the result is the one of running
    every block to its end."""
    import hf_snp.passes.engine

    model = tiny_llama()
    calls: dict[int, int] = {}
    pruned_model = copy.deepcopy(model)
    for index, layer in enumerate(pruned_model.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda m, a, out, i=index: calls.__setitem__(i, calls.get(i, 0) + 1))
    stopped = prune_quiet(pruned_model, targets=targets, sparsity=0.3)
    batches = 4  # 16 windows, batch size 4; once each in the replayed MLP, or in the cut block run again
    assert [calls.get(i, 0) for i in range(4)] == [batches] * 3 + [0]

    original = hf_snp.passes.engine.StreamingEngine.run_block
    monkeypatch.setattr(hf_snp.passes.engine.StreamingEngine, "run_block",
                        lambda self, block, inputs, stats=(), keep_outputs=True, consumers=(), observe=None:
                        original(self, block, inputs, stats, keep_outputs, observe=observe))
    full = prune_quiet(copy.deepcopy(model), targets=targets, sparsity=0.3)
    assert torch.equal(logits(stopped.model), logits(full.model))
