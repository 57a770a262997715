"""setuptools' build backend, minus one notice.

The installed ``m2f`` namespace comes from four root folders (m2f/, kernels/, export/, bench/; see setup.py), which a
``.pth`` path entry cannot express, so an editable install gets setuptools' import finder, and setuptools then emits
an "Editable installation." warning on every such install; pip >= 25 prints a build backend's warnings even under
``--quiet``. It asks nothing of the user (those folders are the package's own sources), so only it is dropped: every
other warning of the build still shows.
"""
from __future__ import annotations

import warnings

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 / PEP 660 hooks, unchanged)
from setuptools.warnings import InformationOnly


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
        return build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
