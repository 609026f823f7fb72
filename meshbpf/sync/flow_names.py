"""Names for the socket-LB events of `meshbpf monitor` (the agent's
/v1/endpoints view carries them beside the policy names): each Service
frontend's Service, and each pod uid's pod, for the client, whose event
names only its cgroup (kubelet's pod cgroups carry the pod uid)."""

from __future__ import annotations

from ..model import DesiredState, ServicePort

# the state the names were made from (held, so that its id cannot be reused), and them
_cache: tuple[DesiredState | None, dict] = (None, {})


def _service_name(sp: ServicePort) -> str:
    """"ns/name:port", and the route that splits it: a split connection's
    backend belongs to another Service, so the route is what explains it."""
    name = f"{sp.namespace}/{sp.name}" + (f":{sp.port_name}" if sp.port_name else "")
    return f"{name} via {sp.route}" if sp.split and sp.route else name


def flow_names(desired: DesiredState | None) -> dict:
    """{"services": {"10.96.0.10:80/TCP": "ns/name:port-name"}, "pod_uids": {uid: "ns/name"}}.
    Kept while the agent holds the same state (a view is asked often, states change seldom)."""
    global _cache
    if desired is None:
        return {"services": {}, "pod_uids": {}}
    if _cache[0] is desired:
        return _cache[1]
    services = {str(fe): _service_name(sp) for fe, sp in desired.service_ports.items()}
    uids = {pod.uid: f"{pod.namespace}/{pod.name}" for pod in desired.pods if pod.uid}
    names = {"services": services, "pod_uids": uids}
    _cache = (desired, names)
    return names
