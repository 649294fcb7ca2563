"""A saved adapter is readable by group and others under umask 022 (issue 10: PEFT's safetensors writer leaves 0600)."""

from __future__ import annotations

import os
import stat

from training.train import TrainConfig, train


def test_saved_adapter_files_are_0644(fresh_tiny, km_data, tmp_path):
    out = tmp_path / "km"
    old = os.umask(0o022)
    try:
        train(fresh_tiny, TrainConfig(task="km", data=km_data, out=out, steps=1, progress=False),
              log=lambda *_: None)
    finally:
        os.umask(old)
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert got == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "README.md": 0o644,
                   "softprompt_training.json": 0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
