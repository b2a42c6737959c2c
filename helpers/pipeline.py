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
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from . import __version__
from .artifacts import file_digest, fingerprint, read_json, write_json

PROJECT = Path(__file__).resolve().parent.parent
KERNEL = "kd-gsm"


def load_profile(profile: str | Path, configs_dir: str | Path | None = None) -> dict:
    """Read ``configs/<profile>.yaml`` (or a path) and check its shape."""
    path = Path(profile)
    if not path.suffix:
        path = Path(configs_dir or PROJECT / "configs") / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(configs_dir or PROJECT / "configs").glob("*.yaml"))
        raise FileNotFoundError(f"profile {str(profile)!r} not found at {path}; known profiles: {', '.join(known)}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a profile is a mapping with run, params and stages")
    for key, kind in (("run", str), ("params", dict), ("stages", list)):
        if not isinstance(cfg.get(key), kind):
            raise ValueError(f"{path}: field {key!r} must be a {kind.__name__}")
    for i, st in enumerate(cfg["stages"]):
        if not isinstance(st, dict) or "notebook" not in st:
            raise ValueError(f"{path}: stage {i + 1} needs a 'notebook' field")
        st.setdefault("name", st["notebook"])
        st.setdefault("params", {})
        st.setdefault("inputs", [])
    cfg["path"] = str(path)
    return cfg


def parse_set(items: list[str]) -> dict:
    """``["n_test=8", "student=/models/x"]`` -> dict, values read as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def ensure_kernel() -> str:
    """A Jupyter kernel that runs this very Python (so notebooks see the same packages)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        if spec.argv and Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL, display_name="Python (kd-gsm)", prefix=sys.prefix)
    return KERNEL


def stage_plan(cfg: dict, root: Path, overrides: dict | None = None) -> list[dict]:
    """Per stage: notebook path, output path, parameters and fingerprint."""
    import papermill as pm

    run = str((overrides or {}).get("run_name") or cfg["run"])
    results_dir, logs_dir = root / "results" / run, root / "logs" / run
    plan = []
    for st in cfg["stages"]:
        nb = PROJECT / "notebooks" / (st["notebook"] if st["notebook"].endswith(".ipynb") else st["notebook"] + ".ipynb")
        if not nb.is_file():
            raise FileNotFoundError(f"stage {st['name']!r}: notebook {nb} not found")
        declared = set(pm.inspect_notebook(str(nb)))
        given = {**cfg["params"], **st["params"], **(overrides or {}),
                 "run_name": run, "results_dir": str(results_dir), "logs_dir": str(logs_dir)}
        for name, extra in _instances(st, given):
            params = {k: v for k, v in {**given, **extra}.items() if k in declared}
            plan.append({"name": name, "notebook": nb, "params": params, "inputs": st["inputs"],
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
                          f"(execution count {e.exec_count}): {e.ename}: {e.evalue}\n"
                          f"  the executed notebook with the traceback: {failed}") from None
    except BaseException:
        if running.exists():
            os.replace(running, failed)
        raise
    os.replace(running, out)


class StageFailed(RuntimeError):
    pass


def run_profile(profile: str | Path = "quick", *, root: str | Path = ".", only: list[str] | None = None,
                force: bool = False, overrides: dict | None = None, log_output: bool = False) -> list[str]:
    """Run (or skip) each stage of a profile in order; returns the names of the stages executed."""
    cfg = load_profile(profile)
    root = Path(root).resolve()
    plan = stage_plan(cfg, root, overrides)
    names = [s["name"] for s in plan]
    selected = lambda name, o: name == o or name.startswith(o + "-")  # noqa: E731  (02_distill = all variants)
    for o in only or []:
        if not any(selected(n, o) for n in names):
            raise ValueError(f"--only {o!r}: no such stage in {cfg['path']}; stages: {', '.join(names)}")
    kernel = ensure_kernel()
    executed = []
    run = (overrides or {}).get("run_name") or cfg["run"]
    print(f"profile {Path(cfg['path']).stem}: run {run!r}, {len(plan)} stage(s), "
          f"results in {root / 'results' / str(run)}, tables in {root / 'logs' / str(run)}", flush=True)
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
        run_stage(stage, kernel=kernel, log_output=log_output)
        write_json(stage["record"], {"stage": stage["name"], "fingerprint": stage["fingerprint"],
                                     "params": stage["params"], "seconds": round(time.time() - t0, 1),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{tag}: finished in {time.time() - t0:.0f} s", flush=True)
        executed.append(stage["name"])
    return executed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", help="name in configs/ or a path to a YAML profile (default: quick)")
    ap.add_argument("--root", default=".", help="where results/ and logs/ go (default: the current directory)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    ap.add_argument("--force", action="store_true", help="re-run stages even if they are done")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters, e.g. n_test=8")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    args = ap.parse_args(argv)
    if args.log_output:  # papermill streams cell output through logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_profile(args.profile, root=args.root, only=args.only, force=args.force,
                    overrides=parse_set(args.set), log_output=args.log_output)
    except (StageFailed, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
