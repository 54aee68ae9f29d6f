"""A second, deliberately naive implementation of docs/objective.md section 3: scalar Python loops.

It shares no code with ``deferredseg_kernels.reference`` (which is vectorised
PyTorch), so agreement between the two on tiny inputs checks the reference
itself. Values only, in float64 via the ``math`` module.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Sequence

import torch


def _log_softmax(v: Sequence[float]):
    m = max(v)
    s = sum(math.exp(x - m) for x in v)
    return [x - m - math.log(s) for x in v]


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _argmax(v: Sequence[float]) -> int:
    best = 0
    for i in range(1, len(v)):
        if v[i] > v[best]:
            best = i
    return best


def naive_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    experts: torch.Tensor,
    K: int,
    E: int,
    ignore_index=-100,
    class_weight=None,
    lambda_seg=1.0,
    lambda_collab=1.0,
    lambda_gate=1.0,
    lambda_coherence=0.1,
    lambda_balance=0.1,
    surrogate="softmax",
    paper_eps=1e-8,
    gate_target="router",
    gate_mse=0.5,
    gate_sparsity=0.1,
    coherence="l1",
    coherence_maps=("router", "gate"),
    balance="cv2",
    balance_low=None,
    balance_high=None,
) -> Dict[str, float]:
    x = logits.double().tolist()
    t = target.tolist()
    m = experts.tolist()
    B = logits.shape[0]
    S = tuple(logits.shape[2:])
    nlab = max(K, 2)
    w = list(class_weight) if class_weight is not None else [1.0] * nlab

    def chan(b, c, idx):
        v = x[b][c]
        for i in idx:
            v = v[i]
        return v

    def lab(arr, b, idx):
        v = arr[b]
        for i in idx:
            v = v[i]
        return v

    seg_num = seg_den = collab = gate = 0.0
    nv = 0
    sums = [0.0] * (E + 1)
    D_map, s_map, valid_map = {}, {}, {}
    for b in range(B):
        for idx in itertools.product(*[range(n) for n in S]):
            y = lab(t, b, idx)
            valid = y != ignore_index
            z = [chan(b, k, idx) for k in range(K)]
            r = [chan(b, K + k, idx) for k in range(E + 1)]
            a = chan(b, K + E + 1, idx)
            lp = _log_softmax(r)
            pi = [math.exp(v) for v in lp]
            D = sum(pi[:E])
            s = 1.0 / (1.0 + math.exp(-a))
            D_map[(b,) + idx], s_map[(b,) + idx], valid_map[(b,) + idx] = D, s, valid
            if not valid:
                continue
            nv += 1
            if K >= 2:
                lseg = -_log_softmax(z)[y]
                c0 = 1.0 if _argmax(z) == y else 0.0
            else:
                lseg = _softplus(z[0]) - y * z[0]
                c0 = 1.0 if (z[0] > 0) == (y == 1) else 0.0
            seg_num += w[y] * lseg
            seg_den += w[y]
            cj = [
                1.0
                if (lab(m, b, (j,) + idx) == y and lab(m, b, (j,) + idx) != ignore_index)
                else 0.0
                for j in range(E)
            ]
            if surrogate == "softmax":
                lc = -c0 * lp[E] - sum(cj[j] * lp[j] for j in range(E))
            elif surrogate == "ova":
                ck = cj + [c0]
                lc = sum(_softplus(r[k]) - ck[k] * r[k] for k in range(E + 1))
            else:
                lc = -c0 * math.log(pi[E] + paper_eps) + sum(
                    (1 - 2 * cj[j]) * math.log(pi[j] + paper_eps) for j in range(E)
                )
            collab += lc
            if gate_target == "router":
                h = 1.0 if _argmax(r) < E else 0.0
            else:  # the model is wrong and the expert the router picks is right
                h = (1.0 - c0) * cj[_argmax(r[:E])]
            gate += _softplus(a) - h * a + gate_mse * (s - D) ** 2 + gate_sparsity * s
            for k in range(E + 1):
                sums[k] += pi[k]
    coh = 0.0
    maps = {"router": D_map, "gate": s_map}
    for name in coherence_maps:
        M = maps[name]
        for d in range(len(S)):
            tot, cnt = 0.0, 0
            for key in M:
                nb = list(key)
                nb[1 + d] += 1
                nb = tuple(nb)
                if nb in M and valid_map[key] and valid_map[nb]:
                    diff = M[key] - M[nb]
                    tot += abs(diff) if coherence == "l1" else diff * diff
                    cnt += 1
            if cnt:
                coh += tot / cnt
    if nv == 0:
        terms = dict(seg=0.0, collab=0.0, gate=0.0, coherence=0.0, balance=0.0)
    else:
        pbar = [v / nv for v in sums]
        if balance == "cv2":
            P = pbar[:E]
            bal = 0.0 if E == 1 else E * sum(p * p for p in P) / sum(P) ** 2 - 1
        else:
            bal = sum(
                max(pbar[k] - balance_high[k], 0.0) + max(balance_low[k] - pbar[k], 0.0)
                for k in range(E + 1)
            )
        terms = dict(
            seg=seg_num / seg_den if seg_den > 0 else 0.0,
            collab=collab / nv,
            gate=gate / nv,
            coherence=coh,
            balance=bal,
        )
    terms["loss"] = (
        lambda_seg * terms["seg"]
        + lambda_collab * terms["collab"]
        + lambda_gate * terms["gate"]
        + lambda_coherence * terms["coherence"]
        + lambda_balance * terms["balance"]
    )
    return terms
