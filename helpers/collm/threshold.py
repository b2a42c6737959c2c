"""Threshold search and calibration on the deferral-logit scale: the logits observed under teacher
forcing (``deferral_logits``), thresholds cut from them per target deferral frequency
(``thresholds_for``), σ and its logit (``logit_threshold``, ``sigma``), the decision rule with
±inf thresholds (``_defer``), and how well σ is calibrated on held-out tokens
(``responsibilities``, ``calibration_table``, ``expected_calibration_error``, ``logit_summary``).
Uses ``head`` and ``train`` (``Features``)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .head import _batches, base_forward
from .train import Features


@torch.no_grad()
def deferral_logits(base, head, tok, examples, batch_size: int = 8) -> np.ndarray:
    """The deferral logit (σ = sigmoid of it) at every solution token of ``examples`` (teacher
    forcing): the distribution thresholds are cut from. Logits, not σ, because σ saturates at
    1.0 in floating point where a head defers confidently, and equal values cannot be ranked."""
    out = []
    for _, batch in _batches(examples, batch_size, tok.pad_token_id):
        batch = {k: v.to(base.device) for k, v in batch.items()}
        _, d, _ = base_forward(base, head, batch["input_ids"], batch["attention_mask"])
        out.append(d[:, :-1][batch["mask"].bool()].double().cpu())
    return torch.cat(out).numpy()


def thresholds_for(logits: np.ndarray, frequencies) -> list[float]:
    """A deferral-logit threshold per target deferral frequency f ("defer when logit > threshold"),
    cut from the observed logits in float64: +inf for f ≤ 0 (never defer), −inf for f ≥ 1 (always),
    and otherwise the midpoint between the k-th and (k+1)-th largest logit, k = round(f·N) clamped
    to 1…N−1, so exactly k of the N observed logits lie above it (unless logits tie there) and
    thresholds stay finite and distinct however confident the head is (σ = 1.0 in floating point
    above a logit of about 36.7, and equal values cannot be ranked)."""
    s = np.sort(np.asarray(logits, dtype=np.float64).ravel())
    if len(s) == 0:
        raise ValueError("thresholds_for needs at least one observed deferral logit")
    if not np.isfinite(s).all():
        raise ValueError("thresholds_for: the observed deferral logits contain inf or NaN")
    n, out = len(s), []
    for f in frequencies:
        f = float(f)
        if f <= 0:
            out.append(math.inf)
        elif f >= 1:
            out.append(-math.inf)
        elif n == 1:
            out.append(float(s[0]) - 1.0 if f >= 0.5 else float(s[0]))
        else:
            k = min(n - 1, max(1, int(round(f * n))))
            out.append(float(0.5 * (s[n - k - 1] + s[n - k])))
    return out


def logit_threshold(eta: float) -> float:
    """The deferral-logit cut equivalent to σ > η (±inf outside (0, 1))."""
    if eta >= 1.0:
        return math.inf
    if eta <= 0.0:
        return -math.inf
    return math.log(eta) - math.log1p(-eta)


def sigma(logit: float) -> float:
    """σ of a deferral logit in float64 (for display: it rounds to 1.0 above a logit of ~36.7)."""
    logit = float(logit)
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    return math.exp(logit) / (1.0 + math.exp(logit))


def _defer(dlogit: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """logit > cut, with cut = +inf never and cut = −inf always deferring, whatever the logit."""
    return torch.where(torch.isinf(cut), cut < 0, dlogit > cut)


def responsibilities(logits: np.ndarray, feats: Features) -> np.ndarray:
    """Posterior P(Z_t = 1 | x_t, x_<t) = σ·p_asst / ((1 − σ)·p_base + σ·p_asst) of the assistant
    having written each reference token, under the head's own σ (float64)."""
    d = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    b, a = feats.base_logp.double(), feats.asst_logp.double()
    log_num = F.logsigmoid(d) + a
    return torch.exp(log_num - torch.logaddexp(F.logsigmoid(-d) + b, log_num)).numpy()


def calibration_table(logits: np.ndarray, feats: Features, bins: int = 10):
    """Reliability bins of σ (equal width on [0, 1]) on held-out tokens: tokens, mean σ, the mean
    posterior responsibility r of the assistant, and the weak-label rate for reference. Empty bins
    are left out.

    r is the calibration target that fits the marginal-likelihood objective: σ is the prior of the
    latent "the assistant writes this token", the objective's stationary points satisfy
    Σ_t (r_t − σ_t)·∂logit_t = 0, and where the tokens follow the model E[r | σ] = σ exactly. The
    weak label (the assistant's top-1, not the base's) is a different event and need not match
    σ. Since r uses the head's own σ it is pulled towards σ: a gap is understated, never invented."""
    import pandas as pd

    d = np.asarray(logits, dtype=np.float64)
    s = torch.sigmoid(torch.as_tensor(d)).numpy()
    r = responsibilities(d, feats)
    z = feats.labels.double().numpy()
    j = np.minimum((s * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = j == b
        if m.any():
            rows.append({"bin low": b / bins, "bin high": (b + 1) / bins, "tokens": int(m.sum()),
                         "mean sigma": float(s[m].mean()), "responsibility": float(r[m].mean()),
                         "weak label rate": float(z[m].mean())})
    return pd.DataFrame(rows)


def expected_calibration_error(table) -> float:
    """Σ_bins (tokens / N)·|mean σ − mean responsibility| of a ``calibration_table``."""
    w = table["tokens"] / table["tokens"].sum()
    return float((w * (table["mean sigma"] - table["responsibility"]).abs()).sum())


QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def logit_summary(logits: np.ndarray, quantiles=QUANTILES) -> dict:
    """Quantiles of deferral logits, and the share whose σ rounds to 1.0 in float32 (logit > ~16.6)."""
    d = np.asarray(logits, dtype=np.float64)
    out = {f"q{round(100 * q):02d}": float(np.quantile(d, q)) for q in quantiles}
    out["share sigma=1 (fp32)"] = float((torch.sigmoid(torch.as_tensor(d, dtype=torch.float32)) == 1.0).float().mean())
    return out
