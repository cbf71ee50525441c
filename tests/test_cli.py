"""The command line as a user meets it: exit codes, one-line refusals, nothing lost."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import onnx
import pytest
import click
from click.testing import CliRunner

from spa.cli import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo.onnx"


@dataclasses.dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str) -> Outcome:
    """The CLI in-process (click's CliRunner): same exit codes and streams, no interpreter start."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run_process(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a real process: for what only a process shows (exit status, hash seeds)."""
    return subprocess.run(
        [sys.executable, "-m", "spa.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def demo(tmp_path: pathlib.Path) -> pathlib.Path:
    p = tmp_path / "demo.onnx"
    shutil.copy(DEMO, p)
    return p


def assert_refused(proc: Outcome | subprocess.CompletedProcess, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spa: error:")


def test_prune_demo_writes_default_output_and_keeps_input(demo: pathlib.Path) -> None:
    before = sha(demo)
    proc = run_process("prune", str(demo), "--ratio", "0.5", "--no-bench")
    assert proc.returncode == 0, proc.stderr
    assert sha(demo) == before
    out = demo.with_name("demo.spa.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert "exact" in proc.stdout


def test_json_and_report(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    report = tmp_path / "r.json"
    proc = run("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--json", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == json.loads(report.read_text())
    assert data["flops_after"] < data["flops_before"]
    assert data["oracle"]["passed"] is True
    assert data["latency_ms_before"] > 0 and data["latency_ms_after"] > 0
    assert set(data["timings"]) >= {"load", "canonicalize", "analyze", "score", "allocate", "plan", "prune", "check", "oracle", "benchmark"}


def test_same_options_same_bytes_across_hash_seeds(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    outs = []
    for seed in ("0", "12345"):
        out = tmp_path / f"o{seed}.onnx"
        proc = run_process("prune", str(demo), "-o", str(out), "--no-bench", "--quiet", env={"PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_ratio_zero_keeps_every_tensor(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "o.onnx"
    assert run("prune", str(demo), "--ratio", "0", "-o", str(out), "--no-bench", "--quiet").returncode == 0
    a = {t.name: t.SerializeToString() for t in onnx.load(demo).graph.initializer}
    b = {t.name: t.SerializeToString() for t in onnx.load(out).graph.initializer}
    assert a == b


def test_plan_then_apply_equals_prune(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", str(demo), "--ratio", "0.3", "-o", str(plan)).returncode == 0
    data = json.loads(plan.read_text())
    assert data["model_sha256"] == sha(demo)
    for t in data["tensors"]:
        for ax in t["axes"]:
            assert ax["kept"] == sorted(ax["kept"])
    assert data["tensors"], "the plan slices nothing: the comparison below would prove nothing"
    assert any(len(ax["kept"]) < t["shape"][ax["axis"]] for t in data["tensors"] for ax in t["axes"])
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run("apply", str(demo), str(plan), "-o", str(a), "--quiet").returncode == 0
    assert run("prune", str(demo), "--ratio", "0.3", "-o", str(b), "--no-bench", "--quiet").returncode == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["groups"][0].pop("removed"), "groups[0].removed is missing"),
        (lambda d: d["options"].update(ratio=1.5), "options.ratio must be a number in [0, 1)"),
        (lambda d: d["options"].update(speed=3), "options.speed is not a plan option"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["tensors"][0]["axes"][0].update(kept="all"), "tensors[0].axes[0].kept must be a list"),
        (None, "is not JSON"),
    ],
    ids=["missing-key", "bad-option", "unknown-option", "version", "wrong-type", "not-json"],
)
def test_a_bad_plan_file_is_one_line_naming_the_field(demo: pathlib.Path, tmp_path: pathlib.Path, edit, field: str) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", str(demo), "-o", str(plan)).returncode == 0
    if edit is None:
        plan.write_text("{ not json")
    else:
        data = json.loads(plan.read_text())
        edit(data)
        plan.write_text(json.dumps(data))
    out = tmp_path / "x.onnx"
    proc = run("apply", str(demo), str(plan), "-o", str(out))
    assert_refused(proc)
    assert field in proc.stderr and str(plan) in proc.stderr
    assert not out.exists()


def test_apply_refuses_another_model(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", str(demo), "-o", str(plan)).returncode == 0
    other = tmp_path / "other.onnx"
    m = onnx.load(demo)
    m.doc_string = "changed"
    onnx.save(m, other)
    assert_refused(run("apply", str(other), str(plan), "-o", str(tmp_path / "x.onnx")))


def test_corrupted_plan_fails_oracle_and_writes_nothing(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", str(demo), "-o", str(plan)).returncode == 0
    data = json.loads(plan.read_text())
    # Keep the wrong channels in one 3x3 conv consumer (its inputs are rarely all-zero after
    # ReLU, unlike a squeeze-excite's 1x1 features): shapes still fit, numbers do not.
    for t in data["tensors"]:
        spatial = len(t["shape"]) == 4 and t["shape"][2] > 1
        ax = next((a for a in t["axes"] if a["roles"] == ["in"]), None) if spatial else None
        if ax is not None:
            dropped = sorted(set(range(t["shape"][ax["axis"]])) - set(ax["kept"]))
            ax["kept"] = sorted(ax["kept"][1:] + dropped[:1])
            break
    plan.write_text(json.dumps(data))
    out = tmp_path / "x.onnx"
    proc = run("apply", str(demo), str(plan), "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "oracle" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_refuses_to_overwrite_input_without_in_place(demo: pathlib.Path) -> None:
    assert_refused(run("prune", str(demo), "-o", str(demo), "--no-bench"))
    before = sha(demo)
    proc = run("prune", str(demo), "-o", str(demo), "--in-place", "--no-bench", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sha(demo) != before
    onnx.checker.check_model(str(demo), full_check=True)


def _bad_inputs(tmp: pathlib.Path) -> dict[str, pathlib.Path | str]:
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "text.onnx").write_text("hello, I am not a model\n")
    data = DEMO.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "nograph.onnx").write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    m = onnx.load(DEMO)
    m.graph.node[0].domain = "com.example.unknown"
    m.opset_import.add(domain="com.example.unknown", version=1)
    onnx.save(m, tmp / "domain.onnx")
    m = onnx.load(DEMO)
    m.opset_import[0].version = 30
    onnx.save(m, tmp / "opset.onnx")
    os.mkfifo(tmp / "fifo.onnx")
    (tmp / "dir.onnx").mkdir()
    return {
        "missing": tmp / "nope.onnx",
        "directory": tmp / "dir.onnx",
        "empty": tmp / "empty.onnx",
        "text": tmp / "text.onnx",
        "truncated": tmp / "truncated.onnx",
        "no graph": tmp / "nograph.onnx",
        "unknown domain": tmp / "domain.onnx",
        "unknown opset": tmp / "opset.onnx",
        "fifo": tmp / "fifo.onnx",
        "device": "/dev/zero",
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "directory", "empty", "text", "truncated", "no graph", "unknown domain", "unknown opset", "fifo", "device"],
)
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_bad_input_is_one_line_exit_2(tmp_path: pathlib.Path, case: str, command: str) -> None:
    if case == "unknown domain" and command == "inspect":
        pytest.skip("a custom-domain op is frozen, not refused: inspect reads the model (tests/test_hostile.py)")
    path = _bad_inputs(tmp_path)[case]
    args = [command, str(path)] + (["-o", str(tmp_path / "o.onnx")] if command == "prune" else [])
    assert_refused(run(*args))


def test_bad_input_exit_status_of_a_real_process(tmp_path: pathlib.Path) -> None:
    assert_refused(run_process("prune", str(_bad_inputs(tmp_path)["truncated"]), "-o", str(tmp_path / "o.onnx")))


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
def test_bad_ratio(demo: pathlib.Path, ratio: str) -> None:
    assert_refused(run("prune", str(demo), f"--ratio={ratio}"))


@pytest.mark.parametrize(
    "args",
    [
        ["--criterion", "nonsense"],
        ["--criterion", "taylor", "--calibration", "missing.npz"],
        ["--input-shape", "bad"],
        ["--flops-target", "0"],
        ["--round-to", "0"],
    ],
)
def test_unsupported_options_are_refused(demo: pathlib.Path, args: list[str]) -> None:
    assert_refused(run("prune", str(demo), *args))


def test_unwritable_output(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert_refused(run("prune", str(demo), "-o", str(tmp_path / "no" / "such" / "dir" / "o.onnx")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(run("prune", str(demo), "-o", str(blocker / "o.onnx")))


def test_inspect_lists_groups(demo: pathlib.Path) -> None:
    proc = run("inspect", str(demo), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    statuses = {g["status"] for g in data["groups"]}
    assert "prunable" in statuses and "frozen" in statuses
    blocked = [g for g in data["groups"] if g["status"] == "frozen"]
    assert all(g["reasons"] for g in blocked)
    assert {r["code"] for g in blocked for r in g["reasons"]} >= {"graph_io"}


# -- nothing half-written: every output is checked before any work ---------------------------


def _outputs(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "demo.onnx")


@pytest.mark.parametrize("where", ["missing folder", "a directory"])
def test_bad_report_path_is_refused_before_any_work(demo: pathlib.Path, tmp_path: pathlib.Path, where: str) -> None:
    target = tmp_path / "no" / "r.json" if where == "missing folder" else tmp_path
    proc = run("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--report", str(target), "--no-bench")
    assert_refused(proc)
    assert _outputs(tmp_path) == []


def test_output_that_is_a_directory_is_refused(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "d.onnx").mkdir()
    assert_refused(run("prune", str(demo), "-o", str(tmp_path / "d.onnx")))


def test_plan_and_html_outputs_are_checked_first(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert_refused(run("plan", str(demo), "-o", str(tmp_path / "no" / "plan.json")))
    assert_refused(run("plan", str(demo), "-o", str(tmp_path)))
    assert_refused(run("inspect", str(demo), "--html", str(tmp_path / "no" / "g.html")))
    assert _outputs(tmp_path) == []


def test_a_failing_report_write_leaves_no_model(demo: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
    from spa import io
    from spa.errors import OutputError

    def fail(path, text):
        raise OutputError(f"{path}: write failed (disk full)")

    monkeypatch.setattr(io, "write_text_atomic", fail)
    out = tmp_path / "o.onnx"
    assert_refused(run("prune", str(demo), "-o", str(out), "--report", str(tmp_path / "r.json"), "--no-bench"))
    assert _outputs(tmp_path) == []


def test_a_failing_model_write_leaves_no_report(demo: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
    from spa import io
    from spa.errors import OutputError

    def fail(*a, **k):
        raise OutputError("write failed (disk full)")

    real = io.save_model
    monkeypatch.setattr(io, "save_model", lambda model, path, **kw: fail() if pathlib.Path(path).name == "o.onnx" else real(model, path, **kw))
    assert_refused(run("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "--no-bench"))
    assert _outputs(tmp_path) == []


def test_dump_dir(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    dump = tmp_path / "dump"
    proc = run("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--dump-dir", str(dump), "--no-bench", "--quiet")
    assert proc.returncode == 0, proc.stderr
    steps = [p.name.split("-", 1)[1] for p in sorted(dump.glob("*.onnx"))]
    assert steps[0] == "load.onnx" and steps[-1] == "prune.onnx"  # canonicalize only if it changed something
    assert_refused(run("prune", str(demo), "--dump-dir", str(tmp_path / "no" / "dump")))


# -- the terminal says what it means ---------------------------------------------------------


def test_explain_lists_the_steps_and_does_nothing(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = run("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--explain", "--verify", "none")
    assert proc.returncode == 0, proc.stderr
    for step in ("canonicalize", "allocate", "prune", "oracle", "save"):
        assert step in proc.stdout
    assert "--verify none" in proc.stdout
    assert _outputs(tmp_path) == []


def test_table_words(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = run("prune", str(demo), "-o", str(tmp_path / "o.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "after/before" in proc.stdout
    assert "blocked" not in proc.stdout  # one word: frozen
    assert "frozen" in proc.stdout
    assert "p10–p90" in proc.stdout


def test_nothing_pruned_warns(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = run("prune", str(demo), "--ratio", "0", "-o", str(tmp_path / "o.onnx"), "--no-bench")
    assert proc.returncode == 0
    assert "spa: warning: nothing was pruned: ratio is 0" in proc.stderr


def test_verbose_after_the_command(demo: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = run_process("prune", str(demo), "-o", str(tmp_path / "o.onnx"), "--no-bench", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "INFO" in proc.stderr


def test_every_option_has_help_text() -> None:
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"spa {name} {param.opts[0]} has no help text"


def test_allow_inexact_never_says_exact(zoo_onnx, tmp_path: pathlib.Path) -> None:
    import re

    path = zoo_onnx("bert")
    proc = run("prune", str(path), "--allow-inexact", "-o", str(tmp_path / "o.onnx"), "--no-bench")
    assert proc.returncode == 0, proc.stderr
    assert "not a proof" in proc.stdout
    assert not re.search(r"\bexact\b", proc.stdout), proc.stdout


def _weights_as_inputs(opset: int, ir_version: int) -> onnx.ModelProto:
    """Conv → Relu → Conv whose initializers are also listed as graph inputs: ORT warns about
    each one ("Initializer w1 appears in graph inputs …") whenever it loads such a model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


@pytest.mark.parametrize("opset, ir_version, flags", [(13, 8, ["--keep-weight-inputs"]), (9, 4, ["--keep-weight-inputs", "--keep-opset"])],
                         ids=["opset13", "opset9-upgraded"])
def test_ort_log_lines_never_reach_the_terminal(tmp_path: pathlib.Path, capfd: pytest.CaptureFixture, opset, ir_version, flags) -> None:
    import onnxruntime as ort

    path = tmp_path / "w.onnx"
    onnx.save(_weights_as_inputs(opset, ir_version), path)
    ort.set_default_logger_severity(2)  # ORT's own default (warnings shown); earlier tests may have raised it
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ort.InferenceSession(_weights_as_inputs(13, 8).SerializeToString(), providers=["CPUExecutionProvider"])
        plain = capfd.readouterr()
        assert "onnxruntime" in plain.err, "the model no longer makes ORT warn: this test proves nothing"
        proc = run("prune", str(path), "-o", str(tmp_path / "o.onnx"), *flags)  # checker, oracle, benchmark: every session
        seen = capfd.readouterr()
    finally:
        ort.set_default_logger_severity(3)
    assert proc.returncode == 0, proc.stderr
    terminal = "\n".join((seen.out, seen.err, proc.stdout, proc.stderr))
    assert "onnxruntime" not in terminal and "[W:" not in terminal and "[E:" not in terminal, terminal
