"""``python -m mixkvq_jax.eval``: see `mixkvq_jax.eval.cli`."""

import sys

from mixkvq_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
