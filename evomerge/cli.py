"""`evomerge` command line. Library code logs; this module prints.

Nothing heavy is imported at module level: settings that must precede torch (OpenMP's wait policy, thread
counts) are applied before any command imports it, and `--help` or an argument error never loads torch."""

from __future__ import annotations

import os

# Before anything can import torch: OpenMP threads that spin while waiting steal the cores of a shared
# machine (a zoo training step went from 0.5 s to 4-5 s beside another job).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from .errors import EvomergeError, HeldOutError, one_line  # noqa: E402

EXPECTED_ERRORS = (
    EvomergeError,
    HeldOutError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (when it has a meaningful one); wide enough for our help lines."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .engine import write_merged
    from .layer_path import PathRecipe, load_any_recipe
    from .path_fold import write_path
    from .slices import SlicedRecipe

    recipe = load_any_recipe(args.recipe)
    shard = int(args.max_shard_size * 1024**3)
    if isinstance(recipe, PathRecipe):
        if args.allow_pickle:
            from .errors import RecipeError

            raise RecipeError("--allow-pickle: layer-path participants are loaded with transformers (safetensors)")
        out = write_path(recipe, args.out, args.device, args.dtype, args.overwrite, shard)
    elif isinstance(recipe, SlicedRecipe):
        out = recipe.write(args.out, args.device, args.dtype, args.allow_pickle, args.overwrite, shard)
    else:
        out = write_merged(
            recipe,
            args.out,
            device=args.device,
            out_dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            overwrite=args.overwrite,
            max_shard_bytes=shard,
        )
    print(f"wrote {out}")
    return 0


def _cmd_export_mergekit(args: argparse.Namespace) -> int:
    import yaml

    from .layer_path import PathRecipe, load_any_recipe
    from .path_fold import path_to_mergekit
    from .recipe import atomic_write_text

    recipe = load_any_recipe(args.recipe)
    config = path_to_mergekit(recipe) if isinstance(recipe, PathRecipe) else recipe.to_mergekit()
    text = yaml.safe_dump(config, sort_keys=False)
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_import_mergekit(args: argparse.Namespace) -> int:
    from .layer_path import load_any_recipe

    recipe = load_any_recipe(args.config)  # mergekit's schema (passthrough slices: a layer path); validated
    if args.out:
        recipe.save(args.out)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(recipe.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary merge-recipe optimizer for model weights.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details and library warnings")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (sets OMP_NUM_THREADS); default: all cores"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "merge",
        help="materialize a recipe (or a mergekit config) into an HF model directory",
        formatter_class=HelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML (evomerge or mergekit format)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="output dtype (float32, bfloat16, float16); default: the recipe's")
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept .bin checkpoints, loaded with torch.load(weights_only=True)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export-mergekit", help="write a recipe as a mergekit config", formatter_class=HelpFormatter)
    p.add_argument("recipe", help="evomerge recipe YAML")
    p.add_argument("--out", help="file to write; default: standard output")
    p.set_defaults(func=_cmd_export_mergekit)

    p = sub.add_parser(
        "import-mergekit", help="read a mergekit config into an evomerge recipe", formatter_class=HelpFormatter
    )
    p.add_argument("config", help="mergekit config YAML")
    p.add_argument("--out", help="file to write; default: standard output")
    p.set_defaults(func=_cmd_import_mergekit)

    from . import commands

    commands.register(sub, HelpFormatter)
    return parser


def _configure_environment(args: argparse.Namespace) -> None:
    """Settings read when torch and transformers are imported, so they are set before any command runs."""
    if args.threads:
        for var in THREAD_VARIABLES:
            os.environ[var] = str(args.threads)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        # deprecation notices about how evomerge calls a library are ours to fix, not the user's to read
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_environment(args)
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as e:
        print(f"evomerge {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
