"""Muon (Jordan et al. 2024): orthogonalised momentum for a network's hidden weight matrices, AdamW for the rest.

Each hidden matrix's step is its (Nesterov) momentum with its singular values set to one by
five Newton-Schulz iterations, so every direction of the update moves at the same rate instead
of the few that dominate the gradient. The step is scaled by 0.2 sqrt(max(rows, cols)) (Moonshot's
rule, "Muon is scalable for LLM training"), which gives it AdamW's RMS: the same `lr` and schedule
serve both kinds of parameter. Embeddings, the output head, norms, biases and convolutions take
AdamW, as in the reference implementation.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of the reference: fast, not exact orthogonalisation
# Our own iteration, not torch.optim.Muon's: that one runs in bf16, which CPUs multiply far slower than fp32.


def orthogonalised(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """g [..., m, n] -> about U V^T of each matrix's SVD, by Newton-Schulz iterations on the smaller Gram matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def orthogonalised_together(gs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`orthogonalised` of each matrix, the ones of one shape stacked into one batch: a transformer's many
    small matrices then take a few batched products instead of one small product each."""
    groups: dict[torch.Size, list[int]] = {}
    for i, g in enumerate(gs):
        groups.setdefault(g.shape, []).append(i)
    out: list[torch.Tensor] = [None] * len(gs)
    for members in groups.values():
        for i, x in zip(members, orthogonalised(torch.stack([gs[i] for i in members]))):
            out[i] = x
    return out


def hidden_matrices(module: nn.Module, skip: tuple[str, ...]) -> set[int]:
    """ids of the weights of every nn.Linear in `module` whose name does not end with one of `skip`."""
    return {id(m.weight) for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith(skip)}


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: param groups flagged `muon` take Muon steps, the others AdamW steps."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], weight_decay: float,
                 momentum: float = 0.95, eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, weight_decay=weight_decay, momentum=momentum, eps=eps,
                                      muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        muon_params, directions = [], []
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)
                if group["muon"]:
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    muon_params.append((p, lr))
                    directions.append(p.grad.lerp(buf, group["momentum"]))
                else:
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    beta1, beta2 = group["betas"]
                    adamw([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                          foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=0.0,
                          eps=group["eps"], maximize=False)  # weight decay: applied above, to both kinds
        for (p, lr), update in zip(muon_params, orthogonalised_together(directions)):
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
