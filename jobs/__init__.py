"""Job entrypoints and YAML job specs for running featurestore on a Ray cluster.

`python -m jobs.<extract|train|evaluate|predict> --config SPEC.yaml` runs one job on
any Ray node; `featurestore submit SPEC --address http://HEAD:8265` ships it there.
"""

# The one install command shared by the README, cluster/Dockerfile and cluster/aws.yaml;
# tests/test_cluster_configs.py checks that they all say the same thing.
INSTALL_COMMAND = 'pip install ".[s3]"'

__all__ = ["INSTALL_COMMAND"]
