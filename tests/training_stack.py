"""Run Python code in a subprocess where the data/ops stack cannot be imported, as on the GPU box (which has only
torch + transformers + tokenizers + sentencepiece + safetensors + numpy + pyyaml + tqdm)."""

from __future__ import annotations

import subprocess
import sys

NOT_ON_THE_GPU_BOX = ["matplotlib", "pandas", "datasets", "datasketch", "great_expectations", "mlflow", "prefect", "dvc"]


def run_without_data_and_ops_stack(code: str) -> subprocess.CompletedProcess:
    prelude = (
        "import sys\n"
        "class Block:\n def find_spec(self, name, path=None, target=None):\n"
        f"  if name.split('.')[0] in {NOT_ON_THE_GPU_BOX!r}: raise ModuleNotFoundError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
