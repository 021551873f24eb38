"""No checkpoint or tokenizer directory runs its own code: every transformers ``Auto*.from_pretrained`` in the
product passes ``trust_remote_code=False``.

Left at its default (None), transformers asks on stdin whether to run a directory's ``auto_map``
code, and a "y" there (a pipe, a wrapper script, a Triton python backend's inherited stdin)
imports it. With False it refuses at once.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

from tests.conftest import REPO

PRODUCT = ("llmexp", "benchmarks")


def auto_class_loads():
    """(file:line, the call's trust_remote_code as written or None) for every ``Auto*.from_pretrained(...)``."""
    for folder in PRODUCT:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id.startswith("Auto")):
                    trust = next((ast.unparse(k.value) for k in node.keywords if k.arg == "trust_remote_code"), None)
                    yield f"{path.relative_to(REPO)}:{node.lineno}", trust


def test_every_auto_class_load_in_the_product_refuses_remote_code():
    loads = list(auto_class_loads())
    assert len(loads) >= 6  # models.py's two, the export stage's, both Triton models', the benchmark sweep's
    assert [(where, trust) for where, trust in loads if trust != "False"] == []


def test_a_tokenizer_with_its_own_code_is_refused_even_when_a_yes_reaches_stdin(tiny_checkpoint, tmp_path):
    tokenizer = tmp_path / "repository" / "tokenizer"
    tokenizer.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, tokenizer / name)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="OwnTokenizer", auto_map={"AutoTokenizer": ["own_tokenizer.OwnTokenizer", None]})
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    marker = tmp_path / "code-ran"
    (tokenizer / "own_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass OwnTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    loaders = f"""
from types import SimpleNamespace
from llmexp.plugins.export import stage, triton_postprocessing, triton_preprocessing
for load in (lambda: triton_preprocessing.load_tokenizer({str(tokenizer.parent)!r}, "tokenizer"),
             lambda: triton_postprocessing.load_tokenizer({str(tokenizer.parent)!r}, "tokenizer"),
             lambda: stage._tokenizer(SimpleNamespace(model=None), {str(tokenizer)!r}, "export")):
    try:
        print("loaded", type(load()).__name__)
    except Exception as error:
        print("refused", type(error).__name__)
"""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", loaders], input="y\n" * 10, capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["refused ValueError", "refused ValueError", "refused UserError"], done.stdout
    assert not marker.exists() and "Do you wish to run the custom code" not in done.stdout + done.stderr
