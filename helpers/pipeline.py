"""Run the notebooks in order with papermill, parameters from a profile in ``configs/``.

    python -m helpers.pipeline                    # the quick profile
    python -m helpers.pipeline --profile smoke --set n_test=8
    python -m helpers.pipeline --profile full --only 03_assess --force

A profile (YAML) has a ``run`` name, shared ``params`` and a list of ``stages``; each stage is
a notebook plus its own params. Every notebook gets the params its parameters cell declares,
plus ``run_name``, ``results_dir`` and ``logs_dir``. Executed notebooks go to
``results/<run>/notebooks/``. A stage whose fingerprint (notebook, parameters, input files)
matches the one recorded after its last success is skipped, so an interrupted or repeated
run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml

from . import __version__, report, settings
from .artifacts import exclusive, file_digest, fingerprint, one_line, read_json, write_json

PROJECT = Path(__file__).resolve().parent.parent
KERNEL = "kd-gsm"


STAGE_KEYS = settings.STAGE_KEYS
load_profile = settings.load_profile


def parse_set(items: list[str]) -> dict:
    """``["n_test=8", "student=/models/x"]`` -> dict, values read as YAML scalars (``2e-5`` is a number)."""
    return dict(settings.parse_assignment(item) for item in items)


def _kernel_is_ours() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        return False
    return bool(spec.argv) and Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()


def ensure_kernel() -> str:
    """A Jupyter kernel that runs this very Python (so notebooks see the same packages). Runs
    started at once (two test workers, two terminals) install it one after the other: the
    installer replaces the kernel's folder, which another installer may be copying."""
    if _kernel_is_ours():
        return KERNEL
    from ipykernel.kernelspec import install

    with exclusive(Path(sys.prefix) / "share" / "jupyter" / f".{KERNEL}-kernel.lock"):
        if not _kernel_is_ours():
            install(kernel_name=KERNEL, display_name="Python (kd-gsm)", prefix=sys.prefix)
    return KERNEL


def stage_plan(cfg: dict, root: Path, overrides: dict | None = None) -> list[dict]:
    """Per stage: notebook path, output path, checked parameters and where its record goes.

    Every stage's merged parameters (profile, stage, ``--set``) are checked against
    ``helpers.settings`` here, before anything runs; a problem raises ``SettingsError``."""
    import papermill as pm

    overrides = dict(overrides or {})
    run = settings.check_value(settings.PARAMS["run_name"], overrides.get("run_name") or cfg["run"],
                          "--set: " if overrides.get("run_name") else f"{cfg['path']}: run: ")
    results_dir, logs_dir = root / "results" / run, root / "logs" / run
    notebooks, declared = {}, {}
    for st in cfg["stages"]:
        nb = PROJECT / "notebooks" / (st["notebook"] if st["notebook"].endswith(".ipynb") else st["notebook"] + ".ipynb")
        if not nb.is_file():
            raise FileNotFoundError(f"stage {st['name']!r}: notebook {nb} not found")
        notebooks[st["name"]], declared[st["name"]] = nb, set(pm.inspect_notebook(str(nb)))
    readers = set().union(*declared.values()) | {src for st in cfg["stages"] for src in (st.get("each") or {}).values()}
    plan = []
    for st in cfg["stages"]:
        given = settings.apply_overrides({**cfg["params"], **st["params"]}, overrides)
        origins = {**{k: cfg["path"] for k in cfg["params"]},
                   **{k: f"{cfg['path']} (stage {st['name']})" for k in st["params"]},
                   **{k.split(".")[0]: "--set" for k in overrides}}
        for k in given:
            if k in settings.PARAMS and settings.PARAMS[k].runner:
                raise settings.SettingsError(f"{origins[k]}: {k!r} is set by the runner; leave it out")
        given = settings.check_params(given, origins=origins, readers=readers)
        given.update(run_name=run, results_dir=str(results_dir), logs_dir=str(logs_dir))
        for name, extra in _instances(st, given):
            params = {k: v for k, v in {**given, **extra}.items() if k in declared[st["name"]]}
            plan.append({"name": name, "notebook": notebooks[st["name"]], "params": params, "inputs": st["inputs"],
                         "output": results_dir / "notebooks" / f"{name}.ipynb",
                         "record": results_dir / "stages" / f"{name}.json"})
    return plan


def stage_fingerprint(stage: dict, root: Path, run: str) -> str:
    """Notebook, parameters and input files of a stage, hashed. Taken just before the stage
    would run, so that it sees what the stages before it have written."""
    return fingerprint({"notebook": file_digest(stage["notebook"]), "params": stage["params"],
                        "inputs": _input_digests(root, stage["inputs"], run), "helpers_version": __version__})


def _instances(stage: dict, given: dict) -> list[tuple[str, dict]]:
    """One stage, or one instance per entry when the stage has ``each: {param: collection}``.

    ``each: {variant: variants}`` runs the notebook once per key of the ``variants`` mapping with
    ``variant=<key>`` and ``variant_spec=<its mapping>``, named ``<stage>-<key>``.
    """
    each = stage.get("each")
    if not each:
        return [(stage["name"], {})]
    if not (isinstance(each, dict) and len(each) == 1):
        raise ValueError(f"stage {stage['name']!r}: 'each' must be one 'param: collection' pair")
    (param, source), = each.items()
    items = given.get(source)
    if isinstance(items, list):
        items = {str(x): {} for x in items}
    if not isinstance(items, dict) or not items:
        raise ValueError(f"stage {stage['name']!r}: 'each' needs a non-empty mapping or list in params.{source}")
    return [(f"{stage['name']}-{key}", {param: key, f"{param}_spec": spec or {}}) for key, spec in items.items()]


def _input_digests(root: Path, patterns: list[str], run: str) -> dict[str, str | None]:
    """Digest of each input file (glob patterns allowed, relative to ``root``); absent files count as None."""
    out: dict[str, str | None] = {}
    for pat in patterns:
        pat = pat.format(run=run)
        matches = sorted(root.glob(pat)) if any(c in pat for c in "*?[") else [root / pat]
        for p in matches:
            out[str(p.relative_to(root))] = file_digest(p)
        if not matches:
            out[pat] = None
    return out


def run_stage(stage: dict, *, kernel: str, log_output: bool = False) -> None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out = stage["output"]
    out.parent.mkdir(parents=True, exist_ok=True)
    running = out.with_name(f".{out.stem}.running.ipynb")
    failed = out.with_name(f"{out.stem}.failed.ipynb")
    failed.unlink(missing_ok=True)
    try:
        pm.execute_notebook(str(stage["notebook"]), str(running), parameters=stage["params"],
                            kernel_name=kernel, progress_bar=True, log_output=log_output,
                            cwd=str(stage["notebook"].parent))
    except PapermillExecutionError as e:
        os.replace(running, failed)
        raise StageFailed(f"stage {stage['name']!r} failed in cell {e.cell_index} "
                          f"(execution count {e.exec_count}): {e.ename}: {one_line(e.evalue)} "
                          f"[traceback in {failed}]") from None
    except BaseException:
        if running.exists():
            os.replace(running, failed)
        raise
    os.replace(running, out)


class StageFailed(RuntimeError):
    pass


class RunLocked(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(results_dir: Path) -> Iterator[Path]:
    """Hold ``results_dir/.lock`` (our pid) while a run writes there; another live holder is refused,
    a lock left by a process that no longer exists is taken over."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lock = results_dir / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_json(lock) or {}
            pid = holder.get("pid")
            if isinstance(pid, int) and holder.get("host") == me["host"] and not _alive(pid):
                print(f"note: removing a stale lock {lock} (pid {pid} no longer runs)", flush=True)
                lock.unlink(missing_ok=True)
                continue
            if not holder:  # being written this instant, or unreadable: look again
                time.sleep(0.2)
                holder = read_json(lock) or {}
                if not holder and lock.exists():
                    raise RunLocked(f"{lock} exists but cannot be read; if no run is using {results_dir}, delete it")
                continue
            raise RunLocked(f"{results_dir} is in use by another run (pid {pid} on {holder.get('host')}, since "
                            f"{holder.get('since')}: {holder.get('command', '?')}); wait for it to finish, or use "
                            f"another --set run_name=...; if that process is gone, delete {lock}")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunLocked(f"could not take the lock {lock}")
    try:
        yield lock
    finally:
        if (read_json(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_profile(profile: str | Path = "quick", *, root: str | Path = ".", only: list[str] | None = None,
                force: bool = False, overrides: dict | None = None, log_output: bool = False,
                check: bool = False) -> list[str]:
    """Run (or skip) each stage of a profile in order; returns the names of the stages executed.
    ``check=True`` validates every setting and prints the resolved plan, running nothing."""
    cfg = load_profile(profile)
    root = Path(root).resolve()
    plan = stage_plan(cfg, root, overrides)
    names = [s["name"] for s in plan]
    selected = lambda name, o: name == o or name.startswith(o + "-")  # noqa: E731  (02_distill = all variants)
    for o in only or []:
        if not any(selected(n, o) for n in names):
            raise ValueError(f"--only {o!r}: no such stage in {cfg['path']}; stages: {', '.join(names)}")
    run = plan[0]["params"]["run_name"] if plan else str((overrides or {}).get("run_name") or cfg["run"])
    results_dir = root / "results" / str(run)
    if check:
        print(describe_plan(cfg, plan, run, root), flush=True)
        return []
    executed, machine = [], None
    with run_lock(results_dir):
        kernel = ensure_kernel()
        print(f"profile {Path(cfg['path']).stem}: run {run!r}, {len(plan)} stage(s), "
              f"results in {results_dir}, tables in {root / 'logs' / str(run)}", flush=True)
        for i, stage in enumerate(plan, 1):
            tag = f"[{i}/{len(plan)}] {stage['name']}"
            if only and not any(selected(stage["name"], o) for o in only):
                print(f"{tag}: not selected", flush=True)
                continue
            record = read_json(stage["record"])
            stage["fingerprint"] = stage_fingerprint(stage, root, str(run))
            if not force and record and record.get("fingerprint") == stage["fingerprint"] and stage["output"].is_file():
                print(f"{tag}: done already (same parameters and inputs), skipped", flush=True)
                continue
            print(f"{tag}: running {stage['notebook'].name} -> {stage['output']}", flush=True)
            t0 = time.time()
            stage["record"].unlink(missing_ok=True)  # a stage that fails now is not done
            run_stage(stage, kernel=kernel, log_output=log_output)
            seconds = round(time.time() - t0, 1)
            machine = machine or report.probe_environment()  # once per run, in a child: CUDA stays out of here
            write_json(stage["record"], {"stage": stage["name"], "fingerprint": stage["fingerprint"],
                                         "params": stage["params"], "seconds": seconds,
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": machine})
            print(f"{tag}: finished in {time.time() - t0:.0f} s", flush=True)
            executed.append(stage["name"])
        write_run_report(root / "logs" / str(run), results_dir)
    return executed


def write_run_report(logs_dir: Path, results_dir: Path) -> None:
    """``logs/<run>/report.html`` from whatever the run holds now (also when every stage was
    skipped); a page that cannot be written is a note, never a failed run."""
    if not logs_dir.is_dir():
        return
    try:
        path = report.write_report(logs_dir, results_dir)
        print(f"report: {path}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"note: {logs_dir / report.REPORT} not written: {type(e).__name__}: {one_line(e)}", flush=True)


def describe_plan(cfg: dict, plan: list[dict], run: str, root: Path) -> str:
    """The resolved settings of every stage, as ``--check`` prints them."""
    shared = {k: v for k, v in plan[0]["params"].items()} if plan else {}
    for st in plan[1:]:
        shared = {k: v for k, v in shared.items() if k in st["params"] and st["params"][k] == v}
    flat = lambda v: yaml.safe_dump(v, default_flow_style=True, width=10_000, allow_unicode=True).strip().removesuffix("...").strip()  # noqa: E731
    lines = [f"profile {cfg['path']}: run {run!r}, {len(plan)} stage(s), results in {root / 'results' / run}",
             "all settings are valid. Shared by every stage:"]
    lines += [f"  {k}: {flat(v)}" for k, v in sorted(shared.items())]
    for i, st in enumerate(plan, 1):
        own = {k: v for k, v in st["params"].items() if k not in shared}
        lines.append(f"[{i}/{len(plan)}] {st['name']} ({st['notebook'].name}):" + ("" if own else " nothing else"))
        lines += [f"  {k}: {flat(v)}" for k, v in sorted(own.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", help="name in configs/ or a path to a YAML profile (default: quick)")
    ap.add_argument("--root", default=".", help="where results/ and logs/ go (default: the current directory)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    ap.add_argument("--force", action="store_true", help="re-run stages even if they are done")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters, e.g. n_test=8")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    ap.add_argument("--check", action="store_true", help="validate the settings and print them; run nothing")
    args = ap.parse_args(argv)
    if args.log_output:  # papermill streams cell output through logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_profile(args.profile, root=args.root, only=args.only, force=args.force,
                    overrides=parse_set(args.set), log_output=args.log_output, check=args.check)
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, the next run resumes", file=sys.stderr)
        return 130
    except (StageFailed, RunLocked, settings.SettingsError, FileNotFoundError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  (one line, whatever went wrong)
        print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
