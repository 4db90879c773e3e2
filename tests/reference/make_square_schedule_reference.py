"""Square's un-rescaled p schedule as the reference AutoAttack runs it.

Run by hand in the reference's own venv (never by pytest):

  /path/to/ref/venv/bin/python tests/reference/make_square_schedule_reference.py

Writes tests/data/autoattack/square_schedule_reference.npz: p at every
iteration 0..4999 of the reference's SquareAttack(p_init=0.8,
n_queries=5000, resc_schedule=False), the setting of AutoAttack's standard
version.
"""

import os

import numpy as np
from pyautoattack.square import SquareAttack

attack = SquareAttack(
  lambda x: x, p_init=0.8, n_queries=5000, eps=0.1, resc_schedule=False
)
p = np.array([attack.p_selection(i) for i in range(5000)], np.float64)
out = os.path.join(
  os.path.dirname(__file__),
  '..',
  'data',
  'autoattack',
  'square_schedule_reference.npz',
)
np.savez(out, p=p)
print('wrote', out, 'distinct values', sorted(set(p.tolist()))[:3], '...')
