"""Command line: ``spa prune | inspect | plan | apply``.

Exit codes (DESIGN.md): 0 done; 2 bad input or usage (one line on stderr, no traceback);
1 internal bug or a pruned model that failed verification (nothing is written then).
Only this module prints; the library logs. Every output path is checked before any work.
"""

from __future__ import annotations

import json
import logging
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
from spa.errors import OutputError, SpaError, UsageError, VerificationError
from spa.passes.manager import DumpInstrument, PassManager, ProgressInstrument
from spa.passes.compensate import COMPENSATE
from spa.pipeline import PruneOptions, State, analyze, default_steps, run_pipeline
from spa.planning import Plan
from spa.report import Report, Timer, human
from spa.verify import parse_input_shapes, parse_input_values
from spa.viz import render_html

__all__ = ["main", "cli"]

err = Console(stderr=True)
out = Console()


def _fail(code: int, message: str) -> None:
    err.print(f"spa: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def _say(kind: str, message: str) -> None:
    err.print(f"spa: {kind}: {message}", markup=False, highlight=False, soft_wrap=True)


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
    """A spinner naming the current step, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self._status = err.status("starting", spinner="dots") if enabled else None

    def __enter__(self) -> list[Any]:
        if self._status is None:
            return []
        self._status.__enter__()
        return [ProgressInstrument(lambda step: self._status.update(f"[bold]{step}[/bold]…"))]

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


def _set_verbosity(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    if value:
        logging.getLogger().setLevel(logging.WARNING - 10 * min(value, 2))


_verbose = click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity, help="Log more (repeatable).")


def _options_decorator(options: list) -> Callable:
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f

    return deco


_input_options = _options_decorator(
    [
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224", help="Shape for an input with dynamic dims (repeatable); used by every count, the oracle and the benchmark."),
        click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE", help="Fill an input with a constant instead of random values (e.g. sr=16000)."),
    ]
)

_plan_options = _options_decorator(
    [
        click.option("--ratio", type=float, default=0.5, show_default=True, help="Fraction of each group's channels to remove, in [0, 1)."),
        click.option("--criterion", type=click.Choice(sorted(CRITERIA)), default="l1", show_default=True, help="Importance criterion, aggregated over every coupled weight of a group."),
        click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True, help="uniform: the same ratio per group; global: one threshold over normalised scores."),
        click.option("--min-keep", type=float, default=0.1, show_default=True, help="Every layer keeps at least this fraction of its channels (and ≥ 1)."),
        click.option("--round-to", type=int, default=1, show_default=True, help="Every layer's kept channel count is a multiple of N where it has ≥ N channels."),
        click.option("--flops-target", type=float, default=None, help="Keep ≤ F of the original FLOPs (the ratio is searched)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random criterion and of the verification inputs."),
        _input_options,
        click.option("--allow-inexact", is_flag=True, help="Also prune channels that LayerNorm/RMSNorm mix (a transformer's hidden size). Not exact: the report says which groups."),
        click.option("--keep-weight-inputs", is_flag=True, help="Keep initializers that are also graph inputs (old IR<4 files) as overridable inputs; their channels stay frozen."),
        click.option("--compensate", type=click.Choice(list(COMPENSATE)), default="none", show_default=True, help="Repair the layers that read removed channels: data-free (BatchNorm statistics, no data) or calibration (least squares on --calibration data)."),
        click.option("--calibration", type=click.Path(exists=False), default=None, metavar="DATA", help="Calibration inputs: a .npz keyed by input name, or a folder of .npy files (samples on axis 0)."),
        click.option("--calibration-samples", type=int, default=128, show_default=True, help="Use at most N calibration samples."),
    ]
)

_KEEP_OPSET_HELP = ("An input at opset 7–10 is upgraded to 13 to be pruned: write the output back at the input's opset "
                    "(checked in ONNX Runtime; where the converter cannot go back, a warning and opset 13).")

_run_options = _options_decorator(
    [
        click.option("--verify", type=click.Choice(["full", "check", "none"]), default="full", show_default=True, help="full: checker + ORT + mask oracle; check: checker only; none: nothing."),
        click.option("--report", "report_path", type=click.Path(), default=None, help="Write the report JSON here."),
        click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout (for build scripts)."),
        click.option("--quiet", is_flag=True, help="Print nothing on success."),
        click.option("--in-place", is_flag=True, help="Allow writing over the input file (never done otherwise)."),
        click.option("--dump-dir", type=click.Path(file_okay=False), default=None, help="Write the model after every step that changes it into DIR (NN-step.onnx), for debugging."),
        click.option("--explain", is_flag=True, help="Print the steps that would run for these options, and exit."),
        _verbose,
    ]
)


def _prune_options(*, input_shapes: tuple[str, ...] = (), input_values: tuple[str, ...] = (), **kw: Any) -> PruneOptions:
    """PruneOptions from the CLI flags (names match PruneOptions' fields)."""
    opts = PruneOptions(input_shapes=parse_input_shapes(input_shapes), input_values=parse_input_values(input_values), **kw)
    opts.validate()
    return opts


def _check_dump_dir(path: str | None) -> pathlib.Path | None:
    if path is None:
        return None
    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"--dump-dir {path}: is a file")
    if not p.exists():
        io.check_output_path(p)  # its parent must exist and be writable
        p.mkdir()
    else:
        io.check_output_path(p / "x.onnx")
    return p


def _explain(state: State, mode: str) -> None:
    t = Table(title=f"spa {mode}: the steps for these options", show_lines=False)
    for col in ("#", "step", "runs", "what it does"):
        t.add_column(col)
    for i, (name, on, why) in enumerate(PassManager(default_steps(mode=mode)).explain(state), 1):
        t.add_row(str(i), name, "yes" if on else "no", why)
    out.print(t)


def _run(state: State, mode: str, *, as_json: bool, quiet: bool, explain: bool, dump_dir: str | None) -> None:
    """Check every output path, then run the pipeline and print what it did."""
    if state.output_path is not None:
        state.output_path = io.check_output_path(state.output_path, source_path=state.source_path, in_place=state.in_place)
    if state.report_path is not None:
        state.report_path = io.check_output_path(state.report_path, source_path=state.source_path)
    if explain:
        _explain(state, mode)
        return
    dump = _check_dump_dir(dump_dir)
    timer = Timer()
    with _Progress(not (quiet or as_json)) as instruments:
        if dump is not None:
            instruments.append(DumpInstrument(dump))
        run_pipeline(state, mode=mode, timer=timer, instruments=instruments)
    report = state.report
    if as_json:
        click.echo(report.dumps())
    if not quiet:
        for w in report.warnings:
            _say("warning", w)
    if not (quiet or as_json):
        _print_report(report)


class _OneLineErrors(click.Group):
    """Usage errors as one line (``spa: error: …``, exit 2), like every other refusal."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "spa", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
            sys.exit(2)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            _fail(2, e.format_message().splitlines()[0] + (f" (see {ctx.command_path} --help)" if ctx is not None else ""))
        except click.exceptions.Abort:
            _fail(130, "interrupted")
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spa")
@click.option("-v", "--verbose", count=True, help="Log more (repeatable; also accepted after the command).")
def cli(verbose: int) -> None:
    """Structurally Prune Anything: exact structured pruning of ONNX models."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), default=None, help="Output path (default: MODEL.spa.onnx beside the input).")
@_plan_options
@click.option("--no-bench", is_flag=True, help="Skip the side-by-side ORT latency measurement.")
@click.option("--keep-opset", is_flag=True, help=_KEEP_OPSET_HELP)
@_run_options
def prune(model, output, no_bench, verify, report_path, as_json, quiet, in_place, dump_dir, explain, **flags) -> None:
    """Prune MODEL and write the smaller model."""
    with _errors():
        opts = _prune_options(verify=verify, benchmark=not no_bench, **flags)
        state = State(
            source=model, options=opts, source_path=model, in_place=in_place,
            output_path=pathlib.Path(output) if output else io.default_output_path(model),
            report_path=pathlib.Path(report_path) if report_path else None,
        )
        _run(state, "prune", as_json=as_json, quiet=quiet, explain=explain, dump_dir=dump_dir)


@cli.command("plan")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the plan JSON.")
@_plan_options
@_verbose
def plan_cmd(model, output, **flags) -> None:
    """Decide what to prune (no surgery) and write the plan as JSON."""
    with _errors():
        opts = _prune_options(**flags)
        out_path = io.check_output_path(output, source_path=model)
        state = run_pipeline(State(source=model, options=opts), mode="plan")
        io.write_text_atomic(out_path, state.plan.dumps() + "\n")
        pruned = sum(1 for g in state.plan.groups if g.removed)
        err.print(f"plan: {pruned}/{len(state.plan.groups)} groups pruned, {len(state.plan.tensors)} tensors sliced → {output}", markup=False, highlight=False)


@cli.command("apply")
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), default=None, help="Output path (default: MODEL.spa.onnx beside the input).")
@_input_options
@click.option("--bench", is_flag=True, help="Also measure ORT latency side by side.")
@click.option("--keep-opset", is_flag=True, help=_KEEP_OPSET_HELP)
@_run_options
def apply_cmd(model, plan_file, output, input_shapes, input_values, bench, keep_opset, verify, report_path, as_json, quiet, in_place, dump_dir, explain) -> None:
    """Replay PLAN_FILE (from `spa plan`) on MODEL."""
    with _errors():
        plan = _read_plan(plan_file)
        opts = _prune_options(**{**plan.options, "verify": verify, "benchmark": bench, "input_shapes": input_shapes, "input_values": input_values, "keep_opset": keep_opset})
        state = State(
            source=model, options=opts, plan=plan, source_path=model, in_place=in_place,
            output_path=pathlib.Path(output) if output else io.default_output_path(model),
            report_path=pathlib.Path(report_path) if report_path else None,
        )
        _run(state, "apply", as_json=as_json, quiet=quiet, explain=explain, dump_dir=dump_dir)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@_input_options
@click.option("--json", "as_json", is_flag=True, help="Print groups as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list groups that are not channels (no weighted source).")
@click.option("--html", "html_path", type=click.Path(), default=None, help="Also draw the graph, coloured by group, with freezing ops marked, into this self-contained HTML file.")
@click.option("--allow-inexact", is_flag=True, help="Analyze as `prune --allow-inexact` would.")
@_verbose
def inspect(model, input_shapes, input_values, as_json, show_all, html_path, allow_inexact) -> None:
    """Show MODEL's channel groups: sizes, layers, what is frozen and why."""
    with _errors():
        parse_input_values(input_values)  # checked like prune's, though inspect runs nothing
        html_out = io.check_output_path(html_path, source_path=model) if html_path else None
        a = analyze(model, allow_inexact=allow_inexact, input_shapes=parse_input_shapes(input_shapes))
        if html_out is not None:
            io.write_text_atomic(html_out, render_html(a))
            err.print(f"wrote {html_out}", markup=False, highlight=False, soft_wrap=True)
        cost = a.cost.count()
        groups = a.channels.groups if show_all else a.channels.candidates
        rows = []
        for g in groups:
            status = "frozen" if not g.prunable else ("partly frozen" if g.frozen.any() else "prunable")
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


def _latency_cells(r: Report) -> tuple[str, str, str]:
    (b10, b90), (a10, a90) = r.latency_p10_p90_ms or ([r.latency_ms_before] * 2, [r.latency_ms_after] * 2)
    before = f"{r.latency_ms_before:.3f} ({b10:.3f}–{b90:.3f})"
    after = f"{r.latency_ms_after:.3f} ({a10:.3f}–{a90:.3f})"
    if r.latency_significant is False:
        return before, after, "no significant change"
    ratio = r.latency_ms_after / r.latency_ms_before
    return before, after, f"{ratio:.3f} ({r.speedup:.2f}× {'faster' if ratio < 1 else 'slower'})"


def _print_report(r: Report) -> None:
    t = Table(title="spa prune", show_lines=False)
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("after/before", "right")):
        t.add_column(col, justify=justify)
    t.add_row("params", human(r.params_before), human(r.params_after), f"{r.params_ratio:.3f}")
    t.add_row("FLOPs", human(r.flops_before), human(r.flops_after), f"{r.flops_ratio:.3f}")
    if r.latency_ms_before is not None:
        t.add_row("ORT ms: median (p10–p90)", *_latency_cells(r))
    out.print(t)
    out.print(f"groups: {r.groups_total} · pruned {r.groups_pruned} · frozen {r.groups_blocked} · partly frozen {r.groups_partial}")
    if r.oracle is not None:
        o = r.oracle
        if o.get("asserted", True):
            out.print(f"mask-equivalence oracle: max |diff| {o['max_abs_diff']:.3g} → exact (the surgery is proven)")
        else:
            out.print(
                f"mask-equivalence oracle: max |diff| {o['max_abs_diff']:.3g} — not a proof: groups "
                f"{', '.join(o['inexact_groups'])} mix channels (--allow-inexact)"
            )
            if o.get("exact_part"):
                out.print(f"  the other groups alone: max |diff| {o['exact_part']['max_abs_diff']:.3g} → proven")
    reasons: dict[str, int] = {}
    for b in r.blocked:
        for reason in b["reasons"][:1]:
            reasons[reason["code"]] = reasons.get(reason["code"], 0) + 1
    if reasons:
        out.print("frozen channels, by reason: " + ", ".join(f"{k} ×{v}" for k, v in sorted(reasons.items())))
    for note in r.notes:
        out.print(f"note: {note}")
    if r.output:
        out.print(f"wrote {r.output}")


def _read_plan(path: str) -> Plan:
    """``Plan.load``: a missing, unreadable or invalid plan is a PlanError (exit 2) naming the
    field ("plan 'p.json': groups[3].removed is missing")."""
    return Plan.load(path)


def main() -> None:
    cli(prog_name="spa")


if __name__ == "__main__":
    main()
