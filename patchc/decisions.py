"""``SiteDecision``: what the compiler did with one linear site (one row of ``patchc.explain``).

A decision carries reason *codes* with their arguments; the text a user reads is derived from
``REASONS``, never edited: passes add ``notes`` (further codes), they do not rewrite strings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

HYBRID, DENSE, SKIPPED = "hybrid", "dense", "skipped"
FALLBACK_PREFIX = "fallback: "

# code -> text template (``str.format`` with the reason's args)
REASONS = {
    # why a site got its action
    "rewritten": "rewritten to patchc::hybrid_linear",
    "fused": ("fused with {others} into one patchc::hybrid_linear call (N={n}; predicted {ratio_m1:.2f}x the "
              "separate time at M=1)"),
    "not_in_plan": "not in the mask plan",
    "keeps_all": "no 2:4 tile in its mask",
    "no_24_tile": "no 2:4 tile; masked dense",
    "cost_model_dense": "cost model: dense is faster at every M <= m_max",
    # fallbacks: the site cannot run the hybrid op and computes a masked dense linear
    "dtype": FALLBACK_PREFIX + "dtype {dtype} is not supported (fp16, bf16, fp32)",
    "mask_shape": FALLBACK_PREFIX + "mask shape {mask} differs from the weight's (out, in) {weight}",
    "input_dtype": FALLBACK_PREFIX + "input dtype {x} differs from weight dtype {w}",
    "grad": FALLBACK_PREFIX + "weight will receive gradients (grad mode is on and the weight requires grad)",
    # notes added by later passes
    "no_kernel": "no Triton kernel ({error}); the reference path runs it",
    "unfusable_height": "not fused with its siblings: N={n} is not a multiple of the tile height {tn}",
    "unfusable_released": "not fused with its siblings: its dense weight was released",
    "unfusable_view": ("not fused with its siblings: its output is reshaped by {node} (.view), which a slice of "
                       "the fused output may not allow"),
    "fusion_slower": "not fused with {others}: the cost model predicts {ratio:.2f}x the separate time",
}
FALLBACKS = frozenset(c for c, t in REASONS.items() if t.startswith(FALLBACK_PREFIX))


@dataclass(frozen=True)
class Reason:
    """A reason code and its arguments (JSON-able values)."""

    code: str
    args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.code not in REASONS:
            raise ValueError(f"unknown reason code {self.code!r}")

    def text(self) -> str:
        return REASONS[self.code].format(**self.args)


@dataclass(frozen=True)
class SiteDecision:
    """What the compiler did with one linear site.  ``reason`` is derived from the codes."""

    fqn: str
    n: int
    k: int
    dtype: str
    action: str                     # "hybrid" | "dense" | "skipped"
    why: Reason
    notes: tuple = ()               # further Reasons (fusion, kernel generation)
    frac_sparse: float = 0.0        # fraction of the weight in 2:4 tiles
    sparsity: float = 0.0           # pruned fraction of the weight
    packed_bytes: int = 0
    dense_bytes: int = 0
    kernel: Optional[str] = None
    site_id: Optional[int] = None
    form: str = ""                  # how the linear appeared in the graph
    node: str = ""                  # the graph node it replaced (tells apart sites of one module)
    layout: Optional[dict] = None   # cost-model summary (strategy per M range, thresholds)

    @property
    def reason(self) -> str:
        return "; ".join([self.why.text()] + [r.text() for r in self.notes])

    @property
    def codes(self) -> tuple[str, ...]:
        return (self.why.code,) + tuple(r.code for r in self.notes)

    @property
    def is_fallback(self) -> bool:
        return self.why.code in FALLBACKS

    def with_note(self, code: str, **args) -> "SiteDecision":
        return replace(self, notes=self.notes + (Reason(code, args),))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = self.reason
        return d
