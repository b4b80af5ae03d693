"""Build script: setup.cfg holds the metadata and dependencies; this adds what setup.cfg cannot say.

``lightning_configs/`` stays a top-level folder of the repository (the design card asks for it) and ships inside the
wheel as ``editing/lightning_configs/`` (package data of a package mapped onto that folder), where
``editing.core.paths.configs_dir`` finds it when the package is installed rather than run from a checkout.
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["editing", "editing.*", "callbacks", "callbacks.*"])

setup(
    packages=[*PACKAGES, "editing.lightning_configs"],
    package_dir={"editing.lightning_configs": "lightning_configs"},
    package_data={"editing.lightning_configs": ["*.md", "**/*.yaml"]},
)
