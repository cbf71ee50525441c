"""Command line: ``spa prune | inspect | plan | apply``.

Exit codes (DESIGN.md): 0 done; 2 bad input or usage (one line on stderr, no traceback);
1 internal bug or a pruned model that failed verification (nothing is written then).
Only this module prints; the library logs.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from spa import io
from spa.allocate import ALLOCATIONS
from spa.criteria import CRITERIA
from spa.errors import OutputError, SpaError, UnsupportedError, UsageError, VerificationError
from spa.pipeline import PruneOptions, analyze, apply as apply_plan, execute_plan, make_plan
from spa.planning import Plan
from spa.report import Report, Timer, human
from spa.verify import parse_input_shapes, parse_input_values
from spa.viz import render_html

__all__ = ["main", "cli"]

err = Console(stderr=True)
out = Console()

# Criteria, compensation and targets that later work adds; named here so users get a reason.
PLANNED_CRITERIA = ("bn", "taylor", "snip", "grasp", "crop", "activation")
PLANNED_TARGETS = ("llvm", "cuda")


def _fail(code: int, message: str) -> None:
    err.print(f"spa: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Map exceptions to exit codes: refusals are one line, bugs keep their traceback."""
    try:
        yield
    except VerificationError as e:
        _fail(1, f"{e} — nothing was written")
    except SpaError as e:
        _fail(2, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except click.exceptions.Exit:
        raise
    except KeyboardInterrupt:
        _fail(130, "interrupted")
    except Exception:  # noqa: BLE001 - a bug: show it, exit 1
        traceback.print_exc()
        _fail(1, "internal error (a bug in spa; the traceback is above)")


class _Progress:
    """A spinner naming the current stage, on stderr, for stages that take a while."""

    def __init__(self, enabled: bool) -> None:
        self._status = err.status("starting", spinner="dots") if enabled else None

    def __enter__(self) -> Callable[[str], None] | None:
        if self._status is None:
            return None
        self._status.__enter__()
        return lambda stage: self._status.update(f"[bold]{stage}[/bold]…")

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


def _common_prune_options(f):
    options = [
        click.option("--ratio", type=float, default=0.5, show_default=True, help="Fraction of each group's channels to remove, in [0, 1)."),
        click.option("--criterion", default="l1", show_default=True, help=f"Importance criterion: {', '.join(sorted(CRITERIA))}."),
        click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True),
        click.option("--min-keep", type=float, default=0.1, show_default=True, help="Each group keeps at least this fraction (and ≥ 1)."),
        click.option("--round-to", type=int, default=1, show_default=True, help="Kept counts are multiples of N where possible."),
        click.option("--flops-target", type=float, default=None, help="Keep ≤ F of the original FLOPs (searches the ratio)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224", help="Shape for an input with dynamic dims (repeatable)."),
        click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE", help="Fill an input with a constant instead of random values (e.g. sr=16000)."),
        click.option(
            "--allow-inexact",
            is_flag=True,
            help="Also prune channels that LayerNorm/RMSNorm mix (a transformer's hidden size). Not exact: the report says which groups.",
        ),
    ]
    for o in reversed(options):
        f = o(f)
    return f


def _options(*, criterion: str, input_shapes: tuple[str, ...], input_values: tuple[str, ...] = (), **kw: Any) -> PruneOptions:
    """PruneOptions from the shared prune/plan flags (names match PruneOptions' fields)."""
    if criterion in PLANNED_CRITERIA:
        raise UnsupportedError(f"criterion '{criterion}' is not available yet (available: {', '.join(sorted(CRITERIA))})")
    opts = PruneOptions(
        criterion=criterion,
        input_shapes=parse_input_shapes(input_shapes),
        input_values=parse_input_values(input_values),
        **kw,
    )
    opts.validate()
    return opts


def _check_output(inp: str, output: str | None, in_place: bool, suffix: str = ".spa.onnx") -> pathlib.Path:
    """Decide and check the output path *before* any work, so a bad -o fails fast."""
    path = pathlib.Path(output) if output else io.default_output_path(inp)
    if os.path.exists(inp) and path.exists() and os.path.samefile(inp, path) and not in_place:
        raise OutputError(f"refusing to overwrite the input '{inp}' (use --in-place)")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write '{path}': folder '{parent}' is not writable")
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': it is a directory")
    return path


def _print_report(r: Report) -> None:
    t = Table(title="spa prune", show_lines=False)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("params", human(r.params_before), human(r.params_after), f"{r.params_ratio:.3f}")
    t.add_row("FLOPs", human(r.flops_before), human(r.flops_after), f"{r.flops_ratio:.3f}")
    if r.latency_ms_before is not None:
        t.add_row("ORT latency (ms)", f"{r.latency_ms_before:.3f}", f"{r.latency_ms_after:.3f}", f"{r.speedup:.2f}× faster")
    out.print(t)
    out.print(
        f"groups: {r.groups_total} · pruned {r.groups_pruned} · blocked {r.groups_blocked} · partly frozen {r.groups_partial}"
    )
    if r.oracle is not None:
        verdict = "exact" if r.oracle["passed"] else "NOT exact (inexact groups: " + ", ".join(r.oracle["inexact_groups"]) + ")"
        out.print(f"mask-equivalence oracle: max |diff| {r.oracle['max_abs_diff']:.3g} → {verdict}")
        if r.oracle.get("exact_part"):
            out.print(f"  the exact groups alone: max |diff| {r.oracle['exact_part']['max_abs_diff']:.3g} → exact")
    reasons: dict[str, int] = {}
    for b in r.blocked:
        for reason in b["reasons"][:1]:
            reasons[reason["code"]] = reasons.get(reason["code"], 0) + 1
    if reasons:
        out.print("frozen channels, by reason: " + ", ".join(f"{k} ×{v}" for k, v in sorted(reasons.items())))
    if r.output:
        out.print(f"wrote {r.output}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spa")
@click.option("-v", "--verbose", count=True, help="Log more (repeatable).")
def cli(verbose: int) -> None:
    """Structurally Prune Anything: exact structured pruning of ONNX models."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), default=None, help="Output path (default: MODEL.spa.onnx beside the input).")
@_common_prune_options
@click.option("--compensate", type=click.Choice(["none", "data-free", "calibration"]), default="none", show_default=True)
@click.option("--calibration", type=click.Path(), default=None, help="Calibration data (with --compensate calibration).")
@click.option("--target", default="onnx", show_default=True, help="Output form: onnx (TVM targets come later).")
@click.option("--verify", type=click.Choice(["full", "check", "none"]), default="full", show_default=True, help="full: checker + ORT oracle; check: checker only.")
@click.option("--no-bench", is_flag=True, help="Skip the ORT latency measurement.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the report JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout (for build scripts).")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--in-place", is_flag=True, help="Allow writing over the input file.")
def prune(model, output, compensate, calibration, target, verify, no_bench, report_path, as_json, quiet, in_place, **flags) -> None:
    """Prune MODEL and write the smaller model."""
    with _errors():
        if compensate != "none":
            raise UnsupportedError(f"--compensate {compensate} is not available yet (only 'none')")
        if target != "onnx":
            raise UnsupportedError(f"--target {target} is not available yet (only 'onnx')")
        opts = _options(verify=verify, benchmark=not no_bench, **flags)
        out_path = _check_output(model, output, in_place)
        with _Progress(not (quiet or as_json)) as on_stage:
            timer = Timer(on_stage)
            analysis = analyze(model, timer, allow_inexact=opts.allow_inexact, input_shapes=opts.input_shapes)
            plan, notes = make_plan(analysis, opts, timer)
            result = execute_plan(analysis, plan, opts, timer, notes)
            with timer("save"):
                written = io.save_model(result.model, out_path, source_path=model, in_place=in_place)
        result.report.output = str(written)
        result.report.timings = dict(timer.timings)
        _emit(result.report.to_json(), report_path, as_json)
        if not (quiet or as_json):
            _print_report(result.report)


def _emit(payload: dict[str, Any], path: str | None, as_json: bool) -> None:
    text = json.dumps(payload, indent=1)
    if path:
        p = pathlib.Path(path)
        if not p.resolve().parent.is_dir():
            raise OutputError(f"cannot write report '{path}': folder does not exist")
        p.write_text(text + "\n")
    if as_json:
        click.echo(text)


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write beside ``path`` first, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print groups as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list groups that are not channels (no weighted source).")
@click.option("--html", "html_path", type=click.Path(), default=None, help="Also draw the graph, coloured by group, with blocking ops marked, into this self-contained HTML file.")
def inspect(model, as_json, show_all, html_path) -> None:
    """Show MODEL's channel groups: sizes, layers, what is frozen and why."""
    with _errors():
        html_out = None
        if html_path:
            if os.path.exists(model) and os.path.exists(html_path) and os.path.samefile(model, html_path):
                raise OutputError(f"refusing to overwrite the input '{model}' with the HTML drawing")
            html_out = _check_output(model, html_path, in_place=True)
        a = analyze(model)
        if html_out is not None:
            _write_text_atomic(html_out, render_html(a))
            err.print(f"wrote {html_out}", markup=False, highlight=False, soft_wrap=True)
        cost = a.cost.count()
        groups = a.channels.groups if show_all else a.channels.candidates
        rows = []
        for g in groups:
            status = "blocked" if not g.prunable else ("partial" if g.frozen.any() else "prunable")
            rows.append(
                {
                    "group": g.id,
                    "status": status,
                    "units": g.n_units,
                    "frozen": int(g.frozen.sum()),
                    "layers": sorted({d.value for d in g.weight_dims()}),
                    "members": [str(d) for d in g.dims],
                    "reasons": [b.to_json() for b in g.reasons],
                }
            )
        if as_json:
            click.echo(json.dumps({"model": a.source, "params": cost.params, "flops": cost.flops, "macs": cost.macs, "groups": rows}, indent=1))
            return
        t = Table(title=f"{a.source}: {len(rows)} channel groups · params {human(cost.params)} · FLOPs {human(cost.flops)}")
        for col in ("group", "status", "units", "frozen", "weights", "why frozen"):
            t.add_column(col)
        for r in rows:
            weights = ", ".join(r["layers"][:3]) + (f" (+{len(r['layers']) - 3})" if len(r["layers"]) > 3 else "")
            why = "; ".join(f"{b['code']}: {b['reason']}" for b in r["reasons"][:2])
            t.add_row(r["group"], r["status"], str(r["units"]), str(r["frozen"]), weights, why)
        out.print(t)


@cli.command("plan")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the plan JSON.")
@_common_prune_options
def plan_cmd(model, output, **flags) -> None:
    """Decide what to prune (no surgery) and write the plan as JSON."""
    with _errors():
        opts = _options(**flags)
        out_path = pathlib.Path(output)
        if not out_path.resolve().parent.is_dir():
            raise OutputError(f"cannot write '{output}': folder does not exist")
        a = analyze(model, allow_inexact=opts.allow_inexact, input_shapes=opts.input_shapes)
        plan, _ = make_plan(a, opts)
        out_path.write_text(plan.dumps() + "\n")
        pruned = sum(1 for g in plan.groups if g.removed)
        err.print(f"plan: {pruned}/{len(plan.groups)} groups pruned, {len(plan.tensors)} tensors sliced → {output}")


@cli.command("apply")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), default=None)
@click.option("--verify", type=click.Choice(["full", "check", "none"]), default="full", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE")
@click.option("--report", "report_path", type=click.Path(), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--in-place", is_flag=True)
def apply_cmd(model, plan_file, output, verify, input_shapes, input_values, report_path, as_json, quiet, in_place) -> None:
    """Replay PLAN_FILE (from `spa plan`) on MODEL."""
    with _errors():
        plan = _read_plan(plan_file)
        out_path = _check_output(model, output, in_place)
        result = apply_plan(
            model, plan, verify=verify, benchmark=False,
            input_shapes=parse_input_shapes(input_shapes), input_values=parse_input_values(input_values),
        )
        written = io.save_model(result.model, out_path, source_path=model, in_place=in_place)
        result.report.output = str(written)
        _emit(result.report.to_json(), report_path, as_json)
        if not (quiet or as_json):
            _print_report(result.report)


def _read_plan(path: str) -> Plan:
    p = pathlib.Path(path)
    if not p.is_file():
        raise UsageError(f"plan '{path}' is not a file")
    try:
        return Plan.from_json(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"plan '{path}' is not a valid spa plan: {e}") from e


def main() -> None:
    cli(prog_name="spa")


if __name__ == "__main__":
    main()
