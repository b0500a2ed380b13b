"""The real coding agents (npm packages at pinned versions) run under jail with default flags, each against a
local mock of its model API and a rule that allows only that API, in weak, strong and rootless modes, with a
HOME laid out as a real one: a turn completes, the agent's state lands in its real state folder and a second
run sees it, and with the API denied the agent reports jail's refusal while nothing reaches the mock.

Select with `-m agents`. The first run installs the agents from the npm registry (~10 s); later runs reuse them.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trustme

from jail.platform.netns import strong_mode_unavailable
from jail.platform.rootless import rootless_unavailable
from tests.agents.install import install_agents
from tests.agents.mock_api import (
    ANSWER,
    AnthropicMessages,
    Dialect,
    GeminiGenerate,
    MockAPI,
    OpenAIResponses,
    start_mock,
)
from tests.conftest import map_names, unmap_names
from tests.test_rootless import RootlessUser, user  # noqa: F401 (the rootless test user, as a fixture)

pytestmark = [
    pytest.mark.agents,
    pytest.mark.skipif(os.geteuid() != 0, reason="mapping the mock APIs' names in /etc/hosts needs root (CI has it)"),
]

FIRST_PROMPT = "Remember the word PELICAN-7."
SECOND_PROMPT = "Which word did I ask you to remember?"
REMEMBERED = "PELICAN-7"
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# A jail under test imported from elsewhere than the installed package stays the one the agents run under.
BASE_ENV |= {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


@dataclass(frozen=True)
class Agent:
    """One agent: how to run a turn and a follow-up against its mock, and where its state must land."""

    command: str
    dialect: type[Dialect]
    host: str
    address: str
    args: tuple[str, ...]  # before the prompt on every run
    follow_up: tuple[str, ...]  # added to continue the last conversation
    prompt_flag: tuple[str, ...]
    environment: dict[str, str]
    state_folder: str
    transcripts: str  # glob under HOME: the files that record a conversation
    written: str  # a state file (under HOME) the first run must fill: more than an empty `{}`
    home_entries: frozenset[str]  # where in HOME (top level) the agent may add files
    settings: dict[str, str] = field(default_factory=dict)  # files under HOME its user has before any run

    def argv(self, bin_dir: Path, prompt: str, follow_up: bool) -> list[str]:
        return [
            str(bin_dir / self.command),
            *self.args,
            *(self.follow_up if follow_up else ()),
            *self.prompt_flag,
            prompt,
        ]


OPENAI = "api.mock-openai.test"
ANTHROPIC = "api.mock-anthropic.test"
GEMINI = "api.mock-gemini.test"
# No retries: a refused turn fails at once instead of after five reconnects.
CODEX_PROVIDER = (
    f'{{name="Mock", base_url="https://{OPENAI}/v1", env_key="MOCK_API_KEY", wire_api="responses", '
    "request_max_retries=0, stream_max_retries=0}"
)
AGENTS = {
    "codex": Agent(
        command="codex",
        dialect=OpenAIResponses,
        host=OPENAI,
        address="127.0.0.3",
        args=(
            "exec",
            "-c",
            "model=mock-model",
            "-c",
            "model_provider=mock",
            "-c",
            f"model_providers.mock={CODEX_PROVIDER}",
        ),
        follow_up=("resume", "--last"),
        prompt_flag=(),
        environment={"MOCK_API_KEY": "mock-key"},
        state_folder=".codex",
        transcripts=".codex/sessions/*/*/*/rollout-*.jsonl",
        written=".codex/installation_id",
        home_entries=frozenset({".codex"}),
    ),
    "claude": Agent(
        command="claude",
        dialect=AnthropicMessages,
        host=ANTHROPIC,
        address="127.0.0.4",
        args=(),
        follow_up=("--continue",),
        prompt_flag=("-p",),
        environment={"ANTHROPIC_BASE_URL": f"https://{ANTHROPIC}", "ANTHROPIC_API_KEY": "sk-ant-mock"},
        state_folder=".claude",
        transcripts=".claude/projects/*/*.jsonl",
        written=".claude.json",
        home_entries=frozenset({".claude", ".claude.json"}),
    ),
    "gemini": Agent(
        command="gemini",
        dialect=GeminiGenerate,
        host=GEMINI,
        address="127.0.0.5",
        args=("--skip-trust",),
        follow_up=("--resume", "latest"),
        prompt_flag=("-p",),
        environment={"GEMINI_API_KEY": "mock-key", "GOOGLE_GEMINI_BASE_URL": f"https://{GEMINI}"},
        state_folder=".gemini",
        transcripts=".gemini/tmp/*/chats/session-*.jsonl",
        written=".gemini/projects.json",
        home_entries=frozenset({".gemini"}),
        # Gemini takes its auth type only from a user (or system) settings file, not the workspace's: the file
        # it writes itself when its user picks "Gemini API key".
        settings={".gemini/settings.json": json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}}})},
    ),
}

# Claude Code at its real API's name (mapped to a mock for the test's duration), with no base URL: what
# its profile's host list is for.
REAL_NAMES = {
    "claude-at-api.anthropic.com": replace(
        AGENTS["claude"],
        host="api.anthropic.com",
        address="127.0.0.6",
        environment={"ANTHROPIC_API_KEY": "sk-ant-mock"},
    )
}
REGISTRIES_POLICY = Path(__file__).resolve().parents[1] / "policies" / "registries.toml"


@pytest.fixture(scope="session")
def agents_bin() -> Path:
    try:
        return install_agents()
    except RuntimeError as error:
        pytest.skip(f"the agents cannot be installed: {error}")


@pytest.fixture(scope="module")
def mock_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("mock-ca")
    folder.chmod(0o755)
    path = folder / "mock-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    path.chmod(0o644)
    return ca, path


@pytest.fixture(scope="module")
def mocks(mock_ca: tuple[trustme.CA, Path]) -> Iterator[dict[str, MockAPI]]:
    """The model APIs on port 443 of their own loopback addresses, by name (outside NO_PROXY)."""
    ca, _ = mock_ca
    lines = [f"{agent.address} {agent.host}" for agent in (AGENTS | REAL_NAMES).values()]
    started: dict[str, MockAPI] = {}
    map_names(lines)
    try:
        for name, agent in (AGENTS | REAL_NAMES).items():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ca.issue_cert(agent.host).configure_cert(context)
            started[name] = start_mock(agent.dialect(), agent.address, agent.host, context)
        yield started
    finally:
        for mock in started.values():
            mock.stop()
        unmap_names(lines)


def make_home(home: Path, owner: tuple[int, int] | None, settings: dict[str, str]) -> Path:
    """A HOME as a real user has one, with a project (a git repository) in it; returns the project."""
    for folder in (".ssh", ".config/git", ".cache/pip", ".npm/_cacache", ".local/share", ".local/state", "project"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    (home / ".bashrc").write_text("export EDITOR=vi\n")
    (home / ".profile").write_text(". ~/.bashrc\n")
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    (home / ".gitconfig").write_text("[user]\n\tname = Test\n\temail = test@example.com\n")
    project = home / "project"
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / "README.md").write_text("a project\n")
    for name, text in settings.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    if owner is not None:
        for path in [home, *home.rglob("*")]:
            os.lchown(path, *owner)
    return project


def snapshot(home: Path) -> dict[str, str]:
    """Every file in HOME but the project's, with the content of those an agent must never change."""
    taken = {str(path.relative_to(home)): "" for path in home.rglob("*") if not path.is_dir()}
    taken = {name: "" for name in taken if not name.startswith("project/")}
    for name in (".bashrc", ".profile", ".gitconfig", ".ssh/id_rsa"):
        taken[name] = (home / name).read_text()
    return taken


@dataclass
class Mode:
    """How one mode runs `jail ARGS...` with an environment (root weak, root strong, or as the test user)."""

    name: str
    run: Callable[[list[str], dict[str, str], Path], subprocess.CompletedProcess]
    owner: tuple[int, int] | None
    base: Path


@pytest.fixture(scope="module")
def root_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agents")


def _run_as_root(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["weak", "strong", "rootless"])
def mode(request: pytest.FixtureRequest, root_base: Path) -> Mode:
    if request.param == "weak":
        return Mode("weak", _run_as_root, None, root_base)
    if request.param == "strong":
        unavailable = strong_mode_unavailable()
        if unavailable is not None:
            pytest.skip(f"strong mode unavailable: {unavailable}")
        return Mode("strong", _run_as_root, None, root_base)
    unavailable = rootless_unavailable()
    if unavailable is not None:
        pytest.skip(f"rootless jail unavailable: {unavailable}")
    subject: RootlessUser = request.getfixturevalue("user")

    def run_as_user(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        # runuser gives the user's own environment; env(1) then sets exactly ours.
        command = [
            "/usr/sbin/runuser",
            "-u",
            subject.entry.pw_name,
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in env.items()),
            *argv,
        ]
        return subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    return Mode("rootless", run_as_user, (subject.uid, subject.entry.pw_gid), subject.workspace.parent)


@dataclass
class Session:
    """One agent's HOME and project in one mode, and the means to run the agent jailed there."""

    agent: Agent
    mode: Mode
    home: Path
    project: Path
    mock: MockAPI
    bin_dir: Path
    upstream_ca: Path

    def jail(
        self, prompt: str, *, follow_up: bool = False, rule: list[str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run the agent jailed; the rule allows only its model API unless RULE (flags) says otherwise."""
        flags = ["--weak"] if self.mode.name == "weak" else []
        flags += ["--upstream-ca", str(self.upstream_ca), "--allow-private", f"{self.agent.address}/32"]
        flags += rule if rule is not None else ["--js", f"r.host === '{self.agent.host}'"]
        argv = [sys.executable, "-m", "jail", *flags, "--", *self.agent.argv(self.bin_dir, prompt, follow_up)]
        env = {**BASE_ENV, "HOME": str(self.home), "JAIL_CA_DIR": str(self.home.parent / "jail-ca")}
        env.update(self.agent.environment)
        return self.mode.run(argv, env, self.project)

    def transcripts(self) -> list[Path]:
        return sorted(self.home.glob(self.agent.transcripts))

    def recorded(self) -> int:
        return sum(path.stat().st_size for path in self.transcripts())


@pytest.fixture
def session(request: pytest.FixtureRequest, mode: Mode, mocks, agents_bin: Path, mock_ca) -> Iterator[Session]:
    agent = (AGENTS | REAL_NAMES)[request.param]
    base = Path(tempfile.mkdtemp(prefix=f"{agent.command}-{mode.name}-", dir=mode.base))
    base.chmod(0o755)
    home = base / "home"
    project = make_home(home, mode.owner, agent.settings)
    if mode.owner is not None:
        os.chown(base, *mode.owner)
    upstream_ca = base / "mock-ca.pem"
    shutil.copy(mock_ca[1], upstream_ca)
    upstream_ca.chmod(0o644)
    mock = mocks[request.param]
    mock.requests.clear()
    yield Session(agent, mode, home, project, mock, agents_bin, upstream_ca)
    shutil.rmtree(base, ignore_errors=True)


def _said(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("session", list(AGENTS), indirect=True)
def test_agent_completes_a_turn_keeps_its_state_and_is_refused_when_denied(session: Session) -> None:
    before = snapshot(session.home)

    first = session.jail(FIRST_PROMPT)
    assert first.returncode == 0 and ANSWER in first.stdout, _said(first)
    assert session.mock.requests, "the turn must have reached the mock"
    state = session.home / session.agent.state_folder
    assert state.is_dir(), f"no state in {state}: {_said(first)}"
    written = session.home / session.agent.written
    assert written.is_file() and written.stat().st_size > 2, f"{written} not written: {_said(first)}"
    transcripts = session.transcripts()
    assert len(transcripts) == 1, (transcripts, _said(first))
    recorded = session.recorded()

    seen = len(session.mock.requests)
    second = session.jail(SECOND_PROMPT, follow_up=True)
    assert second.returncode == 0 and ANSWER in second.stdout, _said(second)
    # The follow-up sent the first turn back to the model: the agent read the state the first run wrote.
    assert REMEMBERED in session.mock.bodies(since=seen), _said(second)
    # Same conversation, longer (Gemini names its file by the minute it is written: a new name is possible).
    assert set(transcripts) <= set(session.transcripts()) and session.recorded() > recorded, _said(second)

    seen = len(session.mock.requests)
    denied = session.jail(FIRST_PROMPT, rule=["--js", "r.host === 'nothing-is-allowed.test'"])
    assert session.mock.requests[seen:] == [], "a denied request reached the model API"
    # Each agent prints the proxy's one-line reason (`jail: blocked POST https://...`) and fails the turn.
    assert denied.returncode != 0 and "jail: blocked" in denied.stdout + denied.stderr, _said(denied)

    after = snapshot(session.home)
    elsewhere = sorted(
        name for name in set(after) - set(before) if name.split("/")[0] not in session.agent.home_entries
    )
    assert elsewhere == [], f"files outside the agent's state in HOME: {elsewhere}"
    assert {name: after.get(name) for name in before} == before, "a file in HOME changed or went"


@pytest.mark.parametrize("session", list(REAL_NAMES), indirect=True)
def test_profile_named_with_profile_allows_its_model_api_and_only_then(session: Session) -> None:
    """`jail --profile claude --policy policies/registries.toml -- claude` works with no rule for the model
    API; the profile told from the command name alone never widens the rule."""
    policy = ["--policy", str(REGISTRIES_POLICY)]
    refused = session.jail(FIRST_PROMPT, rule=policy)
    assert refused.returncode != 0 and "jail: blocked" in refused.stdout + refused.stderr, _said(refused)
    assert session.mock.requests == [], "the profile told from the command name opened its hosts"

    allowed = session.jail(FIRST_PROMPT, rule=["--profile", "claude", *policy])
    assert allowed.returncode == 0 and ANSWER in allowed.stdout, _said(allowed)
    assert {r["host"] for r in session.mock.requests} == {session.agent.host}
