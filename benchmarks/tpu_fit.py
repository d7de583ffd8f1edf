"""Fit check for a multi-chip TPU slice: see `mixkvq_jax.tpu_fit` (same arguments).

    python benchmarks/tpu_fit.py --models llama3-8b,qwen3-8b \\
        --topologies v5e:2x2,v5e:2x4,v6e:2x2 --presets bf16,kivi2,mixkvq --contexts 8192,32768
"""

import sys

from mixkvq_jax.tpu_fit import main

if __name__ == "__main__":
    sys.exit(main())
