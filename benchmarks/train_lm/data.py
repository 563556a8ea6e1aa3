"""The corpus of ``benchmarks.train_lm``: byte-level token streams of the ``.py`` files of the standard library and
of the installed packages (every machine has them offline), split into train and validation by a hash of each
file's path, and the batches drawn from them."""
import dataclasses
import hashlib
import os
import sysconfig
import time

import torch

PROGRAM = "benchmarks.train_lm"
VOCABULARY = 256  # bytes
FILE_SEPARATOR = b"\x00"  # between files: a byte that Python source practically never contains
MAX_FILE_BYTES = 1 << 20  # larger .py files are generated tables, not code
VALIDATION_EVERY = 20  # one file in 20 (by a hash of its path) is validation


@dataclasses.dataclass
class Corpus:
    """Byte-level token streams (uint8 tensors on the CPU) of the train and validation files, each file followed by
    FILE_SEPARATOR, with the file keys ("<root label>/<relative path>") of each split, in stream order."""
    train: torch.Tensor
    validation: torch.Tensor
    train_files: list[str]
    validation_files: list[str]
    roots: dict[str, str]
    byte_cap: int
    digest: str
    load_seconds: float

    def describe(self) -> dict:
        """Sizes and identity of the corpus, for the report and the JSON (not the bytes themselves)."""
        return {"roots": dict(self.roots), "byte_cap": self.byte_cap, "train_bytes": int(self.train.numel()),
                "validation_bytes": int(self.validation.numel()), "train_files": len(self.train_files),
                "validation_files": len(self.validation_files), "sha256": self.digest,
                "load_seconds": round(self.load_seconds, 2)}

    def train_batch(self, generator: torch.Generator, sequences: int, context: int) -> torch.Tensor:
        """`sequences` random windows of context + 1 bytes from the train stream, as a (sequences, context + 1)
        int64 tensor: inputs are [:, :-1], targets [:, 1:]. The starts come from `generator` only, so a seed gives
        the same batches to every method."""
        count = self.train.numel() - context
        if count < 1:
            raise ValueError(f"{PROGRAM}: the train stream ({self.train.numel()} bytes) is shorter than one window "
                             f"of context + 1 = {context + 1} bytes: raise the byte cap")
        starts = torch.randint(0, count, (sequences,), generator=generator)
        return self.train[starts[:, None] + torch.arange(context + 1)].long()

    def validation_windows(self, count: int, context: int) -> torch.Tensor:
        """`count` windows of context + 1 bytes evenly spaced over the validation stream: (count, context + 1)
        int64, the same for every run on this corpus."""
        last_start = self.validation.numel() - context - 1
        if count < 1:
            raise ValueError(f"{PROGRAM}: argument 'validation_windows' must be at least 1, got {count}")
        if last_start < 0:
            raise ValueError(f"{PROGRAM}: the validation stream ({self.validation.numel()} bytes) is shorter than "
                             f"one window of {context + 1} bytes: raise the byte cap")
        starts = torch.linspace(0, last_start, count).round().long()
        return self.validation[starts[:, None] + torch.arange(context + 1)].long()


def default_roots() -> dict[str, str]:
    """{"stdlib": the standard library's directory, "purelib": the installed packages' directory} of this
    interpreter (sysconfig); "platlib" too when it is a different directory."""
    paths = sysconfig.get_paths()
    roots = {"stdlib": paths["stdlib"], "purelib": paths["purelib"]}
    if os.path.realpath(paths["platlib"]) != os.path.realpath(paths["purelib"]):
        roots["platlib"] = paths["platlib"]
    return roots


def _hash_fraction(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big")


def list_python_files(roots: dict[str, str]) -> list[tuple[str, str, int]]:
    """Every ``.py`` file under the roots, as (key, path, size) sorted by key, the key being "<label>/<path
    relative to the root>". Package directories inside the standard library's tree (site-packages,
    dist-packages) belong to purelib, not stdlib; __pycache__ is skipped; a file reached twice (through another
    root) is listed once; files above MAX_FILE_BYTES are left out."""
    files, seen = [], set()
    for label, root in sorted(roots.items()):
        if not os.path.isdir(root):
            continue
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(name for name in subdirectories
                                       if name not in ("site-packages", "dist-packages", "__pycache__"))
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                try:
                    real, size = os.path.realpath(path), os.path.getsize(path)
                except OSError:
                    continue
                if real in seen or size > MAX_FILE_BYTES or size == 0:
                    continue
                seen.add(real)
                files.append((f"{label}/{os.path.relpath(path, root)}", path, size))
    return sorted(files)


def load_corpus(byte_cap: int, *, roots: dict[str, str] | None = None,
                validation_every: int = VALIDATION_EVERY) -> Corpus:
    """The byte corpus of the ``.py`` files under `roots` (default: ``default_roots()``), at most `byte_cap`
    bytes of files in all.

    Deterministic: files are listed in sorted key order; a file is validation when a hash of its key is divisible
    by `validation_every` (so its split never depends on the cap or on the other files). Each split then gets its
    share of the cap (validation: byte_cap // validation_every, train: the rest), filled with files in the order
    of another hash of their keys (a mix of every root and package, not the alphabetically first ones), skipping
    any that would pass the share. The streams concatenate each split's chosen files in sorted key order.
    """
    if isinstance(byte_cap, bool) or not isinstance(byte_cap, int) or byte_cap < 1:
        raise ValueError(f"{PROGRAM}: argument 'byte_cap' must be a positive integer, got {byte_cap!r}")
    if isinstance(validation_every, bool) or not isinstance(validation_every, int) or validation_every < 2:
        raise ValueError(f"{PROGRAM}: argument 'validation_every' must be an integer >= 2, got {validation_every!r}")
    start = time.perf_counter()
    roots = dict(roots or default_roots())
    listed = list_python_files(roots)
    if not listed:
        raise ValueError(f"{PROGRAM}: no .py files under {roots}")
    shares = {"validation": byte_cap // validation_every}
    shares["train"] = byte_cap - shares["validation"]
    splits: dict[str, tuple[list[str], list[bytes]]] = {"train": ([], []), "validation": ([], [])}
    for split in splits:
        members = [item for item in listed
                   if (_hash_fraction("split", item[0]) % validation_every == 0) == (split == "validation")]
        chosen, total = [], 0
        for key, path, size in sorted(members, key=lambda item: (_hash_fraction("order", item[0]), item[0])):
            if total + size <= shares[split]:
                chosen.append((key, path))
                total += size
        for key, path in sorted(chosen):
            try:
                with open(path, "rb") as file:
                    content = file.read()
            except OSError:
                continue
            splits[split][0].append(key)
            splits[split][1].append(content + FILE_SEPARATOR)
    digest = hashlib.sha256()
    streams = {}
    for split, (_, contents) in splits.items():
        joined = b"".join(contents)
        digest.update(joined)
        streams[split] = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else \
            torch.zeros(0, dtype=torch.uint8)
    return Corpus(train=streams["train"], validation=streams["validation"], train_files=splits["train"][0],
                  validation_files=splits["validation"][0], roots=roots, byte_cap=byte_cap,
                  digest=digest.hexdigest()[:16], load_seconds=time.perf_counter() - start)
