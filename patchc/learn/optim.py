"""Adam over the mask logits, one parameter at a time.

Own class rather than ``torch.optim.Adam``: its state is two tensors per parameter and a step
count, which round-trip through ``torch.distributed.checkpoint`` as plain (or DTensor) tensors,
and importing ``torch.optim`` pulls dynamo into ``patchc.learn``.  Parameters are updated one at a
time (:meth:`update`), so the trainer can update each layer's logits as soon as their gradient is
final, during backward, and free that gradient: a step then never holds every layer's gradients.
A sharded (FSDP2) parameter is updated on its local shard.  The update runs in torch's fused Adam
kernel when the build has it (2.7× faster than separate ops on the joint mode's 1.5 logits per
weight, measured on CPU), in float32: a bfloat16 state or moments kept on the CPU are copied to
float32 work tensors on the moments' device for the update of that one parameter.
"""
from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage), else ``t`` itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class Adam:
    """Adam on a list of parameters with one learning rate each.

    ``offload``: keep the moments on the CPU (the update runs there).  Moments have the dtype of
    their parameter.  ``keys``: a name per parameter (checkpoint keys)."""

    def __init__(self, params, lrs, betas=(0.9, 0.999), eps: float = 1e-8, offload: bool = False, keys=None):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.keys = list(keys) if keys is not None else [str(i) for i in range(len(self.params))]
        lrs = [float(lrs)] * len(self.params) if isinstance(lrs, (int, float)) else [float(x) for x in lrs]
        if len(lrs) != len(self.params):
            raise ValueError(f"Adam: {len(lrs)} learning rates for {len(self.params)} parameters")
        self.lrs = lrs
        dev = (lambda t: torch.device("cpu")) if offload else (lambda t: t.device)
        self.m = [torch.zeros_like(local(p), device=dev(local(p))) for p in self.params]
        self.v = [torch.zeros_like(local(p), device=dev(local(p))) for p in self.params]
        self.t = 0
        self._fused = hasattr(torch, "_fused_adam_")

    def begin_step(self) -> None:
        """Count a step: the bias corrections of every :meth:`update` until the next call use it."""
        self.t += 1

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def update(self, i: int) -> None:
        """Adam step of parameter ``i`` with its gradient, which is then freed."""
        p = self.params[i]
        if p.grad is None:
            return
        g, w, m, v = local(p.grad), local(p), self.m[i], self.v[i]
        p.grad = None
        direct = w.dtype == torch.float32 and w.device == m.device
        if direct:
            self._apply(w, g, m, v, self.lrs[i])
            return
        w32, g32, m32, v32 = (t.to(m.device, torch.float32) for t in (w, g, m, v))
        self._apply(w32, g32, m32, v32, self.lrs[i])
        w.copy_(w32)
        m.copy_(m32)
        v.copy_(v32)

    def step(self) -> None:
        """Update every parameter that has a gradient (the step counted by :meth:`begin_step`)."""
        for i in range(len(self.params)):
            self.update(i)

    def _apply(self, w, g, m, v, lr: float) -> None:
        if self._fused:
            try:
                torch._fused_adam_([w], [g], [m], [v], [], [torch.tensor(float(self.t), device=w.device)], lr=lr,
                                   beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                                   amsgrad=False, maximize=False)
                return
            except (RuntimeError, NotImplementedError):   # a device or dtype without the kernel
                self._fused = False
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        w.addcdiv_(m, (v / bc2).sqrt_().add_(self.eps), value=-lr / bc1)
