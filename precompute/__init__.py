"""Offline precompute: from a family of models to universal neurons in SQLite."""

import os

# OpenMP threads spin while waiting for work by default; on a machine whose cores are shared (CI, a laptop
# running the dashboard) that made small torch ops up to 100x slower in our measurements. Sleeping waiters cost
# nothing measurable on large GEMMs. Set before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
