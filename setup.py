"""The package list, the one thing pyproject.toml cannot state: its `find` table searches src/ only, while conf/ at the
repository root (the single copy of the configs) ships inside the package as llmtune/conf, with every group folder."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages("src", include=["llmtune*"]), "llmtune.conf",
              *(f"llmtune.conf.{group}" for group in find_namespace_packages("conf"))],
    package_dir={"": "src", "llmtune.conf": "conf"},
)
