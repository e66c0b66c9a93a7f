"""k8s/: the checked-in overlays are current, and every manifest validates offline.

RayService against KubeRay's strict JSON schema (vendored in tests/schemas/kuberay), its RayCluster
spec against the RayCluster CRD made strict the same way, core kinds with kubernetes-validate,
serveConfigV2 with Ray's ServeDeploySchema, plus the rules KubeRay's controller checks beyond the
CRD schema.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.config import ClusterConfig, load_cluster_config
from cluster.dashboards import build_all
from cluster.k8s_kustomize import apply_json6902, build
from cluster.k8s_render import PROFILES, RAY_VERSION, render_base, render_manifests, render_overlay

ROOT = Path(__file__).parents[1]
K8S = ROOT / "k8s"
SOURCES = {p: f"examples/cluster-k8s-{p}.yaml" for p in PROFILES}
K8S_VERSION = "1.33.0"
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


# Vendored (tests/schemas/kuberay/README.md says where they come from): never a reason to skip.
SCHEMAS = ROOT / "tests" / "schemas" / "kuberay"


@cache
def rayservice_schema() -> dict:
    return json.loads((SCHEMAS / "rayservice_v1.json").read_text())


def _strict(node):
    """additionalProperties: false on every object schema that lists its properties (kubeconform's
    strict mode), except where the CRD preserves unknown fields."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@cache
def raycluster_schema() -> dict:
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def schema_errors(obj: dict, schema: dict) -> list[str]:
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


def as_raycluster(rs: dict) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rs["metadata"]["name"]},
        "spec": rs["spec"]["rayClusterConfig"],
    }


def controller_errors(rs: dict) -> list[str]:
    """Rules KubeRay's controller enforces that the CRD schema does not."""
    errs = []
    spec = rs["spec"]
    up = spec.get("upgradeStrategy", {}).get("type")
    if up is not None and up not in UPGRADE_TYPES:
        errs.append(f"upgradeStrategy.type: {up!r} not in {sorted(UPGRADE_TYPES)}")
    if up == "NewClusterWithIncrementalUpgrade" and "clusterUpgradeOptions" not in spec.get(
        "upgradeStrategy", {}
    ):
        errs.append("upgradeStrategy.clusterUpgradeOptions: required for incremental upgrades")
    name = rs["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errs.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    rc = spec["rayClusterConfig"]
    if not rc["headGroupSpec"]["template"]["spec"].get("containers"):
        errs.append("headGroupSpec.template.spec.containers: at least one container")
    names = [g["groupName"] for g in rc.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        errs.append(f"workerGroupSpecs.groupName: not unique {names}")
    for g in rc.get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if lo > hi:
            errs.append(f"{g['groupName']}: minReplicas {lo} > maxReplicas {hi}")
        if "replicas" in g and not lo <= g["replicas"] <= hi:
            errs.append(f"{g['groupName']}: replicas {g['replicas']} outside [{lo}, {hi}]")
        if not g["template"]["spec"].get("containers"):
            errs.append(f"{g['groupName']}: template.spec.containers: at least one container")
    if not spec.get("serveConfigV2"):
        errs.append("serveConfigV2: required for fleetlm")
    return errs


def serve_config_errors(rs: dict) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"].get("serveConfigV2", "")))
    except ValidationError as e:
        return [str(e)]
    return []


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def pods_of(rs: dict) -> list[dict]:
    rc = rs["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": g["template"].get("metadata", {}),
         "spec": g["template"]["spec"]}
        for g in groups
    ]  # fmt: skip


def all_errors(objs: list[dict]) -> list[str]:
    errs = []
    for o in objs:
        if o["kind"] == "RayService":
            errs += schema_errors(o, rayservice_schema())
            errs += schema_errors(as_raycluster(o), raycluster_schema())
            errs += controller_errors(o)
            errs += serve_config_errors(o)
            for pod in pods_of(o):
                errs += core_errors(pod)
            svc = o["spec"].get("serveService")
            if svc:
                errs += core_errors({"apiVersion": "v1", "kind": "Service", **svc})
        elif o["apiVersion"] == "v1":
            errs += core_errors(o)
        elif o["kind"] == "PodMonitor":
            errs += podmonitor_errors(o)
        else:
            errs.append(f"{o['kind']}: no validator")
    return errs


def podmonitor_errors(pm: dict) -> list[str]:
    allowed = {"apiVersion", "kind", "metadata", "spec"}
    errs = [f"PodMonitor: unknown field {k}" for k in pm if k not in allowed]
    spec = pm["spec"]
    spec_keys = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    errs += [f"PodMonitor.spec: unknown field {k}" for k in spec if k not in spec_keys]
    ep_keys = {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    for ep in spec.get("podMetricsEndpoints", []):
        errs += [f"podMetricsEndpoints: unknown field {k}" for k in ep if k not in ep_keys]
    return errs


@pytest.fixture(scope="module", params=sorted(PROFILES))
def built(request) -> tuple[str, list[dict]]:
    """(profile, objects of `kustomize build k8s/overlays/<profile>`), from the checked-in tree."""
    return request.param, build(K8S / "overlays" / request.param, env_fallback_suffix=".example")


def test_checked_in_tree_is_current():
    """k8s/base and both overlays are exactly what `fleetlm render k8s` writes today."""
    expected = {Path("base") / k: v for k, v in render_base().items()}
    for profile, src in SOURCES.items():
        cfg = load_cluster_config(ROOT / src)
        for rel, text in render_overlay(cfg, profile, source=src).items():
            expected[Path("overlays") / profile / rel] = text
    stale = [str(p) for p, text in expected.items() if (K8S / p).read_text() != text]
    hint = "regenerate: see k8s/README.md 'Regenerating'"
    assert not stale, f"out of date: {stale}; {hint}"
    for d in ["base", "overlays/cpu-demo", "overlays/gpu"]:
        present = {Path(d) / p.name for p in (K8S / d).iterdir() if p.name != "api-keys.env"}
        assert present == {p for p in expected if p.parent == Path(d)}, f"stray files in k8s/{d}"


def test_kustomize_build_equals_render_manifests(built):
    profile, objs = built
    cfg = load_cluster_config(ROOT / SOURCES[profile])
    secrets = [o for o in objs if o["kind"] == "Secret"]
    assert [o for o in objs if o["kind"] != "Secret"] == render_manifests(cfg, profile)
    assert [s["metadata"]["name"] for s in secrets] == (
        ["fleetlm-api-keys"] if cfg.api_keys else []
    )


def test_every_manifest_validates(built):
    _, objs = built
    assert all_errors(objs) == []


def test_serve_config_carries_the_cluster_file(built):
    profile, objs = built
    rs = next(o for o in objs if o["kind"] == "RayService")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "deployments.app:app_builder"
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    cfg = load_cluster_config(ROOT / SOURCES[profile])
    assert ClusterConfig.model_validate(app["args"]["cluster"]) == cfg


def test_profiles_differ_where_the_issue_says(built):
    profile, objs = built
    rs = next(o for o in objs if o["kind"] == "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == RAY_VERSION
    (group,) = rc["workerGroupSpecs"]
    assert group["idleTimeoutSeconds"] > 0 and group["minReplicas"] <= group["maxReplicas"]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    if profile == "gpu":
        assert rs["spec"]["upgradeStrategy"]["type"] == "None"
        assert limits["nvidia.com/gpu"] == 2  # one replica of TP 2 fits one pod
        assert pod["nodeSelector"] and pod["tolerations"]
        assert group["maxReplicas"] == 4
    else:
        assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod
    for p in pods_of(rs):
        c = p["spec"]["containers"][0]
        assert c["readinessProbe"] and c["livenessProbe"]
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert any(port["name"] == "metrics" for port in c["ports"])
        # The PodMonitor selects these pods.
        pm = next(o for o in objs if o["kind"] == "PodMonitor")
        want = dict(pm["spec"]["selector"]["matchLabels"])
        want.pop("ray.io/is-ray-node")  # KubeRay adds it to every Ray pod
        assert want.items() <= p["metadata"]["labels"].items()
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {k: json.loads(v) for k, v in cm["data"].items()} == {
        f"{uid}.json": json.loads(json.dumps(d)) for uid, d in build_all().items()
    }


HEAD_CONTAINER = "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0"
MISSPELLINGS = [
    # (where, JSON pointer to rename, new key)
    ("rayservice", "/spec/rayClusterConfig/workerGroupSpecs/0/minReplicas", "minReplica"),
    ("rayservice", "/spec/serveConfigV2", "serveConfigv2"),
    ("rayservice", "/spec/rayClusterConfig/enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("rayservice", HEAD_CONTAINER + "/imagePullPolicy", "imagePulPolicy"),
    ("rayservice", "/spec/upgradeStrategy/type", "typ"),
    ("configmap", "/data", "dta"),
    ("podmonitor", "/spec/podMetricsEndpoints/0/port", "prot"),
]  # fmt: skip


def _rename(obj: dict, pointer: str, new_key: str) -> dict:
    parts = pointer.split("/")
    value = obj
    for p in parts[1:]:
        value = value[int(p)] if isinstance(value, list) else value[p]
    parent = "/".join(parts[:-1])
    ops = [{"op": "remove", "path": pointer}, {"op": "add", "path": f"{parent}/{new_key}",
                                               "value": value}]  # fmt: skip
    return apply_json6902(obj, ops)


@pytest.mark.parametrize(("kind", "pointer", "new_key"), MISSPELLINGS)
def test_a_misspelt_field_fails(kind, pointer, new_key):
    objs = build(K8S / "overlays" / "gpu", env_fallback_suffix=".example")
    idx = next(i for i, o in enumerate(objs) if o["kind"].lower() == kind)
    objs[idx] = _rename(objs[idx], pointer, new_key)
    errs = all_errors(objs)
    assert errs and any(new_key in e for e in errs), errs


def test_controller_rules_and_serve_schema_catch_bad_values():
    objs = build(K8S / "overlays" / "cpu-demo")
    rs = next(o for o in objs if o["kind"] == "RayService")
    bad = apply_json6902(rs, [
        {"op": "replace", "path": "/spec/upgradeStrategy/type", "value": "BlueGreen"},
        {"op": "replace", "path": "/spec/rayClusterConfig/workerGroupSpecs/0/minReplicas",
         "value": 9},
    ])  # fmt: skip
    errs = controller_errors(bad)
    assert any("upgradeStrategy.type" in e for e in errs)
    assert any("minReplicas 9 > maxReplicas" in e for e in errs)
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    serve["applications"][0]["import_pth"] = serve["applications"][0].pop("import_path")
    bad = apply_json6902(rs, [{"op": "replace", "path": "/spec/serveConfigV2",
                               "value": yaml.safe_dump(serve)}])  # fmt: skip
    assert serve_config_errors(bad)


def test_render_rejects_a_profile_that_does_not_fit():
    cfg = load_cluster_config(ROOT / SOURCES["cpu-demo"])
    with pytest.raises(ValueError, match="num_gpus"):
        render_overlay(cfg, "gpu")
    with pytest.raises(ValueError, match="profile"):
        render_overlay(cfg, "tpu")


def test_dockerfile_uses_the_pinned_ray():
    import ray

    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and RAY_VERSION == ray.__version__
    assert f'"ray[serve]=={ray.__version__}"' in (ROOT / "pyproject.toml").read_text()
    assert "torch==2.13.0" in text


def test_cli_render_k8s(tmp_path, capsys, monkeypatch):
    from cluster.cli import main

    monkeypatch.chdir(ROOT)  # the overlay header names the source path as given
    src = SOURCES["gpu"]
    assert main(["render", "k8s", "-c", str(ROOT / src), "--profile", "gpu"]) == 0
    out, err = capsys.readouterr()
    cfg = load_cluster_config(ROOT / src)
    assert list(yaml.safe_load_all(out)) == render_manifests(cfg, "gpu")
    assert "kubectl create secret generic fleetlm-api-keys" in err  # no placeholder key applied

    out_dir = tmp_path / "gpu"
    out_dir.mkdir()
    (out_dir / "gpu-nodes-patch.yaml").write_text("# my cloud's taints\n[]\n")
    argv = ["render", "k8s", "-c", src, "--profile", "gpu", "--out", str(out_dir)]
    assert main([*argv, "--base-out", str(tmp_path / "base")]) == 0
    assert (out_dir / "gpu-nodes-patch.yaml").read_text() == "# my cloud's taints\n[]\n"  # kept
    for name in ["rayservice.yaml", "kustomization.yaml", "models-pvc.yaml"]:
        assert (out_dir / name).read_text() == (K8S / "overlays" / "gpu" / name).read_text()
    assert (tmp_path / "base" / "podmonitor.yaml").read_text() == (
        K8S / "base" / "podmonitor.yaml"
    ).read_text()

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: demo\n    modle: demo\n")
    assert main(["render", "k8s", "-c", str(bad)]) == 2
    assert "modle" in capsys.readouterr().err
