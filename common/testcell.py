"""The coursework notebook's test cells: the code a student pastes there (each model's `transform` and `denorm`,
taken from the training script's own source, with the imports they need), and that code run the way a grader runs
it: in a clean Python, without this project on the path, on the exported model files.

    cell_code(REPO_ROOT / "vae_train.py")      # the VAE's block, as report.py shows it
    run_cells(paths, mnist_root=..., nz=100)   # {"VAE": (ok, detail), "DCGAN": (ok, detail)}, check_submission.py

Imports no torch (the cells run in a child process).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .flags import REPO_ROOT

CELL_NAMES = ("transform", "denorm")  # what the coursework asks to be copied into its test cells
SCRIPTS = {"VAE": REPO_ROOT / "vae_train.py", "DCGAN": REPO_ROOT / "dcgan_train.py"}


def cell_code(script: Path) -> str:
    """`transform` and `denorm` as the script defines them (source text, not a copy kept elsewhere), preceded by
    the script's own import lines for the names they use."""
    source = Path(script).read_text()
    tree = ast.parse(source)
    pieces = [node for node in tree.body if _defines(node) & set(CELL_NAMES)]
    found = set().union(*(_defines(node) for node in pieces)) if pieces else set()
    if found != set(CELL_NAMES):
        raise ValueError(f"{script} defines {sorted(found)}, not both of {CELL_NAMES} at its top level")
    used = {node.id for piece in pieces for node in ast.walk(piece) if isinstance(node, ast.Name)}
    imports = []
    for node in tree.body:  # the script's import lines of the names used, one line a name
        if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and node.module != "__future__" \
                and not node.level:
            imports += [ast.unparse(type(node)(**{**vars(node), "names": [alias]})) for alias in node.names
                        if (alias.asname or alias.name.split(".")[0]) in used]
    return "\n".join(imports) + "\n\n" + "\n\n\n".join(ast.get_source_segment(source, p) for p in pieces) + "\n"


def _defines(node) -> set[str]:
    if isinstance(node, ast.FunctionDef):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {t.id for t in targets if isinstance(t, ast.Name)}
    return set()


# The grader's side, run after each cell in the cell's own namespace (transform and denorm defined there).
# `result` is (passed, what was seen).
_VAE_TEST = """
import torch, numpy as np
from PIL import Image
model = torch.jit.load(PATHS["vae"], map_location="cpu")
if MNIST_ROOT:
    from torchvision.datasets import MNIST
    test_set = MNIST(MNIST_ROOT, train=False, transform=transform, download=False)
    x = torch.stack([test_set[i][0] for i in range(min(N, len(test_set)))])
    what = f"{len(x)} MNIST test images"
else:
    rng = np.random.default_rng(0)
    x = torch.stack([transform(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L"))
                     for _ in range(N)])
    what = f"{N} random 28x28 PIL images"
with torch.no_grad():
    pixels = denorm(model(x)[0])
ok = bool(tuple(pixels.shape) == tuple(x.shape) and torch.isfinite(pixels).all() and pixels.min() >= 0
          and pixels.max() <= 1)
result = (ok, f"{what} -> transform -> model(x)[0] -> denorm: {tuple(pixels.shape)}, values "
              f"[{pixels.min():.3g}, {pixels.max():.3g}]" + ("" if ok else ", expected the shape of x in [0, 1]"))
"""

_DCGAN_TEST = """
import torch, numpy as np
from PIL import Image
generator = torch.jit.load(PATHS["gen"], map_location="cpu")
discriminator = torch.jit.load(PATHS["disc"], map_location="cpu")
with torch.no_grad():
    pixels = denorm(generator(torch.randn(N, NZ, 1, 1)))
    rng = np.random.default_rng(0)
    real = torch.stack([transform(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                        for _ in range(N)])
    logits = discriminator(real)
ok = bool(tuple(pixels.shape) == (N, 3, 32, 32) and torch.isfinite(pixels).all() and pixels.min() >= 0
          and pixels.max() <= 1 and logits.numel() == N)
result = (ok, f"denorm(G(torch.randn({N}, {NZ}, 1, 1))): {tuple(pixels.shape)} in [{pixels.min():.3g}, "
              f"{pixels.max():.3g}]; D(transform(PIL image)) for {N} RGB 32x32 images: {tuple(logits.shape)}"
          + ("" if ok else "; expected (N, 3, 32, 32) in [0, 1] and N values from D"))
"""

_DRIVER = """
import json, sys, traceback
settings = json.loads(sys.argv[1])
results = {}
for name, cell, test in settings["runs"]:
    space = {"PATHS": settings["paths"], "MNIST_ROOT": settings["mnist_root"], "N": settings["n"],
             "NZ": settings["nz"]}
    try:
        exec(compile(cell, f"<the {name} test cell>", "exec"), space)
        exec(compile(test, f"<the {name} check>", "exec"), space)
        results[name] = [bool(space["result"][0]), str(space["result"][1])]
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        results[name] = [False, f"{type(err).__name__}: {err} ({where.filename}, line {where.lineno})"]
print("RESULTS " + json.dumps(results))
"""


def run_cells(paths: dict[str, Path], *, mnist_root: Path | None, nz: int, n: int = 16,
              timeout: float = 600) -> dict[str, tuple[bool, str]]:
    """Each test cell (cell_code of each script) and a grader's use of it, in one clean Python: `python -I`
    (no PYTHONPATH, no user site, not the script's folder on sys.path), started in an empty temporary folder, so
    the cell works only if it needs nothing of this project. `paths`: vae, gen, disc model files."""
    settings = {"runs": [[name, cell_code(SCRIPTS[name]), test] for name, test in (("VAE", _VAE_TEST),
                                                                                       ("DCGAN", _DCGAN_TEST))],
                "paths": {k: str(Path(v).resolve()) for k, v in paths.items()},
                "mnist_root": str(Path(mnist_root).resolve()) if mnist_root else None, "nz": nz, "n": n}
    with tempfile.TemporaryDirectory(prefix="test-cell-") as cwd:
        proc = subprocess.run([sys.executable, "-I", "-c", _DRIVER, json.dumps(settings)], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")), None)
    if line is None:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {name: (False, f"the clean Python failed: {why}") for name in SCRIPTS}
    return {name: (bool(ok), detail) for name, (ok, detail) in json.loads(line[len("RESULTS "):]).items()}
