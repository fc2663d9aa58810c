"""Rank the kernels of an ``ncu --csv --page raw --metrics gpu__time_duration.sum`` run by total time.

python bench/profiling/ncu_summary.py ncu_times.csv [--json out.json]   (last line: HOTTEST <name>)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    text = pathlib.Path(a.csv).read_text()
    start = text.find('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    tot, cnt = {}, {}
    for r in rows:
        name = r.get("Kernel Name", "")
        try:
            t = float(r["gpu__time_duration.sum"].replace(",", ""))
        except (KeyError, ValueError):
            continue  # the units row
        tot[name] = tot.get(name, 0.0) + t
        cnt[name] = cnt.get(name, 0) + 1
    unit = rows[0].get("gpu__time_duration.sum", "") if rows else ""
    allt = sum(tot.values())
    ranked = sorted(tot.items(), key=lambda kv: -kv[1])
    print(f"{len(rows) - 1} kernels, {allt:,.0f} {unit} in total (kernels serialised by ncu)")
    print(f"| kernel | launches | time ({unit}) | share |")
    print("|---|---|---|---|")
    for name, t in ranked[:20]:
        print(f"| {name[:60]} | {cnt[name]} | {t:,.0f} | {100 * t / allt:.1f}% |")
    if a.json:
        pathlib.Path(a.json).write_text(
            json.dumps({"unit": unit, "total": allt, "kernels": [[n, cnt[n], t] for n, t in ranked]}, indent=1)
        )
    # ncu --kernel-name matches the function's base name: "void cutlass::Kernel2<...>(...)" -> Kernel2
    base = [n.removeprefix("void ").split("(")[0].split("<")[0].split("::")[-1].strip() for n, _ in ranked]
    if base:
        print("HOTTEST", base[0])
    ours = [b for b in base if b.startswith(("tab_", "emb_", "dps_", "select_"))]
    if ours:
        print("HOTTEST_OURS", ours[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
