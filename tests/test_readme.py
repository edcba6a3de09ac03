"""The README's promises: two set-up commands first, and CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## ")  # the commands come before any section
    commands = _readme_commands()
    assert len(commands) == 2
    assert "packager demo" in commands[0] and "pytest" in commands[1]
    for command in commands:
        assert command.startswith("python3 -m venv .venv") and "-c constraints.txt" in command


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.replace(" -q ", " ")  # .ci/run may add -q to pip


def test_constraints_pin_cpu_torch():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
