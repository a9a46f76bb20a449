"""GPU-only paths (fp16 loss scaling, FusedAdam, NCCL, flash attention): see gpu_checks.py."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: fp16 and FusedAdam are refused by "
                                       "DeepSpeed's CPU accelerator, NCCL and flash attention "
                                       "are CUDA-only")


def test_gpu_paths(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["DS_ACCELERATOR"] = "cuda"
    # DeepSpeed's JIT op builder cannot parse arch suffixes such as "9.0a"
    env["TORCH_CUDA_ARCH_LIST"] = env.get("TORCH_CUDA_ARCH_LIST", "").replace("a", "") or \
        "{}.{}".format(*torch.cuda.get_device_capability())
    script = os.path.join(os.path.dirname(__file__), "gpu_checks.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "overflow skipped and counted" in proc.stdout
