"""`evalsuite dashboard`: a self-contained static site (HTML, one CSS file, PNG figures and thumbnails)
built from one or two results folders only, never from a model.

Pages: overview, bias per attribute, mode collapse, image grids (per run), a comparison of two runs on
paired seeds, and methods. No JavaScript and no network: every link and image is a relative path, and a
Content-Security-Policy forbids scripts and remote fetches.
"""

from evalsuite.dashboard.site import MARKER, build_dashboard

__all__ = ["MARKER", "build_dashboard"]
