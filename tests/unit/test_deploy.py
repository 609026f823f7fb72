"""Packaging and the Vagrant lab, checked offline (no cluster, no VM, no root):

- every Kubernetes manifest under deploy/ and vagrant/k3s/ against the
  Kubernetes JSON schemas bundled in kubernetes-validate (strict: unknown
  fields fail), for the oldest and newest Kubernetes versions it carries;
- what the DaemonSet must be (hostNetwork; an unprivileged agent with listed
  capabilities, read-only root, RuntimeDefault seccomp; bpffs Bidirectional
  only in the init container that mounts it; probes; list/watch RBAC, the
  ConfigMap through a Role...), and that its arguments parse with the real
  `meshbpf` CLI;
- the manifests' inline scripts (bpffs mount, node uninstall), run with fake
  `mount` and `meshbpf` commands first on PATH, against scratch folders and
  this machine's bpffs;
- scripts/link-kernel-headers.sh in a scratch folder;
- shellcheck on the provisioning scripts and the manifests' inline scripts;
- `vagrant validate` on vagrant/Vagrantfile (no box, no provider, no network).

scripts/setup.sh installs shellcheck and vagrant; run ./scripts/test.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VAGRANT = REPO / "vagrant"
MANIFEST = DEPLOY / "meshbpf.yaml"
UNINSTALL = DEPLOY / "uninstall" / "meshbpf-uninstall.yaml"
LAB_MANIFEST_SCRIPT = VAGRANT / "k3s" / "lab-manifest.sh"

MANIFEST_FILES = sorted([*DEPLOY.rglob("*.yaml"), *(VAGRANT / "k3s").glob("*.yaml")])


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def objects(path: Path) -> list[dict]:
    return load_docs(path.read_text())


def lab_manifest() -> list[dict]:
    out = subprocess.run([str(LAB_MANIFEST_SCRIPT)], capture_output=True, text=True, check=True)
    return load_docs(out.stdout)


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_containers(obj: dict) -> list[dict]:
    """The containers (init ones first) of a workload object; [] for others."""
    pod = (obj.get("spec") or {}).get("template", {}).get("spec")
    return (pod.get("initContainers", []) + pod["containers"]) if pod else []


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup.sh (it installs it)", pytrace=False)
    return path


# --- schemas -------------------------------------------------------------------

# kubernetes-validate bundles the schemas (the test extras; scripts/setup.sh
# installs them): nothing is fetched.
from kubernetes_validate import utils as kv  # noqa: E402
from kubernetes_validate.utils import SchemaNotFoundError  # noqa: E402
from kubernetes_validate.utils import ValidationError as K8sValidationError  # noqa: E402

K8S_VERSIONS = sorted({kv.all_versions()[0], kv.latest_version()})


def validate(obj: dict, version: str) -> None:
    """Strict schema check; an unknown kind or apiVersion is an error too
    (kubernetes-validate's CLI only warns about those)."""
    try:
        kv.validate(obj, version, strict=True)
    except SchemaNotFoundError as exc:
        pytest.fail(f"{obj.get('kind')} {obj.get('apiVersion')}: {exc.message}", pytrace=False)
    except K8sValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against Kubernetes {exc.version}: "
                    f"{where}: {exc.message}", pytrace=False)


def test_there_are_manifests_to_check():
    names = {p.relative_to(REPO).as_posix() for p in MANIFEST_FILES}
    assert {"deploy/meshbpf.yaml", "deploy/uninstall/meshbpf-uninstall.yaml",
            "vagrant/k3s/whoami.yaml"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_manifest_validates_against_kubernetes_schemas(path, version):
    objs = objects(path)
    assert objs, f"{path} holds no objects"
    for obj in objs:
        validate(obj, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_lab_manifest_validates_against_kubernetes_schemas(version):
    for obj in lab_manifest():
        validate(obj, version)


def test_schema_check_is_not_vacuous():
    ds = copy.deepcopy(one(objects(MANIFEST), "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(K8sValidationError):
        kv.validate(ds, kv.latest_version(), strict=True)
    ds = copy.deepcopy(one(objects(MANIFEST), "DaemonSet"))
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = [1]
    with pytest.raises(K8sValidationError):
        kv.validate(ds, kv.latest_version(), strict=False)


# --- the DaemonSet ---------------------------------------------------------------

@pytest.fixture(scope="module")
def install() -> list[dict]:
    return objects(MANIFEST)


@pytest.fixture(scope="module")
def daemonset(install) -> dict:
    return one(install, "DaemonSet", "meshbpf")


def container(pod: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return one([{"kind": "c", "metadata": c, **c} for c in pod[key]], "c", name)


def mounts_by_path(c: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def test_daemonset_runs_on_the_host_network_at_node_critical(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # the pods' processes, whose /proc/<pid>/ns/net are their network namespaces
    assert pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert daemonset["metadata"]["namespace"] == "kube-system"


# What the agent is allowed, and why each one (deploy/README.md, "Security").
AGENT_CAPABILITIES = {"BPF", "NET_ADMIN", "PERFMON", "SYSLOG", "SYS_RESOURCE", "SYS_ADMIN", "SYS_PTRACE"}


def locked_down(c: dict, caps: set[str]) -> None:
    """Not privileged, exactly `caps`, read-only root, the runtime's seccomp
    profile; no privilege escalation unless SYS_ADMIN makes that moot (the
    API refuses allowPrivilegeEscalation: false with CAP_SYS_ADMIN)."""
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False, c["name"]
    assert sc.get("allowPrivilegeEscalation") is (None if "SYS_ADMIN" in caps else False), c["name"]
    assert sc["readOnlyRootFilesystem"] is True, c["name"]
    assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    assert set(sc["capabilities"].get("add", [])) == caps, c["name"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]


def test_only_the_bpffs_mount_container_is_privileged(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    privileged = [c["name"] for c in pod["initContainers"] + pod["containers"]
                  if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["mount-bpf-fs"]
    assert "securityContext" not in pod or "seccompProfile" not in pod["securityContext"]


def test_agent_runs_with_listed_capabilities_only(daemonset):
    locked_down(container(daemonset["spec"]["template"]["spec"], "agent"), AGENT_CAPABILITIES)


def emptydir_mounts(pod: dict, c: dict) -> set[str]:
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"] for m in c.get("volumeMounts", [])
            if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")}


def test_agent_writes_only_to_its_empty_dirs(daemonset):
    """Read-only root: the header links the entrypoint makes and /tmp are
    emptyDirs (the pins go to the host's bpffs)."""
    pod = daemonset["spec"]["template"]["spec"]
    agent = container(pod, "agent")
    linker = (REPO / "scripts" / "link-kernel-headers.sh").read_text()
    (modules_dir,) = re.findall(r"modules=\$\{MESHBPF_MODULES_DIR:-([^}]+)\}", linker)
    assert emptydir_mounts(pod, agent) == {modules_dir, "/tmp"}
def test_daemonset_rolls_one_node_at_a_time(daemonset):
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}


def test_selector_matches_the_pod_labels(daemonset):
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_volume_mount_names_a_volume(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    for c in pod["containers"] + pod["initContainers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: {m['name']}"


def test_host_bpffs_reaches_the_agent_host_to_container_and_cgroup2_where_it_looks(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent = container(pod, "agent")
    bpf = mounts_by_path(agent)["/sys/fs/bpf"]
    assert bpf["mountPropagation"] == "HostToContainer"
    assert volumes[bpf["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    # The agent attaches to the first cgroup2 mount in /proc/mounts, which
    # is /sys/fs/cgroup in the container: the host's cgroup2 root goes there.
    cg = mounts_by_path(agent)["/sys/fs/cgroup"]
    assert volumes[cg["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert cg["readOnly"] is True
    assert "--cgroup" not in agent["args"]


def test_bidirectional_propagation_only_where_bpffs_is_mounted(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    bidirectional = [(c["name"], m["mountPath"]) for c in pod["initContainers"] + pod["containers"]
                     for m in c.get("volumeMounts", []) if m.get("mountPropagation") == "Bidirectional"]
    assert bidirectional == [("mount-bpf-fs", "/sys/fs/bpf")]


# --- the manifests' inline scripts, run against fakes --------------------------------

def container_command(c: dict) -> tuple[list[str], list[str]]:
    """[shell, -ec, SCRIPT, $0] and the positional arguments after them."""
    cmd = c["command"]
    assert Path(cmd[0]).name in ("sh", "bash") and cmd[1] == "-ec", cmd[:2]
    return cmd[:4], cmd[4:]


def fake_tool(bindir: Path, name: str, status: int = 0) -> Path:
    """An executable `name` on bindir that records each call's arguments
    (one per line, calls separated by ---) and exits with `status`."""
    calls = bindir.parent / f"{name}.calls"
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" --- >> '{calls}'\nexit {status}\n")
    tool.chmod(0o755)
    return calls


def calls_of(calls: Path) -> list[list[str]]:
    if not calls.exists():
        return []
    return [c.strip("\n").split("\n") if c.strip("\n") else []
            for c in calls.read_text().split("---\n")[:-1]]


def run_inline(c: dict, args: list[str], tmp_path: Path, fakes: dict[str, int],
               env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run container c's inline script with `args` for its positional
    arguments and fake tools (name: exit status) first on PATH."""
    head, defaults = container_command(c)
    assert len(args) == len(defaults)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    calls = {name: fake_tool(bindir, name, status) for name, status in fakes.items()}
    run_env = {k: v for k, v in os.environ.items() if k != "HOST_IP"}
    run_env.update(env or {}, PATH=f"{bindir}:{os.environ['PATH']}")
    res = subprocess.run([*head, *args], env=run_env, capture_output=True, text=True, timeout=30)
    return res, {name: calls_of(path) for name, path in calls.items()}


def a_bpffs_mount() -> str:
    """A folder of this machine that /proc/mounts lists as bpffs."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "bpf":
            return fields[1]
    pytest.fail("no bpffs mounted on this machine: run scripts/setup.sh (it mounts one)", pytrace=False)


@pytest.fixture()
def mount_bpffs(daemonset) -> dict:
    return container(daemonset["spec"]["template"]["spec"], "mount-bpf-fs", init=True)


def test_bpffs_mount_script_targets_the_host_bpffs_volume(mount_bpffs):
    _, (where,) = container_command(mount_bpffs)
    assert mounts_by_path(mount_bpffs)[where]["mountPropagation"] == "Bidirectional"
    assert where == "/sys/fs/bpf"


def test_bpffs_mount_script_mounts_bpffs_where_there_is_none(mount_bpffs, tmp_path):
    target = tmp_path / "bpf"
    target.mkdir()
    res, calls = run_inline(mount_bpffs, [str(target)], tmp_path, {"mount": 0})
    assert res.returncode == 0, res.stderr
    assert calls["mount"] == [["-t", "bpf", "bpf", str(target)]]
    assert f"mounting bpffs at {target}" in res.stdout


def test_bpffs_mount_script_leaves_a_mounted_bpffs_alone(mount_bpffs, tmp_path):
    mounted = a_bpffs_mount()
    res, calls = run_inline(mount_bpffs, [mounted], tmp_path, {"mount": 0})
    assert res.returncode == 0, res.stderr
    assert calls["mount"] == []
    assert f"bpffs already mounted at {mounted}" in res.stdout


def test_bpffs_mount_script_fails_when_mount_fails(mount_bpffs, tmp_path):
    res, calls = run_inline(mount_bpffs, [str(tmp_path)], tmp_path, {"mount": 32})
    assert res.returncode == 32
    assert len(calls["mount"]) == 1


def test_probes_and_metrics_port(daemonset):
    pod = daemonset["spec"]["template"]
    agent = container(pod["spec"], "agent")
    (port,) = agent["ports"]
    assert port["name"] == "metrics"
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port["containerPort"])
    assert notes["prometheus.io/path"] == "/metrics"


def test_node_name_and_address_come_from_the_downward_api(daemonset):
    agent = container(daemonset["spec"]["template"]["spec"], "agent")
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "$(NODE_NAME)" in agent["args"]


def parse_agent_args(args: list[str]) -> dict:
    """The DaemonSet's args through the real `meshbpf` click command."""
    from meshbpf.cli import cli

    assert args[0] == "agent"
    expanded = [a.replace("$(NODE_NAME)", "node-a").replace("$(HOST_IP)", "192.0.2.7")
                for a in args[1:]]
    ctx = cli.commands["agent"].make_context("agent", expanded)
    return ctx.params


def test_agent_args_parse_and_agree_with_the_other_objects(install, daemonset):
    agent = container(daemonset["spec"]["template"]["spec"], "agent")
    params = parse_agent_args(agent["args"])
    assert params["source"] == "kubernetes"
    assert params["node_name"] == "node-a"
    assert params["service_proxy_name"] is None
    cm = one(install, "ConfigMap")
    assert params["config_map"] == f"{cm['metadata']['namespace']}/{cm['metadata']['name']}"
    # The node's address (HOST_IP), where the kubelet probes and Prometheus
    # scrapes a hostNetwork pod; not every address of the node.
    host, _, port = params["listen"].rpartition(":")
    assert host == "192.0.2.7"
    assert int(port) == agent["ports"][0]["containerPort"]


def test_lab_manifest_only_adds_the_service_proxy_name():
    lab = lab_manifest()
    base = objects(MANIFEST)
    assert [o["kind"] for o in lab] == [o["kind"] for o in base]
    for got, want in zip(lab, base):
        if got["kind"] != "DaemonSet":
            assert got == want
    agent = container(one(lab, "DaemonSet")["spec"]["template"]["spec"], "agent")
    params = parse_agent_args(agent["args"])
    assert params["service_proxy_name"] == "meshbpf"
    svc = one(objects(VAGRANT / "k3s" / "whoami.yaml"), "Service", "whoami")
    assert svc["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] == "meshbpf"


def test_agent_settings_configmap_holds_a_valid_agent_config(install):
    from meshbpf.sources.agent_config import read_agent_config

    cm = one(install, "ConfigMap")
    settings, problems = read_agent_config(yaml.safe_load(cm["data"]["agent-config.yaml"]), "cm")
    assert problems == []
    assert settings is not None


def granted(role: dict) -> dict[tuple[str, str], dict]:
    """(apiGroup, resource) -> its rule; every rule read-only, but patch on
    the routes' status subresource (the route status the agent writes)."""
    out = {}
    for rule in role["rules"]:
        writes_route_status = (rule["apiGroups"] == ["gateway.networking.k8s.io"]
                               and set(rule["resources"]) <= {"tcproutes/status", "udproutes/status"})
        assert set(rule["verbs"]) <= ({"patch"} if writes_route_status else {"list", "watch"}), rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out[(group, res)] = rule
    return out


def binds(binding: dict, role: dict, sa: dict) -> bool:
    return (binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"],
                                   "name": role["metadata"]["name"]}
            and binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                         "namespace": sa["metadata"]["namespace"]}])


def test_cluster_wide_rbac_is_list_watch_on_what_the_agent_watches(install, daemonset):
    sa = one(install, "ServiceAccount", "meshbpf")
    assert daemonset["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    role = one(install, "ClusterRole", "meshbpf")
    assert binds(one(install, "ClusterRoleBinding", "meshbpf"), role, sa)
    # The reflectors of meshbpf/sources/kubernetes.py, and nothing else.
    assert set(granted(role)) == {("", "services"), ("discovery.k8s.io", "endpointslices"),
                                  ("", "pods"), ("", "nodes"), ("", "namespaces"),
                                  ("networking.k8s.io", "networkpolicies"),
                                  ("gateway.networking.k8s.io", "tcproutes"),
                                  ("gateway.networking.k8s.io", "udproutes"),
                                  ("gateway.networking.k8s.io", "referencegrants"),
                                  ("gateway.networking.k8s.io", "tcproutes/status"),
                                  ("gateway.networking.k8s.io", "udproutes/status")}
    assert [o for o in install if o["kind"] == "ClusterRole"] == [role]


def test_configmap_access_is_a_role_in_its_namespace_on_that_configmap_only(install, daemonset):
    sa = one(install, "ServiceAccount", "meshbpf")
    role = one(install, "Role")
    assert binds(one(install, "RoleBinding"), role, sa)
    agent = container(daemonset["spec"]["template"]["spec"], "agent")
    namespace, name = parse_agent_args(agent["args"])["config_map"].split("/")
    assert role["metadata"]["namespace"] == one(install, "RoleBinding")["metadata"]["namespace"] == namespace
    rules = granted(role)
    assert set(rules) == {("", "configmaps")}
    assert rules[("", "configmaps")]["resourceNames"] == [name]


def test_one_image_everywhere_tagged_with_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = set()
    for path in MANIFEST_FILES:
        for obj in objects(path):
            images.update(c["image"] for c in pod_containers(obj))
    assert images == {f"localhost/meshbpf:{version}"}


# --- uninstall -------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninstall_pod() -> dict:
    return one(objects(UNINSTALL), "DaemonSet", "meshbpf-uninstall")["spec"]["template"]["spec"]


@pytest.fixture()
def uninstall_init(uninstall_pod) -> dict:
    return container(uninstall_pod, "uninstall", init=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uninstall_pods_are_locked_down(uninstall_pod, uninstall_init):
    locked_down(uninstall_init, {"BPF"})
    locked_down(container(uninstall_pod, "done"), set())
    assert mounts_by_path(uninstall_init)["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert uninstall_pod["hostNetwork"] is True            # to see a running agent's port
    assert {"operator": "Exists"} in uninstall_pod["tolerations"]
    env = {e["name"]: e for e in uninstall_init["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_uninstall_script_defaults_are_the_agent_port_and_host_bpffs(daemonset, uninstall_pod, uninstall_init):
    agent = container(daemonset["spec"]["template"]["spec"], "agent")
    _, (port, bpffs) = container_command(uninstall_init)
    assert int(port) == agent["ports"][0]["containerPort"]
    assert mounts_by_path(uninstall_init)[bpffs]["name"] in {v["name"] for v in uninstall_pod["volumes"]}


def test_uninstall_script_runs_meshbpf_uninstall_on_the_agents_bpffs(daemonset, uninstall_init, tmp_path):
    from meshbpf.cli import cli

    mounted = a_bpffs_mount()
    res, calls = run_inline(uninstall_init, [str(free_port()), mounted], tmp_path, {"meshbpf": 0},
                            env={"HOST_IP": "127.0.0.1"})
    assert res.returncode == 0, res.stderr
    (argv,) = calls["meshbpf"]
    assert argv[0] == "uninstall"
    params = cli.commands["uninstall"].make_context("uninstall", argv[1:]).params
    assert params["bpffs"] == Path(mounted) / "meshbpf"
    # ... which, with the manifest's bpffs folder, is where the agent pins.
    _, (_, host_bpffs) = container_command(uninstall_init)
    agent = parse_agent_args(container(daemonset["spec"]["template"]["spec"], "agent")["args"])
    assert Path(host_bpffs) / "meshbpf" == agent["bpffs"]


def test_uninstall_script_passes_on_meshbpf_uninstall_failing(uninstall_init, tmp_path):
    res, calls = run_inline(uninstall_init, [str(free_port()), a_bpffs_mount()], tmp_path,
                            {"meshbpf": 3}, env={"HOST_IP": "127.0.0.1"})
    assert res.returncode == 3
    assert len(calls["meshbpf"]) == 1


@pytest.mark.parametrize("agent_ip", ["127.0.0.2", "127.0.0.1"], ids=["node-address", "loopback"])
def test_uninstall_script_refuses_while_an_agent_answers(uninstall_init, tmp_path, agent_ip):
    """The agent listens on the node's address (HOST_IP, here 127.0.0.2);
    one listening on loopback only counts too."""
    with socket.socket() as agent:
        agent.bind((agent_ip, 0))
        agent.listen()
        port = agent.getsockname()[1]
        res, calls = run_inline(uninstall_init, [str(port), a_bpffs_mount()], tmp_path,
                                {"meshbpf": 0}, env={"HOST_IP": "127.0.0.2"})
    assert res.returncode == 1
    assert calls["meshbpf"] == []
    assert f"a meshbpf agent still answers on {agent_ip}:{port}" in res.stderr


def test_uninstall_script_does_nothing_without_a_bpffs(uninstall_init, tmp_path):
    res, calls = run_inline(uninstall_init, [str(free_port()), str(tmp_path)], tmp_path,
                            {"meshbpf": 0}, env={"HOST_IP": "127.0.0.1"})
    assert res.returncode == 0, res.stderr
    assert calls["meshbpf"] == []
    assert f"no bpffs at {tmp_path}" in res.stdout


# --- image -----------------------------------------------------------------------

def test_dockerfile_copies_what_exists_and_uses_the_shared_header_script():
    text = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M)
    sources = [s for line in copies for s in line.split()]
    assert "scripts/link-kernel-headers.sh" in sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, f"{src} left out of the context"
    entry = (DEPLOY / "entrypoint.sh").read_text()
    assert "/usr/local/bin/link-kernel-headers.sh" in entry
    assert 'ENTRYPOINT ["/usr/local/bin/meshbpf-entrypoint"]' in text
    assert "COPY deploy/entrypoint.sh /usr/local/bin/meshbpf-entrypoint" in text
    assert "python3-bpfcc" in text and "linux-headers-amd64" in text


def test_header_links_are_made_in_one_place_only():
    def makes_header_links(p: Path) -> bool:
        text = p.read_text(errors="replace")
        return p.suffix != ".md" and "ln -s" in text and "linux-headers" in text
    makers = [p.relative_to(REPO).as_posix()
              for p in [*(REPO / "scripts").iterdir(), *DEPLOY.rglob("*"), *VAGRANT.rglob("*")]
              if p.is_file() and makes_header_links(p)]
    assert makers == ["scripts/link-kernel-headers.sh"]
    assert '"$repo/scripts/link-kernel-headers.sh"' in (REPO / "scripts" / "setup.sh").read_text()


# --- scripts/link-kernel-headers.sh ------------------------------------------------

def run_linker(tmp_path: Path, release: str = "9.9.9-test") -> subprocess.CompletedProcess:
    env = dict(os.environ, MESHBPF_KERNEL_RELEASE=release,
               MESHBPF_MODULES_DIR=str(tmp_path / "modules"), MESHBPF_SRC_DIR=str(tmp_path / "src"))
    return subprocess.run([str(REPO / "scripts" / "link-kernel-headers.sh")], env=env,
                          capture_output=True, text=True)


def test_link_kernel_headers_picks_the_newest_headers(tmp_path):
    for name in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-9-common", "6.1.0-10-common"]:
        (tmp_path / "src" / f"linux-headers-{name}").mkdir(parents=True)
    res = run_linker(tmp_path)
    assert res.returncode == 0, res.stderr
    moddir = tmp_path / "modules" / "9.9.9-test"
    assert os.readlink(moddir / "build") == str(tmp_path / "src" / "linux-headers-6.1.0-10-amd64")
    assert os.readlink(moddir / "source") == str(tmp_path / "src" / "linux-headers-6.1.0-10-common")


def test_link_kernel_headers_leaves_real_headers_alone(tmp_path):
    (tmp_path / "src" / "linux-headers-6.1.0-10-amd64").mkdir(parents=True)
    (tmp_path / "src" / "linux-headers-6.1.0-10-common").mkdir(parents=True)
    own = tmp_path / "modules" / "9.9.9-test" / "build" / "include" / "generated" / "uapi"
    own.mkdir(parents=True)
    res = run_linker(tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "modules" / "9.9.9-test" / "build").is_symlink()
    assert not (tmp_path / "modules" / "9.9.9-test" / "source").exists()
    assert res.stderr == ""


def test_link_kernel_headers_says_what_to_install_when_there_are_none(tmp_path):
    (tmp_path / "src").mkdir()
    res = run_linker(tmp_path)
    assert res.returncode == 1
    assert "install linux-headers-amd64" in res.stderr
    assert not (tmp_path / "modules").exists()


# --- shellcheck ----------------------------------------------------------------------

SHELL_SHEBANG = re.compile(rb"^#!\s*/(usr/)?bin/(env\s+)?(ba)?sh\b")


def shell_scripts() -> list[Path]:
    """.ci/run and every shell script under scripts/, deploy/, vagrant/,
    tests/vm/ and bench/."""
    found = [REPO / ".ci" / "run"]
    for folder in (REPO / "scripts", DEPLOY, VAGRANT, REPO / "tests" / "vm", REPO / "bench"):
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith(".") and (
                    p.suffix == ".sh" or SHELL_SHEBANG.match(p.read_bytes()[:64])):
                found.append(p)
    return found


def test_provisioning_scripts_are_found():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"scripts/setup.sh", "scripts/link-kernel-headers.sh", "deploy/entrypoint.sh",
            "vagrant/k3s/provision.sh", "vagrant/k3s/lab-manifest.sh", "vagrant/k3s/demo.sh",
            "tests/vm/run", "tests/vm/matrix", "tests/vm/build-image", "tests/vm/guest-run",
            "tests/vm/guest-init", "bench/run", "bench/run-redirect"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck(script):
    res = subprocess.run([need("shellcheck"), "--external-sources", str(script)],
                         capture_output=True, text=True, cwd=script.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def inline_scripts() -> list:
    """Every container command of the form [sh|bash, -c..., SCRIPT, ...]."""
    found = []
    for path in MANIFEST_FILES:
        for obj in objects(path):
            for c in pod_containers(obj):
                cmd = c.get("command", [])
                if len(cmd) >= 3 and Path(cmd[0]).name in ("sh", "bash") and cmd[1].startswith("-"):
                    found.append(pytest.param(Path(cmd[0]).name, cmd[2],
                                              id=f"{path.name}:{c['name']}"))
    return found


def test_inline_container_scripts_are_found():
    assert len(inline_scripts()) >= 2


@pytest.mark.parametrize("shell,script", inline_scripts())
def test_shellcheck_inline_container_scripts(shell, script):
    res = subprocess.run([need("shellcheck"), f"--shell={shell}", "-"], input=script,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --- vagrant ---------------------------------------------------------------------------

def test_vagrant_validate(tmp_path):
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"), VAGRANT_NO_COLOR="1")
    res = subprocess.run([need("vagrant"), "validate", "--ignore-provider"], cwd=VAGRANT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


def test_vagrantfile_runs_the_ci_setup_script_then_the_demo():
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'config.vm.synced_folder "..", "/meshbpf"' in text
    paths = re.findall(r'"(/meshbpf/[^"]+)"', text)
    assert "/meshbpf/scripts/setup.sh" in paths and "/meshbpf/scripts/demo" in paths
    assert paths.index("/meshbpf/scripts/setup.sh") < paths.index("/meshbpf/scripts/demo")
    for p in paths:
        assert (REPO / p.removeprefix("/meshbpf/")).exists(), p
    for p in re.findall(r'path: "([^"]+)"', text):
        assert (VAGRANT / p).is_file(), p
