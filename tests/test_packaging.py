"""Packaging metadata: the MIT license file and the matching pyproject field."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mit_license_file_and_pyproject_field():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
