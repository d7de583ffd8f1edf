"""Deviceless TPU compile benchmark: see `mixkvq_jax.tpu_aot` (same arguments).

    python benchmarks/tpu_aot.py --model llama3-8b --topology v5e:1x1 \\
        --presets bf16,kivi2,mixkvq --impl auto,xla --batch 8 --context 32768
"""

import sys

from mixkvq_jax.tpu_aot import main

if __name__ == "__main__":
    sys.exit(main())
