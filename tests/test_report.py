"""logs/<run>/report.html: built from a run folder made here; every table, picture, stage time and
CSV link is on the page, nothing on it reaches the network, and a real headless Chromium draws it."""
import base64
import json
import shutil
import socket
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from helpers import pipeline, report

ACCURACY_MD = """# Accuracy: r

| Experiment | Accuracy | 95% CI |
|---|---|---|
| no-distillation | 7.5% | 4.6–12.0% |
| reference-kd | 24.5% | 19.1–30.9% |

- 200 test problems from word_arith (seed 0); **greedy** decoding, `max_new_tokens` 128.
- KL to <teacher>: *forward* KL.

## Paired comparisons

| Experiment | vs | McNemar p |
|---|---|---|
| reference-kd | no-distillation | 5.65e-08 |
"""
CO_LLM_MD = """# Co-LLM deferral: r

| Experiment | Deferral frequency |
|---|---|
| Co-LLM (learned) | 0.790 |
"""
PICTURE = ("<div style='font-family:monospace;line-height:1.6'><b>q1 (gold 24)</b> "
           '<span style="background:#cfe3f7">To</span><span style="background:#f6c28b"> solve&lt;x&gt;</span><br>'
           '<script>alert(1)</script><span onclick="steal()" style="background:url(http://example.com/a.png)">'
           'z</span><img src="https://example.com/b.png"></div>')
ENV = {"versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}, "cpu": "Test CPU (avx2)", "cpu_count": 2,
       "gpus": ["Fake GPU 80GB"], "cuda": "12.4", "platform": "Linux"}


def _png(path: Path, color: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.bar(["a", "b"], [1, 2], color=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _notebook(path: Path, html_outputs: list[str]) -> None:
    cells = [{"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
              "outputs": [{"output_type": "display_data", "metadata": {}, "data": {"text/html": h}}]}
             for h in html_outputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


@pytest.fixture
def run(tmp_path):
    """A run as the runner leaves it: logs/r (tables, CSVs) and results/r (pictures, stage records)."""
    logs, results = tmp_path / "logs" / "r", tmp_path / "results" / "r"
    (logs / "per_question").mkdir(parents=True)
    (logs / "co_llm" / "per_question").mkdir(parents=True)
    (logs / "accuracy.md").write_text(ACCURACY_MD)
    (logs / "co_llm.md").write_text(CO_LLM_MD)
    (logs / "accuracy.csv").write_text("experiment,accuracy\nno-distillation,0.075\n")
    (logs / "per_question" / "reference-kd.csv").write_text("id,correct\nq1,1\n")
    (logs / "co_llm" / "per_question" / "Co-LLM (learned).csv").write_text("id,correct\nq1,0\n")
    _png(results / "accuracy.png", "tab:blue")
    _png(results / "co_llm" / "provenance.png", "tab:orange")
    _png(results / "figures" / "loss_reference-kd.png", "tab:green")
    for name, seconds, params in [("03_assess", 12.3, {"n_test": 200, "batch_size": 100}),
                                  ("04_co_llm_deferral", 75.0, {"n_test": 200, "collm_n_test": 24})]:
        (results / "stages").mkdir(parents=True, exist_ok=True)
        (results / "stages" / f"{name}.json").write_text(json.dumps({
            "stage": name, "seconds": seconds, "finished": "2026-12-07T03:43:02", "fingerprint": "x",
            "environment": ENV, "params": {**params, "run_name": "r", "results_dir": str(results),
                                           "logs_dir": str(logs)}}))
    _notebook(results / "notebooks" / "04_co_llm_deferral.ipynb",
              [PICTURE, "<div><table><tr><td>a dataframe</td></tr></table></div>"])
    return logs, results


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.attrs, self.tags, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _md_tables(md: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def test_the_page_holds_every_table_picture_time_and_link(run):
    logs, results = run
    path = report.write_report(logs, results)
    assert path == logs / "report.html"
    text = path.read_text()
    page = _parse(text)
    for md in (ACCURACY_MD, CO_LLM_MD):
        for table in _md_tables(md):
            assert table in page.tables, table
    # inline marks, and text that only looks like markup stays text
    assert "<strong>greedy</strong>" in text and "<code>max_new_tokens</code>" in text
    assert "<em>forward</em>" in text and "KL to &lt;teacher&gt;" in text and "word_arith" in text

    images = [v for tag, k, v in page.attrs if tag == "img" and k == "src"]
    assert len(images) == 3 and all(v.startswith("data:image/png;base64,") for v in images)
    decoded = {base64.b64decode(v.split(",", 1)[1]) for v in images}
    assert decoded == {p.read_bytes() for p in results.rglob("*.png")}

    # nothing fetched: no address with a scheme in any src or href, no scripts or external sheets
    for tag, k, v in page.attrs:
        if k in ("src", "href"):
            assert v.startswith(("data:", "#")) or "://" not in v and not v.startswith("//"), (tag, k, v)
    assert "http://" not in text and "https://" not in text
    assert "default-src 'none'; img-src data:" in text  # and the browser itself refuses any fetch
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "onclick" not in text and "url(" not in text

    # the CSVs: relative links to files that exist beside the page
    links = {unquote(v) for tag, k, v in page.attrs if tag == "a" and k == "href" and not v.startswith("#")}
    expected = {"accuracy.csv", "per_question/reference-kd.csv", "co_llm/per_question/Co-LLM (learned).csv"}
    assert links == expected
    assert all((logs / link).is_file() and not Path(link).is_absolute() for link in links)

    # stages, their wall time, the machine, the settings; no path of this machine
    stages = next(t for t in page.tables if t and t[0] == ["stage", "wall time", "finished"])
    assert ["03_assess", "12.3 s", "2026-12-07 03:43:02"] in stages
    assert ["04_co_llm_deferral", "1 min 15 s", "2026-12-07 03:43:02"] in stages
    assert ["all stages", "1 min 27 s", ""] in stages
    kv = {row[0]: row[1] for t in page.tables for row in t if len(row) == 2}
    assert kv["CPU"] == "Test CPU (avx2)" and kv["GPU"] == "Fake GPU 80GB (CUDA 12.4)" and kv["torch"] == "2.13.0+cpu"
    assert kv["collm_n_test"] == "24" and kv["n_test"] == "200" and kv["run_name"] == "r"
    assert str(logs.parent.parent) not in text

    # the token-coloured picture from notebook 04, whitelisted; the dataframe output left to the tables
    assert '<span style="background:#cfe3f7">To</span>' in text and " solve&lt;x&gt;" in text
    assert "a dataframe" not in text
    assert text.index("04 · Co-LLM deferral") < text.index("background:#cfe3f7") < text.index("Settings</h2>")


def test_markdown_the_project_writes():
    out = report.markdown_to_html("# T\n\npara *a* and 2*3*4, a_b_c\nnext line\n\n1. one\n2. two\n"
                                  "\n| x | y |\n|:--|--:|\n| a \\| b | [csv](per_question/a.csv) |\n"
                                  "\n[site](https://example.com)\n", shift=2)
    assert "<h3>T</h3>" in out
    assert "<p>para <em>a</em> and 2*3*4, a_b_c next line</p>" in out
    assert "<ol><li>one</li><li>two</li></ol>" in out
    assert '<th style="text-align:right">y</th>' in out and "<td>a | b</td>" in out
    assert '<a href="per_question/a.csv">csv</a>' in out
    assert "href" not in out.split("</table>")[1] and "site (https://example.com)" in out


def test_the_command_and_the_runner_write_it(run, tmp_path, capsys):
    logs, results = run
    assert report.main([str(logs)]) == 0  # results/r found beside logs/
    assert "data:image/png" in (logs / "report.html").read_text()
    assert report.main([str(tmp_path / "nothing")]) == 1
    assert "no such logs folder" in capsys.readouterr().err
    (logs / "report.html").unlink()
    pipeline.write_run_report(logs, results)
    assert (logs / "report.html").is_file()
    (results / "stages" / "03_assess.json").write_text("{not json")  # a bad record: still a page, or a note
    pipeline.write_run_report(logs, results)
    assert "report:" in capsys.readouterr().out


def _chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (p := shutil.which(name))), None)


class _Proxy:
    """A TCP port that notes the host of every request sent to it: Chromium's proxy, so that any
    fetch shows up here."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.2)
        self.port, self.hosts, self._stop = self.sock.getsockname()[1], [], False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:  # "CONNECT host:443 HTTP/1.1" or "GET http://host/path HTTP/1.1"
                target = conn.recv(4096).split(b"\r\n")[0].decode("latin-1").split(" ")[1]
                self.hosts.append(target.split("://")[-1].split("/")[0].rsplit(":", 1)[0])
            except (OSError, IndexError):
                self.hosts.append("?")
            conn.close()

    def seen(self, draw) -> set[str]:
        """The hosts requested while ``draw()`` runs."""
        start = len(self.hosts)
        draw()
        return set(self.hosts[start:])

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


def _screenshot(browser: str, page: Path, png: Path, proxy_port: int) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-default-apps", f"--proxy-server=http://127.0.0.1:{proxy_port}",
                    "--proxy-bypass-list=<-loopback>", f"--screenshot={png}", "--window-size=1200,2000",
                    page.resolve().as_uri()], capture_output=True, timeout=120, check=False)


def test_a_headless_chromium_draws_the_page_offline(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium)")
    import numpy as np
    from PIL import Image

    logs, results = run
    page = report.write_report(logs, results)
    shot = tmp_path / "report.png"
    (tmp_path / "blank.html").write_text("<html><body>blank</body></html>")
    (tmp_path / "control.html").write_text('<html><body><img src="http://report-check.invalid/a.png"></body></html>')
    proxy = _Proxy()
    try:
        # the browser's own traffic (update and time checks) is the same whatever the page; a page's
        # fetch adds its host, as the control shows, so the report may add none
        own = proxy.seen(lambda: _screenshot(browser, tmp_path / "blank.html", tmp_path / "blank.png", proxy.port))
        control = proxy.seen(lambda: _screenshot(browser, tmp_path / "control.html", tmp_path / "c.png", proxy.port))
        assert "report-check.invalid" in control, f"the proxy saw {control}: this check of network use proves nothing"
        drawing = proxy.seen(lambda: _screenshot(browser, page, shot, proxy.port))
        background = own | control - {"report-check.invalid"}
        assert drawing <= background, f"the report reached for {drawing - background}"
    finally:
        proxy.close()
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    inked = (pixels < 235).any(axis=2).mean()  # not white: text, rules, table bands, pictures
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert inked > 0.03 and colours > 50, (inked, colours)
    # the pictures are drawn, not broken-image icons: the bars' colours are on screen
    orange = ((abs(pixels[..., 0].astype(int) - 255) < 8) & (abs(pixels[..., 1].astype(int) - 127) < 10)
              & (pixels[..., 2] < 30)).sum()
    assert orange > 200, orange
