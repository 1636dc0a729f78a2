#!/usr/bin/env python3
"""Checks that both tiers' containers stay hardened where Kubernetes' checks (scripts/check-k8s.py) cannot see:

- every image whose entrypoint is `gateway` or `model-server`, in Dockerfile and model-server/Dockerfile.cuda,
  runs as a numeric user other than root, following each stage's FROM to the stage it builds on;
- in compose.yaml, alone and with each compose.*.yaml override, both services have a read-only root filesystem,
  run as no other user than the image's, and gain no privilege or capability.

Then the self-test breaks each rule once and makes sure it is reported, so a check that cannot fail is noticed.

    python scripts/check-containers.py
"""
import re
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("check-containers: PyYAML is missing: pip install -r scripts/requirements-test.txt")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "model-server" / "Dockerfile.cuda"]
SERVICES = ("gateway", "model-server")


def stages(text):
    """Each stage's name, base, last USER and last ENTRYPOINT, in order; unnamed stages get their index."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        keyword = words[0].upper()
        if keyword == "FROM":
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else str(len(found))
            found.append({"name": name, "base": words[1], "user": None, "entrypoint": None})
        elif keyword == "USER" and found:
            found[-1]["user"] = words[1]
        elif keyword == "ENTRYPOINT" and found:
            found[-1]["entrypoint"] = " ".join(words[1:])
    return found


def effective(all_stages, stage, key):
    """A stage's own setting, or the one of the stage it is built FROM; None from an outside image (root)."""
    by_name = {s["name"]: s for s in all_stages}
    while stage is not None:
        if stage[key] is not None:
            return stage[key]
        stage = by_name.get(stage["base"])
    return None


def check_dockerfile(name, text):
    errors = []
    all_stages = stages(text)
    images = 0
    for stage in all_stages:
        entrypoint = effective(all_stages, stage, "entrypoint") or ""
        if not any(f'"{service}"' in entrypoint for service in SERVICES):
            continue
        images += 1
        user = effective(all_stages, stage, "user")
        uid = (user or "root").split(":")[0]
        if not re.fullmatch(r"[0-9]+", uid) or int(uid) == 0:
            errors.append(f"{name}: stage {stage['name']} runs as {user or 'root (no USER)'}; "
                          "it must be a numeric non-root user")
    if images == 0:
        errors.append(f"{name}: no stage runs gateway or model-server, so nothing was checked")
    return errors


def check_compose(name, services):
    errors = []
    for service in SERVICES:
        spec = services.get(service)
        if spec is None:
            errors.append(f"{name}: no service {service}")
            continue
        if spec.get("read_only") is not True:
            errors.append(f"{name}: {service} needs read_only: true")
        if "user" in spec:
            errors.append(f"{name}: {service} sets user: {spec['user']!r}; the image's non-root user must stay")
        if spec.get("privileged"):
            errors.append(f"{name}: {service} is privileged")
        if spec.get("cap_add"):
            errors.append(f"{name}: {service} adds capabilities {spec['cap_add']}")
    return errors


def merge(base, override):
    """Compose's merge, as far as these keys go: mappings merge, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def compose_files():
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    yield "compose.yaml", base
    for override in sorted(ROOT.glob("compose.*.yaml")):
        extra = (yaml.safe_load(override.read_text()) or {}).get("services", {})
        yield f"compose.yaml + {override.name}", merge(base, extra)


def check_all(dockerfiles, composes):
    errors = []
    for name, text in dockerfiles:
        errors += check_dockerfile(name, text)
    for name, services in composes:
        errors += check_compose(name, services)
    return errors


def self_test(dockerfiles, composes):
    """Each break must be reported; returns the breaks that were not."""
    docker = dict(dockerfiles)
    compose = dict(composes)["compose.yaml"]
    main = docker["Dockerfile"]
    breaks = {
        "USER root in an image stage": (
            [("Dockerfile", main.replace("ENTRYPOINT [\"gateway\"]", "USER root\nENTRYPOINT [\"gateway\"]"))], []),
        "no USER at all": ([("Dockerfile", re.sub(r"(?m)^USER .*$", "", main))], []),
        "a writable root filesystem": (
            [], [("x", merge(compose, {"model-server": {"read_only": False}}))]),
        "a user override": ([], [("x", merge(compose, {"gateway": {"user": "0"}}))]),
        "a privileged container": ([], [("x", merge(compose, {"gateway": {"privileged": True}}))]),
        "an added capability": ([], [("x", merge(compose, {"model-server": {"cap_add": ["NET_ADMIN"]}}))]),
    }
    return [what for what, (d, c) in breaks.items() if not check_all(d, c)]


def main():
    dockerfiles = [(str(p.relative_to(ROOT)), p.read_text()) for p in DOCKERFILES]
    composes = list(compose_files())
    errors = check_all(dockerfiles, composes)
    for error in errors:
        print(f"check-containers: {error}", file=sys.stderr)
    missed = self_test(dockerfiles, composes)
    for what in missed:
        print(f"check-containers: self-test: {what} was not reported", file=sys.stderr)
    if errors or missed:
        sys.exit(1)
    print(f"check-containers: {len(dockerfiles)} Dockerfiles and {len(composes)} compose files hardened; "
          "self-test caught every break")


if __name__ == "__main__":
    main()
