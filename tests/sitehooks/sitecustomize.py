"""Test-only hooks, loaded by Python at start-up when tests put this folder on PYTHONPATH (tests/hooks.py's
``hook_env``), so the package itself carries no test switches. Each hook is off unless its variable is set:

* ``LUNA_TEST_SLOW_SCAN_S``: sleep that long before each scan read (luna.ct.read_scan), so a test can kill a
  crop job between two scans;
* ``LUNA_TEST_SLOW_BATCH_S``: sleep that long after each training batch's augmentation (luna.data.augment_batch),
  so a test can kill luna-train mid-epoch;
* ``LUNA_TEST_NO_RESERVE=1``: the crop store's room is neither reserved nor checked (luna.store), standing in for
  another job filling the disk after the checks.

The hooks replace the functions in their modules before any luna module that imports them by name is loaded.
"""

import os
import time


def _install() -> None:
    slow_scan = float(os.environ.get("LUNA_TEST_SLOW_SCAN_S", "0") or 0)
    if slow_scan > 0:
        import luna.ct

        read_scan = luna.ct.read_scan

        def slow_read_scan(path):
            time.sleep(slow_scan)
            return read_scan(path)

        luna.ct.read_scan = slow_read_scan
    slow_batch = float(os.environ.get("LUNA_TEST_SLOW_BATCH_S", "0") or 0)
    if slow_batch > 0:
        import luna.data

        augment_batch = luna.data.augment_batch

        def slow_augment_batch(batch, config, generator):
            time.sleep(slow_batch)
            return augment_batch(batch, config, generator)

        luna.data.augment_batch = slow_augment_batch
    if os.environ.get("LUNA_TEST_NO_RESERVE", "") == "1":
        import luna.store

        luna.store.free_bytes = lambda folder: 2**62
        luna.store._fallocate = lambda path, size: False


_install()
