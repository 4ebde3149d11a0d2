"""``tvm-paged`` command line: a thin layer over library functions.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; nothing is
imported or parsed until ``main`` runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("tvm_paged.demo.serve", "serve chat requests with SmolLM2-135M-Instruct (or --gguf PATH) on the paged "
             "cache; --model synthetic: a tiny random Llama"),
    "tune": ("tvm_paged.tune", "tune kernels for a target and write tuning_logs/ and schedules/"),
    "export": ("tvm_paged.export", "compile one configuration's kernels into a loadable library + manifest"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-paged", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not module_name.startswith(exc.name or "?"):
                raise
            continue  # subcommand not available in this build
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command not in modules:
        parser.error(f"{args.command} is not available in this installation")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
