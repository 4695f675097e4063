"""The README's Python example really runs (from the repository root, as a reader would run it)."""

import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_readme_python_examples_run(shared_data, tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README.md has no ```python example"
    for number, block in enumerate(blocks):
        script = tmp_path / f"readme_example_{number}.py"
        script.write_text(block)
        result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"README example {number} failed:\n{result.stderr[-3000:]}"
