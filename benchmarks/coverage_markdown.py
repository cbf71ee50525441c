"""Render the JSON of ``coverage.py --out`` (and optionally ``real_models.py --json`` and
``onnxsim_peer.py --out``) as the Markdown tables of docs/coverage.md.

    python benchmarks/coverage_markdown.py coverage.json [real_models.json [onnxsim.json]] > docs/coverage.md
"""

from __future__ import annotations

import json
import sys


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def coverage_table(data: dict, onnxsim: dict | None = None) -> list[str]:
    s = data["summary"]
    sim = (onnxsim or {}).get("rows", {})
    out = [
        f"**{s['models']} timm models** (random weights, opset 17), `--ratio {data.get('ratio', 0.5)}`: "
        f"spa {s['spa_status']}; {s['pct_lose_macs']:.1f} % lose MACs; median MACs ratio "
        + ", ".join(f"{k} {v:.3f}" for k, v in s["median_macs_ratio"].items())
        + f"; oracle passed on all: {s['oracle_all_passed']}; slowest prune {s['max_prune_s'][0]} s "
        f"({s['max_prune_s'][1]}). Torch-Pruning {s['tp_status']}."
        + (f" onnxsim {onnxsim['summary']}." if onnxsim else ""),
        "",
        "| model | family | spa status | MACs after/before | oracle max diff | shapes | prune s | Torch-Pruning | TP MACs | onnxsim | onnxsim MACs | why not more |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        spa, tp = r["spa"], r.get("tp") or {}
        oracle = spa.get("oracle") or {}
        why = "; ".join(f"{c[0]} ×{c[1]}" for c in (spa.get("reasons") or [])[:2])
        out.append(
            f"| {r['model']} | {r['family']} | {spa['status']} | {_ratio(spa.get('macs_ratio'))} | "
            f"{oracle.get('max_abs_diff', float('nan')):.1e} | {'ok' if spa.get('shapes_ok') else '—'} | "
            f"{spa.get('prune_s', '—')} | {tp.get('status', '—')} | {_ratio(tp.get('macs_ratio'))} | "
            f"{sim.get(r['model'], {}).get('status', '—')} | {_ratio(sim.get(r['model'], {}).get('macs_ratio'))} | {why} |"
        )
    return out


def real_table(rows: list[dict]) -> list[str]:
    out = [
        "| model | framework | status | groups pruned/total | MACs ratio | oracle max diff | fidelity (pruned vs original, no fine-tuning) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spa = r.get("spa") or {}
        oracle = spa.get("oracle") or {}
        fidelity = r.get("fidelity") or {}
        text = fidelity.get("summary", "") if isinstance(fidelity, dict) else str(fidelity)
        diff = oracle.get("max_abs_diff")
        out.append(
            f"| {r.get('model')}{' (+inexact)' if r.get('allow_inexact') and '+inexact' not in r.get('model', '') else ''} | "
            f"{r.get('framework', '')} | {spa.get('status', '—')} | "
            f"{spa.get('groups_pruned', '—')}/{spa.get('groups_total', '—')} | {_ratio(spa.get('macs_ratio'))} | "
            f"{'—' if diff is None else f'{diff:.1e}'} | {text.replace('|', '/')} |"
        )
    return out


def main(argv: list[str]) -> None:
    lines = ["# Coverage", ""]
    onnxsim = json.load(open(argv[2])) if len(argv) > 2 else None
    lines += coverage_table(json.load(open(argv[0])), onnxsim)
    if len(argv) > 1:
        real = json.load(open(argv[1]))
        rows = real["rows"] if isinstance(real, dict) else real
        lines += ["", "## Real models", ""] + real_table(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
