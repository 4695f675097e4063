"""The Makefile's targets do what the README says (checked with `make -n`: running them installs a virtualenv)."""

import subprocess

from conftest import REPO_ROOT


def dry_run(target: str) -> str:
    completed = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), target], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_bench_runs_every_benchmark():
    commands = dry_run("bench")
    scripts = sorted(path.name for path in (REPO_ROOT / "benchmarks").glob("bench_*.py"))
    assert scripts and all(f"benchmarks/{name}" in commands for name in scripts)


def test_demo_and_test_run_the_cli_and_the_suite():
    assert "run_pretrain.py" in dry_run("demo")
    assert "-m pytest" in dry_run("test")
