"""Where the assistant writes, for tables and pictures: deferral rate by kind of token
(``token_kind``, ``deferral_by_kind``), by relative position in the solution
(``deferral_by_position``), and one solution as HTML with each token coloured by its writer
(``provenance_html``). Reads decoded rows only; imports none of the package's modules."""
from __future__ import annotations

import numpy as np


TOKEN_KINDS = ("digit", "operator", "word", "punctuation", "space/other")


def token_kind(text: str) -> str:
    s = text.strip()
    if not s:
        return "space/other"
    if any(c.isdigit() for c in s):
        return "digit"
    if all(c in "+-*/=×÷^%<>()" for c in s):
        return "operator"
    if any(c.isalpha() for c in s):
        return "word"
    if all(not c.isalnum() for c in s):
        return "punctuation"
    return "space/other"


def deferral_by_kind(rows: list[dict], tok):
    """Deferral rate and count per kind of token."""
    import pandas as pd

    counts = {k: [0, 0] for k in TOKEN_KINDS}
    for r in rows:
        for t, w in zip(r["token_ids"], r["who"]):
            k = token_kind(tok.decode([t]))
            counts[k][0] += w
            counts[k][1] += 1
    return pd.DataFrame([{"kind": k, "tokens": n, "deferred": d, "deferral rate": d / n if n else float("nan")}
                         for k, (d, n) in counts.items()])


def deferral_by_position(rows: list[dict], bins: int = 10):
    """Deferral rate by relative position in the solution (tenths of its length)."""
    import pandas as pd

    d, n = np.zeros(bins), np.zeros(bins)
    for r in rows:
        L = len(r["who"])
        for i, w in enumerate(r["who"]):
            j = min(bins - 1, int(bins * i / max(L, 1)))
            d[j] += w
            n[j] += 1
    return pd.DataFrame({"position": [f"{i / bins:.1f}–{(i + 1) / bins:.1f}" for i in range(bins)],
                         "tokens": n.astype(int), "deferral rate": np.where(n > 0, d / np.maximum(n, 1), np.nan)})


def provenance_html(row: dict, tok, title: str = "") -> str:
    """One generated solution, each token coloured by the model that wrote it."""
    import html

    spans = []
    for t, w in zip(row["token_ids"], row["who"]):
        piece = html.escape(tok.decode([t])).replace("\n", "<br>")
        style = "background:#f6c28b" if w else "background:#cfe3f7"
        spans.append(f'<span style="{style}">{piece}</span>')
    legend = ('<span style="background:#cfe3f7">base</span> '
              '<span style="background:#f6c28b">assistant</span>')
    return (f"<div style='font-family:monospace;line-height:1.6'><b>{html.escape(title)}</b> {legend}<br>"
            + "".join(spans) + "</div>")
