"""The wheel: `pip wheel --no-build-isolation .` builds, and ships the Triton kernels in our namespace.

The layout test builds the pure-Python wheel (D2Z_NO_EXTENSION=1): the package list is the same with
or without the extension, and compiling it again here took ~2 minutes of `make test`. The wheel with
the extension is built and inspected by `make wheel-cuda` (tools/check_cuda_wheel.py: one _C, its
cubins and PTX, build_info.py beside it, its ops registered), which .ci/run runs after `make test`.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_and_maps_triton_kernels_into_the_package(tmp_path):
    import os

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "D2Z_NO_EXTENSION": "1"},
    )
    (wheel,) = tmp_path.glob("d2z_optim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "d2z_optim/triton_kernels/__init__.py" in names  # not a top-level triton_kernels
    assert not any(n.startswith("triton_kernels/") for n in names)
    assert {"d2z_optim/__init__.py", "d2z_optim/optimizer.py", "d2z_optim/schedules.py"} <= names
    assert "d2z_optim/backends/torch_backend.py" in names
    # every module of the source tree ships (a subpackage missing from setup.py's list would not)
    source = {f"d2z_optim/{f.relative_to(ROOT / 'd2z_optim').as_posix()}" for f in (ROOT / "d2z_optim").rglob("*.py")}
    source |= {f"d2z_optim/triton_kernels/{f.name}" for f in (ROOT / "triton_kernels").glob("*.py")}
    assert source - {"d2z_optim/build_info.py"} <= names, sorted(source - names)


def test_installed_package_imports_the_mapped_subpackage():
    import d2z_optim.triton_kernels as tk

    assert tk.__name__ == "d2z_optim.triton_kernels"


def _setup_py(args, tmp_path, env=None):
    """setup.py run as pip runs it (``__main__``) in a python where torch cannot be imported."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')"
    )
    import os

    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_a_build_without_torch_fails_saying_what_works(tmp_path):
    """pip's build isolation hides torch: the build fails loudly instead of a wheel without the kernel."""
    r = _setup_py(["bdist_wheel", "-d", str(tmp_path)], tmp_path)
    assert r.returncode != 0
    assert "pip install --no-build-isolation" in r.stderr and "D2Z_NO_EXTENSION=1" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.whl"))


def test_metadata_needs_no_torch(tmp_path):
    r = _setup_py(["egg_info", "--egg-base", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr


def test_an_explicit_pure_python_install(tmp_path):
    r = _setup_py(
        ["build", "--build-base", str(tmp_path / "b"), "bdist_wheel", "-b", str(tmp_path / "bd"), "-d", str(tmp_path)],
        tmp_path,
        env={"D2Z_NO_EXTENSION": "1"},
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("d2z_optim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "d2z_optim/optimizer.py" in names and not any(n.endswith(".so") for n in names), names


def test_release_build_has_no_debug_info():
    from d2z_optim import _C

    blob = Path(_C.__file__).read_bytes()
    assert b".debug_info" not in blob, f"{_C.__file__} carries debug info ({len(blob) / 1e6:.1f} MB)"


def test_the_build_records_the_torch_it_was_compiled_against():
    import torch

    from d2z_optim.backends import cpp_backend

    assert cpp_backend.built_with_torch() == torch.__version__
    assert cpp_backend.load_extension() is None


def test_another_torch_is_named_not_a_loader_error():
    from d2z_optim.backends.cpp_backend import torch_mismatch

    why = torch_mismatch("2.13.0+cpu", "2.14.1+cu130")
    assert "built against torch 2.13.0+cpu but torch 2.14.1+cu130 is running" in why
    assert "pip install --no-build-isolation --force-reinstall" in why
    assert torch_mismatch("2.13.0+cpu", "2.13.1") is None  # a patch release keeps the ABI
    assert torch_mismatch(None, "2.13.0") is None  # no record (a build before the record existed)
