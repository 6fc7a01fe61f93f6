"""Check a CUDA build of d2z_optim without a GPU: what the wheel holds and what the install registers.

    python tools/check_cuda_wheel.py dist/d2z_optim-*.whl --arch 80 --arch 90 --ptx 90

1. The wheel's extension holds device code (an ELF cubin in a fatbin) for every
   ``--arch``. Read from the fatbin headers directly (no cuobjdump here): a fatbin
   starts with the magic 0xBA55ED50, a 16-byte header whose 8-byte field at offset 8
   is the size of its entries; each entry has a header (its own size at offset 4, the
   payload size at offset 8, the kind at offset 0: 1 = PTX, 2 = ELF cubin, and the
   SM version at offset 28), then its payload.
2. The installed package imports, and every ``d2z::`` op has a CPU and a CUDA kernel.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zipfile

FATBIN_MAGIC = 0xBA55ED50


def fatbin_archs(blob: bytes) -> dict[str, set[int]]:
    """{'cubin': {80, 90}, 'ptx': {...}} from every fatbin embedded in ``blob``."""
    found: dict[str, set[int]] = {"cubin": set(), "ptx": set()}
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = blob.find(magic)
    while pos != -1:
        try:
            _, _, header, size = struct.unpack_from("<IHHQ", blob, pos)
            off, end = pos + header, pos + header + size
            while off + 32 <= end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, off)
                (arch,) = struct.unpack_from("<I", blob, off + 28)
                if entry_header < 32 or kind not in (1, 2):
                    break
                found["ptx" if kind == 1 else "cubin"].add(arch)
                off += entry_header + payload
        except struct.error:
            pass
        pos = blob.find(magic, pos + 4)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel")
    ap.add_argument("--arch", type=int, action="append", default=[], help="SM version that must have a cubin")
    ap.add_argument("--ptx", type=int, action="append", default=[], help="compute version that must have PTX")
    ap.add_argument("--no-import", action="store_true", help="only inspect the wheel")
    args = ap.parse_args()
    ok = True
    with zipfile.ZipFile(args.wheel) as z:
        exts = [n for n in z.namelist() if n.startswith("d2z_optim/_C") and n.endswith(".so")]
        if len(exts) != 1:
            print(f"FAIL: expected one d2z_optim/_C*.so in the wheel, found {exts}")
            return 1
        archs = fatbin_archs(z.read(exts[0]))
        # the torch the kernel was compiled against ships beside it (setup.py writes it as it builds)
        info = z.read("d2z_optim/build_info.py").decode() if "d2z_optim/build_info.py" in z.namelist() else ""
    if "TORCH_CUDA = '" not in info:
        print(f"FAIL: d2z_optim/build_info.py is missing from the wheel or names no CUDA torch: {info!r}")
        return 1
    print(f"{exts[0]}: cubins for sm_{sorted(archs['cubin'])}, PTX for compute_{sorted(archs['ptx'])}")
    for a in args.arch:
        if a not in archs["cubin"]:
            print(f"FAIL: no sm_{a} cubin in {exts[0]}")
            ok = False
    for a in args.ptx:
        if a not in archs["ptx"]:
            print(f"FAIL: no compute_{a} PTX in {exts[0]} (newer GPUs need it to JIT the kernels)")
            ok = False
    if not args.no_import:
        import torch

        import d2z_optim
        from d2z_optim.backends import cpp_backend

        why = cpp_backend.load_extension()
        if why:
            print(f"FAIL: {why}")
            return 1
        ops = [f"d2z::{name}" for name in dir(torch.ops.d2z) if not name.startswith("_") and name.endswith("_")]
        for op in ops:
            for key in ("CPU", "CUDA"):
                has = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                print(f"{op}: {key} kernel {'registered' if has else 'MISSING'}")
                ok &= has or (key == "CUDA" and "replay" in op)  # the grid replay is a CPU-only test op
        # the arch gate's record of the device code must be what the fatbin holds
        recorded = set(cpp_backend.cuda_code())
        held = {f"sm_{a}" for a in archs["cubin"]} | {f"compute_{a}" for a in archs["ptx"]}
        print(f"_C.cuda_code(): {sorted(recorded)}")
        if recorded != held:
            print(f"FAIL: the extension records {sorted(recorded)} but its fatbin holds {sorted(held)}")
            ok = False
        print(f"d2z_optim {d2z_optim.__version__} from {d2z_optim.__file__}; torch {torch.__version__}")
        print(f"backends: {d2z_optim.available_backends()}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
