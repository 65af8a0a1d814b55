"""`evomerge` command line. Library code logs; this module prints."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from .checkpoint import CheckpointError
from .evaluate.tasks import HeldOutError, TaskError
from .methods import MethodError
from .recipe import Recipe, RecipeError, atomic_write_text

EXPECTED_ERRORS = (CheckpointError, RecipeError, MethodError, TaskError, HeldOutError, FileNotFoundError, FileExistsError)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .engine import write_merged

    recipe = Recipe.load(args.recipe)
    out = write_merged(
        recipe,
        args.out,
        device=args.device,
        out_dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_size * 1024**3),
    )
    print(f"wrote {out}")
    return 0


def _cmd_export_mergekit(args: argparse.Namespace) -> int:
    recipe = Recipe.load(args.recipe)
    text = yaml.safe_dump(recipe.to_mergekit(), sort_keys=False)
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_import_mergekit(args: argparse.Namespace) -> int:
    recipe = Recipe.load(args.config)  # the recipe schema is mergekit's; loading validates it
    if args.out:
        recipe.save(args.out)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(recipe.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge-recipe optimizer for model weights.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="materialize a recipe (or a mergekit config) into an HF model directory")
    p.add_argument("recipe", help="recipe YAML (evomerge or mergekit format)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="output dtype (float32, bfloat16, float16); default the recipe's")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin checkpoints, loaded with torch.load(weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export-mergekit", help="write a recipe as a mergekit config")
    p.add_argument("recipe")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=_cmd_export_mergekit)

    p = sub.add_parser("import-mergekit", help="read a mergekit config into an evomerge recipe")
    p.add_argument("config")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=_cmd_import_mergekit)

    from . import commands

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as e:
        print(f"evomerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
