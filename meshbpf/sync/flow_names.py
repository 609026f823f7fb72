"""Names for the socket-LB events of `meshbpf monitor` (the agent's
/v1/endpoints view carries them beside the policy names): each Service
frontend's Service, and each pod uid's pod, for the client, whose event
names only its cgroup (kubelet's pod cgroups carry the pod uid)."""

from __future__ import annotations

from ..model import DesiredState

# the state the names were made from (held, so that its id cannot be reused), and them
_cache: tuple[DesiredState | None, dict] = (None, {})


def flow_names(desired: DesiredState | None) -> dict:
    """{"services": {"10.96.0.10:80/TCP": "ns/name:port-name"}, "pod_uids": {uid: "ns/name"}}.
    Kept while the agent holds the same state (a view is asked often, states change seldom)."""
    global _cache
    if desired is None:
        return {"services": {}, "pod_uids": {}}
    if _cache[0] is desired:
        return _cache[1]
    services = {str(fe): f"{sp.namespace}/{sp.name}" + (f":{sp.port_name}" if sp.port_name else "")
                for fe, sp in desired.service_ports.items()}
    uids = {pod.uid: f"{pod.namespace}/{pod.name}" for pod in desired.pods if pod.uid}
    names = {"services": services, "pod_uids": uids}
    _cache = (desired, names)
    return names
