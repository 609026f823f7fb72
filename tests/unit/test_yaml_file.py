"""The YAML file source: files and folders, documents, error locations, polling."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from k8s_builders import fe
from meshbpf.sources.errors import ConfigError, Problem
from meshbpf.sources.yaml_file import FileSource, config_files, parse_documents, read_config

SERVICE_DOC = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {ip}
  clusterIPs:
  - {ip}
  ports:
  - name: http
    port: {port}
    protocol: TCP
    targetPort: 8080
"""

SLICE_DOC = """\
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - {addr}
  conditions:
    ready: true
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: {name}
  name: {name}-abcde
  namespace: default
ports:
- name: http
  port: 8080
  protocol: TCP
"""


def svc_doc(name="web", ip="10.96.0.10", port=80):
    return SERVICE_DOC.format(name=name, ip=ip, port=port)


def slice_doc(name="web", addr="10.244.1.1"):
    return SLICE_DOC.format(name=name, addr=addr)


def write(path: Path, text: str, mtime_ns: int | None = None) -> Path:
    path.write_text(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def problems_of(exc_info) -> list[Problem]:
    return exc_info.value.problems


# --- Which files ------------------------------------------------------------------

def test_a_single_file_is_read(tmp_path):
    f = write(tmp_path / "services.conf", svc_doc())  # any name works for a file
    assert config_files(f) == [f]
    assert set(read_config(f).state.service_ports) == {fe("10.96.0.10", 80)}


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    for name in ["b.yaml", "a.yml", "c.json", "README.md", ".hidden.yaml", "web.yaml~",
                 "notes.txt"]:
        write(tmp_path / name, "")
    (tmp_path / "sub.yaml").mkdir()
    write(tmp_path / "sub.yaml" / "inner.yaml", "")
    assert [p.name for p in config_files(tmp_path)] == ["a.yml", "b.yaml", "c.json"]


def test_a_folder_merges_services_and_slices_across_files(tmp_path):
    write(tmp_path / "10-services.yaml", svc_doc("web") + "---\n" + svc_doc("api", "10.96.0.11"))
    write(tmp_path / "20-slices.yaml", slice_doc("web", "10.244.1.1") + "---\n"
          + slice_doc("api", "10.244.1.2"))
    write(tmp_path / "README.md", "not: [yaml")  # ignored: not a config suffix
    state = read_config(tmp_path).state
    assert [str(e.address) for e in state.service_ports[fe("10.96.0.10", 80)].endpoints] == [
        "10.244.1.1"]
    assert [str(e.address) for e in state.service_ports[fe("10.96.0.11", 80)].endpoints] == [
        "10.244.1.2"]


def test_folder_with_the_kubectl_dump_split_in_two_gives_the_same_state(tmp_path, cluster_list,
                                                                         cluster_multidoc):
    text = cluster_multidoc.read_text()
    docs = text.split("\n---\n")
    write(tmp_path / "a.yaml", "\n---\n".join(docs[:8]) + "\n")
    write(tmp_path / "b.yaml", "---\n" + "\n---\n".join(docs[8:]))
    assert read_config(tmp_path).state == read_config(cluster_list).state


def test_missing_path_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        read_config(missing)
    (problem,) = problems_of(exc)
    assert str(missing) in str(problem) and "no such file or folder" in str(problem)


def test_empty_folder_and_empty_file_give_an_empty_state(tmp_path):
    assert read_config(tmp_path).state.service_ports == {}
    for text in ["", "# only a comment\n", "---\n", "---\n---\n"]:
        f = write(tmp_path / "empty.yaml", text)
        assert read_config(f).state.service_ports == {}, repr(text)


def test_kubectl_json_output_is_read_like_the_yaml(tmp_path, cluster_list):
    (doc,) = parse_documents(cluster_list, cluster_list.read_text())
    f = write(tmp_path / "dump.json", json.dumps(doc.obj, indent=4))
    assert read_config(f).state == read_config(cluster_list).state


# --- Documents ---------------------------------------------------------------------

def test_multidocument_file_numbers_documents_and_gives_their_lines(tmp_path):
    text = "# header comment\n---\n" + svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11")
    docs = parse_documents(Path("x.yaml"), text)
    assert [d.obj["metadata"]["name"] for d in docs] == ["a", "b"]
    assert docs[0].where == "x.yaml: document 1 (line 2)"
    second = 2 + svc_doc().count("\n") + 1
    assert text.splitlines()[second - 1] == "---"
    assert docs[1].where == f"x.yaml: document 2 (line {second})"


def test_first_document_without_a_marker_starts_on_line_one(tmp_path):
    text = svc_doc("a") + "--- # second\n" + svc_doc("b", "10.96.0.11")
    docs = parse_documents(Path("x.yaml"), text)
    assert [d.where for d in docs] == [
        "x.yaml: document 1 (line 1)",
        f"x.yaml: document 2 (line {svc_doc().count(chr(10)) + 1})"]


def test_a_single_document_is_document_one():
    (doc,) = parse_documents(Path("x.yaml"), svc_doc())
    assert doc.where == "x.yaml: document 1 (line 1)"
    assert doc.obj["kind"] == "Service"


def test_a_document_can_be_a_kind_list_among_plain_documents(tmp_path):
    lst = ("apiVersion: v1\nkind: List\nitems:\n"
           + "- " + slice_doc("web").replace("\n", "\n  ").rstrip() + "\n"
           + "- " + slice_doc("api", "10.244.1.2").replace("\n", "\n  ").rstrip() + "\n")
    f = write(tmp_path / "mixed.yaml",
              svc_doc("web") + "---\n" + lst + "---\n" + svc_doc("api", "10.96.0.11"))
    state = read_config(f).state
    assert len(state.service_ports[fe("10.96.0.10", 80)].endpoints) == 1
    assert len(state.service_ports[fe("10.96.0.11", 80)].endpoints) == 1


def test_empty_documents_between_markers_are_skipped(tmp_path):
    f = write(tmp_path / "gaps.yaml", "---\n---\n" + svc_doc() + "---\n\n---\n")
    assert set(read_config(f).state.service_ports) == {fe("10.96.0.10", 80)}


def test_multidoc_fixture_documents_point_at_their_object(cluster_multidoc):
    text = cluster_multidoc.read_text()
    lines = text.splitlines()
    docs = parse_documents(cluster_multidoc, text)
    assert len(docs) == 23
    for i, doc in enumerate(docs):
        m = re.fullmatch(rf"{re.escape(str(cluster_multidoc))}: document {i + 1} \(line (\d+)\)",
                         doc.where)
        assert m, doc.where
        line = int(m.group(1))
        # The reported line is the document's marker; the object follows it.
        assert lines[line - 1] == "---"
        assert lines[line] in ("apiVersion: v1", "addressType: IPv4", "addressType: IPv6")


# --- Error locations ---------------------------------------------------------------

def test_problem_in_the_third_document_names_file_document_field_and_reason(tmp_path):
    bad = svc_doc("c", "10.96.0.12").replace("port: 80", "port: 80000")
    f = write(tmp_path / "svc.yaml",
              svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11") + "---\n" + bad)
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    text = str(problem)
    assert str(f) in text
    assert "document 3" in text
    assert "spec.ports[0].port" in text
    assert "80000 is not a port number (1-65535)" in text
    assert "Service default/c" in text
    marker = 2 * svc_doc().count("\n") + 2  # the `---` before document 3
    assert f.read_text().splitlines()[marker - 1] == "---"
    assert f"(line {marker})" in text


def test_problem_inside_a_kubectl_list_names_document_and_item(tmp_path, cluster_list):
    text = cluster_list.read_text().replace("    - 10.244.2.60\n", "    - 10.244.2.600\n")
    f = write(tmp_path / "dump.yaml", text)
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert problem.where == f"{f}: document 1 (line 1): items[22]"
    assert problem.obj == "EndpointSlice monitoring/grafana-8n7bq"
    assert problem.path == "endpoints[0].addresses[0]"
    assert "'10.244.2.600' is not an IP address" in str(problem)


@pytest.mark.parametrize("old, new, doc, path, reason", [
    ("  sessionAffinity: None\n", "  sessionAfinity: None\n",
     1, "spec.sessionAfinity", "unknown field 'sessionAfinity' (did you mean 'sessionAffinity'?)"),
    ("    targetPort: grpc\n", "    targetPort: grpc\n    nodeport: 30080\n",
     1, "spec.ports[0].nodeport", "did you mean 'nodePort'?"),
    ("    port: 9090\n    protocol: TCP\n    targetPort: grpc\n",
     "    protocol: TCP\n    targetPort: grpc\n",
     1, "spec.ports[0].port", "missing"),
    ("  clusterIP: 10.96.88.5\n", "  clusterIP: 10.96.88.5.1\n",
     2, "spec.clusterIPs[0]", "differs from spec.clusterIP '10.96.88.5.1'"),
    ("  - 10.244.1.10\n", "  - 10.244.1.1O\n",
     12, "endpoints[0].addresses[0]", "'10.244.1.1O' is not an IP address"),
    ("- name: grpc\n  port: 9090\n", "- name: grcp\n  port: 9090\n",
     12, "ports[0].name", "'grcp' matches no port of Service default/api (its ports: 'grpc')"),
])
def test_mistakes_in_the_multidoc_fixture_are_located(tmp_path, cluster_multidoc, old, new,
                                                      doc, path, reason):
    text = cluster_multidoc.read_text()
    assert old in text
    f = write(tmp_path / "dump.yaml", text.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert problem.path == path
    text = str(problem)
    assert str(f) in text
    assert re.search(rf": document {doc} \(line \d+\)", text), text
    assert path in text
    assert reason in text


def test_unknown_field_in_the_ninth_document_is_reported_there(tmp_path, cluster_multidoc):
    text = cluster_multidoc.read_text()
    docs = text.split("---\n")  # [header, doc1, doc2, ...]
    assert "name: web\n" in docs[9]
    docs[9] = docs[9].replace("  sessionAffinity: None\n", "  sesionAffinity: None\n")
    f = write(tmp_path / "dump.yaml", "---\n".join(docs))
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert "document 9 " in problem.where
    assert problem.obj == "Service default/web"
    assert problem.path == "spec.sesionAffinity"
    assert "unknown field 'sesionAffinity' (did you mean 'sessionAffinity'?)" in str(problem)


def test_bad_yaml_names_the_file_the_line_and_the_reason(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc("a") + "---\n" + "metadata: {name: [\n")
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert str(f) in str(problem)
    assert "not valid YAML" in str(problem)
    assert re.search(r"line 1[67]\b", str(problem)), str(problem)


def test_duplicate_key_is_rejected(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc().replace("  namespace: default\n",
                                                       "  namespace: default\n  name: other\n"))
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert str(f) in str(problem) and "duplicate" in str(problem)


def test_bad_yaml_names_the_document(tmp_path):
    f = write(tmp_path / "svc.yaml",
              svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11") + "---\nmetadata: {name: [\n")
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    (problem,) = problems_of(exc)
    assert "document 3" in str(problem)


def test_problems_in_several_files_are_all_reported(tmp_path):
    write(tmp_path / "a.yaml", "kind: [\n")
    write(tmp_path / "b.yaml", "also: [broken\n")
    with pytest.raises(ConfigError) as exc:
        read_config(tmp_path)
    assert {Path(p.where.split(":")[0]).name for p in problems_of(exc)} == {"a.yaml", "b.yaml"}


def test_object_problems_in_several_files_are_all_reported(tmp_path):
    write(tmp_path / "a.yaml", svc_doc("a").replace("port: 80", "port: 0"))
    write(tmp_path / "b.yaml", svc_doc("b", "10.96.0.11").replace("clusterIP:", "clusterIp:"))
    with pytest.raises(ConfigError) as exc:
        read_config(tmp_path)
    where = sorted(str(p) for p in problems_of(exc))
    assert len(where) == 2
    assert "a.yaml: document 1" in where[0] and "spec.ports[0].port" in where[0]
    assert "b.yaml: document 1" in where[1] and "did you mean 'clusterIP'?" in where[1]


def test_service_defined_in_two_files_names_the_first_file(tmp_path):
    write(tmp_path / "a.yaml", svc_doc("web"))
    write(tmp_path / "b.yaml", svc_doc("web", "10.96.0.11"))
    with pytest.raises(ConfigError) as exc:
        read_config(tmp_path)
    (problem,) = problems_of(exc)
    assert "b.yaml: document 1" in problem.where
    assert f"first at {tmp_path / 'a.yaml'}: document 1" in problem.reason


def test_file_that_is_not_utf8_is_a_problem_naming_it(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(svc_doc().encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        read_config(tmp_path)
    (problem,) = problems_of(exc)
    assert str(f) in str(problem) and "cannot read" in str(problem)


def test_config_error_message_lists_problems_and_truncates_after_twenty():
    problems = [Problem(f"f.yaml: document {i}", "", "spec", "bad") for i in range(1, 26)]
    text = str(ConfigError(problems))
    assert text.startswith("25 problem(s) in the configuration:")
    assert "f.yaml: document 20: spec: bad" in text
    assert "f.yaml: document 21" not in text
    assert text.endswith("... and 5 more")


def test_problem_text_joins_place_object_field_and_reason():
    p = Problem("svc.yaml: document 3 (line 41)", "Service default/web", "spec.ports[0].port",
                "missing")
    assert str(p) == "svc.yaml: document 3 (line 41) (Service default/web): spec.ports[0].port: missing"
    assert str(Problem("svc.yaml", "", "", "not valid YAML")) == "svc.yaml: not valid YAML"


# --- Found while testing ------------------------------------------------------------

def test_multidocument_file_with_crlf_line_endings(tmp_path):
    # Files are read in text mode, so Windows line endings become "\n" before
    # the document markers are looked for.
    text = svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11")
    f = tmp_path / "crlf.yaml"
    f.write_bytes(text.replace("\n", "\r\n").encode())
    assert len(read_config(f).state.service_ports) == 2


def test_top_level_sequence_is_rejected_with_or_without_a_document_marker(tmp_path):
    seq = "- " + svc_doc().replace("\n", "\n  ").rstrip() + "\n"
    without = write(tmp_path / "a.yaml", seq)
    with pytest.raises(ConfigError) as exc:
        read_config(without)
    assert "got a list" in str(exc.value)
    with_marker = write(tmp_path / "a.yaml", "---\n" + seq)
    with pytest.raises(ConfigError):
        read_config(with_marker)


def test_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "bom.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + svc_doc().encode())
    assert set(read_config(f).state.service_ports) == {fe("10.96.0.10", 80)}


def test_yaml_directive_does_not_shift_document_lines():
    text = "%YAML 1.2\n---\n" + svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11")
    docs = parse_documents(Path("x.yaml"), text)
    second = 3 + svc_doc().count("\n")
    assert text.splitlines()[second - 1] == "---"
    assert docs[1].where == f"x.yaml: document 2 (line {second})"


# --- FileSource.poll ------------------------------------------------------------------

T0 = 1_700_000_000_000_000_000  # a fixed mtime in ns, so changes never depend on the clock


def test_poll_returns_state_once_then_none_until_something_changes(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(), T0)
    src = FileSource(f)
    assert src.changed()
    state = src.poll()
    assert state is not None and set(state.service_ports) == {fe("10.96.0.10", 80)}
    assert not src.changed()
    assert src.poll() is None
    assert src.poll() is None


def test_poll_sees_an_edit_in_place(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(port=80), T0)
    src = FileSource(f)
    src.poll()
    write(f, svc_doc(port=81), T0 + 1_000_000_000)  # same size, new mtime
    assert src.changed()
    state = src.poll()
    assert state is not None and set(state.service_ports) == {fe("10.96.0.10", 81)}


def test_poll_sees_a_size_change_even_with_the_same_mtime(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(port=80), T0)
    src = FileSource(f)
    src.poll()
    write(f, svc_doc(port=8080), T0)
    state = src.poll()
    assert state is not None and set(state.service_ports) == {fe("10.96.0.10", 8080)}


def test_poll_sees_a_file_replaced_by_rename_with_same_size_and_mtime(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(port=80), T0)
    src = FileSource(f)
    src.poll()
    new = write(tmp_path / "svc.yaml.tmp", svc_doc(port=81), T0)  # created while f exists:
    assert new.stat().st_ino != f.stat().st_ino                   # another inode
    os.replace(new, f)
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (len(svc_doc(port=80)), T0)
    state = src.poll()
    assert state is not None and set(state.service_ports) == {fe("10.96.0.10", 81)}


def test_poll_sees_files_added_to_and_removed_from_a_folder(tmp_path):
    write(tmp_path / "a.yaml", svc_doc("a"), T0)
    src = FileSource(tmp_path)
    assert len(src.poll().service_ports) == 1
    write(tmp_path / "b.yaml", svc_doc("b", "10.96.0.11"), T0)
    assert len(src.poll().service_ports) == 2
    assert src.poll() is None
    (tmp_path / "a.yaml").unlink()
    assert set(src.poll().service_ports) == {fe("10.96.0.11", 80)}


def test_poll_ignores_files_the_folder_does_not_read(tmp_path):
    write(tmp_path / "a.yaml", svc_doc("a"), T0)
    src = FileSource(tmp_path)
    src.poll()
    write(tmp_path / "notes.txt", "hello")
    write(tmp_path / ".a.yaml.swp", "junk")
    assert src.poll() is None


def test_bad_change_raises_once_then_waits_for_the_next_change(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(), T0)
    src = FileSource(f)
    src.poll()
    write(f, svc_doc().replace("port: 80", "port: 0"), T0 + 1)
    with pytest.raises(ConfigError) as exc:
        src.poll()
    assert "spec.ports[0].port" in str(exc.value)
    assert src.poll() is None  # reported once per change, not on every poll
    write(f, svc_doc(port=82), T0 + 2)
    assert set(src.poll().service_ports) == {fe("10.96.0.10", 82)}


def test_path_that_disappears_is_reported_once(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc(), T0)
    src = FileSource(f)
    src.poll()
    f.unlink()
    with pytest.raises(ConfigError) as exc:
        src.poll()
    assert "no such file or folder" in str(exc.value)
    assert src.poll() is None
    write(f, svc_doc(), T0)
    assert src.poll() is not None


def test_poll_passes_the_node_name_on(tmp_path, cluster_list):
    f = write(tmp_path / "dump.yaml", cluster_list.read_text(), T0)
    state = FileSource(f, node_name="node-b").poll()
    (endpoint,) = state.service_ports[fe("10.96.81.25", 8125, "UDP")].endpoints
    assert str(endpoint.address) == "10.244.2.50"


def test_notes_are_logged_when_they_change_not_on_every_read(tmp_path, cluster_list, caplog):
    f = write(tmp_path / "dump.yaml", cluster_list.read_text(), T0)
    src = FileSource(f)
    with caplog.at_level(logging.INFO, logger="meshbpf.sources.yaml_file"):
        src.poll()
    assert sum("headless" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    os.utime(f, ns=(T0 + 5, T0 + 5))
    with caplog.at_level(logging.INFO, logger="meshbpf.sources.yaml_file"):
        assert src.poll() is not None
    assert not any("headless" in r.getMessage() for r in caplog.records)


# --- A file being written is not applied half-way --------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_fresh_change_is_read_only_once_it_is_the_same_on_two_polls(tmp_path):
    """`kubectl get ... > file` truncates first and writes for a while: a
    file that just changed waits a poll, so a cut file is not applied."""
    f = write(tmp_path / "svc.yaml", svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11"), T0)
    src = FileSource(f)
    assert len(src.poll().service_ports) == 2
    f.write_text(svc_doc("a") + "---\napiVersion: v1\nkind: Serv")  # cut mid-write, mtime now
    assert src.poll() is None  # not read yet: nothing rejected, nothing applied
    f.write_text(svc_doc("a") + "---\n" + svc_doc("c", "10.96.0.12"))  # the writer finishes
    assert src.poll() is None  # changed again since the last poll
    state = src.poll()  # the same as on the last poll: settled
    assert state is not None and set(state.service_ports) == {fe("10.96.0.10", 80), fe("10.96.0.12", 80)}


def test_a_change_that_empties_every_service_is_held_then_applied(tmp_path, caplog):
    clock = FakeClock()
    f = write(tmp_path / "svc.yaml", svc_doc(), T0)
    src = FileSource(f, clock=clock, hold_s=5)
    assert src.poll() is not None
    write(f, "", T0 + 1)  # truncated, and the writer stalls
    with caplog.at_level(logging.WARNING, logger="meshbpf.sources.yaml_file"):
        assert src.poll() is None
        clock.now += 4
        assert src.poll() is None
    assert "removes every Service; holding it" in caplog.text
    clock.now += 1.5
    state = src.poll()  # still empty after the hold: meant, so applied
    assert state is not None and not state.service_ports
    assert src.poll() is None


def test_a_held_empty_change_is_dropped_when_the_writer_finishes(tmp_path):
    clock = FakeClock()
    f = write(tmp_path / "svc.yaml", svc_doc(port=80), T0)
    src = FileSource(f, clock=clock)
    src.poll()
    write(f, "", T0 + 1)
    assert src.poll() is None
    clock.now += 1
    write(f, svc_doc(port=81), T0 + 2)
    state = src.poll()
    assert set(state.service_ports) == {fe("10.96.0.10", 81)}
    clock.now += 10
    assert src.poll() is None  # the empty state is never applied


def test_removing_some_services_is_not_held(tmp_path):
    f = write(tmp_path / "svc.yaml", svc_doc("a") + "---\n" + svc_doc("b", "10.96.0.11"), T0)
    src = FileSource(f, clock=FakeClock())
    src.poll()
    write(f, svc_doc("a"), T0 + 1)
    assert set(src.poll().service_ports) == {fe("10.96.0.10", 80)}


def test_an_empty_config_at_start_is_not_held(tmp_path):
    src = FileSource(write(tmp_path / "svc.yaml", "", T0), clock=FakeClock())
    state = src.poll()
    assert state is not None and not state.service_ports


def test_a_file_replaced_by_rename_is_read_at_once(tmp_path):
    """Write-then-rename, as the README advises: the new inode means the
    writer has finished, so there is no settling wait."""
    f = write(tmp_path / "svc.yaml", svc_doc(port=80), T0)
    src = FileSource(f)
    src.poll()
    tmp = write(tmp_path / "svc.yaml.tmp", svc_doc(port=81))  # mtime: now
    os.replace(tmp, f)
    assert set(src.poll().service_ports) == {fe("10.96.0.10", 81)}


def test_a_new_file_just_written_waits_a_poll(tmp_path):
    write(tmp_path / "a.yaml", svc_doc("a"), T0)
    src = FileSource(tmp_path)
    src.poll()
    write(tmp_path / "b.yaml", svc_doc("b", "10.96.0.11"))  # mtime: now, perhaps still growing
    assert src.poll() is None
    assert len(src.poll().service_ports) == 2
