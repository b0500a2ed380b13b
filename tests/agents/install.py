"""The real agents, installed once from the npm registry at pinned versions into a git-ignored folder
(`.venv/agents`), and reused until the pins change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

PINS = {
    "@openai/codex": "0.169.0",
    "@anthropic-ai/claude-code": "2.1.328",
    "@google/gemini-cli": "0.61.0",
}
AGENTS_DIR = Path(__file__).resolve().parents[2] / ".venv" / "agents"


def install_agents(folder: Path = AGENTS_DIR) -> Path:
    """Install the pinned agents into `folder` (skipped when already there); returns their `.bin` folder.

    Install scripts are skipped (the optional native add-ons they build are not needed); Claude Code's own
    is run by hand, as it puts the native binary in place of its placeholder (a hard link, milliseconds)."""
    marker = folder / "pins.json"
    bin_dir = folder / "node_modules" / ".bin"
    if marker.exists() and json.loads(marker.read_text()) == PINS:
        return bin_dir
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing (install nodejs >= 20)")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "package.json").write_text('{"name": "jail-test-agents", "private": true}\n')
    specs = [f"{name}@{version}" for name, version in PINS.items()]
    command = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error", *specs]
    installed = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        raise RuntimeError(f"npm install failed: {installed.stderr.strip()[-2000:]}")
    claude = folder / "node_modules" / "@anthropic-ai" / "claude-code"
    placed = subprocess.run(["node", "install.cjs"], cwd=claude, capture_output=True, text=True, timeout=120)
    if placed.returncode != 0:
        raise RuntimeError(f"claude-code's install.cjs failed: {placed.stderr.strip()}")
    # Other users (the rootless test user) run the agents too.
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            path = Path(root, name)
            path.chmod(path.stat().st_mode | 0o555)
    marker.write_text(json.dumps(PINS))
    return bin_dir
