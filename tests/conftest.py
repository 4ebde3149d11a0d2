"""Test-session settings shared by every test module.

The user's own tuned schedules (``~/.cache/tvm_paged/schedules``, searched before the packaged ones) would make
results depend on what was tuned on this machine: every test reads an empty user folder instead, unless it sets
``TVM_PAGED_SCHEDULES_DIR`` itself.
"""

from __future__ import annotations

import os
import tempfile

os.environ["TVM_PAGED_SCHEDULES_DIR"] = tempfile.mkdtemp(prefix="tvm_paged-user-schedules-")
