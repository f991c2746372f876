#!/usr/bin/env python3
"""Checks the deploy recipes that cannot run here (Kubernetes, Slurm): the
manifests parse as YAML and hold what a grove cluster needs, every flag they
and the Slurm scripts pass to `grove run` is one grove accepts, and every
shell script parses. Exit 77 (skipped) when PyYAML is missing."""
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError:
    print("SKIP: python3-yaml not installed; the Kubernetes manifests are not checked")
    sys.exit(77)

src = os.environ["GROVE_SOURCE_DIR"]
grove = os.path.join(os.environ["GROVE_BIN"], "grove")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def load(name):
    with open(os.path.join(src, "deploy/k8s", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# The flags `grove run` accepts, from its own --help.
run_help = subprocess.run([grove, "run", "--help"], capture_output=True, text=True, check=True).stdout
run_flags = set(re.findall(r"^  --([a-z_]+)", run_help, re.M))
check({"id", "coordinator", "config", "bind", "run_dir", "set"} <= run_flags,
      f"grove run --help lists {sorted(run_flags)}")


def check_container(c, where, env_names):
    cmd = c.get("command", [])
    check(cmd[:2] == ["grove", "run"] and len(cmd) == 3, f"{where}: command {cmd} is not grove run ROLE")
    role = cmd[2] if len(cmd) == 3 else "?"
    args = c.get("args", [])
    for a in args:
        m = re.match(r"--([a-z_]+)=", a)
        check(m is not None and m.group(1) in run_flags, f"{where}: {a!r} is not a grove run flag")
        for var in re.findall(r"\$\(([A-Z_]+)\)", a):
            check(var in env_names, f"{where}: {a!r} uses $({var}) but env does not define it")
    check("--config=/etc/grove/config.toml" in args, f"{where}: no --config=/etc/grove/config.toml")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    check(mounts.get("config") == "/etc/grove", f"{where}: config volume not at /etc/grove")
    if role != "coordinator":
        check(any(a.startswith("--coordinator=tcp://") for a in args), f"{where}: no --coordinator")
        check(any(a.startswith("--id=" + role + "-") for a in args), f"{where}: id not {role}-...")
    if role in ("replay", "learner", "verifier"):
        check("--bind=tcp://$(POD_IP):0" in args, f"{where}: must bind the pod IP to be reachable")
    if role in ("replay", "learner"):
        check(mounts.get("data") == "/data" and "--run_dir=/data/run" in args,
              f"{where}: state must live on the data volume")
    return role, args


def pod_checks(spec, where):
    pod = spec["template"]["spec"]
    check(spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(),
          f"{where}: selector does not match the pod labels")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    check(vols.get("config", {}).get("configMap", {}).get("name") == "grove-config",
          f"{where}: config volume is not the ConfigMap grove-config")
    roles = {}
    for c in pod["containers"]:
        env_names = {e["name"] for e in c.get("env", [])}
        role, args = check_container(c, f"{where}/{c['name']}", env_names)
        roles[role] = args
    return roles


coord = load("coordinator.yaml")
kinds = {d["kind"]: d for d in coord}
check(set(kinds) == {"Service", "StatefulSet"}, f"coordinator.yaml kinds {sorted(kinds)}")
svc, sts = kinds["Service"], kinds["StatefulSet"]
ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
check(ports == {"control": 7070, "metrics": 9100}, f"service ports {ports}")
check(svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items(),
      "service selects no StatefulSet pod")
check(sts["spec"]["replicas"] == 1, "exactly one coordinator/learner pod")
vct = sts["spec"].get("volumeClaimTemplates", [])
check(len(vct) == 1 and vct[0]["metadata"]["name"] == "data", "StatefulSet needs the data volume claim")
roles = pod_checks(sts["spec"], "coordinator.yaml")
check(set(roles) == {"coordinator", "replay", "learner"}, f"coordinator pod runs {sorted(roles)}")
check("--bind=tcp://0.0.0.0:7070" in roles.get("coordinator", []), "coordinator must serve 7070")
check(any("metrics_bind" in a and ":9100" in a for a in roles.get("coordinator", [])),
      "coordinator must serve /metrics on 9100")
service_endpoint = f"tcp://{svc['metadata']['name']}:{ports.get('control')}"

for name, role in (("rollout.yaml", "rollout"), ("verifier.yaml", "verifier")):
    docs = load(name)
    check(len(docs) == 1 and docs[0]["kind"] == "Deployment", f"{name}: one Deployment")
    d = docs[0]
    check(isinstance(d["spec"].get("replicas"), int), f"{name}: replicas (kubectl scale) missing")
    r = pod_checks(d["spec"], name)
    check(set(r) == {role}, f"{name}: runs {sorted(r)}")
    check(f"--coordinator={service_endpoint}" in r.get(role, []),
          f"{name}: does not reach the coordinator Service at {service_endpoint}")

kust = load("kustomization.yaml")[0]
for res in kust["resources"]:
    check(os.path.exists(os.path.join(src, "deploy/k8s", res)), f"kustomization names missing {res}")

# Slurm: a heterogeneous job, and the flags its scripts pass exist.
with open(os.path.join(src, "deploy/slurm/grove.sbatch")) as f:
    sbatch = f.read()
check("#SBATCH hetjob" in sbatch, "grove.sbatch is not a heterogeneous job")
check("--het-group=1" in sbatch and "--het-group=0" in sbatch, "grove.sbatch uses both components")
for script in ("deploy/slurm/grove.sbatch", "deploy/slurm/grove-join.sbatch", "deploy/ssh.sh"):
    path = os.path.join(src, script)
    with open(path) as f:
        text = f.read()
    for flag in set(re.findall(r"run (?:coordinator|replay|learner|verifier|rollout|\"\$role\")[^\n]*", text)):
        for name in re.findall(r"--([a-z_]+)=", flag):
            check(name in run_flags, f"{script}: grove run has no --{name}")
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    check(r.returncode == 0, f"{script}: bash -n: {r.stderr}")
    check(os.access(path, os.X_OK), f"{script} is not executable")

for f in failures:
    print("FAIL:", f)
print(f"{len(failures)} problems")
sys.exit(1 if failures else 0)
