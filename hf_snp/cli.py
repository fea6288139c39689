"""The hf-snp command line: prune, demo, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .methods import METHODS

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="execution device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="only warnings and errors, no progress bars")
    verbosity.add_argument("--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-snp", description="One-shot structured pruning of Hugging Face models (SNP, VBP).")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prune", help="prune a model and save it")
    p.add_argument("model", help="Hub id, local directory, .gguf file, or smollm2-demo")
    p.add_argument("--method", default="snp", choices=sorted(METHODS))
    p.add_argument("--sparsity", type=float, default=0.3, help="fraction of the targeted parameters to remove")
    p.add_argument("--targets", default="mlp", help="comma-separated: mlp, heads (e.g. mlp,heads)")
    p.add_argument("--gqa-mode", default="per_group", choices=["per_group", "kv_groups"],
                   help="GQA head removal: same number of query heads per KV group, or whole KV groups")
    p.add_argument("--calibration", default="wikitext2", help="wikitext2, c4, wikitext2-local, or a .txt/.jsonl path")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--damping", type=float, default=1e-6)
    p.add_argument("--add-bias", default=None, action=argparse.BooleanOptionalAction,
                   help="allow adding a bias to bias-free consumers (default: VBP yes, SNP no)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint-dir", default=None, help="save the state after each block here")
    p.add_argument("--resume", action="store_true", help="finish the run checkpointed in --checkpoint-dir")
    _add_common(p)

    d = commands.add_parser("demo", help="offline demo: SmolLM2-135M, 30%% of MLP neurons with SNP")
    d.add_argument("--out", default="smollm2-snp30")
    d.add_argument("--method", default="snp", choices=sorted(METHODS))
    d.add_argument("--sparsity", type=float, default=0.3)
    d.add_argument("--num-samples", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--eval-windows", type=int, default=12)
    _add_common(d)

    e = commands.add_parser("eval", help="perplexity of a saved model")
    e.add_argument("model", help="directory or Hub id")
    e.add_argument("--ppl", default="wikitext2", help="wikitext2, wikitext2-test-local, or a text file")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    _add_common(e)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_snp").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        if args.command == "prune":
            from .api import prune

            result = prune(
                args.model, method=args.method, sparsity=args.sparsity, targets=args.targets, calibration=args.calibration,
                num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, device=args.device, output_dir=args.out,
                batch_size=args.batch_size, damping=args.damping, add_bias=args.add_bias, gqa_mode=args.gqa_mode, gguf_file=args.gguf_file,
                dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, progress=not args.quiet,
                checkpoint_dir=args.checkpoint_dir, resume=args.resume,
            )
            summary = {k: result.report[k] for k in ("method", "sparsity", "params_before", "params_after", "save_format")}
            print(json.dumps({**summary, "output_dir": args.out, "seconds": result.report["timings_s"]["total"]}, indent=2))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.method, args.sparsity, args.num_samples, args.seq_len, args.eval_windows, args.device, args.overwrite)
        elif args.command == "eval":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from .evaluation import perplexity

            model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
            if args.device:
                model.to(args.device)
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            ppl = perplexity(model, tokenizer, args.ppl, args.seq_len, args.max_windows, progress=not args.quiet)
            print(json.dumps({"model": args.model, "dataset": args.ppl, "seq_len": args.seq_len, "perplexity": ppl}))
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"hf-snp: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
