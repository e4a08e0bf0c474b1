"""`python -m omni_jax` is the same as the `omni-jax` console script."""
from omni_jax.cli import main

raise SystemExit(main())
