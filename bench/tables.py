"""The Markdown tables of docs/benchmarks.md, printed from the current results in bench/results/.

python bench/tables.py [DEVICE]        (default h200: engine_DEVICE.json, md*_DEVICE.json)
"""

from __future__ import annotations

import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
COLS = [
    ("dpsnake", "double", "double nets"),
    ("dpsnake-tab", "double", "double tab"),
    ("deepmd-pt", "double", "DeePMD-kit FP64"),
    ("dpsnake", "mixed", "mixed nets"),
    ("dpsnake-tab", "mixed", "mixed tab"),
    ("dpsnake-tab-tf32", "mixed", "mixed tab+TF32"),
    ("deepmd-pt", "mixed", "DeePMD-kit FP32"),
]
CASES = {"single": "one system", "batched": "256 systems x 108 atoms, one call", "model_devi": "4-model deviation"}


def engine(dev: str) -> None:
    rows = {}
    for r in json.loads((RESULTS / f"engine_{dev}.json").read_text()):
        if "bench" not in r or "code" not in r:
            continue
        prec = {"float64": "double", "float32": "mixed"}.get(r["prec"], r["prec"])
        val = r.get("us_per_atom", r.get("us_per_frame_atom"))
        key = (r["bench"], r["natoms"] * r.get("nframes", 1))
        rows.setdefault(key, {})[(r["code"], prec)] = "out of memory" if val is None else f"{val:.3f}"
    print("| us per atom per force call | atoms | " + " | ".join(c[2] for c in COLS) + " |")
    print("|---|---|" + "---|" * len(COLS))
    order = sorted(rows, key=lambda k: (k[0] != "single", k[0] == "model_devi", k[1]))
    for bench, nat in order:
        cells = " | ".join(rows[(bench, nat)].get(c[:2], "-") for c in COLS)
        print(f"| {CASES[bench]} | {nat:,} | {cells} |")


def md(dev: str) -> None:
    cases = [("md", "NPT nets"), ("md_tab", "NPT tab"), ("md_tab_nvt", "NVT tab")]
    runs = {k: json.loads(p.read_text()) for k, _ in cases if (p := RESULTS / f"{k}_{dev}.json").is_file()}
    print("| ms per step | " + " | ".join(name for k, name in cases if k in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for part, label in (("explore", "explore (the real loop)"), ("force", "force only"), ("integrator", "integrator")):
        print(f"| {label} | " + " | ".join(f"{1e3 * r['seconds_per_step'][part]:.2f}" for r in runs.values()) + " |")
    cells = []
    for r in runs.values():
        ov = r["rounds"]["overhead"]
        cells.append(f"{100 * r['md_overhead_over_force']:.1f}% ({100 * min(ov):.1f} to {100 * max(ov):.1f})")
    print("| MD overhead over force (rounds) | " + " | ".join(cells) + " |")


def main() -> int:
    dev = sys.argv[1] if len(sys.argv) > 1 else "h200"
    engine(dev)
    print()
    md(dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
