"""The architecture weightings of the DARTS family, with the published semantics.

* ``softmax_weights`` (DARTS): ``softmax(alpha, -1)`` per edge.
* ``sigmoid_weights`` (FairDARTS): ``sigmoid(alpha)``, each candidate independent.
* ``gdas_weights`` (GDAS): hard Gumbel-softmax with a straight-through gradient, exactly as GDAS
  forms it: ``g = -log(Exp(1))``, ``probs = softmax((log_softmax(alpha) + g) / tau)``,
  ``index = argmax(probs)``, ``hardwts = one_hot(index) - probs.detach() + probs`` (resampled
  while g or probs hold inf/nan). In the forward pass ``hardwts`` is one-hot; its gradient flows
  into every logit through ``probs``. The mixed op is then evaluated only for the chosen
  candidate, ``MixedOp.forward_gdas(x, hardwts, index) = hardwts[index] * op_index(x)`` (GDAS'
  DARTS-space cell), so the other entries of ``hardwts`` get no gradient from the edge and the
  other candidates are not run.
* ``edge_weights`` (PC-DARTS edge normalisation): the betas of the 2 + i incoming edges of node i
  are soft-maxed per node and concatenated (length 14 for 4 nodes); a node is
  ``sum_j edge_w[j] * mixed_j(h_j)``. The partial channels themselves are ``MixedOp(...,
  partial_k=K)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTINGS = ("softmax", "sigmoid", "gdas", "pcdarts")


def softmax_weights(alpha: torch.Tensor) -> torch.Tensor:
    return F.softmax(alpha, dim=-1)


def sigmoid_weights(alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(alpha)


def gdas_weights(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None):
    """(hardwts, index) of GDAS' hard Gumbel-softmax over the last dim of ``alpha``."""
    if not tau > 0:
        raise ValueError(f"the Gumbel-softmax temperature tau must be positive, got {tau}")
    while True:
        gumbels = -torch.empty_like(alpha).exponential_(generator=generator).log()
        logits = (alpha.log_softmax(dim=-1) + gumbels) / tau
        probs = F.softmax(logits, dim=-1)
        index = probs.max(-1, keepdim=True)[1]
        one_h = torch.zeros_like(logits).scatter_(-1, index, 1.0)
        hardwts = one_h - probs.detach() + probs
        if not (torch.isinf(gumbels).any() or torch.isinf(probs).any() or torch.isnan(probs).any()):
            return hardwts, index.squeeze(-1)


def edge_weights(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """PC-DARTS' edge normalisation: softmax of the betas of each node's incoming edges."""
    want = sum(2 + i for i in range(steps))
    if betas.dim() != 1 or betas.numel() != want:
        raise ValueError(f"edge betas for {steps} nodes must be a vector of {want}, got shape "
                         f"{tuple(betas.shape)}")
    parts, start = [], 0
    for i in range(steps):
        parts.append(F.softmax(betas[start:start + 2 + i], dim=-1))
        start += 2 + i
    return torch.cat(parts)
