"""modelbake: package ML models into verified, offline-ready Docker images.

Data flows one way through the sub-packages:

- ``modelbake.spec``       a model selection (strings a user types) -> parsed specs and file names
- ``modelbake.producers``  build time (torch): one producer per stage writes artifacts + a manifest fragment
- ``modelbake.manifest``   fragments -> merged ``model_manifest.json``; checks shared by writers and readers
- ``modelbake.runtime``    run time (onnxruntime, numpy, no torch): load and verify what the stages produced
"""

__version__ = "0.1.0"
