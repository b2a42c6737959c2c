"""One self-contained page per run: ``logs/<run>/report.html``.

    python -m helpers.report logs/quick                      # results read from results/quick
    python -m helpers.report logs/quick --results /data/results/quick

The page is assembled from what the run wrote and nothing else: every Markdown table in
``logs/<run>/`` (converted here: the project writes pipe tables, headings, paragraphs, lists and
inline bold, italic and code), every PNG of ``results/<run>/`` and ``logs/<run>/`` as a data URI,
the token-coloured HTML pictures the executed notebooks displayed (Co-LLM's who-wrote-which-token),
whitelisted down to text and inline styles, the settings and wall time of each stage (from
``results/<run>/stages/*.json``), the machine and library versions the runner recorded, and
relative links to the CSVs beside the page. No script, no font, no stylesheet or image is fetched:
the page opens offline and can be mailed on its own. The runner rebuilds it after every run.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
import time
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

from . import __version__
from .artifacts import one_line, read_json, write_text

REPORT = "report.html"
# (stage prefix, title, Markdown files, pictures under results/ or logs/, CSVs under logs/); what no
# section claims goes to "Other outputs", so a new file of a run is never left out of the page.
SECTIONS = [
    ("01_teacher_logits", "01 · Teacher solutions", ["teacher.md"], [], ["teacher.csv"]),
    ("02_distill", "02 · Distillation", [], ["figures/loss_*.png", "figures/*.png"], []),
    ("03_assess", "03 · Assessment", ["accuracy.md"], ["accuracy.png", "comparison.png"],
     ["accuracy*.csv", "kd_divergence.csv", "token_calibration.csv", "manual_review.csv", "overrides.csv",
      "per_question/*.csv"]),
    ("04_co_llm_deferral", "04 · Co-LLM deferral", ["co_llm.md", "co_llm/*.md"], ["co_llm/*.png"],
     ["co_llm/*.csv", "co_llm/per_question/*.csv"]),
    ("05_speculative", "05 · Speculative decoding", ["speculative.md", "speculative/*.md"],
     ["speculative*.png", "speculative/*.png"], ["speculative*.csv", "speculative/*.csv"]),
    ("06_fusion", "06 · Fusion across tokenizers", ["fusion.md", "fusion/*.md"], ["fusion/*.png"],
     ["fusion/*.csv", "fusion/per_question/*.csv"]),
]
RUNNER_PATHS = ("results_dir", "logs_dir")  # machine paths the runner adds; run_name says where they are
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "papermill", "pandas", "matplotlib")


# --------------------------------------------------------------------------- the machine
def environment() -> dict:
    """Python, library versions, CPU and the GPUs torch sees, on this machine now. The runner
    takes it in a child process (``python -c``), so that its own process never touches CUDA."""
    import os
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version(), "helpers": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out = {"versions": versions, "platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": []}
    try:
        from .models import cpu_name

        out["cpu"] = cpu_name()
        import torch

        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001  (a page without the GPU's name beats no page)
        out.setdefault("cpu", platform.processor() or platform.machine())
        out["note"] = f"torch not usable: {one_line(e)}"
    return out


def probe_environment(timeout: float = 120) -> dict | None:
    """``environment()`` from a child process of this Python (None if it fails)."""
    import subprocess

    code = "import json; from helpers.report import environment; print(json.dumps(environment()))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- Markdown -> HTML
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])|(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def inline(text: str) -> str:
    """One line of Markdown as HTML: code spans, bold, italic, links (to relative targets only)."""
    codes: list[str] = []

    def keep(m):
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = html.escape(_CODE.sub(keep, text), quote=False)
    text = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", text)
    text = _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", text)

    def link(m):
        label, target = m.group(1), html.unescape(m.group(2))
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # no page of the report reaches out
            return f"{label} ({html.escape(target)})"
        return f'<a href="{html.escape(target)}">{label}</a>'

    text = _LINK.sub(link, text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def _cells(line: str) -> list[str]:
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s)]


_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def markdown_to_html(text: str, shift: int = 0) -> str:
    """The Markdown the project writes, as HTML: ``#`` headings (moved ``shift`` levels down), pipe
    tables with a header row and alignment, ``-``/``*``/``1.`` lists, paragraphs, inline marks."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line):
            level = min(6, len(m.group(1)) + shift)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1]):
            head, rule = _cells(line), _cells(lines[i + 1])
            align = ["right" if r.endswith(":") and not r.startswith(":") else "center" if r.startswith(":")
                     and r.endswith(":") else "" for r in rule]
            i += 2
            body = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                body.append(_cells(lines[i]))
                i += 1

            def row(cells, tag):
                cells = cells + [""] * (len(head) - len(cells))
                styles = [f' style="text-align:{a}"' if a else "" for a in align] + [""] * len(cells)
                return "<tr>" + "".join(f"<{tag}{styles[j]}>{inline(c)}</{tag}>" for j, c in enumerate(cells)) + "</tr>"

            out.append('<div class="scroll"><table><thead>' + row(head, "th") + "</thead><tbody>"
                       + "".join(row(r, "td") for r in body) + "</tbody></table></div>")
        elif re.match(r"^\s*([-*+]|\d+[.)])\s+", line):
            ordered = bool(re.match(r"^\s*\d+[.)]\s+", line))
            items = []
            while i < len(lines) and lines[i].strip():
                if m := re.match(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$", lines[i]):
                    items.append(m.group(1))
                elif items:  # a wrapped item
                    items[-1] += " " + lines[i].strip()
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{inline(t)}</li>" for t in items) + f"</{tag}>")
        else:
            para = []
            while (i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6})\s", lines[i])
                   and not lines[i].lstrip().startswith("|") and not re.match(r"^\s*([-*+]|\d+[.)])\s+", lines[i])):
                para.append(lines[i].strip())
                i += 1
            if not para:  # a lone table-looking line without its rule
                para, i = [lines[i].strip()], i + 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


# --------------------------------------------------------------------------- notebook HTML pictures
class _Whitelist(HTMLParser):
    """Rebuilds HTML keeping only text, a few inline tags and their ``style`` (no url() in it)."""
    TAGS = {"div", "span", "b", "i", "em", "strong", "br", "p", "code", "pre", "small", "sub", "sup"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.TAGS:
            style = next((v for k, v in attrs if k == "style" and v), "")
            ok = style and not re.search(r"url\s*\(|expression|@import|javascript:", style, re.I)
            self.out.append(f'<{tag} style="{html.escape(style)}">' if ok else f"<{tag}>")

    def handle_endtag(self, tag):
        if tag in self.TAGS and tag != "br":
            self.out.append(f"</{tag}>")

    def handle_data(self, data):
        self.out.append(html.escape(data, quote=False))


def sanitize_html(fragment: str) -> str:
    parser = _Whitelist()
    parser.feed(fragment)
    parser.close()
    return "".join(parser.out)


def notebook_pictures(notebook: Path) -> list[str]:
    """The HTML outputs of an executed notebook that are not tables (pandas' tables are in the
    Markdown and CSVs already): the token-coloured pictures, whitelisted."""
    nb = read_json(notebook) or {}
    found = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            fragment = (output.get("data") or {}).get("text/html")
            fragment = "".join(fragment) if isinstance(fragment, list) else fragment
            if fragment and "<table" not in fragment and "<span" in fragment:
                found.append(sanitize_html(fragment))
    return found


# --------------------------------------------------------------------------- the page
def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _png_size(blob: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header (0, 0 when it is not one)."""
    if blob[:8] != b"\x89PNG\r\n\x1a\n" or len(blob) < 24:
        return 0, 0
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")


def _img(path: Path, caption: str) -> str:
    blob = path.read_bytes()
    w, h = _png_size(blob)
    wide = ' class="wide"' if h and w / h > 1.8 else ""  # side-by-side panels get the whole width
    data = base64.b64encode(blob).decode("ascii")
    return (f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return ""
    if s < 59.95:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else v


def _kv_table(pairs) -> str:
    return ('<div class="scroll"><table class="kv"><tbody>' + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(_value(v))}</code></td></tr>" for k, v in pairs)
        + "</tbody></table></div>")


def _claim(files: list[Path], base: Path, patterns: list[str], taken: set[Path]) -> list[Path]:
    got = []
    for pat in patterns:
        for f in files:
            if f not in taken and fnmatch(_rel(f, base), pat):
                taken.add(f)
                got.append(f)
    return got


def _csv_links(files: list[Path], logs: Path) -> str:
    if not files:
        return ""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_rel(f.parent, logs) if f.parent != logs else "", []).append(f)
    parts = []
    for folder, fs in groups.items():
        links = " · ".join(f'<a href="{quote(_rel(f, logs))}">{html.escape(f.name)}</a>' for f in fs)
        parts.append(f"<li>{html.escape(folder + '/') if folder else ''}{' ' if folder else ''}{links}</li>")
    return '<h4>Data files</h4><ul class="files">' + "".join(parts) + "</ul>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def build_html(logs_dir: Path, results_dir: Path | None, env_now: dict | None = None) -> str:
    logs_dir = Path(logs_dir)
    results_dir = Path(results_dir) if results_dir else None
    records = []
    if results_dir and (results_dir / "stages").is_dir():
        records = [r for f in sorted((results_dir / "stages").glob("*.json")) if (r := read_json(f))]
    run = next((r["params"].get("run_name") for r in records if r.get("params", {}).get("run_name")), logs_dir.name)
    finished = max((r.get("finished", "") for r in records), default="")

    skip = {REPORT}
    mds = sorted(p for p in logs_dir.rglob("*.md") if p.name not in skip)
    csvs = sorted(logs_dir.rglob("*.csv"))
    roots = [d for d in (results_dir, logs_dir) if d and d.is_dir()]
    pngs = [(p, root) for root in roots for p in sorted(root.rglob("*.png"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    png_files = [p for p, _ in pngs]
    base_of = dict(pngs)
    notebooks = sorted(results_dir.glob("notebooks/*.ipynb")) if results_dir else []
    notebooks = [n for n in notebooks if not n.name.startswith(".") and not n.name.endswith(".failed.ipynb")]

    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in mds}
    taken_md: set[Path] = set()
    taken_png: set[Path] = set()
    taken_csv: set[Path] = set()
    sections = []  # (id, title, html)
    for prefix, title, md_pats, png_pats, csv_pats in SECTIONS + [("", "Other outputs", ["*"], ["*"], ["*"])]:
        parts = []
        stage_recs = [r for r in records if prefix and str(r.get("stage", "")).startswith(prefix)]
        if stage_recs:
            parts.append('<p class="meta">' + " · ".join(
                f"{html.escape(str(r['stage']))}: {_seconds(r.get('seconds'))}" for r in stage_recs) + "</p>")
        for md in _claim(mds, logs_dir, md_pats, taken_md):
            mine = texts[md].strip()
            within = next((o for o in mds if o != md and mine and mine in texts[o]
                           and (len(texts[o].strip()) > len(mine) or o < md)), None)
            name = _rel(md, logs_dir)
            if within is not None:
                parts.append(f'<p class="meta">{html.escape(name)}: its text is part of '
                             f"{html.escape(_rel(within, logs_dir))}, shown in full with it.</p>")
                continue
            parts.append(f'<div class="md"><p class="src">{html.escape(name)}</p>'
                         f"{markdown_to_html(texts[md], shift=2)}</div>")
        if prefix:
            for nb in notebooks:
                if nb.stem.startswith(prefix):
                    for pic in notebook_pictures(nb):
                        parts.append(f'<div class="tokens"><p class="src">{html.escape(nb.name)} '
                                     f"(token-coloured, as the notebook showed it)</p>{pic}</div>")
        figs = []
        for png in [p for p in png_files if p not in taken_png]:
            rel = _rel(png, base_of[png])
            if any(fnmatch(rel, pat) for pat in png_pats):
                taken_png.add(png)
                where = "results" if base_of[png] == results_dir else "logs"
                figs.append(_img(png, f"{where}/{run}/{rel}"))
        if figs:
            parts.append('<div class="figs">' + "".join(figs) + "</div>")
        parts.append(_csv_links(_claim(csvs, logs_dir, csv_pats, taken_csv), logs_dir))
        body = "".join(p for p in parts if p)
        if body:
            sections.append((_slug(title), title, body))

    # stages and wall time
    total = sum(float(r.get("seconds") or 0) for r in records)
    stage_rows = "".join(
        f"<tr><td>{html.escape(str(r.get('stage', '?')))}</td><td class=\"num\">{_seconds(r.get('seconds'))}</td>"
        f"<td>{html.escape(str(r.get('finished', '')).replace('T', ' '))}</td></tr>" for r in records)
    if records:
        stages_html = ("<table><thead><tr><th>stage</th><th>wall time</th><th>finished</th></tr></thead><tbody>"
                       + stage_rows + f"<tr class=\"total\"><td>all stages</td><td class=\"num\">{_seconds(total)}"
                       "</td><td></td></tr></tbody></table>")
    else:
        stages_html = "<p>No stage records found (results folder absent): wall times unknown.</p>"

    # machine and versions: what the runner recorded with each stage, else this machine now
    envs = [(r.get("stage"), r["environment"]) for r in records if isinstance(r.get("environment"), dict)]
    if envs:
        distinct = []
        for stage, e in envs:
            for d in distinct:
                if d[1] == e:
                    d[0].append(stage)
                    break
            else:
                distinct.append(([stage], e))
        machine_note = "Recorded by the runner when the stages ran."
    else:
        distinct = [([], env_now if env_now is not None else environment())]
        machine_note = ("The run's stage records carry no machine: shown is the machine that built this page, "
                        f"{time.strftime('%Y-%m-%d %H:%M')}.")
    machine_parts = [f'<p class="meta">{machine_note}</p>']
    for stages, e in distinct:
        if len(distinct) > 1:
            machine_parts.append(f"<h4>{html.escape(', '.join(map(str, stages)))}</h4>")
        gpus = ", ".join(e.get("gpus") or []) or "none (CPU only)"
        pairs = [("CPU", e.get("cpu", "?")), ("cores", e.get("cpu_count", "?")),
                 ("torch threads", e.get("torch_threads", "?")),
                 ("GPU", gpus + (f" (CUDA {e['cuda']})" if e.get("cuda") else "")), ("platform", e.get("platform", "?"))]
        pairs += list((e.get("versions") or {}).items())
        if e.get("note"):
            pairs.append(("note", e["note"]))
        machine_parts.append(_kv_table(pairs))

    # settings, as the runner merged them: shared by every stage, then each stage's own
    params = [(r.get("stage"), {k: v for k, v in (r.get("params") or {}).items() if k not in RUNNER_PATHS})
              for r in records]
    if params:
        shared = dict(params[0][1])
        for _, p in params[1:]:
            shared = {k: v for k, v in shared.items() if k in p and p[k] == v}
        cards = [("Shared by every stage", sorted(shared.items()))]
        cards += [(str(stage), own) for stage, p in params
                  if (own := sorted((k, v) for k, v in p.items() if k not in shared))]
        settings_html = ('<p class="meta">As the runner merged them (profile, stage, <code>--set</code>) and recorded '
                         'them in results/&lt;run&gt;/stages/; the runner\'s folder paths left out.</p><div class="cards">'
                         + "".join(f"<div><h3>{html.escape(t)}</h3>{_kv_table(kv)}</div>" for t, kv in cards)
                         + "</div>")
    else:
        settings_html = "<p>No stage records found: settings unknown.</p>"

    top = [("stages", "Stages and wall time", stages_html), ("machine", "Machine and versions", "".join(machine_parts))]
    tail = [("settings", "Settings", settings_html)]
    everything = top + sections + tail
    toc = "".join(f'<li><a href="#{sid}">{html.escape(title)}</a></li>' for sid, title, _ in everything)
    section = lambda sid, title, content: f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'  # noqa: E731
    body = ('<div class="cards">' + "".join(section(*s) for s in top) + "</div>"
            + "".join(section(*s) for s in sections + tail))
    when = finished.replace("T", " ") if finished else "not recorded"
    results_note = f"results/{html.escape(run)}/" if results_dir else "no results folder"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>Run {html.escape(run)}: report</title>
<style>{CSS}</style></head>
<body><header><h1>Run {html.escape(run)}: report</h1>
<p class="meta">last stage finished {html.escape(when)} · wall time of the stages {_seconds(total) or "unknown"} ·
built from logs/{html.escape(run)}/ and {results_note} by helpers {html.escape(__version__)} at
{time.strftime('%Y-%m-%d %H:%M')}</p></header>
<nav><h2>Contents</h2><ol>{toc}</ol></nav>
<main>{body}</main></body></html>
"""


CSS = """
:root{--ink:#1d2430;--mute:#5b6575;--line:#d9dee6;--bg:#fff;--band:#f4f6f9;--accent:#2f5d9b}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1180px;padding:24px 28px 60px;font:14px/1.5 system-ui,-apple-system,"Segoe UI",
Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg)}
header h1{margin:0 0 4px;font-size:26px}
h2{font-size:20px;margin:32px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--accent)}
h3{font-size:16px;margin:18px 0 6px}h4{font-size:14px;margin:14px 0 6px}h5,h6{font-size:13px;margin:12px 0 4px}
code{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;background:var(--band);
padding:0 3px;border-radius:3px}
.meta,.src{color:var(--mute);font-size:12.5px;margin:4px 0}
.src{font-family:ui-monospace,"DejaVu Sans Mono",monospace}
nav{background:var(--band);border:1px solid var(--line);border-radius:6px;padding:8px 16px;margin:14px 0}
nav h2{border:0;margin:4px 0;font-size:15px}nav ol{margin:4px 0;padding-left:22px;columns:2}
a{color:var(--accent)}
.scroll{overflow-x:auto;margin:8px 0 12px}
table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:var(--band);position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfc}
table.kv th{background:var(--band);font-weight:600;white-space:nowrap}
table.kv code{background:none;padding:0;white-space:pre-wrap;word-break:break-word}
td.num{text-align:right}tr.total td{font-weight:600;background:var(--band)}
.md{margin:6px 0 14px}.md ul{margin:6px 0;padding-left:22px}.md li{margin:2px 0}
figure.wide{grid-column:1/-1}figure.wide img{max-width:min(100%,1000px)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(500px,1fr));gap:0 28px;align-items:start}
.md td{white-space:nowrap}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px;margin:12px 0}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:8px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:var(--mute);font-size:12px;text-align:center;margin-top:4px;font-family:ui-monospace,monospace}
.tokens{border:1px solid var(--line);border-radius:6px;padding:8px 12px;margin:10px 0;background:#fff}
.tokens>div{margin:6px 0 10px}
ul.files{padding-left:20px;font-size:13px}ul.files li{margin:3px 0}
"""


def default_results(logs_dir: Path) -> Path:
    """``logs/<run>`` -> ``results/<run>`` beside it (the runner's layout)."""
    return Path(logs_dir).resolve().parent.parent / "results" / Path(logs_dir).resolve().name


def write_report(run_dir_logs: str | Path, results_dir: str | Path | None = None,
                 env_now: dict | None = None) -> Path:
    """Write ``<run_dir_logs>/report.html`` (atomically) from the run's logs and results folders;
    ``results_dir`` defaults to ``results/<run>`` beside ``logs/``. Returns the page's path."""
    logs = Path(run_dir_logs)
    if not logs.is_dir():
        raise FileNotFoundError(f"{logs}: no such logs folder (expected logs/<run>/ as a run writes it)")
    results = Path(results_dir) if results_dir is not None else default_results(logs)
    if results_dir is not None and not results.is_dir():
        raise FileNotFoundError(f"{results}: no such results folder")
    page = build_html(logs, results if results.is_dir() else None, env_now)
    return write_text(logs / REPORT, page)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("logs_dir", help="a run's logs folder, e.g. logs/quick")
    ap.add_argument("--results", default=None, help="its results folder (default: results/<run> beside logs/)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.logs_dir, args.results)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
