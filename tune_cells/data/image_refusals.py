"""Images refused from their header, before decoding (images.open_image): each message says why."""

from __future__ import annotations


class ImageRefused(ValueError):
    """An image refused from its header, before decoding; the message says why."""


class ImageTooLarge(ImageRefused):
    """An image whose header declares more pixels than images.MAX_IMAGE_PIXELS."""


class MultiPageTiff(ImageRefused):
    """A TIFF of several full-size pages (a stack, a series, channels): which one is the image?"""


class SeparatePlanesTiff(ImageRefused):
    """A TIFF of separate colour planes (PlanarConfiguration 2) that Pillow would read wrong
    (deep_colour.refuse_misread_planes says which)."""
