"""pairopt's built-in loss plugins, one file per loss.

This package is loaded through the entry-point group `pairopt.losses` exactly like a
third-party plugin package: importing it imports every module below, and each registers its
loss with `@pairopt.register_loss`. Adding a file here adds a loss; nothing else lists them.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
