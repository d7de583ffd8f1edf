"""``python -m mixkvq_jax.eval``: see `mixkvq_jax.eval.cli`."""

from mixkvq_jax.errors import cli_exit
from mixkvq_jax.eval.cli import main

if __name__ == "__main__":
    cli_exit(main())
