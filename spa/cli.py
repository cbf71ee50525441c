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

from spa import io, safety
from spa.allocate import ALLOCATIONS
from spa.criteria import CRITERIA
from spa.errors import OutputError, SpaError, UsageError, VerificationError
from spa.factorize import LOWRANK_MODES
from spa.passes.manager import DumpInstrument, PassManager, ProgressInstrument
from spa.passes.compensate import COMPENSATE, DATA_FREE_METHODS
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
    except _Terminated:
        _fail(143, "terminated (SIGTERM)")
    except KeyboardInterrupt:
        _fail(130, "interrupted")
    except Exception as e:  # noqa: BLE001 - a bug: show it, exit 1
        kind = _interrupted(e)  # a signal that landed inside an import or a callback, re-raised wrapped
        if kind is _Terminated:
            _fail(143, "terminated (SIGTERM)")
        if kind is KeyboardInterrupt:
            _fail(130, "interrupted")
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

    def tuning(self, task: str, done: int, total: int) -> None:
        """MetaSchedule's progress: a bar over the tasks the database lacks."""
        if self._status is not None:
            width = 20
            bar = "█" * (width * done // max(total, 1)) + "░" * (width - width * done // max(total, 1))
            self._status.update(f"[bold]compile[/bold]: tuning {bar} {done}/{total} tasks" + (f" · {task}" if task else ""))

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
        click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True, help="uniform: the same ratio per group; global: one threshold over normalised scores; latency: global, over scores per millisecond each group's units save (measured)."),
        click.option("--min-keep", type=float, default=0.1, show_default=True, help="Every layer keeps at least this fraction of its channels (and ≥ 1)."),
        click.option("--round-to", type=int, default=None, help="Every layer's kept channel count is a multiple of N where it has ≥ N channels. Default: 1; 8 with --latency-target or --allocation latency (ONNX Runtime's CPU kernels block channels by 8); with --target, the target's vector width (llvm: 16 with AVX-512, 8 with AVX2, else 4; cuda: 8)."),
        click.option("--flops-target", type=float, default=None, help="Keep ≤ F of the original FLOPs (the ratio is searched)."),
        click.option("--latency-target", type=float, default=None, metavar="MS", help="Keep the predicted latency on the target ≤ MS milliseconds (the ratio is searched from a per-layer table measured on ORT, or on TVM with --target; cached in --tuning-db)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random criterion and of the verification inputs."),
        _input_options,
        click.option("--allow-inexact", is_flag=True, help="Also prune channels that LayerNorm/RMSNorm mix (a transformer's hidden size). Not exact: the report says which groups."),
        click.option("--keep-weight-inputs", is_flag=True, help="Keep initializers that are also graph inputs (old IR<4 files) as overridable inputs; their channels stay frozen."),
        click.option("--compensate", type=click.Choice(list(COMPENSATE)), default="none", show_default=True, help="Repair the layers that read removed channels: data-free (BatchNorm statistics, no data) or calibration (least squares on --calibration data)."),
        click.option("--calibration", type=click.Path(exists=False), default=None, metavar="DATA", help="Calibration inputs: a .npz keyed by input name, or a folder of .npy files (samples on axis 0)."),
        click.option("--calibration-samples", type=int, default=128, show_default=True, help="Use at most N calibration samples."),
        click.option("--data-free-method", type=click.Choice(list(DATA_FREE_METHODS)), default="moments", show_default=True, help="--compensate data-free: moments (channels independent) or udfc (correlated as the producing layer's filters say: removed channels rebuilt from similar kept ones)."),
        click.option("--max-memory", type=str, default=None, metavar="SIZE", callback=lambda _c, _p, v: _memory_size(v), help="Memory ceiling for analysis (e.g. 8G, 512M): a model whose declared tensors need more is refused at load. Default: half of the machine's RAM."),
        click.option("--lowrank", type=click.Choice(list(LOWRANK_MODES)), default="none", show_default=True, help="Also factorize layers by truncated SVD: energy (every layer at --lowrank-energy) or auto (keep/prune/factorize per layer to meet --flops-target or --params-target at least estimated error)."),
        click.option("--lowrank-energy", type=float, default=0.95, show_default=True, help="--lowrank energy: each layer keeps the smallest rank holding this fraction of its singular energy, in (0, 1]."),
        click.option("--params-target", type=float, default=None, help="With --lowrank auto: keep ≤ F of the original parameters."),
        click.option("--fold", is_flag=True, help="After surgery, fold BatchNorm and per-channel Mul/Add into weights, merge linear pairs where cheaper, remove no-ops (exact, checked in ORT)."),
    ]
)

_target_options = _options_decorator(
    [
        click.option("--target", default="onnx", show_default=True, metavar="TARGET", help="onnx (the ONNX file), or a TVM target to also build a module for: llvm [-mcpu=… -mattr=… -mtriple=…], cuda [-arch=sm_80], any TVM kind, or its JSON form."),
        click.option("--tune-trials", type=int, default=0, show_default=True, help="MetaSchedule trials for the whole model (0: TVM's default schedules)."),
        click.option("--tuning-db", type=click.Path(file_okay=False), default=None, metavar="DIR", help="Tuning records, reused across runs and models (workloads already there are not tuned again)."),
        click.option("--rpc-tracker", default=None, metavar="HOST:PORT", help="TVM RPC tracker: tune and time on a device registered there."),
        click.option("--rpc-key", default=None, metavar="KEY", help="The device key at --rpc-tracker."),
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
    progress = _Progress(not (quiet or as_json))
    with progress as instruments:
        if dump is not None:
            instruments.append(DumpInstrument(dump))
        state.emit_progress = progress.tuning
        run_pipeline(state, mode=mode, timer=timer, instruments=instruments)
    report = state.report
    if as_json:
        click.echo(report.dumps())
    if not quiet:
        for w in report.warnings:
            _say("warning", w)
    if not (quiet or as_json):
        _print_report(report)
    if report.target is not None and report.target.get("error"):
        sys.exit(3)  # the pruned ONNX is written; the module is not (the warning above says why)


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
@_target_options
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
@_target_options
@_run_options
def apply_cmd(model, plan_file, output, input_shapes, input_values, bench, keep_opset, verify, report_path, as_json, quiet, in_place, dump_dir, explain, **target) -> None:
    """Replay PLAN_FILE (from `spa plan`) on MODEL."""
    with _errors():
        plan = _read_plan(plan_file)
        opts = _prune_options(**{**plan.options, "verify": verify, "benchmark": bench, "input_shapes": input_shapes, "input_values": input_values, "keep_opset": keep_opset, **target})
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


@cli.command("lowrank")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), default=None, help="Output path (default: MODEL.spa.onnx beside the input).")
@click.option("--energy", type=float, default=0.95, show_default=True, help="Each layer keeps the smallest rank holding this fraction of its singular energy, in (0, 1].")
@click.option("--flops-target", type=float, default=None, help="Instead of --energy: ranks chosen by the allocator to keep ≤ F of the FLOPs (nothing pruned).")
@click.option("--params-target", type=float, default=None, help="Instead of --energy: ranks chosen to keep ≤ F of the parameters.")
@click.option("--round-to", type=int, default=1, show_default=True, help="Ranks are multiples of N (rounded up).")
@click.option("--fold", is_flag=True, help="Also run the exact folding passes first (BatchNorm, per-channel Mul/Add, linear pairs, no-ops).")
@click.option("--calibration", type=click.Path(exists=False), default=None, metavar="DATA", help="Calibration inputs: Gemm/MatMul layers use the activation-whitened SVD (less output error).")
@click.option("--calibration-samples", type=int, default=128, show_default=True, help="Use at most N calibration samples.")
@_input_options
@click.option("--no-bench", is_flag=True, help="Skip the side-by-side ORT latency measurement.")
@_run_options
def lowrank_cmd(model, output, energy, flops_target, params_target, round_to, fold, calibration, calibration_samples, no_bench,
                verify, report_path, as_json, quiet, in_place, dump_dir, explain, **flags) -> None:
    """Factorize MODEL's Gemm/MatMul/Conv layers by truncated SVD where it pays (nothing is pruned)."""
    with _errors():
        auto = flops_target is not None or params_target is not None
        opts = _prune_options(ratio=0.0, min_keep=1.0, lowrank="auto" if auto else "energy", lowrank_energy=energy, flops_target=flops_target,
                              params_target=params_target, round_to=round_to, fold=fold, calibration=calibration,
                              calibration_samples=calibration_samples, verify=verify, benchmark=not no_bench, **flags)
        state = State(
            source=model, options=opts, source_path=model, in_place=in_place,
            output_path=pathlib.Path(output) if output else io.default_output_path(model),
            report_path=pathlib.Path(report_path) if report_path else None,
        )
        _run(state, "prune", as_json=as_json, quiet=quiet, explain=explain, dump_dir=dump_dir)


def _print_lowrank(r: Report) -> None:
    lr = r.lowrank
    t = Table(title=f"low-rank ({lr['mode']})", show_lines=False)
    for col in ("layer", "op", "action", "rank / full", "FLOPs before → after", "rel. error est.", "rel. error measured", "why kept"):
        t.add_column(col, no_wrap=col in ("action", "rank / full"), overflow="fold")
    for row in lr["layers"]:
        rank = f"{row['rank']} / {row['full_rank']}" if row["rank"] else f"— / {row['full_rank']}"
        err = row.get("error")
        est = row.get("estimated_error")
        t.add_row(row["layer"], row["op"], row["action"], rank, f"{human(row['flops_before'])} → {human(row['flops_after'])}",
                  "" if est is None else f"{est:.4f}", "" if err is None else f"{err:.4f}", row.get("reason", ""))
    out.print(t)
    if lr.get("full_rank_max_abs_diff") is not None:
        out.print(f"full-rank factorization: max |diff| {lr['full_rank_max_abs_diff']:.3g} → exact (the rewrite is proven)")
    if lr.get("output_error_vs_original") is not None:
        out.print(f"model output error (relative L2) vs the original: {lr['output_error_vs_original']:.4f}"
                  f" (the low-rank step alone: {lr['output_error_vs_before']:.4f})")


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
    if r.lowrank is not None:
        _print_lowrank(r)
    if r.fold is not None:
        out.print("fold: removed " + ", ".join(f"{n} ×{k}" for n, k in r.fold["removed_nodes"].items() if k) if any(r.fold["removed_nodes"].values()) else "fold: nothing to fold")
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
    if r.target is not None:
        _print_target(r.target)
    if r.output:
        out.print(f"wrote {r.output}")


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), default=None, help="The library (default: MODEL.<target>.so beside the input; .tar for a cross target).")
@_target_options
@_input_options
@click.option("--no-bench", is_flag=True, help="Skip the TVM vs ORT latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@_verbose
def compile_cmd(model, output, target, tune_trials, tuning_db, rpc_tracker, rpc_key, input_shapes, input_values, no_bench, as_json, quiet) -> None:
    """Build MODEL with TVM for --target (no pruning), check it against ONNX Runtime, time both."""
    import tempfile

    from spa.kernels.emit import compile_onnx
    from spa.passes import emit as emit_mod

    with _errors():
        if (target or "onnx") == "onnx":
            raise UsageError("spa compile needs --target llvm|cuda|… (onnx is the file itself)")
        opts = _prune_options(target=target, tune_trials=tune_trials, tuning_db=tuning_db, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                              input_shapes=input_shapes, input_values=input_values, benchmark=not no_bench)
        model_ir = io.load_model(model)  # the same safe load as prune (one-line refusals)
        emit = emit_mod.preflight(opts)
        default = emit_mod.module_path_for(pathlib.Path(model), emit.target.suffix)
        dest = io.check_output_path(pathlib.Path(output) if output else default, source_path=model)
        progress = _Progress(not (quiet or as_json))
        emit.progress = progress.tuning
        with tempfile.TemporaryDirectory(prefix="spa-") as tmp, progress:
            folder = pathlib.Path(tmp)
            onnx_path = folder / "model.onnx"
            io.save_model(model_ir, onnx_path, durable=False)
            feeds = emit_mod.feeds_for(model_ir, opts)
            info = compile_onnx(onnx_path, feeds, folder / f"module{emit.target.suffix}", emit, scratch=folder)
            emit_mod.ModuleArtifact.read(pathlib.Path(info["module"]), emit.target.suffix).write(dest)
        info["module"] = str(dest)
        if as_json:
            click.echo(json.dumps(info, indent=1))
        elif not quiet:
            _print_target(info)


@cli.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--target", default="onnx", show_default=True, metavar="TARGET", help="onnx: ORT only; a TVM target: ORT and TVM for each model.")
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None, metavar="DIR", help="Build TVM modules from these tuning records (nothing is tuned).")
@_input_options
@click.option("--budget", type=float, default=5.0, show_default=True, help="Seconds of timed runs (after warm-up), all models together.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@_verbose
def bench_cmd(models, target, tuning_db, input_shapes, input_values, budget, as_json) -> None:
    """ORT (and TVM) latency of ORIGINAL [PRUNED ...], measured side by side in one run."""
    import tempfile

    from spa.kernels.bench import bench_models
    from spa.passes import emit as emit_mod

    with _errors():
        opts = _prune_options(target=target, tuning_db=tuning_db, input_shapes=input_shapes, input_values=input_values)
        first = io.load_model(models[0])
        for m in models[1:]:
            io.load_model(m)
        emit = emit_mod.preflight(opts) if emit_mod.wants_module(opts) else None
        feeds = emit_mod.feeds_for(first, opts)
        with tempfile.TemporaryDirectory(prefix="spa-") as tmp, _Progress(not as_json) as _:
            rows = bench_models(list(models), feeds, emit=emit, budget_s=budget, scratch=pathlib.Path(tmp))
        if as_json:
            click.echo(json.dumps([r.to_json() for r in rows], indent=1))
            return
        title = "spa bench: median ms (p10–p90), side by side, order rotated"
        if emit is not None and not emit.target.is_gpu:
            from spa.kernels.threads import runtime_threads

            title += f"; TVM on {runtime_threads()} CPU threads"
        t = Table(title=title)
        for col, justify in (("model", "left"), ("runtime", "left"), ("ms", "right"), ("vs first (ORT)", "right")):
            t.add_column(col, justify=justify)
        for r in rows:
            t.add_row(r.model, r.runtime, f"{r.median_ms:.3f} ({r.p10_p90_ms[0]:.3f}–{r.p10_p90_ms[1]:.3f})", f"{r.vs_first:.3f}")
        out.print(t)


def _print_target(info: dict[str, Any]) -> None:
    """The emit section: where the module is, its check against ORT, TVM vs ORT latency."""
    if info.get("error"):
        return  # the warning line says it
    tuning = info.get("tuning")
    line = f"module for {info['target']}: {info['module']} (built in {info['compile_s']:.1f} s"
    if tuning:
        line += f"; tuning: {tuning['tasks_tuned']} tasks tuned in {tuning['tune_s']:.0f} s, {tuning['tasks_from_database']} from the database"
    out.print(line + ")", markup=False, highlight=False)
    if info.get("cuda_check") and info["cuda_check"].get("compiled"):
        c = info["cuda_check"]
        out.print(f"CUDA: {c['kernels']} kernels compiled ahead of time by nvcc for {c['arch']}", markup=False, highlight=False)
    if info.get("check"):
        out.print(f"TVM vs ONNX Runtime: max |diff| {info['check']['max_abs_diff']:.3g} (within atol {info['check']['atol']}, rtol {info['check']['rtol']})")
    lat = info.get("latency")
    if lat:
        threads = f" on {lat['tvm_threads']} threads" if "tvm_threads" in lat else ""
        out.print(f"latency of this model: TVM {lat['tvm_ms']:.3f} ms{threads} · ONNX Runtime {lat['ort_ms']:.3f} ms → deploy {lat['recommended']}",
                  markup=False, highlight=False)
    for note in info.get("notes", []):
        out.print(f"note: {note}", markup=False, highlight=False)


def _read_plan(path: str) -> Plan:
    """``Plan.load``: a missing, unreadable or invalid plan is a PlanError (exit 2) naming the
    field ("plan 'p.json': groups[3].removed is missing")."""
    return Plan.load(path)


def _memory_size(value: str | None) -> int | None:
    """``--max-memory 8G`` → bytes; a bad size is a usage error (one line, exit 2)."""
    if value is None:
        return None
    try:
        return safety.parse_size(value)
    except SpaError as e:
        raise click.BadParameter(str(e)) from None


def _interrupted(exc: BaseException) -> type | None:
    """_Terminated or KeyboardInterrupt when one is in ``exc``'s chain (cause or context)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, KeyboardInterrupt):
            return _Terminated if isinstance(cur, _Terminated) else KeyboardInterrupt
        cur = cur.__cause__ or cur.__context__
    return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` (scratch folders, the
    atomic save's temporary folder) runs before the process exits."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated()


def main() -> None:
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    try:
        cli(prog_name="spa")
    except _Terminated:  # outside _errors (parsing, imports): still one line, no traceback
        _fail(143, "terminated")


if __name__ == "__main__":
    main()
