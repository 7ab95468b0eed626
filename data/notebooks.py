"""The analysis notebooks, installed with the package, on any run directory.

    python -m data.notebooks iteration_drift runs/demo_spin            # -> runs/demo_spin/iteration_drift.ipynb
    python -m data.notebooks compare_runs runs/demo_spin runs/demo_sppo --html --out compare.ipynb

Writes the notebook with its parameters (`run_dir`, or `run_dirs`) set to the given run directories (made
absolute), executed when nbclient and ipykernel are installed (the dev extra has them), and with `--html`
an HTML copy beside it (nbconvert). Open the .ipynb with `jupyter lab PATH` (`pip install jupyterlab`), or
the .html in a browser. The notebooks find the installed package, so the copy works outside a checkout.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from common.errors import DataError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"  # installed beside data/ (setup.cfg packages)
NOTEBOOKS = ("iteration_drift", "compare_runs")
CELL_TIMEOUT = 600


def write_notebook(name: str, run_dirs: list[Path], out: Path, execute: bool = True, html: bool = False) -> list[Path]:
    """The notebook `name` with its parameters set to `run_dirs`, at `out` (executed if it can be), and its
    HTML copy; returns the files written."""
    import nbformat

    for run_dir in run_dirs:
        if not (run_dir / "run.yaml").is_file():
            raise DataError(f"{run_dir}: not a run directory (no run.yaml)")
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    value = str(run_dirs[0]) if name == "iteration_drift" else [str(d) for d in run_dirs]
    cell.source += f"\n# set by python -m data.notebooks\n{'run_dir' if name == 'iteration_drift' else 'run_dirs'} = {value!r}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if execute:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(out.parent)}}).execute()
    nbformat.write(nb, out)
    written = [out]
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        written.append(out.with_suffix(".html"))
        written[-1].write_text(body)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", choices=NOTEBOOKS)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (iteration_drift takes one)")
    parser.add_argument("--out", type=Path, help="where to write the notebook (default: in the first run directory)")
    parser.add_argument("--html", action="store_true", help="also write an HTML copy (nbconvert)")
    parser.add_argument("--no-execute", action="store_true", help="write it with its parameters set, without running it")
    args = parser.parse_args(argv)
    if args.notebook == "iteration_drift" and len(args.run_dirs) != 1:
        parser.error("iteration_drift takes one run directory (compare_runs takes several)")
    run_dirs = [d.expanduser().resolve() for d in args.run_dirs]
    out = (args.out or run_dirs[0] / f"{args.notebook}.ipynb").resolve()
    missing = [m for m in ("nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    execute = not args.no_execute and not missing
    if missing and not args.no_execute:
        print(f"selfplay: {', '.join(missing)} not installed: writing the notebook unexecuted "
              f"(pip install {' '.join(missing)} to run it here)", file=sys.stderr)
    try:
        written = write_notebook(args.notebook, run_dirs, out, execute, args.html)
    except DataError as exc:
        raise SystemExit(f"selfplay: {exc}") from None
    for path in written:
        print(path)
    print(f"open it with: jupyter lab {written[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
