#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in k8s/.

For every overlay in k8s/overlays/: render it with `kubectl kustomize`, validate every object against the
schemas of the newest Kubernetes release that kubernetes-validate ships (strict: unknown fields are
errors), then check what no schema can see: the links between objects (selectors, named ports, probes,
the gateway's MODEL_SERVER address, the NetworkPolicy, ConfigMap references) and the house rules for
every container (resources, hardened securityContext). Then the self-test breaks the rendered cpu overlay
one way at a time and makes sure each break is reported, so that a check that can never fail is noticed.

    python scripts/check-k8s.py               # every overlay, then the self-test
    python scripts/check-k8s.py --self-test   # the self-test alone

Needs kubectl on PATH (its built-in kustomize renders) and the packages in scripts/requirements-test.txt.
"""
import argparse
import collections
import copy
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

try:
    import kubernetes_validate
    import yaml
except ImportError as err:
    sys.exit(f"check-k8s: {err.name} is missing: pip install -r scripts/requirements-test.txt")

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "k8s" / "overlays"
GATEWAY, MODEL_SERVER = "gateway", "model-server"  # Deployment and container names
GATEWAY_PATHS = {"/healthz", "/readyz"}  # what the gateway serves for probes
RUN_AS = 10001  # the images' numeric USER
GPU = "nvidia.com/gpu"
MIN_STARTUP_SECONDS = 120  # model loading and warm-up on a slow node
UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value):
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def render(overlay):
    done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay.relative_to(ROOT)} failed:\n{done.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def validate_schemas(objects, version):
    errors = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "top level"
            errors.append(f"{name}: {err.message} (at {where})")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{name}: {err.message}")
    return errors


class Manifests:
    """The rendered objects of one overlay, with the look-ups the checks share."""

    def __init__(self, objects, overlay):
        self.objects, self.overlay = objects, overlay

    def of(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind, name, namespace=None):
        for obj in self.of(kind):
            if obj["metadata"]["name"] == name and namespace in (None, ns(obj)):
                return obj
        return None

    def pod_spec(self, deployment):
        return deployment["spec"]["template"]["spec"]

    def containers(self, deployment, init=True):
        spec = self.pod_spec(deployment)
        return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])

    def main_container(self, name):
        dep = self.get("Deployment", name)
        if dep is None:
            return None, None
        return dep, next((c for c in self.containers(dep, init=False) if c["name"] == name), None)

    def service_targets(self, svc):
        """Names of the Deployments whose pods the Service sends to (none without a selector)."""
        selector = svc["spec"].get("selector")
        return self.deployments_selected({"matchLabels": selector}, ns(svc)) if selector else []

    def deployments_selected(self, selector, namespace):
        """Names of the Deployments whose pods the label selector matches."""
        return [d["metadata"]["name"] for d in self.of("Deployment") if ns(d) == namespace
                and selector_matches(selector, d["spec"]["template"]["metadata"].get("labels", {}))]

    def env(self, deployment, container):
        """The container's environment as the kubelet builds it: envFrom first, then env over it."""
        values = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            cm = ref and self.get("ConfigMap", ref["name"], ns(deployment))
            if cm:
                values.update({source.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
        values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        return values


def ns(obj):
    return obj["metadata"].get("namespace", "default")


def selector_matches(selector, labels):
    if not isinstance(selector, dict):
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if not {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def container_port(container, port):
    """The container's port entry that `port` (a number or a name) refers to, or None."""
    for entry in container.get("ports", []):
        if port in (entry["containerPort"], entry.get("name")):
            return entry
    return None


def describe_ports(container):
    return ", ".join(f"{p['containerPort']}/{p.get('name', '-')}" for p in container.get("ports", [])) or "none"


# ---- link checks: each takes the Manifests and returns a list of problems -----------------------------

def check_deployment_selectors(m):
    errors = []
    for dep in m.of("Deployment"):
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        if not selector_matches(dep["spec"]["selector"], labels):
            errors.append(f"Deployment {dep['metadata']['name']}: selector does not match its pod labels {labels}")
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
            if key not in labels:
                errors.append(f"Deployment {dep['metadata']['name']}: pod template has no {key} label")
    return errors


def check_services(m):
    errors = []
    for svc in m.of("Service"):
        name, deps = svc["metadata"]["name"], m.service_targets(svc)
        if len(deps) != 1:
            errors.append(f"Service {name} selects the pods of {len(deps)} Deployments {deps} "
                          f"(selector {svc['spec'].get('selector')}); expected exactly one")
            continue
        containers = m.containers(m.get("Deployment", deps[0], ns(svc)), init=False)
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if not isinstance(target, str):
                errors.append(f"Service {name} port {port['port']}: targetPort {target} should name a container port")
            elif not any(p.get("name") == target for c in containers for p in c.get("ports", [])):
                errors.append(f"Service {name} port {port['port']}: targetPort '{target}' is not a named port of "
                              f"Deployment {deps[0]} ({'; '.join(describe_ports(c) for c in containers)})")
    return errors


def check_model_service_headless(m):
    dep, server = m.main_container(MODEL_SERVER)
    if server is None:
        return [f"no Deployment {MODEL_SERVER} with a container {MODEL_SERVER}"]
    services = [s for s in m.of("Service") if ns(s) == ns(dep) and MODEL_SERVER in m.service_targets(s)]
    if not services:
        return [f"no Service selects the {MODEL_SERVER} pods"]
    errors = []
    for svc in services:
        if svc["spec"].get("clusterIP") != "None":
            errors.append(f"Service {svc['metadata']['name']} selects the {MODEL_SERVER} pods but is not headless "
                          "(clusterIP: None): each gateway's HTTP/2 connection would stay on one pod")
            continue
        for port in svc["spec"].get("ports", []):
            entry = container_port(server, port.get("targetPort", port["port"]))
            if entry and entry["containerPort"] != port["port"]:
                errors.append(f"Service {svc['metadata']['name']}: port {port['port']} differs from container port "
                              f"{entry['containerPort']}, and a headless Service hands out pod addresses as they are")
    return errors


def check_probes(m):
    errors = []
    for dep in m.of("Deployment"):
        for c in m.containers(dep, init=False):
            where = f"Deployment {dep['metadata']['name']} container {c['name']}"
            for needed in ("readinessProbe", "livenessProbe"):
                if needed not in c:
                    errors.append(f"{where}: no {needed}")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind, {})
                for handler in ("httpGet", "grpc", "tcpSocket"):
                    if handler in probe and container_port(c, probe[handler]["port"]) is None:
                        errors.append(f"{where}: {kind} {handler} port {probe[handler]['port']} is not a port of the "
                                      f"container ({describe_ports(c)})")
                path = probe.get("httpGet", {}).get("path")
                if "httpGet" in probe and path not in GATEWAY_PATHS:
                    errors.append(f"{where}: {kind} path {path} is not served by the gateway ({sorted(GATEWAY_PATHS)})")
                if probe.get("grpc", {}).get("service"):
                    errors.append(f"{where}: {kind} asks grpc service {probe['grpc']['service']!r}; "
                                  "the server reports readiness on the default service \"\"")
    _, server = m.main_container(MODEL_SERVER)
    startup = (server or {}).get("startupProbe")
    if server and not startup:
        errors.append(f"{MODEL_SERVER}: no startupProbe, so liveness may kill it while the model loads")
    elif startup:
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if budget < MIN_STARTUP_SECONDS:
            errors.append(f"{MODEL_SERVER}: startupProbe allows {budget}s, less than {MIN_STARTUP_SECONDS}s for loading")
    return errors


def check_autoscalers_and_budgets(m):
    errors = []
    for hpa in m.of("HorizontalPodAutoscaler"):
        name, ref = hpa["metadata"]["name"], hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or m.get("Deployment", ref["name"], ns(hpa)) is None:
            errors.append(f"HorizontalPodAutoscaler {name} scales {ref['kind']} {ref['name']}, "
                          "which is not a Deployment here")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            errors.append(f"HorizontalPodAutoscaler {name}: minReplicas exceeds maxReplicas")
    for pdb in m.of("PodDisruptionBudget"):
        deps = m.deployments_selected(pdb["spec"].get("selector"), ns(pdb))
        if len(deps) != 1:
            errors.append(f"PodDisruptionBudget {pdb['metadata']['name']} selects the pods of {len(deps)} "
                          f"Deployments {deps}; expected exactly one")
    return errors


def check_model_server_address(m):
    dep, gateway = m.main_container(GATEWAY)
    if gateway is None:
        return [f"no Deployment {GATEWAY} with a container {GATEWAY}"]
    url = m.env(dep, gateway).get("MODEL_SERVER")
    if not url:
        return [f"{GATEWAY}: MODEL_SERVER is set neither in env nor in an envFrom ConfigMap"]
    parts = urlsplit(url)
    host, labels = parts.hostname or "", (parts.hostname or "").split(".")
    if parts.scheme not in ("http", "https") or parts.port is None:
        return [f"{GATEWAY} MODEL_SERVER {url}: expected http://SERVICE:PORT"]
    if len(labels) > 1 and labels[2:] not in (["svc"], ["svc", "cluster", "local"]):
        return [f"{GATEWAY} MODEL_SERVER {url}: host {host} is not SERVICE[.NAMESPACE.svc[.cluster.local]]"]
    namespace = labels[1] if len(labels) > 1 else ns(dep)
    svc = m.get("Service", labels[0], namespace)
    if svc is None:
        return [f"{GATEWAY} MODEL_SERVER {url}: no Service named {labels[0]} in namespace {namespace}"]
    errors = []
    if MODEL_SERVER not in m.service_targets(svc):
        errors.append(f"{GATEWAY} MODEL_SERVER {url}: Service {labels[0]} does not select the {MODEL_SERVER} pods")
    ports = [p["port"] for p in svc["spec"].get("ports", [])]
    if parts.port not in ports:
        errors.append(f"{GATEWAY} MODEL_SERVER {url}: port {parts.port} is not a port of Service {labels[0]} {ports}")
    return errors


def check_network_policy(m):
    dep, server = m.main_container(MODEL_SERVER)
    if server is None:
        return []
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    policies = [p for p in m.of("NetworkPolicy")
                if ns(p) == ns(dep) and selector_matches(p["spec"]["podSelector"], pod_labels)]
    policies = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return [f"no NetworkPolicy restricts ingress to the {MODEL_SERVER} pods"]
    errors, rules = [], [(p["metadata"]["name"], r) for p in policies for r in p["spec"].get("ingress", [])]
    if not rules:
        errors.append(f"NetworkPolicy {policies[0]['metadata']['name']} admits no one, the gateway included")
    for name, rule in rules:
        if not rule.get("from"):
            errors.append(f"NetworkPolicy {name} admits every source; only {GATEWAY} pods should reach the model server")
        for peer in rule.get("from", []):
            admitted = m.deployments_selected(peer.get("podSelector"), ns(dep))
            wider = sorted(set(peer) - {"podSelector"})  # namespaceSelector or ipBlock reach past these pods
            if wider or admitted != [GATEWAY]:
                errors.append(f"NetworkPolicy {name} admits {', '.join(admitted) or 'pods of no Deployment'}"
                              f"{' through ' + ', '.join(wider) if wider else ''}; only {GATEWAY} pods should "
                              "reach the model server")
        if not rule.get("ports"):
            errors.append(f"NetworkPolicy {name} opens every port; only the gRPC port should be open")
        for port in rule.get("ports", []):
            entry = container_port(server, port.get("port"))
            if port.get("protocol", "TCP") != "TCP" or entry is None or entry.get("name") != "grpc":
                errors.append(f"NetworkPolicy {name} opens port {port.get('port')}, not the model server's gRPC port "
                              f"({describe_ports(server)})")
    return errors


def check_config_references(m):
    errors = []
    for dep in m.of("Deployment"):
        for c in m.containers(dep):
            for source in c.get("envFrom", []):
                for kind, ref_key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    ref = source.get(ref_key)
                    if ref and not ref.get("optional") and m.get(kind, ref["name"], ns(dep)) is None:
                        errors.append(f"Deployment {dep['metadata']['name']} container {c['name']}: envFrom names "
                                      f"{kind} {ref['name']}, which does not exist")
    return errors


def check_resources(m):
    errors = []
    for dep in m.of("Deployment"):
        for c in m.containers(dep):
            where = f"Deployment {dep['metadata']['name']} container {c['name']}"
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in resources.get(part, {})]
                if missing:
                    errors.append(f"{where}: no {part} for {', '.join(missing)}")
            for res, request in resources.get("requests", {}).items():
                limit = resources.get("limits", {}).get(res)
                if limit is not None and quantity(request) > quantity(limit):
                    errors.append(f"{where}: {res} request {request} exceeds its limit {limit}")
    return errors


def check_security_contexts(m):
    errors = []
    for dep in m.of("Deployment"):
        pod = m.pod_spec(dep).get("securityContext", {})
        for c in m.containers(dep):
            own = c.get("securityContext", {})
            effective = {**pod, **own}
            expected = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
            wrong = [f"{k}={effective.get(k)} (want {v})" for k, v in expected.items() if effective.get(k) != v]
            if effective.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                wrong.append("seccompProfile is not RuntimeDefault")
            caps = own.get("capabilities", {})
            if "ALL" not in caps.get("drop", []) or caps.get("add"):
                wrong.append("capabilities must drop ALL and add none")
            if own.get("privileged"):
                wrong.append("privileged")
            if wrong:
                errors.append(f"Deployment {dep['metadata']['name']} container {c['name']}: {'; '.join(wrong)}")
    return errors


def check_model_repository(m):
    dep, server = m.main_container(MODEL_SERVER)
    if server is None:
        return []
    spec, errors = m.pod_spec(dep), []
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in m.containers(dep):
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                errors.append(f"{MODEL_SERVER} container {c['name']} mounts volume {mount['name']}, which the pod lacks")
    path = m.env(dep, server).get("MODEL_REPOSITORY", "/models")
    mount = next((v for v in server.get("volumeMounts", []) if v["mountPath"] == path), None)
    if server["image"].endswith("-with-model"):
        if mount:
            errors.append(f"{MODEL_SERVER}: volume {mount['name']} at {path} hides the model baked into {server['image']}")
    elif mount is None:
        errors.append(f"{MODEL_SERVER}: {server['image']} has no model and nothing is mounted at {path}")
    elif "emptyDir" in volumes.get(mount["name"], {}) and not any(
            v["name"] == mount["name"] and not v.get("readOnly") for c in spec.get("initContainers", [])
            for v in c.get("volumeMounts", [])):
        errors.append(f"{MODEL_SERVER}: emptyDir {mount['name']} at {path} is filled by no init container")
    return errors


def check_inference_threads(m):
    dep, server = m.main_container(MODEL_SERVER)
    if server is None:
        return []
    threads = m.env(dep, server).get("INFERENCE_THREADS")
    limit = server.get("resources", {}).get("limits", {}).get("cpu")
    if threads is None or limit is None or int(threads) != math.ceil(quantity(limit)):
        return [f"{MODEL_SERVER}: INFERENCE_THREADS={threads} but the CPU limit is {limit}: set them equal"]
    return []


def check_gpu_requests(m):
    errors, gpu_containers = [], 0
    for dep in m.of("Deployment"):
        for c in m.containers(dep):
            if "cuda" in c["image"].rsplit(":", 1)[-1]:
                gpu_containers += 1
                resources = c.get("resources", {})
                if not all(quantity(resources.get(p, {}).get(GPU, 0)) >= 1 for p in ("requests", "limits")):
                    errors.append(f"Deployment {dep['metadata']['name']} container {c['name']}: {c['image']} "
                                  f"requests no {GPU}")
    if m.overlay == "cuda" and gpu_containers == 0:
        errors.append("the cuda overlay runs no CUDA image")
    return errors


LINK_CHECKS = [check_deployment_selectors, check_services, check_model_service_headless, check_probes,
               check_autoscalers_and_budgets, check_model_server_address, check_network_policy,
               check_config_references, check_resources, check_security_contexts, check_model_repository,
               check_inference_threads, check_gpu_requests]


def check_links(m):
    errors = []
    for check in LINK_CHECKS:
        try:
            errors += check(m)
        except (KeyError, IndexError, TypeError, ValueError) as err:  # a shape the check did not expect
            errors.append(f"{check.__name__} could not read the manifests: {type(err).__name__} {err}")
    return errors


def summarize(m):
    lines = []
    for name in (GATEWAY, MODEL_SERVER):
        dep, c = m.main_container(name)
        if c is None:
            continue
        inits = len(m.pod_spec(dep).get("initContainers", []))
        svc, hpa = m.get("Service", name), m.get("HorizontalPodAutoscaler", name)
        service = "no Service" if svc is None else "Service {} :{}".format(
            "headless" if svc["spec"].get("clusterIP") == "None" else svc["spec"].get("type", "ClusterIP"),
            ",".join(str(p["port"]) for p in svc["spec"].get("ports", [])))
        scaling = "no HPA" if hpa is None else f"HPA {hpa['spec'].get('minReplicas', 1)}-{hpa['spec']['maxReplicas']}"
        lines.append(f"    {name:<13} {c['image']}{f' (+{inits} init)' if inits else ''}; {service}; {scaling}")
    return lines


# ---- self-test: single mutations of the rendered cpu overlay, each of which must be reported ----------

def find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def container_of(objects, name):
    return find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def config_of(objects, name):
    ref = container_of(objects, name)["envFrom"][0]["configMapRef"]["name"]
    return find(objects, "ConfigMap", ref)["data"]


MUTATIONS = [  # (what is broken, how, text the report must contain)
    ("Service selector matching no pods", lambda o: find(o, "Service", GATEWAY)["spec"]["selector"].update(
        {"app.kubernetes.io/name": "gatewya"}), "Service gateway selects the pods of 0 Deployments"),
    ("targetPort naming no container port", lambda o: find(o, "Service", GATEWAY)["spec"]["ports"][0].update(
        targetPort="web"), "targetPort 'web' is not a named port"),
    ("probe on a missing port", lambda o: container_of(o, MODEL_SERVER)["readinessProbe"]["grpc"].update(
        port=9001), "readinessProbe grpc port 9001 is not a port"),
    ("probe on a path the gateway does not serve", lambda o: container_of(o, GATEWAY)["livenessProbe"]["httpGet"]
        .update(path="/health"), "livenessProbe path /health is not served"),
    ("HPA pointing at a missing Deployment", lambda o: find(o, "HorizontalPodAutoscaler", MODEL_SERVER)["spec"]
        ["scaleTargetRef"].update(name="model-srv"), "scales Deployment model-srv"),
    ("PDB selecting no pods", lambda o: find(o, "PodDisruptionBudget", GATEWAY)["spec"]["selector"]["matchLabels"]
        .update({"app.kubernetes.io/name": "gw"}), "PodDisruptionBudget gateway selects the pods of 0"),
    ("MODEL_SERVER with a wrong port", lambda o: config_of(o, GATEWAY).update(MODEL_SERVER="http://model-server:8002"),
        "port 8002 is not a port of Service model-server"),
    ("MODEL_SERVER naming no Service", lambda o: config_of(o, GATEWAY).update(MODEL_SERVER="http://models:8001"),
        "no Service named models"),
    ("non-headless model Service", lambda o: find(o, "Service", MODEL_SERVER)["spec"].pop("clusterIP"),
        "is not headless"),
    ("NetworkPolicy from the wrong pods", lambda o: find(o, "NetworkPolicy", MODEL_SERVER)["spec"]["ingress"][0]
        ["from"][0]["podSelector"]["matchLabels"].update({"app.kubernetes.io/name": MODEL_SERVER}),
        "NetworkPolicy model-server admits model-server"),
    ("NetworkPolicy on the wrong port", lambda o: find(o, "NetworkPolicy", MODEL_SERVER)["spec"]["ingress"][0]
        ["ports"][0].update(port=8080), "opens port 8080, not the model server's gRPC port"),
    ("envFrom naming a missing ConfigMap", lambda o: container_of(o, GATEWAY)["envFrom"][0]["configMapRef"].update(
        name="gateway-settings"), "ConfigMap gateway-settings, which does not exist"),
    ("container without limits", lambda o: container_of(o, GATEWAY)["resources"].pop("limits"),
        "container gateway: no limits for cpu, memory"),
    ("writable root filesystem", lambda o: container_of(o, MODEL_SERVER)["securityContext"].update(
        readOnlyRootFilesystem=False), "readOnlyRootFilesystem=False"),
    ("pod running as root", lambda o: find(o, "Deployment", GATEWAY)["spec"]["template"]["spec"]["securityContext"]
        .update(runAsUser=0), "runAsUser=0 (want 10001)"),
    ("baked-in model hidden by a volume", lambda o: container_of(o, MODEL_SERVER).update(
        image="imageserve/model-server:0.1.0-with-model"), "hides the model baked into"),
    ("INFERENCE_THREADS above the CPU limit", lambda o: config_of(o, MODEL_SERVER).update(INFERENCE_THREADS="8"),
        "INFERENCE_THREADS=8 but the CPU limit is 2"),
    ("CUDA image without a GPU", lambda o: container_of(o, MODEL_SERVER).update(
        image="imageserve/model-server:0.1.0-cuda"), f"requests no {GPU}"),
]


def self_test(version):
    """Returns (passed, failed) over the clean baseline, the schema mutation and every link mutation."""
    objects = render(OVERLAYS / "cpu")
    baseline = check_links(Manifests(objects, "cpu"))
    passed, failed = (0, 1) if baseline else (1, 0)
    print(f"self-test: unmutated cpu overlay {'reports ' + str(baseline) if baseline else 'is clean'}")
    mutated = copy.deepcopy(objects)
    container_of(mutated, GATEWAY)["imagePullPolcy"] = "Always"
    schema_errors = validate_schemas(mutated, version)
    results = [("unknown field (strict schema)", "imagePullPolcy", schema_errors)]
    for what, mutate, expected in MUTATIONS:
        mutated = copy.deepcopy(objects)
        mutate(mutated)
        results.append((what, expected, check_links(Manifests(mutated, "cpu"))))
    for what, expected, errors in results:
        hit = next((e for e in errors if expected in e), None)
        passed, failed = passed + bool(hit), failed + (not hit)
        print(f"  {'caught' if hit else 'MISSED'}: {what}: " + (hit or f"wanted {expected!r}, got {errors}"))
    return passed, failed


def check_overlay(overlay, version):
    objects = render(overlay)
    m = Manifests(objects, overlay.name)
    schema_errors, link_errors = validate_schemas(objects, version), check_links(m)
    counts = collections.Counter(o["kind"] for o in objects)
    print(f"{overlay.name}: {len(objects)} objects ({', '.join(f'{k} {n}' for k, n in sorted(counts.items()))})")
    print(f"    schemas (Kubernetes {version}, strict): {len(schema_errors) or 'no'} errors; "
          f"links ({len(LINK_CHECKS)} checks): {len(link_errors) or 'no'} errors")
    print("\n".join(summarize(m)))
    for error in schema_errors + link_errors:
        print(f"    ERROR: {error}")
    return not (schema_errors or link_errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="only prove that the link checks catch breakage")
    args = parser.parse_args()
    if shutil.which("kubectl") is None:
        sys.exit("check-k8s: kubectl is not on PATH; it renders the overlays (`kubectl kustomize`), so install it")
    version = kubernetes_validate.utils.latest_version()
    passed = failed = 0
    try:
        if not args.self_test:
            overlays = sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
            if not overlays:
                sys.exit(f"check-k8s: no overlays in {OVERLAYS.relative_to(ROOT)}")
            for overlay in overlays:
                ok = check_overlay(overlay, version)
                passed, failed = passed + ok, failed + (not ok)
        p, f = self_test(version)
    except RuntimeError as err:
        sys.exit(f"check-k8s: {err}")
    passed, failed = passed + p, failed + f
    print(f"check-k8s: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
