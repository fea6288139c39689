"""The dense reference: KL divergence and top-1 agreement to the dense model, empty replies, save and reload."""

from __future__ import annotations

import pytest
import torch
from chat_helpers import chat_tokenizer, words
from conftest import VOCAB, mlp_sites, tiny_llama

from hf_snp.evaluation.divergence import Divergence, TopK, kl_full, kl_topk
from hf_snp.evaluation.reference import DenseReference, compare, evaluate, shipped_prompts
from hf_snp.setup.calibration import load_calibration
from hf_snp.setup.conversations import conversations_from

PROMPTS = [words(i, 2 + i % 3) for i in range(5)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(words(3, 200))
    return str(path)


def reference_of(model, text_file, **options):
    options = {"windows": 3, "seq_len": 16, "prompts": PROMPTS, "max_new_tokens": 6, "k": 8, "batch_size": 2,
               "progress": False, **options}
    return DenseReference.compute(model, chat_tokenizer(), text_file, **options)


def test_a_model_is_at_zero_kl_and_full_agreement_with_itself(text_file):
    model = tiny_llama()
    reference = reference_of(model, text_file)
    assert reference.text_top.logprobs.shape == (3 * 15, 8) and len(reference.reply_ids) == len(PROMPTS)
    metrics = compare(model, reference, chat_tokenizer())
    assert metrics["kl_text"] == pytest.approx(0, abs=1e-9) and metrics["agreement_text"] == 1
    assert metrics["kl_chat"] == pytest.approx(0, abs=1e-9) and metrics["agreement_chat"] == 1
    assert metrics["perplexity_text"] == pytest.approx(reference.meta["dense_perplexity"], rel=1e-9)
    assert metrics["empty_reply_share"] == reference.meta["dense_empty_reply_share"]
    shown = metrics["replies"]
    assert [r["pruned"] for r in shown] == [r["dense"] for r in shown] == reference.replies[:3]


@torch.no_grad()
def test_one_zeroed_mlp_neuron_moves_the_model_away(text_file):
    model = tiny_llama()
    reference = reference_of(model, text_file)
    site = mlp_sites(model)[1]
    site.consumer_linear.weight[:, 5] = 0  # neuron 5 of layer 1 no longer reaches the residual stream
    metrics = compare(model, reference, chat_tokenizer())
    assert metrics["kl_text"] > 1e-6 and metrics["kl_chat"] > 1e-6


@torch.no_grad()
def test_a_model_that_ends_every_turn_at_once_answers_nothing(text_file):
    model = tiny_llama()
    reference = reference_of(model, text_file)
    stop = reference.meta["stop_ids"][-1]  # <|end|>, the template's end of turn
    bias = torch.zeros(VOCAB)
    bias[stop] = 1e4
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    metrics = compare(model, reference, chat_tokenizer())
    assert metrics["empty_reply_share"] == 1 and all(r["pruned"] == "" for r in metrics["replies"])
    assert metrics["agreement_text"] < 0.5 and metrics["kl_chat"] > 1


def test_the_saved_reference_reloads_to_the_same_numbers(text_file, tmp_path):
    model = tiny_llama()
    reference = reference_of(model, text_file)
    reference.save(str(tmp_path / "ref"))
    loaded = DenseReference.load(str(tmp_path / "ref"))
    assert torch.equal(loaded.text_ids, reference.text_ids) and torch.equal(loaded.chat_top.ids, reference.chat_top.ids)
    assert loaded.reply_ids == reference.reply_ids and loaded.meta == reference.meta
    other = tiny_llama(seed=3)
    assert evaluate(other, str(tmp_path / "ref"), chat_tokenizer()) == compare(other, reference, chat_tokenizer())


def test_a_folder_without_a_reference_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="DenseReference.compute"):
        DenseReference.load(str(tmp_path))


def test_without_a_chat_template_only_text_is_compared(text_file):
    model = tiny_llama()
    reference = DenseReference.compute(model, chat_tokenizer(template=False), text_file, windows=2, seq_len=16, k=8,
                                       progress=False)
    assert reference.prompts == [] and reference.chat_top is None
    metrics = compare(tiny_llama(seed=1), reference)
    assert metrics["kl_text"] > 0 and metrics["kl_chat"] is None and metrics["empty_reply_share"] is None


def test_top_k_kl_is_a_lower_bound_exact_on_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    dense, other = torch.randn(40, VOCAB, generator=generator) * 3, torch.randn(40, VOCAB, generator=generator) * 3
    exact = kl_full(dense, other)
    assert torch.allclose(kl_topk(TopK.of(dense, VOCAB), other), exact, atol=1e-5)  # float32 log-probs
    previous = torch.zeros_like(exact)
    for k in (1, 4, 16, 64):  # coarser buckets never show more divergence (log-sum inequality)
        approx = kl_topk(TopK.of(dense, k), other)
        assert bool((approx >= -1e-12).all()) and bool((approx <= exact + 1e-5).all())
        assert bool((approx >= previous - 1e-5).all())
        if k < 64:
            assert float((exact - approx).mean()) > 1e-3  # a real gap: the tail's own divergence is left out
        previous = approx
    total = Divergence()
    total.add(TopK.of(dense, 8), dense)
    assert total.mean_kl == pytest.approx(0, abs=1e-12) and total.agreement == 1


def test_shipped_prompts_are_held_out_from_the_shipped_conversations():
    prompts = shipped_prompts()
    assert len(prompts) == 40 and len(set(prompts)) == 40
    tokenizer = chat_tokenizer()
    calib_texts = {message["content"] for conversation in conversations_from("chat-local")[0]
                   for message in conversation}
    assert not set(prompts) & calib_texts
    assert load_calibration("chat-local", tokenizer, 4, 32).input_ids.shape == (4, 32)
