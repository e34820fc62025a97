"""Adds exactly one onnxruntime flavour to the runtime requirements listed in setup.cfg.

``onnxruntime`` and ``onnxruntime-gpu`` install into the same ``onnxruntime`` folder and
break each other, so casam depends on one, chosen at install time with ``CASAM_ORT``:
``onnxruntime-gpu`` (the default, as the design card lists; it also runs on CPU-only
machines), ``onnxruntime`` (CPU-only wheel), or ``none`` (bring your own onnxruntime build).
The runtime always needs one: even the TensorRT backend allocates its device buffers as
onnxruntime-gpu ``OrtValue``s, so a TensorRT-only install cannot run.
"""

import configparser
import os
from pathlib import Path

from setuptools import setup

ORT_CHOICES = {"onnxruntime-gpu": "onnxruntime-gpu>=1.17", "onnxruntime": "onnxruntime>=1.17", "none": None}

choice = os.environ.get("CASAM_ORT", "onnxruntime-gpu")
if choice not in ORT_CHOICES:
    raise SystemExit(f"CASAM_ORT must be one of {', '.join(ORT_CHOICES)}, got {choice!r}")

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).with_name("setup.cfg"))
requires = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
if ORT_CHOICES[choice]:
    requires.append(ORT_CHOICES[choice])
setup(install_requires=requires)
