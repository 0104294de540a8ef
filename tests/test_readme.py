"""The README stays true: its config reference is the one generated from config.Config, and the commands it
promises name files that exist."""

import re
from pathlib import Path

from config import KEY_TYPES, config_reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_config_reference_matches_the_defaults():
    start = README.index("<!-- config-reference")
    table = README[README.index("\n", start) + 1:README.index("<!-- end config-reference -->")].strip()
    assert table == config_reference(), "README config reference is stale: paste `python config.py` output"


def test_every_key_has_a_comment():
    documented = set(re.findall(r"^\| `(\w+)` \|", config_reference(), re.M))
    assert documented == set(KEY_TYPES)


def test_commands_name_existing_files():
    for script, config in re.findall(r"(\w+\.py) (configs/\w+\.py)", README):
        assert (ROOT / script).exists(), script
        assert (ROOT / config).exists(), config


def test_ci_runs_the_readme_test_command():
    command = "pip install -r requirements.txt -r requirements-extras.txt && python -m pytest -q"
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()


def test_what_is_where_names_every_file():
    table = README[README.index("## What is where"):README.index("## Models")]
    named = set(re.findall(r"`([\w/]+(?:\.py)?/?)`", table))
    top = {p.name for p in ROOT.glob("*.py")} | {"configs/", "tests/", "tasks/"}
    assert top <= named, top - named
    in_tasks = {p.name for p in (ROOT / "tasks").glob("*.py")}
    assert {n.removeprefix("tasks/") for n in named if n.endswith(".py")} - top == in_tasks


def test_adding_a_task_shows_the_code_as_it_is():
    section = README[README.index("### Adding a task"):README.index("## Fault tolerance")]
    example, registry_line = re.findall(r"```python\n(.*?)```", section, re.S)
    source = (ROOT / "tasks" / "snli_ve.py").read_text()
    for line in example.splitlines():
        code = line.split("  #")[0].rstrip()
        if code and not code.endswith("..."):
            assert code + "\n" in source or code + "  #" in source, f"README's Task example is not the code: {code!r}"
    assert "    " + registry_line.strip() in (ROOT / "tasks" / "__init__.py").read_text()
