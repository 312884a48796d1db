"""pairopt's built-in loss plugins, one file per loss.

This package is loaded through the entry-point group `pairopt.losses` exactly like a
third-party plugin package: importing it imports every module below, and each registers its
loss with `@pairopt.register_loss`.
"""
