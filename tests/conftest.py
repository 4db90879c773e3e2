"""Test setup: 8 fake CPU devices, set before JAX initialises."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Scripts run by hand in the reference implementations' own venvs.
collect_ignore_glob = ['reference/*']
