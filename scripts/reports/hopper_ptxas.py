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


# ---------------------------------------------------------------------------------------------------------------
# SASS: the instructions ptxas produced, from a cubin, and how many a kernel spends per element (the fused optimizer
# steps' compile reports, hopper_collage_report.py, count them without a GPU).
#
# "Instructions per element" of a streaming kernel is counted on its main path: the SASS of the code that handles
# the elements of a full, aligned chunk (a CUDA kernel's vector loop: the innermost loop around its 16-byte loads; a
# Triton kernel's full-chunk path: from the basic block of its first 16-byte load to the EXIT after its last 16-byte
# store), divided by the elements that code handles per thread. Two counts:
#   - "static": every instruction of that code, NOPs aside;
#   - "hot": without the inline stubs that call the out-of-line slow paths of IEEE division and square root (a
#     predicated branch around a few moves and a CALL), which run only for operands outside the fast path's range
#     (zero, infinities, denormals, extreme exponents): the instructions an element of a finite, normal chunk issues.

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SASS_FUNCTION = re.compile(r"Function : (\S+)")
VECTOR_LOAD = re.compile(r"\bLDG?\.E(?:\.[A-Z0-9_]+)*\.128\b")
VECTOR_STORE = re.compile(r"\bSTG?\.E(?:\.[A-Z0-9_]+)*\.128\b")
BRANCH_TARGET = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")


def cuobjdump_path() -> str:
    """Triton's bundled cuobjdump (the CUDA toolkit's, if Triton's is missing)."""
    import shutil

    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - an older Triton: fall back to PATH
        pass
    path = shutil.which("cuobjdump")
    if path is None:
        raise FileNotFoundError("cuobjdump: neither Triton's nor one on PATH")
    return path


def sass_functions(cubin: bytes) -> dict:
    """{function name: [(address, instruction text, predicate included)]} of a cubin, from cuobjdump -sass."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        text = subprocess.run([cuobjdump_path(), "-sass", path], capture_output=True, text=True, check=True).stdout
    functions, current = {}, None
    for line in text.splitlines():
        match = SASS_FUNCTION.search(line)
        if match:
            current = functions.setdefault(match.group(1), [])
            continue
        match = SASS_LINE.search(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(2)))
    return functions


def opcode(instruction: str) -> str:
    parts = instruction.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def _branch_target(instruction: str):
    match = BRANCH_TARGET.search(instruction)
    return int(match.group(1), 16) if match and opcode(instruction).startswith("BRA") else None


def slow_path_stubs(instructions: list, limit: int = 16) -> set:
    """Addresses of the inline stubs that call a slow path: the instructions between a predicated forward branch and
    its target, at most `limit` of them, one of which is a CALL."""
    index = {address: k for k, (address, _) in enumerate(instructions)}
    stubs = set()
    for k, (address, instruction) in enumerate(instructions):
        target = _branch_target(instruction)
        if not instruction.startswith("@") or target is None or target <= address or target not in index:
            continue
        inner = instructions[k + 1:index[target]]
        if len(inner) <= limit and any(opcode(text).startswith("CALL") for _, text in inner):
            stubs.update(inner_address for inner_address, _ in inner)
    return stubs


def vector_loop(instructions: list) -> tuple:
    """(first, last) address of the innermost loop (a backward branch's range) that holds a 16-byte load."""
    loops = []
    for address, instruction in instructions:
        target = _branch_target(instruction)
        if target is not None and target <= address:
            inside = [text for a, text in instructions if target <= a <= address]
            if any(VECTOR_LOAD.search(text) for text in inside):
                loops.append((address - target, target, address))
    if not loops:
        raise ValueError("no loop holds a 16-byte load")
    _, first, last = min(loops)
    return first, last


def vector_path(instructions: list) -> tuple:
    """(first, last) address of a straight-line path: from the start of the basic block of the first 16-byte load to
    the first EXIT after the last 16-byte store."""
    loads = [a for a, text in instructions if VECTOR_LOAD.search(text)]
    stores = [a for a, text in instructions if VECTOR_STORE.search(text)]
    if not loads or not stores:
        raise ValueError("no 16-byte load or store")
    first_load, last_store = min(loads), max(stores)
    starts = {instructions[0][0]}
    for address, instruction in instructions:
        target = _branch_target(instruction)
        if target is not None and target <= first_load:
            starts.add(target)
        if address < first_load and (target is not None or opcode(instruction) == "EXIT"):
            starts.add(address + 16)  # the instruction after a branch or an exit starts a basic block
    exits = [a for a, text in instructions if a >= last_store and opcode(text) == "EXIT"]
    return max(start for start in starts if start <= first_load), min(exits)


def per_element(instructions: list, region: tuple, elements: int) -> dict:
    """{"static", "hot"} SASS instructions per element of `region` (NOPs aside) for `elements` per thread, and the
    16-byte loads and stores the region holds."""
    first, last = region
    inside = [(a, text) for a, text in instructions if first <= a <= last and opcode(text) != "NOP"]
    stubs = slow_path_stubs(instructions)
    hot = [(a, text) for a, text in inside if a not in stubs]
    return {"static": round(len(inside) / elements, 2), "hot": round(len(hot) / elements, 2),
            "vector_loads": sum(1 for _, text in inside if VECTOR_LOAD.search(text)),
            "vector_stores": sum(1 for _, text in inside if VECTOR_STORE.search(text))}
