"""`python -m brkeras.nn.kernels`: builds the fused kernels against the installed TensorFlow."""

import sys

from brkeras.nn import kernels

if __name__ == "__main__":
    try:
        print(f"built {kernels.build()}")
    except RuntimeError as err:
        print(f"brkeras.nn.kernels: {err}", file=sys.stderr)
        sys.exit(1)
