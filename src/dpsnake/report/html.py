"""Self-contained HTML pages: inline CSS, tables from pandas, plots as base64 PNG ``<img>``."""

from __future__ import annotations

import html as _html

import pandas as pd

CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table.data { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.data th { background: #f0f0f0; } table.data td:first-child { text-align: left; }
img.plot { max-width: 100%; display: block; margin: 0.6em 0; border: 1px solid #eee; }
.ok { color: #1a7f1a; font-weight: bold; } .no { color: #b02020; font-weight: bold; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: #666; font-size: 0.9em; } nav a { margin-right: 1em; }
"""


def esc(text) -> str:
    return _html.escape(str(text))


def table(df: pd.DataFrame, floatfmt: str = "{:.4g}", empty: str = "no data yet") -> str:
    """A DataFrame as an HTML table (or the note ``empty`` when it has no rows)."""
    if df is None or not len(df):
        return f'<p class="note">({esc(empty)})</p>'
    # columns with no value at all (e.g. virial trust levels when only forces are used) are not shown
    df = df.loc[:, [c for c in df.columns if df[c].notna().any() and (df[c] != "").any()]].copy()
    for c in df.columns[df.dtypes.eq(object)]:  # None in text columns: show blank, as NaN is
        df[c] = ["" if v is None else v for v in df[c]]
    body = df.to_html(index=False, classes="data", border=0, na_rep="", float_format=lambda v: floatfmt.format(v))
    return f'<div class="scroll">{body}</div>'  # wide tables scroll instead of being cut off


def image(b64: str | None, alt: str) -> str:
    """An embedded PNG, or a note when there was nothing to plot."""
    if not b64:
        return f'<p class="note">({esc(alt)}: nothing to plot yet)</p>'
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def section(title: str, *parts: str, anchor: str | None = None) -> str:
    a = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h2{a}>{esc(title)}</h2>\n" + "\n".join(parts)


def page(title: str, body: list[str], nav: list[tuple[str, str]] | None = None) -> str:
    """A complete HTML document; ``nav``: (href, label) links shown at the top."""
    links = "".join(f'<a href="{esc(h)}">{esc(t)}</a>' for h, t in (nav or []))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<nav>{links}</nav>\n<h1>{esc(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
