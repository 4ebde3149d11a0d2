"""``tvm-paged`` command line: a thin layer over library functions.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; nothing is
imported or parsed until ``main`` runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("tvm_paged.demo.serve", "serve chat requests with SmolLM2-135M-Instruct (or --gguf PATH) on the paged "
             "cache; --model synthetic: a tiny random Llama"),
    "tune": ("tvm_paged.tune", "tune kernels for a target and write their schedules (~/.cache/tvm_paged/schedules)"),
    "export": ("tvm_paged.export", "compile one configuration's kernels into a loadable library + manifest"),
}


# ------------------------------------------------------------------- variant selection (export and tune)
# Tags of the attention variants on the command line (KernelConfig's name tags, plus their field names).
VARIANT_TAGS = {"w": "window", "window": "window", "cap": "soft_cap", "soft_cap": "soft_cap", "alibi": "alibi",
                "sink": "sinks", "sinks": "sinks"}
VARIANTS_HELP = ("a combination is its tags joined by '+': w (sliding window, window_left >= 0), cap (logits soft-cap, "
                 "logits_soft_cap > 0), alibi (ALiBi slopes), sink (attention-sink logits); e.g. w+cap")
_FIELD_ORDER = ("window", "soft_cap", "alibi", "sinks")


def variant_flags(combo) -> dict[str, bool]:
    """One combination of attention variants -> ``{"window": .., "soft_cap": .., "alibi": .., "sinks": ..}``.

    ``combo``: tags joined by ``+`` (``"w+cap"``; ``""``, ``"plain"`` or ``"none"``: no variant), an iterable of
    tags or field names (``("w", "cap")``), or a dict of those fields."""
    if isinstance(combo, dict):
        unknown = set(combo) - set(_FIELD_ORDER)
        if unknown:
            raise ValueError(f"variants: unknown fields {sorted(unknown)} (one of {list(_FIELD_ORDER)})")
        return {f: bool(combo.get(f, False)) for f in _FIELD_ORDER}
    if isinstance(combo, str):
        text = combo.strip().lower()
        tags = [] if text in ("", "plain", "none") else [t.strip() for t in text.split("+")]
    else:
        tags = [str(t).strip().lower() for t in combo]
    flags = dict.fromkeys(_FIELD_ORDER, False)
    for tag in tags:
        if tag not in VARIANT_TAGS:
            raise ValueError(f"variants: unknown variant {tag!r} in {combo!r} ({VARIANTS_HELP})")
        flags[VARIANT_TAGS[tag]] = True
    return flags


def parse_variants(values) -> list[dict[str, bool]]:
    """``--variants`` values (each a comma-separated list of combinations, the option may repeat) -> the flags of
    each combination, duplicates dropped, order kept. ``all``: every combination of the four variants."""
    out: list[dict[str, bool]] = []
    for value in values or ():
        for part in str(value).split(","):
            if not part.strip():
                continue
            if part.strip().lower() == "all":
                combos = [{f: bool(i >> j & 1) for j, f in enumerate(_FIELD_ORDER)} for i in range(1, 16)]
            else:
                combos = [variant_flags(part)]
            out.extend(c for c in combos if c not in out)
    return out


def output_folder(path, option: str) -> Path:
    """``path``, a folder a command will write into, checked before any work (a compile or a tune that runs for
    minutes or hours must not fail at the end on an unwritable path) and not made yet (a refused command leaves
    nothing behind): an existing folder must be writable, a new one must have a writable folder above it.
    ValueError naming ``option``."""
    if path is None or not str(path).strip():
        raise ValueError(f"{option}: empty path")
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option}: {folder} exists and is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option}: cannot create {folder}: {existing} is not a folder")
    try:  # a real write: permission bits do not tell root, or a read-only or virtual file system
        with tempfile.TemporaryDirectory(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: cannot write in {existing} ({exc.strerror or exc})") from None
    return folder


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
