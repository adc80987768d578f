"""`python capped.py CAP_BYTES PEAK_FILE -m MODULE ARGS...` (or `... SCRIPT.py ARGS...`): run a module or script
with the process's CUDA caching allocator capped at CAP_BYTES (``torch.cuda.set_per_process_memory_fraction``,
FlexGen's T4 setting on a bigger GPU), then write the GPU name, the cap and the peak it allocated
(``torch.cuda.max_memory_allocated``) to PEAK_FILE as JSON. Without CUDA it runs the module uncapped and
records no peak. Every side of gpu.sh starts through it, so each lives under the same cap.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # this checkout's flexrun, for `-m flexrun`


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    cap, peak_file = int(sys.argv[1]), sys.argv[2]
    rest = sys.argv[3:]
    info: dict[str, object] = {"gpu_cap_bytes": cap}
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_total_bytes=total)
    code: object = 0
    try:
        if rest[0] == "-m":
            sys.argv = [rest[1], *rest[2:]]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = rest
            runpy.run_path(rest[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            info["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(0)
        with open(peak_file, "w") as f:
            json.dump(info, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
