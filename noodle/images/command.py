"""``noodle image build|path KIND``: registered into the ``noodle`` command."""

from __future__ import annotations

import argparse
import os
import sys

from noodle.images import DEFAULT_ROOT, ENV_ROOT, KINDS, build, build_script, image_dir, image_root


def cmd_image(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.dir) if args.dir else None
    if args.action == "path":
        for kind in args.kinds or KINDS:
            build_script(kind)
            print(image_dir(kind, root))
        return 0
    for kind in args.kinds or KINDS:
        code = build(kind, root, args.force)
        if code:
            print(f"noodle: building the {kind} image failed (exit {code})", file=sys.stderr)
            return 1
    return 0


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "path"),
                   help="build: install the Debian packages a kind needs and build its image (root); "
                        "path: print where the kinds look for it")  # fmt: skip
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"{', '.join(KINDS)} (default: all)")
    p.add_argument("--dir", metavar="DIR",
                   help=f"image root (default: ${ENV_ROOT}, else {DEFAULT_ROOT}; now {image_root()})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="rebuild even when the image is current")


def _register() -> None:
    from noodle.cli import Command, register

    register(Command("image", "build the sandbox images the jail, oci and microvm kinds need", _configure,
                     cmd_image))  # fmt: skip


_register()
