"""The GitHub Action (action.yml): its steps run as GitHub runs a composite action (each `run:` with
`bash --noprofile --norc -eo pipefail`, `${{ ... }}` expressions substituted, per-step GITHUB_OUTPUT, shared
GITHUB_ENV and GITHUB_STEP_SUMMARY, `if: always()`), with the real jail; only the install step is left
out (the test's venv has jail already). actionlint is not packaged for Debian: a structural check of the
file stands in for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import UPSTREAM_HOST

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
STEP_OUTPUT = re.compile(r"steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+)")
# GitHub's shell for `shell: bash` steps.
GITHUB_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


def load_action() -> dict:
    return yaml.safe_load(ACTION.read_text())


@dataclass
class ActionRun:
    """What one run of the action left: each step's outcome, the summary and the action's outputs."""

    conclusions: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    log: str = ""

    @property
    def failed(self) -> bool:
        return "failure" in self.conclusions.values()


def parse_output_file(path: Path) -> dict[str, str]:
    """`name=value` lines and `name<<DELIMITER` blocks, as GitHub reads GITHUB_OUTPUT and GITHUB_ENV."""
    values: dict[str, str] = {}
    lines = iter(path.read_text().splitlines()) if path.exists() else iter(())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            block = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            values[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def run_action(inputs: dict[str, str], workspace: Path, env: dict[str, str], skip: tuple[str, ...] = ("install",)):
    action = load_action()
    declared = action["inputs"]
    unknown = set(inputs) - set(declared)
    assert not unknown, f"not inputs of the action: {unknown}"
    values = {name: inputs.get(name, str(spec.get("default", ""))) for name, spec in declared.items()}
    step_outputs: dict[str, dict[str, str]] = {}
    run = ActionRun()
    temp = workspace.parent / "runner-temp"
    temp.mkdir(exist_ok=True)
    summary = workspace.parent / "step-summary.md"
    github_env = workspace.parent / "github-env"
    summary.touch()
    github_env.touch()

    def evaluate(expression: str) -> str:
        if expression.startswith("inputs."):
            return values[expression.removeprefix("inputs.")]
        if expression == "github.action_path":
            return str(ROOT)
        if match := STEP_OUTPUT.fullmatch(expression):
            return step_outputs.get(match.group(1), {}).get(match.group(2), "")
        raise AssertionError(f"the test does not know the expression {expression!r}: teach it, or simplify action.yml")

    def substitute(text: str) -> str:
        return EXPRESSION.sub(lambda match: evaluate(match.group(1)), str(text))

    for index, step in enumerate(action["runs"]["steps"]):
        name = step.get("id", f"step{index}")
        condition = step.get("if", "success()")
        if name in skip or (run.failed and condition != "always()"):
            run.conclusions[name] = "skipped"
            continue
        output = workspace.parent / f"output-{index}"
        output.touch()
        script = workspace.parent / f"step-{index}.sh"
        script.write_text(substitute(step["run"]))
        step_env = {
            **env,
            **parse_output_file(github_env),
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_ACTION_PATH": str(ROOT),
            "GITHUB_OUTPUT": str(output),
            "GITHUB_ENV": str(github_env),
            "GITHUB_STEP_SUMMARY": str(summary),
            "RUNNER_TEMP": str(temp),
            **{key: substitute(value) for key, value in step.get("env", {}).items()},
        }
        result = subprocess.run(
            [*GITHUB_BASH, str(script)], cwd=workspace, env=step_env, capture_output=True, text=True, timeout=120
        )
        run.log += f"--- {name} (exit {result.returncode})\n{result.stdout}{result.stderr}"
        run.conclusions[name] = "success" if result.returncode == 0 else "failure"
        step_outputs[name] = parse_output_file(output)
    run.outputs = {name: substitute(spec["value"]) for name, spec in action.get("outputs", {}).items()}
    run.summary = summary.read_text()
    return run


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace"
    folder.mkdir()
    (folder / "policy.toml").write_text(
        f'default = "deny"\n[[rule]]\nname = "test-origin"\naction = "allow"\nhost = "{UPSTREAM_HOST}"\n'
    )
    return folder


@pytest.fixture
def action_env(jail_env: dict[str, str]) -> dict[str, str]:
    """The runner's environment: jail on PATH (the install step is skipped), no proxy settings."""
    env = dict(jail_env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# The test's origin is on loopback (refused unless allowed) and weak mode needs no set-up: the action's
# plumbing is under test here, the isolation modes have their own tests.
TEST_ARGS = f"--weak --allow-private {UPSTREAM_HOST}/32"


def test_action_file_is_a_well_formed_composite_action():
    """What actionlint would check first: the keys GitHub requires, a composite `runs`, a shell on every
    `run` step, ids that outputs and expressions refer to, and no input pasted into a script."""
    action = load_action()
    assert {"name", "description", "inputs", "outputs", "runs"} <= set(action)
    assert action["runs"]["using"] == "composite"
    assert set(action["inputs"]["command"]) >= {"description", "required"} and action["inputs"]["command"]["required"]
    for name, spec in action["inputs"].items():
        assert "description" in spec, name
        assert isinstance(spec.get("default", ""), str), f"input {name}: defaults are strings"
    ids = [step["id"] for step in action["runs"]["steps"] if "id" in step]
    assert len(ids) == len(set(ids))
    for step in action["runs"]["steps"]:
        assert "run" in step or "uses" in step, step
        if "run" in step:
            assert step.get("shell") in ("bash", "sh", "pwsh", "python"), f"a run step needs a shell: {step['name']}"
            # Expressions only in `env:`: a value pasted into the script could inject shell code.
            assert not EXPRESSION.search(step["run"]), f"expression inside the script of {step['name']}"
        for expression in EXPRESSION.findall(yaml.safe_dump(step)):
            if match := STEP_OUTPUT.fullmatch(expression):
                assert match.group(1) in ids, expression
            else:
                assert expression.split(".")[0] in ("inputs", "github"), expression
                if expression.startswith("inputs."):
                    assert expression.removeprefix("inputs.") in action["inputs"], expression
    for name, spec in action["outputs"].items():
        assert STEP_OUTPUT.fullmatch(EXPRESSION.fullmatch(spec["value"]).group(1)), name


def test_allowed_run_passes_with_summary_log_and_report(workspace, action_env, http_upstream):
    run = run_action(
        {
            "command": f"curl -sSf {http_upstream.url('/allowed')} -o fetched.json && echo done",
            "policy": "policy.toml",
            "fail-on-deny": "true",
            "args": TEST_ARGS,
        },
        workspace,
        action_env,
    )
    assert not run.failed, run.log
    assert run.outputs["exit-code"] == "0"
    assert (workspace / "fetched.json").exists()  # the command ran in the workspace
    assert [r["path"] for r in http_upstream.requests] == ["/allowed"]
    assert "**jail egress**: 1 request: 1 allowed, 0 denied" in run.summary
    log, report = Path(run.outputs["audit-log"]), Path(run.outputs["report"])
    assert not log.is_relative_to(workspace) and log.is_file()  # out of the jailed command's reach
    assert '"decision": "allow"' in log.read_text() and '"path": "/allowed"' in log.read_text()
    assert report.read_text().lstrip().lower().startswith("<!doctype html")


def test_a_denial_with_fail_on_deny_fails_the_step(workspace, action_env, http_upstream):
    # The command itself succeeds (curl without -f): only the denial fails the step.
    command = f"curl -sS {http_upstream.url('/ok')} && curl -sS http://denied.example/x"
    run = run_action(
        {"command": command, "policy": "policy.toml", "fail-on-deny": "true", "args": TEST_ARGS},
        workspace,
        action_env,
    )
    assert run.failed, run.log
    assert run.outputs["exit-code"] == "1"
    assert run.conclusions["run"] == "success" and run.conclusions["status"] == "failure"
    assert "1 allowed, 1 denied" in run.summary and "denied.example" in run.summary
    assert Path(run.outputs["report"]).is_file()  # written on failure too, for upload-artifact


def test_without_fail_on_deny_the_commands_own_status_decides(workspace, action_env):
    run = run_action(
        {"command": "curl -sS http://denied.example/x; exit 3", "policy": "policy.toml", "args": TEST_ARGS},
        workspace,
        action_env,
    )
    assert run.failed and run.outputs["exit-code"] == "3", run.log
    run = run_action(
        {"command": "curl -sS http://denied.example/x", "policy": "policy.toml", "args": TEST_ARGS},
        workspace,
        action_env,
    )
    assert not run.failed and run.outputs["exit-code"] == "0", run.log


def test_audit_mode_lets_everything_through_and_records_would_deny(workspace, action_env, http_upstream):
    policy = workspace / "deny-all.toml"
    policy.write_text('default = "deny"\n')
    run = run_action(
        {
            "command": f"curl -sSf {http_upstream.url('/audited')}",
            "policy": "deny-all.toml",
            "audit": "true",
            "args": TEST_ARGS,
        },
        workspace,
        action_env,
    )
    assert not run.failed, run.log
    assert [r["path"] for r in http_upstream.requests] == ["/audited"]
    assert "0 denied, 1 would-deny" in run.summary
    assert '"decision": "would_deny"' in Path(run.outputs["audit-log"]).read_text()
    # The same with fail-on-deny: what would have been denied fails the step.
    run = run_action(
        {
            "command": f"curl -sSf {http_upstream.url('/audited')}",
            "policy": "deny-all.toml",
            "audit": "true",
            "fail-on-deny": "true",
            "args": TEST_ARGS,
        },
        workspace,
        action_env,
    )
    assert run.failed and run.outputs["exit-code"] == "1", run.log


def test_a_command_with_quotes_is_run_as_written(workspace, action_env):
    """The command reaches bash -c through the environment: quotes and `$(...)` are the command's own."""
    run = run_action(
        {
            "command": "echo \"it's $((6 * 7))\" > out.txt; echo '${{ not-an-expression }}' >> out.txt",
            "args": TEST_ARGS,
        },
        workspace,
        action_env,
    )
    assert not run.failed, run.log
    assert (workspace / "out.txt").read_text() == "it's 42\n${{ not-an-expression }}\n"


def test_jails_own_failure_fails_the_step(workspace, action_env):
    run = run_action({"command": "true", "policy": "missing.toml", "args": TEST_ARGS}, workspace, action_env)
    assert run.failed and run.outputs["exit-code"] == "2", run.log


def test_sudo_true_starts_jail_through_sudo_keeping_the_environment_and_path(workspace, action_env, tmp_path):
    """As GitHub's runner user: `sudo -E env PATH=...` (sudo resets PATH), then jail and its flags. The
    machine has no sudo (and the test runs as root): a stand-in records its arguments and runs them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sudo-args"
    sudo = bin_dir / "sudo"
    sudo.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nshift\nexec "$@"\n')
    sudo.chmod(0o755)
    env = {**action_env, "PATH": f"{bin_dir}{os.pathsep}{action_env['PATH']}"}
    run = run_action({"command": "echo jailed > out.txt", "sudo": "true", "args": TEST_ARGS}, workspace, env)
    assert not run.failed, run.log
    args = record.read_text().splitlines()
    assert args[:3] == ["-E", "env", f"PATH={env['PATH']}"]
    assert args[3] == "jail" and args[-3:] == ["bash", "-c", "echo jailed > out.txt"]
    assert (workspace / "out.txt").read_text() == "jailed\n"
    record.unlink()
    run = run_action({"command": "true", "args": TEST_ARGS}, workspace, env)  # auto, and root already
    assert not run.failed, run.log
    assert not record.exists()


def test_github_example_uses_the_actions_own_inputs_and_outputs():
    example = yaml.safe_load((ROOT / "examples" / "github-actions.yml").read_text())
    action = load_action()
    steps = example["jobs"]["test"]["steps"]
    jailed = [step for step in steps if step.get("uses", "").endswith("egress-jail@v1")]
    assert len(jailed) == 1
    assert set(jailed[0]["with"]) <= set(action["inputs"]) and "command" in jailed[0]["with"]
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    referenced = set(re.findall(r"steps\.jail\.outputs\.([a-z-]+)", upload["with"]["path"]))
    assert referenced == {"audit-log", "report"} <= set(action["outputs"])


def test_gitlab_example_commands_are_valid_jail_command_lines(jail_env, tmp_path):
    """Each jail line of the GitLab job (script, and the commented audit variant), checked with --explain."""
    text = (ROOT / "examples" / "gitlab-ci.yml").read_text()
    lines = re.findall(r"^\s*(?:# )?- (jail --.*)$", text, re.MULTILINE)
    assert len(lines) == 2
    env = {**jail_env, "EGRESS_DIR": str(tmp_path)}
    for line in lines:
        explained = line.replace("jail --", f"{sys.executable} -m jail --explain --", 1)
        result = subprocess.run(["bash", "-c", explained], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (line, result.stderr)
