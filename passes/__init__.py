"""FX graph passes of the patch backend, one per file; ``PIPELINE`` is the literal order.

Each pass reads and writes only the compile-state fields it declares (``state.compile_pass``);
passes never import each other (shared helpers live in ``state`` and ``plan_cache``).
"""
import patchc.ops  # noqa: F401  (registers the patchc:: ops the rewritten graphs call)

from .attach_masks import attach_masks
from .choose_layouts import choose_layouts
from .find_linear_sites import find_linear_sites
from .fuse_siblings import fuse_siblings
from .generate_kernels import generate_kernels
from .map_owners import map_owners
from .rewrite_linears import rewrite_linears

PIPELINE = [
    find_linear_sites,
    map_owners,
    attach_masks,
    choose_layouts,
    fuse_siblings,
    generate_kernels,
    rewrite_linears,
]

__all__ = ["PIPELINE", "find_linear_sites", "map_owners", "attach_masks", "choose_layouts", "fuse_siblings",
           "generate_kernels", "rewrite_linears"]
