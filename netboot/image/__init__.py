"""The HPC boot image recipe: kernel and initramfs from Debian packages, reproducible by construction."""

from trustcap.netboot.image.builder import BuildInputs, BuiltImage, build_image

__all__ = ["BuildInputs", "BuiltImage", "build_image"]
