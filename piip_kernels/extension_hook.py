"""The no-edit route: our op for the repositories that import a compiled deformable-attention
extension, with no build and no changed line.

    python -m piip_kernels.extension_hook install   # once per environment
    python -m piip_kernels.extension_hook status
    python -m piip_kernels.extension_hook remove

``install`` writes one file, ``piip_kernels_extensions.pth``, into the environment's
site-packages. At every interpreter start it loads this file (by path: neither piip_kernels
nor torch is imported then) and appends an import finder to ``sys.meta_path``. The finder
answers only for the extension names that no other finder finds:

- ``MultiScaleDeformableAttention``: Deformable DETR, DINO, DN-DETR, H-DETR, Mask2Former,
  MaskDINO, OneFormer, ViT-Adapter and their forks (``import MultiScaleDeformableAttention
  as MSDA``, then ``MSDA.ms_deform_attn_forward`` / ``MSDA.ms_deform_attn_backward``);
- ``groundingdino._C``: GroundingDINO (``from groundingdino import _C``).

Importing one of them then imports piip_kernels and gives our stand-in
(``piip_kernels.compat.ms_deform_attn_forward`` / ``ms_deform_attn_backward``), on the CPU
as well as on a GPU. An extension that was built and is importable is found first and keeps
running; ``piip_kernels.compat.install_extensions()`` replaces even that, in one process.
``remove`` deletes the file. Set ``PIIP_KERNELS_NO_HOOK=1`` to turn the finder off for one run.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

# Kept free of torch and of the rest of piip_kernels: this file runs at interpreter start-up.
SERVED = ("MultiScaleDeformableAttention", "groundingdino._C")
PTH_NAME = "piip_kernels_extensions.pth"
# The .pth line: finds this file through the import system without importing the package
# (whose __init__ imports torch), loads it under another name and registers the finder. A
# failure says so on stderr and leaves the interpreter running.
_STARTUP = """
try:
    import importlib.util as _u, os as _os
    _s = _u.find_spec("piip_kernels")
    if _s is not None and _s.submodule_search_locations:
        _f = _os.path.join(list(_s.submodule_search_locations)[0], "extension_hook.py")
        _h = _u.spec_from_file_location("_piip_kernels_extension_hook", _f)
        _m = _u.module_from_spec(_h)
        _h.loader.exec_module(_m)
        _m.register()
except Exception as _e:
    sys.stderr.write(f"piip_kernels: the extension hook (piip_kernels_extensions.pth) did not load: {_e}; "
                     "python -m piip_kernels.extension_hook remove takes it out\\n")
"""


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module, filled by exec_module

    def exec_module(self, module):
        from piip_kernels.compat import fill_extension_module

        fill_extension_module(module)


class ExtensionFinder(importlib.abc.MetaPathFinder):
    """Finds our stand-in for the served extension names (appended last: any real module of
    that name is found first)."""

    piip_kernels_extension_finder = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in SERVED or os.environ.get("PIIP_KERNELS_NO_HOOK") == "1":
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin="piip_kernels (stand-in)")


def register() -> None:
    """Appends the finder to ``sys.meta_path`` once (what the .pth file runs)."""
    if not any(getattr(f, "piip_kernels_extension_finder", False) for f in sys.meta_path):
        sys.meta_path.append(ExtensionFinder())


def site_packages() -> str:
    """This interpreter's site-packages (its virtual environment's, when one is active)."""
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def pth_path(directory: str | None = None) -> str:
    return os.path.join(directory or site_packages(), PTH_NAME)


def pth_line() -> str:
    return f"import sys; exec({_STARTUP!r})\n"


def install(directory: str | None = None) -> str:
    """Writes the .pth file into ``directory`` (default: site-packages); returns its path."""
    path = pth_path(directory)
    with open(path, "w") as f:
        f.write(pth_line())
    return path


def remove(directory: str | None = None) -> str | None:
    """Deletes the .pth file; returns its path, or None if there was none."""
    path = pth_path(directory)
    if not os.path.exists(path):
        return None
    os.remove(path)
    return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m piip_kernels.extension_hook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("install", "remove", "status"))
    ap.add_argument("--dir", default=None, help="the site directory (default: this interpreter's site-packages)")
    args = ap.parse_args(argv)
    if args.command == "install":
        print(f"installed {install(args.dir)}: {', '.join(SERVED)} now import piip_kernels' stand-in where no "
              "compiled extension is found")
    elif args.command == "remove":
        path = remove(args.dir)
        print(f"removed {path}" if path else f"no hook at {pth_path(args.dir)}")
    else:
        path = pth_path(args.dir)
        print(f"{'installed' if os.path.exists(path) else 'not installed'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
