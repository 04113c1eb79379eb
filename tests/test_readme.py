"""README is the user's first contact: its configuration table must name every setting."""

from pathlib import Path

from molmo_backend.settings import SETTINGS_DOC

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_environment_variable_is_in_the_readme_table():
    missing = [var for var, _ in SETTINGS_DOC.values() if f"`{var}`" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_two_setup_commands_exist_and_ci_calls_the_test_command():
    root = Path(__file__).resolve().parents[1]
    assert "scripts/serve" in README and "scripts/test" in README
    assert (root / "scripts/serve").stat().st_mode & 0o111 and (root / "scripts/test").stat().st_mode & 0o111
    assert "scripts/test" in (root / ".ci/run").read_text()
