"""The hf-snp command line: prune, demo, eval, report, push."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

import yaml

from .config import PruneConfig
from .methods import METHODS

S = argparse.SUPPRESS  # prune flags absent from the command line are not passed (recipe fields or defaults apply)


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", default=False,
                           help="only warnings and errors, no progress bars")
    verbosity.add_argument("--verbose", action="store_true", default=False, help="debug logging")


def _per_target(kind):
    """Parse "7" (MLP) or "mlp=0.3,heads=0.1" into a number or a {target: number} mapping."""
    def parse(text: str):
        if "=" not in text:
            return kind(text)
        return {key.strip(): kind(value) for key, value in (item.split("=", 1) for item in text.split(","))}

    return parse


PARSERS = {"per_target_int": _per_target(int), "per_target_float": _per_target(float), "yaml": yaml.safe_load}


def _flag_for(spec) -> dict:
    """argparse keywords for one PruneConfig field, from its type, choices and parser."""
    meta, kind = spec.metadata, str(spec.type)
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    keywords: dict = {"help": meta["help"].replace("%", "%%")}
    if meta["parse"]:
        keywords["type"] = PARSERS[meta["parse"]]
    elif kind.startswith("bool"):
        keywords["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("int"):
        keywords["type"] = int
    elif kind.startswith("float"):
        keywords["type"] = float
    if choices is not None:
        keywords["choices"] = [c for c in choices if isinstance(c, str)]
    return keywords


def _prune_parser(commands) -> None:
    """``hf-snp prune``: one flag per PruneConfig field (``--sparsity-per-target`` for sparsity_per_target)."""
    p = commands.add_parser("prune", help="prune a model and save it", argument_default=S)
    p.add_argument("model", nargs="?", help="Hub id, local directory, .gguf file, or smollm2-demo (or from --recipe)")
    p.add_argument("--recipe", help="YAML file of prune() arguments; flags given here override it")
    for spec in fields(PruneConfig):
        flag = "--" + spec.name.replace("_", "-")
        p.add_argument(*spec.metadata["flags"], flag, dest=spec.name, **_flag_for(spec))
    p.add_argument("--plots", action="store_true", default=False, help="write hf_snp_report.png beside the model")
    _add_verbosity(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-snp",
                                     description="One-shot structured pruning of Hugging Face models (SNP, VBP).")
    commands = parser.add_subparsers(dest="command", required=True)
    _prune_parser(commands)

    d = commands.add_parser("demo", help="offline demo: SmolLM2-135M, 30%% of MLP neurons with SNP")
    d.add_argument("--out", default="smollm2-snp30")
    d.add_argument("--method", default="snp", choices=sorted(METHODS))
    d.add_argument("--sparsity", type=float, default=0.3)
    d.add_argument("--num-samples", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--eval-windows", type=int, default=12)
    d.add_argument("--device", default=None)
    d.add_argument("--overwrite", action="store_true")
    _add_verbosity(d)

    e = commands.add_parser("eval",
                            help="perplexity and lm-eval tasks of a saved model; accuracy of an image classifier")
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
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None, help="default: 1 window (language), 32 images")
    e.add_argument("--device", default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--speed", action="store_true", help="measure prefill and decode speed (hf_snp.deliver.speed)")
    e.add_argument("--baseline", default=None,
                   help="--speed: a model (e.g. the dense one) to report speed-ups against, measured interleaved")
    e.add_argument("--save", action="store_true", help="record the results in the model's hf_snp_report.json")
    _add_verbosity(e)

    r = commands.add_parser("report", help="print a saved model's pruning report as a table")
    r.add_argument("model", help="directory written by hf-snp prune")
    r.add_argument("--plots", default=None, metavar="PNG", help="also draw the report to this PNG file")
    r.add_argument("--json", action="store_true", help="print the raw JSON instead")

    u = commands.add_parser("push", help="upload a saved model (weights, code, tokenizer, report, card) to the Hub")
    u.add_argument("model", help="directory written by hf-snp prune")
    u.add_argument("repo_id", help="user/name")
    u.add_argument("--private", action="store_true")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_snp").setLevel(level)


def _prune(args: argparse.Namespace) -> None:
    from .api import prune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "verbose", "plots", "recipe")}
    if options.get("model") is None:
        options.pop("model", None)
    if "model" not in options and not getattr(args, "recipe", None):
        raise ValueError("give a MODEL or a --recipe that names one")
    if "output_dir" not in options and not getattr(args, "recipe", None) and "push_to_hub" not in options:
        raise ValueError("give --out DIR (or --push-to-hub user/name)")
    options.setdefault("progress", not args.quiet)
    result = prune(recipe=getattr(args, "recipe", None), **options)
    output_dir = options.get("output_dir") or result.report.get("output_dir")
    if args.plots and output_dir:
        result.report.plot(os.path.join(output_dir, "hf_snp_report.png"))
    summary = {k: result.report[k]
               for k in ("method", "sparsity", "targets", "params_before", "params_after", "save_format")}
    print(json.dumps({**summary, "output_dir": output_dir, "seconds": result.report["timings_s"]["total"]}, indent=2))


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


def _eval(args: argparse.Namespace) -> None:
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

    if args.ppl is None and args.tasks is None and not args.speed:
        raise ValueError("choose what to evaluate: --ppl DATASET, --tasks T1,T2 and/or --speed "
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
    if args.ppl is None and args.tasks is None:
        return results
    tokenizer = AutoTokenizer.from_pretrained(args.model)
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


def _report(args: argparse.Namespace) -> None:
    from .deliver.report import PruneReport

    report = PruneReport.load(args.model)
    print(json.dumps(report, indent=2) if args.json else report.table())
    if args.plots:
        print(f"plot written to {report.plot(args.plots)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        if args.command == "prune":
            _prune(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.method, args.sparsity, args.num_samples, args.seq_len, args.eval_windows,
                     args.device, args.overwrite)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "push":
            from .deliver.push import push_folder

            print(push_folder(args.model, args.repo_id, private=args.private))
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"hf-snp: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
