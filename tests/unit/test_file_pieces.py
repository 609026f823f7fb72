"""One big file, edited piece by piece (issue 14): the file source cuts it into
its documents or List items, re-parses only the pieces that changed, and
gives exactly the state of a full read. Seeded random edits in every layout
kubectl and our own writer produce, and the files that must not be cut."""

from __future__ import annotations

import gc
import json
import os
import random
import types
from pathlib import Path

import pytest
import yaml

import meshbpf.sources.file_pieces as file_pieces
import meshbpf.sources.yaml_fast as yaml_fast
from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_incremental import ServiceIndex
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sources.yaml_file import FileSource, read_config
from meshbpf.sources.yaml_load import dump_all, load_all
from policy_world import netpol, ns_obj

LAYOUTS = ("yaml-stream", "yaml-list", "json-indent", "json-compact", "json-tight")


def render(objects: list[dict], layout: str, comment: bool = False) -> str:
    doc = {"apiVersion": "v1", "items": objects, "kind": "List", "metadata": {"resourceVersion": ""}}
    if layout == "yaml-stream":
        text = dump_all(objects) if objects else ""
        if comment:  # a comment and a blank line at the end of the first document
            text = text.replace("\n---\n", "\n\n# next\n---\n", 1)
        return text
    if layout == "yaml-list":
        return yaml.dump(doc, Dumper=yaml.CSafeDumper)  # kubectl's layout: items at column 0
    if layout == "json-indent":
        return json.dumps(doc, indent=4)                 # kubectl get -o json
    if layout == "json-compact":
        return json.dumps(doc)
    return json.dumps(doc, separators=(",", ":"))        # jq -c


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def random_service(rng: random.Random, i: int) -> list[dict]:
    name = f"s{i}"
    out = [service(name, f"10.96.{i // 200}.{i % 200 + 1}", ports=[
        {"name": "http", "port": rng.choice([80, 81]), "protocol": "TCP", "targetPort": 8080}])]
    for j in range(rng.randint(0, 2)):
        out.append(endpoint_slice(f"{name}-{j}", name, [
            ep(f"10.244.{i % 200}.{rng.randint(1, 9)}", ready=rng.random() < 0.8)
            for _ in range(rng.randint(1, 3))]))
    return out


def random_edit(rng: random.Random, objects: list[dict], serial: list[int]) -> str:
    """One edit of the object list, in place; returns what it did."""
    what = rng.choice(["add", "remove", "modify", "modify", "reorder", "policy", "none", "whitespace"])
    if what == "add":
        serial[0] += 1
        for obj in random_service(rng, serial[0]):
            objects.insert(rng.randint(0, len(objects)), obj)
    elif what == "remove" and len(objects) > 2:
        objects.pop(rng.randrange(len(objects)))
    elif what == "modify" and objects:
        obj = objects[rng.randrange(len(objects))]
        if obj["kind"] == "EndpointSlice":
            obj["endpoints"] = [ep(f"10.245.0.{rng.randint(1, 250)}") for _ in range(rng.randint(0, 3))]
        elif obj["kind"] == "Service":
            obj["spec"]["ports"][0]["port"] = rng.randint(1, 1000)
        else:
            obj["metadata"]["labels"] = {"v": str(rng.randint(0, 3))}
    elif what == "reorder" and len(objects) > 1:
        i, j = rng.sample(range(len(objects)), 2)
        objects[i], objects[j] = objects[j], objects[i]
    elif what == "policy":
        serial[0] += 1
        objects.insert(rng.randint(0, len(objects)), rng.choice([
            ns_obj(f"n{serial[0]}"),
            netpol(f"p{serial[0]}", "n1", {"matchLabels": {"v": "1"}}, ingress=[{"ports": [{"port": 80}]}])]))
    return what


def unslimmed_build(objects: list[dict]) -> dict:
    """The Services as build_state reads the objects with every field (the
    file source drops fields nothing reads: file_incremental._slim)."""
    copies = json.loads(json.dumps(objects))
    return build_state([SourceObject(o, "t") for o in copies], node_name="node-a").state.service_ports


@pytest.fixture
def pieces_parsed(monkeypatch):
    """How many pieces each cut parsed (the rest were known by digest)."""
    counts: list[int] = []
    real = file_pieces.split

    def spy(path, text, known=frozenset(), take=None):
        taken = []
        out = real(path, text, known, take and (lambda split, i, value: taken.append(take(split, i, value))))
        counts.append(-1 if out is None else len(out.values) + len(taken))
        return out
    monkeypatch.setattr(file_pieces, "split", spy)
    return counts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(6))
def test_random_edits_of_one_big_file_give_the_full_read_and_parse_only_changed_pieces(
        tmp_path, pieces_parsed, layout, seed):
    rng = random.Random(seed)
    serial = [0]
    objects = [obj for i in range(12) for obj in random_service(rng, i)]
    serial[0] = 12
    path = tmp_path / ("big.json" if layout.startswith("json") else "big.yaml")
    comment = False
    write(path, render(objects, layout, comment))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    state = src.poll()
    assert state == read_config(tmp_path, "node-a").state
    for _ in range(10):
        before = [json.dumps(o, sort_keys=True) for o in objects]
        first = before[0]
        what = random_edit(rng, objects, serial)
        comment ^= what == "whitespace"
        write(path, render(objects, layout, comment))
        pieces_parsed.clear()
        new = src.poll()
        state = new if new is not None else state
        assert state == read_config(tmp_path, "node-a").state, what
        assert state.service_ports == unslimmed_build(objects), what
        assert src._index is not None, what  # stayed on the incremental path
        after = [json.dumps(o, sort_keys=True) for o in objects]
        new_pieces = len(set(after) - set(before))
        # The first document has no `---` line and holds the comment: toggling
        # it, or another document becoming the first, changes that piece too.
        extra = int(layout == "yaml-stream" and (what == "whitespace" or after[0] != first))
        # Only the pieces not seen before are parsed (JSON's last item is parsed
        # to find the List's end; it is not counted when known).
        assert new_pieces <= pieces_parsed[0] <= new_pieces + extra, (what, pieces_parsed)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(20))
def test_a_cut_file_reads_as_the_whole_file_does(layout, seed):
    rng = random.Random(seed)
    objects = [obj for i in range(rng.randint(2, 6)) for obj in random_service(rng, i)]
    if rng.random() < 0.5:
        objects.insert(rng.randint(0, len(objects)), ns_obj("n1", {"x": "}, {"}))  # braces in a string
    text = render(objects, layout, comment=rng.random() < 0.5)
    split = file_pieces.split(Path("f"), text)
    assert split is not None
    assert split.documents() == load_all(text)
    again = file_pieces.split(Path("f"), text, set(split.digests))
    assert again.digests == split.digests and again.values == {}


@pytest.mark.parametrize("text", [
    "a: &x {b: 1}\n---\nc: *x\n",                  # an alias across documents
    "%YAML 1.1\n---\na: 1\n---\nb: 2\n",             # a directive
    "a: 1\n...\n---\nb: 2\n",                         # a document end marker
    '{"items": [{"a": "}, {"}, {"b": 1}], "kind": "List"}',  # the separator inside a string
    '{"items": [{"a": 1}, {"b": 1}] , "kind": "List"} {"x": 1}',  # not JSON: read as YAML
    "items:\n- a: 1\n# comment\n- b: 2\nkind: List\n",  # not kubectl's List layout
    "- a: 1\n---\n- b: 2\n",
])
def test_files_that_do_not_cut_cleanly_read_as_a_whole_parse_does(text):
    split = file_pieces.split(Path("f"), text)
    try:
        whole = load_all(text)
    except Exception:
        assert split is None
        return
    assert split is None or split.documents() == whole


def test_an_edit_of_one_item_in_a_big_yaml_list_reads_only_that_item(tmp_path, monkeypatch):
    """The proportional-work claim, seen from the YAML reader: after one item
    of a 40-Service List changes, the lines parsed are that item's (plus the
    List's few head and tail lines), not the file's."""
    objects = [obj for i in range(40) for obj in (service(f"s{i}", f"10.96.0.{i + 1}"),
                                                   endpoint_slice(f"s{i}-1", f"s{i}", [ep(f"10.244.0.{i + 1}")]))]
    path = tmp_path / "big.yaml"
    write(path, render(objects, "yaml-list"))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    src.poll()
    src.poll()  # quiet: builds the index
    lines: list[int] = []
    real = yaml_fast._documents
    monkeypatch.setattr(yaml_fast, "_documents", lambda ls, *a: lines.append(len(ls)) or real(ls, *a))
    objects[41]["endpoints"] = [ep("10.244.9.9")]
    text = render(objects, "yaml-list")
    write(path, text)
    state = src.poll()
    parsed = sum(lines)
    assert state == read_config(tmp_path, "node-a").state
    item = yaml.dump([objects[41]], Dumper=yaml.CSafeDumper).count("\n")
    assert 0 < parsed < item + 10 < text.count("\n") // 10


def test_errors_in_a_piece_name_the_file_document_and_field(tmp_path):
    objects = [obj for i in range(4) for obj in (service(f"s{i}", f"10.96.0.{i + 1}"),)]
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    for layout, where in (("json-indent", r"big\.json: document 1 \(line 1\): items\[2\]"),
                          ("yaml-stream", r"big\.yaml: document 3 \(line \d+\)")):
        for f in tmp_path.iterdir():
            f.unlink()
        path = tmp_path / ("big.json" if layout.startswith("json") else "big.yaml")
        write(path, render(objects, layout))
        src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
        good = src.poll()
        src.poll()
        bad = json.loads(json.dumps(objects))
        bad[2]["spec"]["ports"][0]["port"] = 70000
        write(path, render(bad, layout))
        with pytest.raises(ConfigError, match=where + r".*spec\.ports\[0\]\.port"):
            src.poll()
        assert src.poll() is None  # the running state stays; reported once
        write(path, render(objects, layout))
        assert src.poll() == good


def test_a_slice_edit_keeps_services_of_a_file_that_also_holds_an_agent_config(tmp_path):
    """A Service whose file holds another kind (here an AgentConfig) must stay
    known to the index: an edit of its EndpointSlice in another file rebuilds it."""
    config = {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
              "metadata": {"name": "agent"}, "spec": {}}
    write(tmp_path / "a.yaml", dump_all([config, service("web", "10.96.0.1")]))
    write(tmp_path / "b.yaml", dump_all([endpoint_slice("web-1", "web", [ep("10.244.0.1")])]))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    src.poll()
    src.poll()
    write(tmp_path / "b.yaml", dump_all([endpoint_slice("web-1", "web", [ep("10.244.0.2")])]))
    state = src.poll()
    assert state == read_config(tmp_path, "node-a").state
    assert len(state.service_ports) == 1


def _reachable_objects(root, stop) -> list[dict]:
    """Kubernetes objects (dicts with a kind) reachable from root, not
    looking inside the objects in `stop`."""
    seen, found, todo = {id(o) for o in stop}, [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType,
                                                types.BuiltinFunctionType, types.MethodType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict) and obj.get("kind") in ("Service", "EndpointSlice"):
            found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def test_the_source_keeps_no_parsed_objects_beside_the_service_index(tmp_path):
    """Footprint (issue 14): once the index is built, the Services and
    EndpointSlices are held once, by the ServiceIndex; the file source keeps
    digests and keys, not the parsed documents."""
    objects = [obj for i in range(5) for obj in (service(f"s{i}", f"10.96.0.{i + 1}"),
                                                  endpoint_slice(f"s{i}-1", f"s{i}", [ep(f"10.244.0.{i + 1}")]))]
    write(tmp_path / "big.json", render(objects, "json-indent"))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    src.poll()
    src.poll()  # builds the index
    index = src._index
    services = next(v for v in vars(index).values() if isinstance(v, ServiceIndex))
    assert _reachable_objects(src, stop=[services]) == []
    objects[3]["endpoints"] = [ep("10.244.9.9")]
    write(tmp_path / "big.json", render(objects, "json-indent"))
    src.poll()
    assert _reachable_objects(src, stop=[services]) == []
