"""What ptxas reports for a kernel compiled for Hopper (sm_90): registers and spill bytes. Shared by the compile
report scripts (hopper_loss_report.py, hopper_collage_report.py), which run without a GPU."""
import os
import re
import subprocess
import tempfile

from triton.backends.nvidia.compiler import get_ptxas

PATTERNS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
            "spill_loads": r"(\d+) bytes spill loads"}


def ptxas_report(ptx: str) -> dict:
    """{"registers", "spill_stores", "spill_loads"} of `ptx` assembled by Triton's own ptxas for sm_90a."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", source, "-o",
                                 os.path.join(folder, "kernel.cubin")], capture_output=True, text=True, check=True)
    output = result.stdout + result.stderr
    return {name: int(re.search(pattern, output).group(1)) for name, pattern in PATTERNS.items()}
