"""``PatchConfig``: every option of the ``patch`` backend, parsed strictly."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

_CHOICES = {
    "inner": ("inductor", "eager"),
    "fallback": ("dense", "error"),
    "kernel": ("auto", "triton", "reference"),
}


@dataclass(frozen=True)
class PatchConfig:
    """Options of ``torch.compile(model, backend="patch", options={...})`` / ``patchc.compile``.

    plan        a ``MaskPlan`` or a path to a mask file; ``None``: infer each tile from the weights
    tile        tile size (tn, tk) used when the plan is inferred from the weights
    inner       what runs the rest of the graph: "inductor" (default) or "eager"
    fallback    a site that cannot be rewritten: "dense" (masked dense linear, the default) or "error"
                (raise).  A plan that does not fit the model is an error unless "dense" is given
                explicitly (then a warning, and the layers that do not fit stay dense)
    kernel      "auto" (Triton on CUDA, reference on CPU), "triton" (everywhere; on CPU needs
                TRITON_INTERPRET=1), "reference"
    cache_dir   where generated kernels and the cost model's plans (``plans/``, ``fusion/``) are
                cached (default: the user cache dir, or $PATCHC_CACHE_DIR)
    dump_dir    write the graph before and after each pass there
    device      the GPU the cost model plans for (default: the current CUDA device, else
                $PATCHC_DEVICE, else h200)
    fusion      fuse sibling linears that read the same input into one kernel
    m_max       largest number of rows (tokens) the dispatch thresholds are planned for
    weights     updated weights to compute with: a weights file (``patchc.weights.save_weights``,
                written by ``patchc prune --method sparsegpt`` / ``--reconstruct``) or a
                ``{fqn: tensor}`` dict.  Loaded into the model's linear weights (in place, every
                tensor checked first) before anything is packed: ``patchc.compile`` loads them all
                up front, the string backend the ones of the linears each graph reads when dynamo
                compiles it.  ``None``: the model's weights as they are (mask only)
    release_dense  free the dense weights of rewritten sites (``patchc.compile`` only)
    mode        torch.compile mode for inductor ("default", "reduce-overhead", "max-autotune", ...):
                torch.compile does not take ``mode=`` together with ``options=``, so pass it here
    """

    plan: Any = None
    tile: tuple[int, int] = (128, 128)
    inner: str = "inductor"
    fallback: Optional[str] = None     # None: "dense" for sites, an error for a plan that does not fit
    kernel: str = "auto"
    cache_dir: Optional[str] = None
    dump_dir: Optional[str] = None
    device: Optional[str] = None
    fusion: bool = True
    m_max: int = 65536
    weights: Any = None
    release_dense: bool = False
    mode: Optional[str] = None

    @classmethod
    def valid_keys(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> "PatchConfig":
        """Parse ``options``; an unknown key or a bad value raises ``ValueError`` naming it."""
        opts = dict(options or {})
        if not isinstance(options, (Mapping, type(None))):
            raise ValueError(f"patch backend options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(opts) - set(cls.valid_keys()))
        if unknown:
            raise ValueError(f"unknown patch backend option(s) {unknown}; valid options are: "
                             f"{', '.join(cls.valid_keys())}")
        for key, allowed in _CHOICES.items():
            if key in opts and opts[key] not in allowed:
                raise ValueError(f"option {key}={opts[key]!r} is not one of {list(allowed)}")
        if "tile" in opts:
            t = opts["tile"]
            if (not isinstance(t, (tuple, list)) or len(t) != 2 or not all(isinstance(v, int) and v > 0 for v in t)
                    or t[1] % 4):
                raise ValueError(f"option tile={t!r} must be two positive ints (tn, tk) with tk a multiple of 4")
            opts["tile"] = (int(t[0]), int(t[1]))
        for key in ("cache_dir", "dump_dir"):
            if opts.get(key) is not None:
                opts[key] = os.fspath(opts[key])
        if "plan" in opts and opts["plan"] is not None:
            from .plan import MaskPlan
            if not isinstance(opts["plan"], (MaskPlan, str, os.PathLike)):
                raise ValueError(f"option plan must be a MaskPlan or a path to a mask file, got {type(opts['plan']).__name__}")
            if isinstance(opts["plan"], os.PathLike):
                opts["plan"] = os.fspath(opts["plan"])
        if opts.get("weights") is not None:
            if not isinstance(opts["weights"], (str, os.PathLike, Mapping)):
                raise ValueError(f"option weights must be a path to a weights file or a dict of tensors, got "
                                 f"{type(opts['weights']).__name__}")
            if isinstance(opts["weights"], os.PathLike):
                opts["weights"] = os.fspath(opts["weights"])
        if "m_max" in opts and (not isinstance(opts["m_max"], int) or opts["m_max"] < 1):
            raise ValueError(f"option m_max={opts['m_max']!r} must be a positive int")
        for key in ("fusion", "release_dense"):
            if key in opts and not isinstance(opts[key], bool):
                raise ValueError(f"option {key}={opts[key]!r} must be True or False")
        if mode is not None:
            if opts.get("mode") not in (None, mode):
                raise ValueError(f"mode={mode!r} and options['mode']={opts['mode']!r} disagree")
            opts["mode"] = mode
        if opts.get("mode") is not None and not isinstance(opts["mode"], str):
            raise ValueError(f"option mode={opts['mode']!r} must be a torch.compile mode name")
        return cls(**opts)

    def replace(self, **kw) -> "PatchConfig":
        return dataclasses.replace(self, **kw)

    def planning_device(self) -> str:
        """The GPU the cost model plans for: this option, else the current CUDA device, else
        $PATCHC_DEVICE, else h200."""
        from patchc.codegen.devices import get_device
        return get_device(self.device).name
