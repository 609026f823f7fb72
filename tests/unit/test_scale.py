"""Scale sanity: 10 000 services x 4 endpoints build and plan correctly.

No timing is asserted anywhere: this only checks that the whole pipeline
works at the size of the scale requirement and gives the expected counts.
"""

from __future__ import annotations

import ipaddress

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.reconcile import LBState, plan, wanted_services
from meshbpf.sources.yaml_file import read_config
from reconcile_checks import check_realises

SERVICES = 10_000
ENDPOINTS = 4


def cluster_ip(i: int) -> str:
    return str(ipaddress.ip_address("10.96.0.0") + 1 + i)


def pod_ip(i: int, j: int) -> str:
    return str(ipaddress.ip_address("10.128.0.0") + 1 + i * ENDPOINTS + j)


def objects():
    for i in range(SERVICES):
        yield service(f"svc-{i}", cluster_ip(i), namespace=f"ns-{i % 50}")
        yield endpoint_slice(f"svc-{i}-x7k2p", f"svc-{i}",
                             [ep(pod_ip(i, j)) for j in range(ENDPOINTS)],
                             namespace=f"ns-{i % 50}")


def kubectl_yaml() -> str:
    """A `kubectl get svc,endpointslices -A -o yaml` List of the same objects."""
    out = ["apiVersion: v1\nitems:\n"]
    for i in range(SERVICES):
        out.append(f"""\
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-04-02T08:11:37Z"
    name: svc-{i}
    namespace: ns-{i % 50}
    resourceVersion: "{1000 + i}"
    uid: 00000000-0000-4000-8000-{i:012d}
  spec:
    clusterIP: {cluster_ip(i)}
    clusterIPs:
    - {cluster_ip(i)}
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
    selector:
      app: svc-{i}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {{}}
""")
    for i in range(SERVICES):
        out.append(f"""\
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
""")
        for j in range(ENDPOINTS):
            out.append(f"""\
  - addresses:
    - {pod_ip(i, j)}
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-{j}
    targetRef:
      kind: Pod
      name: svc-{i}-{j}
      namespace: ns-{i % 50}
""")
        out.append(f"""\
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-04-02T08:11:37Z"
    generateName: svc-{i}-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: svc-{i}
    name: svc-{i}-x7k2p
    namespace: ns-{i % 50}
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: svc-{i}
      uid: 00000000-0000-4000-8000-{i:012d}
    resourceVersion: "{20000 + i}"
  ports:
  - name: http
    port: 8080
    protocol: TCP
""")
    out.append('kind: List\nmetadata:\n  resourceVersion: ""\n')
    return "".join(out)


def check_plans_at_scale(state_desired):
    assert len(state_desired.service_ports) == SERVICES
    assert len(state_desired.services()) == SERVICES
    want = wanted_services(state_desired)
    p = plan(LBState(), want)
    assert len(p.service_updates) == SERVICES
    assert len(p.slot_updates) == SERVICES * ENDPOINTS
    assert len(p.backend_updates) == SERVICES * ENDPOINTS
    maps = p.apply_to(LBState())
    assert (len(maps.services), len(maps.slots), len(maps.backends)) == (10_000, 40_000, 40_000)
    check_realises(maps, want)

    # Restart: nothing to write.
    assert plan(maps, want).writes == 0

    # One endpoint gone from one service: a handful of writes, not a rebuild.
    key = next(iter(want))
    want[key] = want[key]._replace(backends=want[key].backends[1:])
    small = plan(maps, want)
    assert len(small.slot_updates) + len(small.slot_deletes) <= 2
    assert len(small.backend_deletes) == 1 and len(small.service_updates) == 1
    assert small.writes <= 4


def test_ten_thousand_services_from_objects():
    result = build(*objects())
    assert result.problems == []
    check_plans_at_scale(result.state)


def test_ten_thousand_services_from_a_kubectl_yaml_file(tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(kubectl_yaml())
    result = read_config(f)
    check_plans_at_scale(result.state)
