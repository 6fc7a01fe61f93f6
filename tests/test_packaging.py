"""The wheel: `pip wheel --no-build-isolation .` builds, and ships the Triton kernels in our namespace."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_and_maps_triton_kernels_into_the_package(tmp_path):
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
    )
    (wheel,) = tmp_path.glob("d2z_optim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "d2z_optim/triton_kernels/__init__.py" in names  # not a top-level triton_kernels
    assert not any(n.startswith("triton_kernels/") for n in names)
    assert {"d2z_optim/__init__.py", "d2z_optim/optimizer.py", "d2z_optim/schedules.py"} <= names
    assert "d2z_optim/backends/torch_backend.py" in names


def test_installed_package_imports_the_mapped_subpackage():
    import d2z_optim.triton_kernels as tk

    assert tk.__name__ == "d2z_optim.triton_kernels"
