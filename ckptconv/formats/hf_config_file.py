"""An HF config given on the command line (--hf-config FILE|DIR) as a dict."""
from __future__ import annotations

import json
from pathlib import Path


def load_hf_config_arg(hf_config: str | Path | None) -> dict | None:
    if hf_config is None:
        return None
    p = Path(hf_config)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())
