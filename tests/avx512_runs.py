"""Run a snippet in two fresh processes, with the AVX-512 kernels (where the CPU has them) and with
QUIPC_NO_AVX512=1 (the choice is made once a process): tests compare what the two paths compute."""
import os
import subprocess
import sys

import numpy as np


def with_and_without_avx512(code: str, tmp_path, suffix: str = ".npy") -> list:
    """[result as built, result with QUIPC_NO_AVX512=1]: `code` saves its result to sys.argv[1]
    (np.save / np.savez), loaded back here."""
    outs = []
    for flag in ("0", "1"):
        path = tmp_path / f"avx512_{flag}{suffix}"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                       env={**os.environ, "QUIPC_NO_AVX512": flag})
        outs.append(np.load(path))
    return outs
