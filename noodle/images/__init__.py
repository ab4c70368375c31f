"""Sandbox images: where they live and ``noodle image build KIND``.

The build scripts travel inside the package (``noodle/images/<kind>/``) so an
installed wheel can build its images anywhere; they write into a data
directory, ``/var/lib/noodle/images/<kind>`` unless ``$NOODLE_IMAGE_DIR``
(or ``image_dir`` in the pool's TOML, or ``--dir``) says otherwise. The
kinds look there first, then in a source checkout's ``images/build/<kind>``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from noodle.errors import ConfigError

DEFAULT_ROOT = "/var/lib/noodle/images"
ENV_ROOT = "NOODLE_IMAGE_DIR"
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
KINDS = ("jail", "oci", "microvm")
_CHECKOUT_BUILD = os.path.join(os.path.dirname(os.path.dirname(SCRIPTS)), "images", "build")


def image_root() -> str:
    return os.environ.get(ENV_ROOT) or DEFAULT_ROOT


def image_dir(kind: str, root: str | None = None) -> str:
    return os.path.join(root or image_root(), kind)


def find(kind: str, marker: str) -> str:
    """The image directory of ``kind`` holding ``marker``: the data
    directory's if built there, else a source checkout's ``images/build``;
    the data directory's path (for the error message) when neither is."""
    primary = image_dir(kind)
    for d in (primary, os.path.join(_CHECKOUT_BUILD, kind)):
        if os.path.exists(os.path.join(d, marker)):
            return os.path.realpath(d)  # runc refuses a rootfs path through a symlink
    return primary


def build_script(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"no image to build for kind {kind!r}; kinds with images: {', '.join(KINDS)}")
    return os.path.join(SCRIPTS, kind, "build.sh")


def build(kind: str, root: str | None = None, force: bool = False) -> int:
    """Run the kind's build script into its image directory; its exit code."""
    script = build_script(kind)
    dest = image_dir(kind, root)
    os.makedirs(dest, mode=0o755, exist_ok=True)
    env = dict(os.environ, NOODLE_IMAGE_OUT=dest)
    if force:
        env["FORCE"] = "1"
    shell = "/bin/bash" if kind == "microvm" else "/bin/sh"
    print(f"noodle image build {kind}: {script} -> {dest}", file=sys.stderr, flush=True)
    return subprocess.call([shell, script, dest], env=env)
