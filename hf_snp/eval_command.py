"""``hf-snp eval``: a saved model's perplexity, lm-eval tasks, speed, image accuracy, and its divergence from the
dense model (``--against``). Imports what each option needs when it runs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable


def eval_parser(commands, add_common: Callable) -> None:
    """``hf-snp eval``: perplexity, lm-eval tasks, speed, accuracy, and the comparison with the dense model."""
    e = commands.add_parser("eval", help="perplexity and lm-eval tasks of a saved model; accuracy of an image "
                                         "classifier")
    e.add_argument("model", help="directory or Hub id")
    e.add_argument("--task", choices=["language-modeling", "image-classification"], default="language-modeling",
                   help="image-classification: top-1/top-5 accuracy on --dataset")
    e.add_argument("--dataset", default=None,
                   help="image-classification: an imagefolder folder or a Hub id (name:split)")
    e.add_argument("--label-column", default=None, help="image-classification: the label column (default: label)")
    e.add_argument("--max-samples", type=int, default=None, help="image-classification: evaluate the first N images")
    e.add_argument("--ppl", default=None, help="perplexity on wikitext2, wikitext2-test-local, or a text file")
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (wikitext_local works offline)")
    e.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files")
    e.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval --limit)")
    e.add_argument("--seq-len", type=int, default=2048, help="perplexity: tokens per window (default: 2048)")
    e.add_argument("--max-windows", type=int, default=None, help="perplexity: the first N windows (default: all)")
    e.add_argument("--batch-size", type=int, default=None, help="default: 1 window (language), 32 images")
    e.add_argument("--device", default=None, help="default: the GPU when there is one")
    e.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")
    e.add_argument("--speed", action="store_true", help="measure prefill and decode speed (hf_snp.deliver.speed)")
    e.add_argument("--baseline", default=None,
                   help="--speed: a model (e.g. the dense one) to report speed-ups against, measured interleaved")
    e.add_argument("--save", action="store_true", help="record the results in the model's hf_snp_report.json")
    e.add_argument("--against", default=None, metavar="DENSE",
                   help="KL divergence and top-1 agreement to the dense model on held-out WikiText-2 and on its "
                        "replies to the shipped chat prompts, and the share of empty replies: DENSE is the dense "
                        "model (a directory or Hub id) or a reference folder saved by evaluate= or --save-reference")
    e.add_argument("--save-reference", default=None, metavar="DIR",
                   help="--against a model: save its dense reference there, to compare other variants without it")
    add_common(e)


def _image_eval(args: argparse.Namespace) -> dict:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .evaluation.accuracy import evaluate_accuracy

    if args.dataset is None:
        raise ValueError("--task image-classification needs --dataset (an imagefolder folder or a Hub id)")
    if args.ppl is not None or args.tasks is not None:
        raise ValueError("--ppl and --tasks are for language models; drop them with --task image-classification")
    model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
    if args.device:
        model.to(args.device)
    processor = AutoImageProcessor.from_pretrained(args.model)
    accuracy = evaluate_accuracy(model, args.dataset, processor, batch_size=args.batch_size or 32,
                                 label_column=args.label_column, max_samples=args.max_samples, progress=not args.quiet)
    return {"accuracy": {**accuracy, "dataset": args.dataset}}


def run_eval(args: argparse.Namespace) -> None:
    """Run ``hf-snp eval`` and print the results as JSON (and record them in the report with --save)."""
    from .deliver.report import REPORT_NAME, PruneReport

    results: dict = {"model": args.model}
    if args.task == "image-classification":
        results.update(_image_eval(args))
    else:
        results.update(_language_eval(args))
    if args.save and os.path.exists(os.path.join(args.model, REPORT_NAME)):
        report = PruneReport.load(args.model)
        if "speed" in results:
            report["speed"] = results["speed"]
        report.setdefault("metrics", {}).update({k: v for k, v in results.items() if k not in ("model", "speed")})
        with open(os.path.join(args.model, REPORT_NAME), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str))


def _language_eval(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation.perplexity import perplexity

    if args.ppl is None and args.tasks is None and not args.speed and args.against is None:
        raise ValueError("choose what to evaluate: --ppl DATASET, --tasks T1,T2, --against DENSE and/or --speed "
                         "(or --task image-classification)")
    if args.baseline is not None and not args.speed:
        raise ValueError("--baseline is the reference of --speed; add --speed")

    def load(path: str):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code).eval()
        return model.to(args.device) if args.device else model

    model = load(args.model)
    results: dict = {}
    if args.speed:
        from .deliver.speed import compare_speed

        models = {"baseline": load(args.baseline), "model": model} if args.baseline else {"model": model}
        measured = compare_speed(models)
        results["speed"] = {"device": measured["device"], "dtype": measured["dtype"], **measured["models"]["model"]}
        if args.baseline:
            results["speed"]["baseline"] = args.baseline
    if args.ppl is None and args.tasks is None and args.against is None:
        return results
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.against is not None:
        results.update(_against_dense(args, model, tokenizer, load))
    if args.ppl is not None:
        results["perplexity"] = perplexity(model, tokenizer, args.ppl, args.seq_len, args.max_windows,
                                           progress=not args.quiet)
        results["perplexity_protocol"] = f"{args.ppl}, seq_len {args.seq_len}, windows {args.max_windows or 'all'}"
    if args.tasks is not None:
        from .evaluation.harness import lm_eval

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results["lm_eval"] = lm_eval(model, args.tasks.split(","), tokenizer=tokenizer, batch_size=args.batch_size or 1,
                                     limit=limit, include_path=args.include_path)
    return results


def _against_dense(args: argparse.Namespace, model, tokenizer, load: Callable) -> dict:
    """The comparison with the dense model (``--against``): a saved reference, or one computed from the dense
    model now (and saved with ``--save-reference``)."""
    from .evaluation.reference import FILES, DenseReference, evaluate

    if all(os.path.exists(os.path.join(args.against, name)) for name in FILES):
        reference = DenseReference.load(args.against)
    else:
        reference = DenseReference.compute(load(args.against), tokenizer, progress=not args.quiet)
        if args.save_reference:
            reference.save(args.save_reference)
    metrics = evaluate(model, reference, tokenizer, progress=not args.quiet)
    return {**metrics, "against": args.against}
