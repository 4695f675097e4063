"""Every code block of the README, fenced or indented, runs as a reader would run it.

- ```python blocks run as scripts from the repository root, in order (a later block may use what an earlier one saved).
- Shell blocks (```bash or indented) run command by command in a scratch folder, where the corpus paths they name
  (`/data/mimic-cxr-jpg`, `/data/CheXpert-v1.0-small`, `reports.csv`) are small fixture layouts in the corpus's own
  format and `../shared/data` is the shared data folder. Training commands run at smoke size: the same flags, plus
  tiny towers, 32 px images and one optimizer step appended (later flags win). `python run_pretrain.py` /
  `python run_eval.py` run in this process (`runpy`, as `__main__`, to spare a start-up each), every other command in
  a subprocess; `make` targets are checked with `make -n` (running them would install a virtualenv or the suite).
  Commands that name `outputs/cpu-demo/final` (what `make demo` trains) find there the tiny model a README command
  trained before. `python app.py` starts the web demo on a free port and passes once it prints its address; then it
  is stopped.
"""

import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest
from accelerate.state import AcceleratorState
from conftest import REPO_ROOT
from support.corpora import REPORTS, write_chexpert, write_mimic

from dataset_scripts.paths import shared_data_dir

pytestmark = pytest.mark.slow

SMOKE_FLAGS = [
    "--vision_model_name_or_path", "", "--text_model_name_or_path", "", "--vision_config", "tiny-resnet",
    "--text_config", "tiny-bert", "--projection_dim", "16", "--num_frozen_text_layers", "1", "--image_size", "32",
    "--max_length", "32", "--max_steps", "1", "--eval_steps", "0", "--save_steps", "1", "--per_device_train_batch_size",
    "4", "--max_eval_samples", "4", "--max_eval_images", "16", "--mixed_precision", "no", "--disable_tqdm",
]  # fmt: skip


def code_blocks(text: str) -> list[tuple[str, str]]:
    """`(language, code)` of every fenced block and every indented block (4 spaces, after a blank line)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            end = lines.index("```", index + 1)
            blocks.append((line[3:].strip() or "text", "\n".join(lines[index + 1 : end])))
            index = end + 1
        elif line.startswith("    ") and (index == 0 or not lines[index - 1].strip()):
            end = index
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(("indented", "\n".join(row[4:] for row in lines[index:end]).strip()))
            index = end
        else:
            index += 1
    return blocks


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: `\\` continuations joined, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def prepare(command: str, scratch) -> tuple[list[str], dict]:
    """The argv and environment that run `command` from `scratch`, at smoke size (see the module docstring)."""
    command = command.replace("/data/mimic-cxr-jpg", str(scratch / "mimic-cxr-jpg"))
    command = command.replace("/data/CheXpert-v1.0-small", str(scratch / "CheXpert-v1.0-small"))
    command = command.replace("../shared/data", str(shared_data_dir()))
    words = shlex.split(command)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[0] == "make":
        return ["make", "-n", "-C", str(REPO_ROOT), *words[1:]], env
    if words[0] == "accelerate":
        words = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", *words[2:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    words = [str(REPO_ROOT / word) if word in ("run_pretrain.py", "run_eval.py", "app.py") else word for word in words]
    if any(word.endswith("app.py") for word in words):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            words += ["--port", str(probe.getsockname()[1]), "--cache_dir", str(scratch / "app-cache")]
    if any(word.endswith("run_pretrain.py") for word in words):
        words += SMOKE_FLAGS
    if any(word.endswith("run_eval.py") for word in words):
        words += ["--max_eval_images", "16", "--max_train_images", "120", "--prompts_per_class", "2", "--n_resamples", "50"]
    return words, env


def serve_until_ready(argv: list[str], env: dict, cwd) -> None:
    """Starts a server command and waits for the address it prints; stops it then."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if "running at http" in line:
                return
        raise AssertionError(f"{argv[1:3]} exited without serving:\n{''.join(output)[-3000:]}")
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_script_in_process(argv: list[str], env: dict, cwd, monkeypatch) -> None:
    """`python run_pretrain.py ...` as `__main__` of this process, with the command's environment and folder."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", argv[1:])
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{argv[1:4]} exited with {exit_.code}"


@pytest.fixture
def scratch(tmp_path):
    for folder in ("mimic-cxr-jpg", "CheXpert-v1.0-small"):
        (tmp_path / folder).mkdir()
    write_mimic(tmp_path / "mimic-cxr-jpg", 24)
    write_chexpert(tmp_path / "CheXpert-v1.0-small", 24)
    pd.DataFrame({"text": REPORTS}).to_csv(tmp_path / "reports.csv", index=False)
    return tmp_path


def test_every_readme_code_block_runs(shared_data, scratch, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = code_blocks(readme)
    assert any(language == "python" for language, _ in blocks) and any(language == "bash" for language, _ in blocks)
    for number, (language, code) in enumerate(blocks):
        if language == "python":
            script = scratch / f"readme_block_{number}.py"
            script.write_text(code)
            runs = [([sys.executable, str(script)], dict(os.environ), REPO_ROOT)]
        elif language in ("bash", "indented"):
            runs = [(*prepare(command, scratch), scratch) for command in shell_commands(code)]
        else:
            raise AssertionError(f"README block {number} has language {language!r}, which this test cannot run")
        for argv, env, cwd in runs:
            demo_model = scratch / "outputs" / "cpu-demo" / "final"  # what `make demo` leaves
            if (argv[1].endswith("app.py") or "outputs/cpu-demo/final" in argv) and not demo_model.is_dir():
                shutil.copytree(scratch / "out" / "tiny" / "final", demo_model)
            if argv[0] == sys.executable and argv[1].endswith(("run_pretrain.py", "run_eval.py")):
                run_script_in_process(argv, env, cwd, monkeypatch)
                continue
            if argv[0] == sys.executable and argv[1].endswith("app.py"):
                serve_until_ready(argv, env, cwd)
                continue
            result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"README block {number} ({argv[:6]}...) failed:\n{result.stderr[-3000:]}"


def test_code_blocks_finds_fenced_and_indented_blocks():
    text = "intro\n\n```python\nprint(1)\n```\n\ntext\n\n    python run.py \\\n        --flag 1\n\nafter\n"
    assert code_blocks(text) == [("python", "print(1)"), ("indented", "python run.py \\\n    --flag 1")]
    assert shell_commands("# comment\npython a.py \\\n    --b 1  # note\nmake demo") == ["python a.py --b 1", "make demo"]
