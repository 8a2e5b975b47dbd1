"""The ``fastkd`` command.

``fastkd distill [CONFIG.toml] [--data NAME|FILE.npz] [--out DIR] [--resume [DIR]] [--epochs N]
[--batch-size N] [--seed N] [--set KEY=VALUE ...]`` runs a distillation job: the config file (if
any) over the embedded defaults, then the flags over the file. With no arguments it runs the
default job (ensemble distillation on scikit-learn's digits); ``--data lm`` with no config runs the
language-model job (``configs/lm.toml``). ``--resume`` continues the run in
``--out`` (or in DIR) from its last checkpoint; the saved config is used when no file is given.

``fastkd distill ... --teacher-cache DIR`` distils the language-model job's students from a
teacher cache instead of a teacher (``teacher.cache``).

``fastkd cache-teacher [CONFIG.toml] --data lm (--top-k K | --sample K) [--out DIR] [--resume]
[--set KEY=VALUE ...]`` writes that cache (see ``fastkd/cache_cli.py``).

``fastkd bench [--ops ...] [--quick] [--device cpu|cuda] [--dtype ...] [--shapes NxV,...] [--out DIR]``
runs the kernel microbenchmarks on this machine (see ``fastkd/bench_cli.py``).

A configuration problem, or a file fastkd refuses to load (damaged, or holding more than
tensors and plain data), prints one line ``fastkd: error: ...`` and exits with status 2; a job
whose training diverges (a non-finite loss, gradient or weight) prints one line saying how to
continue and exits with status 3.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import List, Optional

from fastkd.engine.config import LM_JOB, ConfigError, load_config, parse_overrides
from fastkd.engine.trainer import Diverged

EXIT_CONFIG = 2
EXIT_DIVERGED = 3  # training (or a teacher cache) produced non-finite values and stopped


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump)."""

    def error(self, message):  # noqa: D401
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastkd", description="Knowledge distillation with fused losses.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    d = sub.add_parser("distill", help="run a distillation job (default: ensemble distillation on digits)")
    d.add_argument("config", nargs="?", help="TOML config (default: the embedded default job)")
    d.add_argument("--data", help="dataset: digits, multiview, lm (the language-model job), or a path to an .npz with x and y")
    d.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    d.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue the run in --out (or DIR) from its last checkpoint")
    d.add_argument("--epochs", type=int, help="train.epochs")
    d.add_argument("--batch-size", type=int, help="train.batch_size")
    d.add_argument("--seed", type=int, help="seed")
    d.add_argument("--method", help="method: distill, self_distill, mutual, stagewise")
    d.add_argument("--teacher-cache", metavar="DIR", help="lm: distil from a teacher cache (fastkd cache-teacher) "
                   "instead of training and running the teacher (teacher.cache)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=0.001 (TOML value syntax)")
    from fastkd import bench_cli, cache_cli

    cache_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    return p


def config_from_args(args) -> tuple:
    """The validated config and whether to resume, from parsed arguments."""
    resume = args.resume is not False
    out = args.out
    if isinstance(args.resume, str):
        if out is not None and os.path.abspath(out) != os.path.abspath(args.resume):
            raise ConfigError(f"--resume {args.resume} and --out {out} name different directories")
        out = args.resume
    if resume and out is None:
        raise ConfigError("--resume needs the run directory: --resume DIR or --out DIR")
    overrides = parse_overrides(args.set)
    for flag, key in (("data", "data.name"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("seed", "seed"), ("method", "method"), ("teacher_cache", "teacher.cache")):
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag)))
    if args.no_progress:
        overrides.append(("train.progress", False))
    if out is not None:
        overrides.append(("out", out))
    base = None
    if args.data == "lm" and args.config is None and not resume:
        # `--data lm` alone runs the language-model job (configs/lm.toml, embedded).
        base = copy.deepcopy(LM_JOB)
    if resume and args.config is None:
        saved = os.path.join(out, "config.json")
        if not os.path.isfile(saved):
            raise ConfigError(f"--resume: {out} holds no run (no config.json)")
        from fastkd.engine.runner import read_run_config

        base = read_run_config(out, resume=True).get("config")
        if not isinstance(base, dict):
            raise ConfigError(f"--resume: {saved} holds no config")
        base.pop("out", None)
    return load_config(args.config, overrides, base=base), resume


# What each extra of pyproject.toml brings: `import fastkd` and the losses need none of them.
_EXTRA_OF_MODULE = {
    **dict.fromkeys(("transformers", "tokenizers", "safetensors", "xxhash", "sklearn", "matplotlib", "tqdm"), "engine"),
    **dict.fromkeys(("pytest", "pytest_benchmark"), "bench"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_CONFIG
        if args.command == "bench":
            from fastkd import bench_cli

            return bench_cli.run(args, argv[1:])
        if args.command == "cache-teacher":
            from fastkd import cache_cli

            return cache_cli.run(args)
        cfg, resume = config_from_args(args)
        from fastkd.engine.runner import run_job

        run_job(cfg, resume=resume)
    except ConfigError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Diverged as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt as exc:
        out = getattr(exc, "out", None)
        hint = f"; continue from its last checkpoint with: fastkd distill --resume {out}" if out else ""
        if getattr(exc, "hint", None):
            hint = f"; {exc.hint}"
        print(f"fastkd: interrupted{hint}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(module)
        if extra is None:
            raise
        # From argv, not args: the import may have failed while the parser was being built.
        command = " ".join(["fastkd"] + argv[:1])
        print(f"fastkd: error: `{command}` needs the module {module!r}, one of fastkd's "
              f"optional dependencies: pip install 'fastkd[{extra}]'", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
