"""The architecture, checked: layers that point only downward, one name per column on both sides
of the C++/Python boundary, torch-free kernels, no decision taken on an error message's text.

Layers, top to bottom (CONTRIBUTING.md): the face (``optimizer.py``); the step cache,
checkpoints and device schedule; the backends (``backends/``); the kernels (``triton_kernels/``,
``csrc/kernels/``). A module may import what is below it, never what is above, and never another
module's underscore name.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import d2z_optim.triton_kernels
import pytest

import d2z_optim
from d2z_optim.backends.contract import HP_COLS, HpCol, StepStatus

ROOT = Path(__file__).resolve().parents[1]
# the imported packages' files (in make wheel-cuda, the installed wheel's), never a path that
# may be missing: a glob of a missing folder would pass every test below vacuously
PACKAGE = Path(d2z_optim.__file__).resolve().parent
KERNELS = Path(d2z_optim.triton_kernels.__file__).resolve().parent
CSRC = ROOT / "csrc"

# rank of each package module: imports go from a higher rank to a lower one (or the same file)
RANKS = {
    "d2z_optim.integrations": 6.5,  # the frameworks' side: above the face, imported by nothing in it
    "d2z_optim.integrations.hf": 6,
    "d2z_optim.integrations.lightning": 6,
    "d2z_optim.integrations.accelerate": 6,
    "d2z_optim.integrations.common": 5.5,
    "d2z_optim": 5,
    "d2z_optim.optimizer": 4,
    "d2z_optim.cli": 4,
    "d2z_optim.__main__": 5,
    "d2z_optim.step_cache": 3,
    "d2z_optim.checkpoint": 3,
    "d2z_optim.grad_clip": 2.5,
    "d2z_optim.device_schedule": 2,
    "d2z_optim.arguments": 1.5,
    "d2z_optim.tracked": 1.5,
    "d2z_optim.state_dtypes": 1.5,
    "d2z_optim.dual": 2,
    "d2z_optim.reference": 1,
    "d2z_optim.schedules": 1,
    "d2z_optim.backends": 1,
    "d2z_optim.backends.torch_backend": 1,
    "d2z_optim.backends.cpp_backend": 1,
    "d2z_optim.backends.triton_backend": 1,
    "d2z_optim.backends.checks": 0.5,
    "d2z_optim.backends.stochastic": 0.45,
    "d2z_optim.backends.remainders": 0.45,
    "d2z_optim.backends.contract": 0.4,
    "d2z_optim.triton_kernels": 0,
    "d2z_optim.triton_kernels.adamw": 0,
    "d2z_optim.triton_kernels.clip": 0,
    "d2z_optim._C": 0,  # the compiled extension (csrc/)
    "d2z_optim.build_info": 0,  # written by setup.py when the extension is built
}


def _modules():
    assert (PACKAGE / "optimizer.py").is_file() and (KERNELS / "adamw.py").is_file()
    for path in sorted(PACKAGE.rglob("*.py")):
        if KERNELS in path.parents:  # the wheel puts them inside the package: once, below
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path
    for path in sorted(KERNELS.glob("*.py")):
        stem = "" if path.stem == "__init__" else f".{path.stem}"
        yield f"d2z_optim.triton_kernels{stem}", path


def _imports(name: str, path: Path):
    """(imported module, imported names) of every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if path.parent == KERNELS:
        package = "d2z_optim.triton_kernels"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: x is a module
                for n in names:
                    yield f"{mod}.{n}", []
            else:
                yield mod, names


def test_every_package_module_has_a_layer():
    assert {name for name, _ in _modules()} <= set(RANKS), sorted({n for n, _ in _modules()} - set(RANKS))


def test_imports_point_only_downward_and_take_no_underscore_names():
    bad = []
    for name, path in _modules():
        for mod, names in _imports(name, path):
            if not mod.startswith("d2z_optim"):
                continue
            if mod not in RANKS:
                bad.append(f"{name}: imports {mod}, which has no layer")
            elif RANKS[mod] > RANKS[name] or (RANKS[mod] == RANKS[name] and mod == name.rpartition(".")[0]):
                bad.append(f"{name} (layer {RANKS[name]}) imports {mod} (layer {RANKS[mod]}): upward")
            bad += [f"{name}: imports {mod}.{n}, another module's underscore name" for n in names if n[0] == "_"]
    assert not bad, "\n".join(bad)


def test_no_module_reads_another_modules_underscore_names():
    """``module._name`` on an imported d2z_optim module (e.g. ``adamw._kernel``): none."""
    bad = []
    for name, path in _modules():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("d2z_optim")):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_triton_kernels_import_nothing_of_d2z_optim():
    for path in KERNELS.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(d2z_optim|\.)", text, re.M), path


def test_triton_kernels_read_table_columns_only_through_constexprs():
    """No raw column offsets such as ``tl.load(hp + 4)``: a new column would be misread silently."""
    text = (KERNELS / "adamw.py").read_text()
    assert not re.search(r"\b(hp|row)\s*\+\s*\d", text), "a table column read by a literal offset"


def test_nothing_decides_on_an_error_messages_text():
    bad = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Call) and isinstance(side.func, ast.Name) and side.func.id == "str":
                        bad.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                inner = node.func.value
                if (
                    node.func.attr in ("startswith", "endswith", "replace", "find")
                    and isinstance(inner, ast.Call)
                    and isinstance(inner.func, ast.Name)
                    and inner.func.id == "str"
                    and inner.args
                    and isinstance(inner.args[0], ast.Name)
                    and inner.args[0].id in ("e", "err", "exc", "error")
                ):
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, bad


# ------------------------------------------------------------- C++ <-> Python mirrors
def _cpp_enum(path: Path, enum: str) -> dict[str, int]:
    body = re.search(rf"enum (?:class )?{enum}\b[^{{]*\{{(.*?)\}};", path.read_text(), re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    out, nxt = {}, 0
    for item in [x.strip() for x in body.split(",") if x.strip()]:
        name, _, value = (s.strip() for s in item.partition("="))
        nxt = int(value) if value else nxt
        out[name] = nxt
        nxt += 1
    return out


def _py_name(cpp: str) -> str:
    """kWeightDecay -> WEIGHT_DECAY, kBeta1 -> BETA1."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp[1:]).upper()


def test_hparams_columns_match_csrc():
    cpp = _cpp_enum(CSRC / "kernels" / "adamw_math.h", "HpCol")
    assert cpp.pop("kHpCols") == HP_COLS
    assert {_py_name(k): v for k, v in cpp.items()} == {c.name: int(c) for c in HpCol}
    assert max(HpCol) < HP_COLS


def test_triton_metadata_columns_match_csrc():
    pytest.importorskip("triton")
    from d2z_optim.backends.triton_backend import META_COLS, MetaCol

    cpp = _cpp_enum(CSRC / "torch" / "adamw_step_holder.h", "TritonMetaCol")
    assert cpp.pop("kMetaCols") == META_COLS
    assert {k[len("kMeta") :].upper(): v for k, v in cpp.items()} == {c.name: int(c) for c in MetaCol}


def test_step_status_matches_csrc():
    cpp = _cpp_enum(CSRC / "torch" / "adamw_step_holder.h", "StepStatus")
    assert {_py_name(k): v for k, v in cpp.items()} == {s.name: int(s) for s in StepStatus}


# ------------------------------------------------------------------ torch-free kernels
def test_csrc_kernels_include_no_torch():
    for path in (CSRC / "kernels").iterdir():
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("ATen", "torch", "c10", "pybind11", "Python.h")], path


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_csrc_kernels_compile_without_torch(tmp_path):
    """The CPU kernel and every header compile with no torch include path at all."""
    srcs = [str(p) for p in (CSRC / "kernels").glob("*.cpp")]
    probe = tmp_path / "headers.cpp"
    probe.write_text("".join(f'#include "{h.name}"\n' for h in (CSRC / "kernels").glob("*.h*")))
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC / 'kernels'}", *srcs, str(probe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
