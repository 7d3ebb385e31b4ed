"""Files written next to a sliced checkpoint so that transformers loads it with trust_remote_code=True.

``configuration_slicegpt.py`` and ``modeling_slicegpt.py`` live here; the model itself is
``modeling.py``, copied as ``slicegpt_reference.py`` (it depends on torch alone).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
REFERENCE = HERE.parent / "modeling.py"
AUTO_MAP = {
    "AutoConfig": "configuration_slicegpt.SliceGPTConfig",
    "AutoModelForCausalLM": "modeling_slicegpt.SliceGPTForCausalLM",
}


def write_remote_code(directory: Path) -> dict[str, Any]:
    """Copy the remote-code files into `directory`; returns the config.json entries that point to them."""
    for name in ("configuration_slicegpt.py", "modeling_slicegpt.py"):
        shutil.copyfile(HERE / name, Path(directory) / name)
    shutil.copyfile(REFERENCE, Path(directory) / "slicegpt_reference.py")
    return {"auto_map": AUTO_MAP, "architectures": ["SliceGPTForCausalLM"]}
