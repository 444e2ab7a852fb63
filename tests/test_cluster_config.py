"""cluster.yaml is checked offline against Ray's own cluster-config schema: a typo fails CI, not a bill."""

from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_schema_check_catches_a_typo(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = yaml.safe_load(CLUSTER_YAML.read_text())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(broken))


def test_head_runs_no_trials_and_workers_declare_resources(config):
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in nodes["cpu_worker"]["resources"]


def test_only_ssh_is_open_and_setup_uses_the_readme_constraints(config):
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    setup = " ".join(config["setup_commands"])
    assert "--constraint ~/tune-cells/constraints.txt" in setup
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_every_ray_start_requires_the_token_and_the_token_reaches_every_node(config):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    # Ray reads ~/.ray/auth_token; the launcher copies it to the head, the head to the workers.
    assert config["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def test_no_ingress_is_open_to_the_whole_internet(config):
    import ipaddress

    for rule in config["provider"]["security_group"]["IpPermissions"]:
        ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert ranges, rule  # each rule names who may connect
        for cidr in ranges:
            assert ipaddress.ip_network(cidr).prefixlen > 0, f"{cidr} opens port {rule['FromPort']} to everyone"
