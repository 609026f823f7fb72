"""The fast reader for kubectl's YAML (meshbpf/sources/yaml_fast.py) against
libyaml: it gives exactly libyaml's answer, or bails out (NotInSubset) and
lets libyaml answer. Never a different answer, never another exception.

Differential tests over generated kubectl-style documents, every YAML file
in the repository, hand-picked edge cases and a seeded fuzz corpus of
mutations. The oracle is yaml_load.load_all_libyaml, the libyaml path with
the go-yaml v2 resolver that the file source used before the fast path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from meshbpf.gcpause import gc_paused
from meshbpf.sources import yaml_fast, yaml_load
from meshbpf.sources.yaml_load import load_all
from test_scale import kubectl_yaml

REPO = Path(__file__).resolve().parents[2]
BAIL = "bail"
ERROR = "error"


def same(a, b) -> bool:
    """Equal, with the same types (True is not 1), key order and float sign."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(same(ka, kb) and same(va, vb)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items()))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def fast(text: str):
    try:
        return yaml_fast.load_all(text)
    except yaml_fast.NotInSubset:
        return BAIL


def oracle(text: str):
    try:
        return yaml_load.load_all_libyaml(text)
    except yaml_load.LoadError:
        return ERROR


def check(text: str) -> bool:
    """The invariant; returns whether the fast path answered."""
    got = fast(text)
    if got is BAIL:
        return False
    want = oracle(text)
    assert want is not ERROR, f"fast path accepted what libyaml refuses: {text!r}"
    assert same(got, want), f"different answers for {text!r}:\n fast {got!r}\n libyaml {want!r}"
    return True


# --- The subset is read, and read right ------------------------------------------

def test_the_10000_service_kubectl_dump_takes_the_fast_path():
    text = kubectl_yaml()
    with gc_paused():  # as the file source reads; libyaml's node tree is slow to collect
        got = yaml_fast.load_all(text)  # raises NotInSubset if it bailed out
        assert same(got, yaml_load.load_all_libyaml(text))
    assert len(got[0]["items"]) == 20_000


def test_load_all_uses_the_fast_path(monkeypatch):
    def no_libyaml(text):
        raise AssertionError("libyaml was used")
    monkeypatch.setattr(yaml_load, "load_all_libyaml", no_libyaml)
    assert yaml_load.load_all("a: yes\nb:\n- 0777\n") == [{"a": True, "b": [0o777]}]


def test_outside_the_subset_load_all_falls_back_to_libyaml():
    assert yaml_load.load_all("a: [1, {b: on}]\n") == [{"a": [1, {"b": True}]}]
    with pytest.raises(yaml_load.LoadError, match="duplicate key 'a'") as exc:
        yaml_load.load_all("a: 1\nb: 2\na: 3\n")
    assert exc.value.line == 3


@pytest.mark.parametrize("text", [
    "", "\n", "# only a comment\n", "---\n", "---\n---\n", "a: 1\n---\n", "---\na: 1\n---\nb: 2\n",
    "# c\n---\na: 1\n", "a: 1", "a:\n", "a:\nb:\n", "a:\n  b:\n", "- a\n- b\n", "- a:\n- b\n",
    "a:\n- 1\n- 2\nb: 3\n", "a:\n  - 1\n  - 2\nb: 3\n", "- a: 1\n  b:\n  - x\n  c: 2\n- d\n",
    "  a: 1\n  b: 2\n", "a: 1 # trailing\n# full\n  # indented\nb: 2\n",
    "a: yes\nb: No\nc: on\nd: OFF\ne: y\nf: n\ng: ~\nh: null\ni: Null\nj: true\n",
    "a: 0777\nb: 0x1F\nc: 0b101\nd: 1_000\ne: -17\nf: +3\ng: 1.5\nh: 08\ni: 1e3\nj: .inf\nk: -.Inf\n",
    "a: .nan\nb: 1:20\nc: 2024-04-02T08:11:37Z\nd: 2024-04-02\ne: 0o17\nf: 0.\ng: -0.0\n",
    "yes: 1\n80: http\n1.5: x\nnull: 2\n'yes': 3\n", "a: 'it''s'\nb: \"q\\\"uote\\\\\"\nc: ''\nd: \"\"\n",
    'a: "\\x41\\u00e9\\U0001F600\\n\\t\\0\\/\\ \\_\\N\\L\\P\\e"\n', 'a: "\\ud800"\n', 'a: "\\q"\n',
    "a: |\n  line 1\n  line 2\nb: 1\n", "a: |-\n  x\n\n  y\n\n\nb: 1\n", "a: |\n  x\n    indented\n",
    "a: |\n  x", "a: |\n  x\n", "a:\n- |\n x\n- b\n", "a:\n  - |\n   x\n  - |-\n    y\n", "a:\n- |\nx\n", "- |\n  x\n- |-\n  y\n", "- a: |\n    x\n  b: 1\n", "a: |\n\n  x\n",
    "a: |\n  x\n  \n", "a: |\nb: 1\n", "a: >\n  x\n", "a: |2\n   x\n", "a: | # c\n  x\n",
    "a: b\n  c\nd: 1\n", "a: b\n  c\n  d e\nx: 1\n", "- b\n  c\n- d\n", "k:\n- b\n c\n",
    "k:\n- a: b\n    c\n  d: 1\n", "k:\n- a: b\n   c\n", "a: 1\n  2\n", "a: yes\n  no\n",
    "a: b # c\n  d\n", "a: b\n c # x\n", "a: b\n\n  c\n", "a: b\n  - c\n", "a: 'b'\n  c\n",
    "a:\n  b\n", "- a\n  b: c\n", "a: b\n  c: d\n", "a: |\n  x\n  y\n z\n", "a: b\n  c\n \n",
    "a: 'LimitRanger plugin set: cpu request for container\n  hostnames'\nb: 1\n",
    "- 'a b\n  c'\n- d\n", "a: 'x\n  y\n  z' # c\n", "a: 'x  \n    y'\n", "a: 'x\n\n  y'\n",
    "a: 'x\ny'\n", "a: 'it''s\n  it''s'\n", "a: 'x\n  y' z\n", "a: 'x\n  y'\n  c: 1\n",
    "k:\n- a: 'x\n   y'\n", "a: 'x\n  y", "a: 'x\n  ' \n", "a: '\n  x'\n", "'a\n  b': c\n",
    "a: {}\nb: []\n- {}\n", "a: {}\nb: []\nc:\n- {}\n- []\n", "a: { }\n", "a: [1]\n",
    "a: b: c\n", "a: b #c\n", "a: b#c\n", "a:b\n", "a:  \n", "a : b\n", "'a b': c\n", '"a\\nb": c\n',
    "a: -\n", "a: - b\n", "- - a\n", "-\n  a: 1\n", "- \n", "-1: x\n", "a: -1\n", "a: ---\n",
    "---a: 1\n", "--- a: 1\n", "...\n", "a: 1\n...\n", "%YAML 1.1\n---\na: 1\n",
    "a: 1\n b: 2\n", "a:\n  b: 1\n c: 2\n", "a:\n    b: 1\n  c: 2\n", "a:\n- 1\n  - 2\n",
    "a: 1\na: 2\n", "- a: 1\n  a: 2\n", "a: &x 1\nb: *x\n", "<<: {a: 1}\n", "a: !!str 1\n",
    "a: b\n  c\n", "a: 'multi\n  line'\n", "a: \"multi\n  line\"\n", "a:\tb\n", "a: b\r\nc: d\r\n",
    "\ufeffa: 1\n", "a: \u2028\n", "a: \x85\n", "a: caf\u00e9 \u00a0x\n", "a: \U0001F600\n",
    "a: x:y\n", "a: x::y\nb: fd00::1\nc: ::1\n", "a: 'x' y\n", "a: \"x\"#c\n", "a: x,y\n",
    "=: 1\n", "a: =\n", "~: 1\n", "a: @x\n", "a: `x\n", "a: %x\n", "a: ?x\n", "a: ? x\n", "? a\n: b\n",
])
def test_edge_cases_agree_with_libyaml(text):
    check(text)


def test_deep_nesting_bails_out_instead_of_recursing():
    text = "".join(" " * i + "a:\n" for i in range(5000)) + " " * 5000 + "b: 1\n"
    assert fast(text) is BAIL
    assert fast("- " * 5000 + "x\n") is BAIL


# --- Every YAML file in the repository ----------------------------------------------

def _repository_yaml() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in REPO.rglob(ext)
                  if not {".git", ".venv", "node_modules"} & set(p.relative_to(REPO).parts))


def test_every_yaml_file_in_the_repository_agrees():
    files = _repository_yaml()
    answered = {p.name for p in files if check(p.read_text())}
    kubectl_fixtures = {p.name for p in (REPO / "tests/unit/fixtures").glob("*.yaml")}
    assert len(kubectl_fixtures) >= 8 and kubectl_fixtures <= answered


# --- Generated kubectl-style documents ----------------------------------------------

WORDS = ["web", "svc-1", "10.96.0.10", "fd00::10", "::1", "kube-system", "TCP", "ClusterIP",
         "discovery.k8s.io/v1", "app.kubernetes.io/name", "yes", "No", "on", "OFF", "y", "n",
         "null", "~", "true", "False", "0777", "0x1F", "0b101", "1_000", "-17", "+3", "1.5", "08",
         "1e3", ".inf", "-.Inf", ".nan", "1:20", "2024-04-02T08:11:37Z", "<<", "=", "a#b", "a #b",
         "a: b", "a:b", "-", "- a", "---", "...", "|", ">", "@x", "`x", "%x", "!x", "&x", "*x",
         "'q'", '"q"', "a'b", 'a"b', "[a]", "{a}", "a,b", " lead", "trail ", "", "caf\u00e9",
         "\u2028", "tab\tx", "x\\y", "two words", "a  b", "?", "?x", ":x", "x:", "0", "-0", "0.",
         "line1\nline2", "line1\nline2\n", "\nlead", "  indented\nx", "\U0001F600", "\x00", "\x07"]


def _scalar_text(rng: random.Random, value) -> str:
    """A scalar in one of the styles go-yaml writes, whether or not that style is
    right for the value: the invariant holds for any text."""
    if not isinstance(value, str):
        return json.dumps(value)
    style = rng.random()
    if style < 0.5:
        return value
    if style < 0.7:
        return "'" + value.replace("'", "''") + "'"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


def _block(rng: random.Random, value: str, indent: int) -> list[str]:
    header = rng.choice(["|", "|-"])
    pad = " " * (indent + rng.choice([2, 2, 4]))
    return [header] + [pad + line if line else "" for line in value.split("\n")]


def _value(rng: random.Random, depth: int):
    r = rng.random()
    if depth < 4 and r < 0.25:
        return {_key(rng): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 4 and r < 0.4:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if r < 0.45:
        return rng.choice([0, 80, -1, 1.5, True, False, None])
    return rng.choice(WORDS) if rng.random() < 0.7 else rng.choice(WORDS) + rng.choice(WORDS)


def _key(rng: random.Random) -> str:
    return rng.choice(["name", "port", "protocol", "yes", "on", "80", "a b", "x:y", "1.5", "k"]
                      + WORDS[:12]) + rng.choice(["", "", str(rng.randint(0, 9))])


def emit(rng: random.Random, value, indent: int = 0) -> list[str]:
    """Lines of value as go-yaml writes a block: sequences under a key at the
    key's own column, '- ' items, one scalar per line."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            head = f"{pad}{_scalar_text(rng, k)}:"
            lines += _entry(rng, head, v, indent, indent if isinstance(v, list) else indent + 2)
        return lines or [pad + "{}"]
    if isinstance(value, list):
        lines = []
        for v in value:
            if isinstance(v, dict) and v:
                inner = emit(rng, v, indent + 2)
                lines += [pad + "- " + inner[0][indent + 2:]] + inner[1:]
            else:
                lines += _entry(rng, pad + "-", v, indent, indent + 2)
        return lines or [pad + "[]"]
    return [pad + _scalar_text(rng, value)]


def _entry(rng: random.Random, head: str, value, indent: int, inner: int) -> list[str]:
    if isinstance(value, (dict, list)) and value:
        return [head] + emit(rng, value, inner)
    if isinstance(value, str) and "\n" in value and rng.random() < 0.7:
        first, *rest = _block(rng, value, indent)
        return [f"{head} {first}"] + rest
    if value == {}:
        return [head + " {}"]
    if value == []:
        return [head + " []"]
    if value is None and rng.random() < 0.5:
        return [head]
    text = _scalar_text(rng, value)
    if " " in text and rng.random() < 0.3:  # wrapped, as go-yaml wraps long scalars
        first, *rest = text.split(" ")
        pad = " " * (indent + rng.choice([1, 2, 2, 4]))
        return [f"{head} {first}"] + [pad + word for word in rest]
    return [f"{head} {text}"]


def generated_documents(rng: random.Random) -> str:
    docs = []
    for _ in range(rng.randint(1, 3)):
        obj = {_key(rng): _value(rng, 0) for _ in range(rng.randint(1, 6))}
        docs.append("\n".join(emit(rng, obj)) + "\n")
    return ("---\n" if rng.random() < 0.3 else "") + "---\n".join(docs)


def test_generated_kubectl_style_documents_agree():
    rng = random.Random(20261130)
    answered = sum(check(generated_documents(rng)) for _ in range(6000))
    assert answered >= 600  # enough of them are in the subset to test it


def test_pyyaml_dumps_of_generated_objects_agree():
    import yaml
    rng = random.Random(7)
    answered = 0
    for _ in range(1500):
        obj = {_key(rng): _value(rng, 0) for _ in range(rng.randint(1, 6))}
        text = yaml.safe_dump(obj, default_flow_style=False, allow_unicode=rng.random() < 0.5,
                              sort_keys=False)
        answered += check(text)
    assert answered >= 150


# --- Fuzz: mutations of kubectl output and of generated text ------------------------------

ALPHABET = "{}[]:-,&*!|>'\"#%@`?\n\t <=\\~.0aZy\x00\xa0\xff\u2028\ufeff"


def mutate(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(lines))
        op = rng.random()
        if op < 0.15:
            lines.insert(i, lines[rng.randrange(len(lines))])           # a duplicate line
        elif op < 0.3:
            lines[i] = " " * rng.choice([1, 2, 3]) + lines[i]           # indentation off
        elif op < 0.4:
            lines[i] = lines[i][rng.choice([1, 2]):]
        elif op < 0.5 and len(lines) > 1:
            del lines[i]
        else:
            chars = list(lines[i])
            pos = rng.randrange(len(chars) + 1)
            if op < 0.75:
                chars.insert(pos, rng.choice(ALPHABET))
            elif chars:
                chars[min(pos, len(chars) - 1)] = rng.choice(ALPHABET)
            lines[i] = "".join(chars)
    return "\n".join(lines)


@pytest.mark.timeout(240)  # a hang fails here; nothing below asserts a time
def test_fuzz_mutated_input_agrees_or_bails(cluster_list, cluster_multidoc):
    rng = random.Random(99)
    seeds = [cluster_list.read_text(), cluster_multidoc.read_text()]
    seeds += [generated_documents(rng) for _ in range(50)]
    answered = 0
    for _ in range(20_000):
        text = mutate(rng, rng.choice(seeds))
        if rng.random() < 0.1:
            text = mutate(rng, text)
        answered += check(text)
        try:  # and the whole reader: an answer or a LoadError, nothing else
            yaml_load.load_all(text)
        except yaml_load.LoadError:
            pass
    assert answered >= 700


@pytest.mark.timeout(60)
def test_long_hostile_lines_stay_cheap():
    """Long lines of what a backtracking expression chokes on: each is read or
    refused, none hangs."""
    for body in ["a " * 3000, "a:" * 3000, "a" + " #" * 3000, "'" + "''" * 3000, '"' + "\\" * 6001,
                 "- " * 3000 + "x", "a" * 4000 + ": " + "b " * 2000 + ":"]:
        check(f"k: {body}\n")
        check(body + "\n")


def test_fast_path_values_are_independent_objects():
    """A cached line token must not share mutable values between places."""
    (doc,) = yaml_fast.load_all("a: {}\nb: {}\nc:\n- []\n- []\n")
    assert doc["a"] is not doc["b"] and doc["c"][0] is not doc["c"][1]


@pytest.mark.parametrize("text", ["a: " + "1" * 5000 + "\n", "a: 1_" + "2" * 5000 + "\n",
                                  "- " + "7" * 4400 + "\n", "{\"a\": " + "1" * 5000 + "}"])
def test_an_integer_with_thousands_of_digits_is_a_located_error_not_a_crash(text):
    """Python refuses to convert ints over 4300 digits (ValueError); that must
    come out as a LoadError with its line, on every path."""
    with pytest.raises(yaml_load.LoadError, match="too many digits") as exc:
        yaml_load.load_all(text)
    assert exc.value.line == 1


def test_lines_of_the_cheap_expression_read_the_same_by_the_general_one():
    """yaml_fast reads most lines with _SIMPLE_LINE; each must give the token
    the general expression gives."""
    rng = random.Random(5)
    lines = set(kubectl_yaml().split("\n")[:20_000])
    lines |= {line for _ in range(500) for line in generated_documents(rng).split("\n")}
    lines |= {pad + dash + key + value for pad in ("", "  ") for dash in ("", "- ")
              for key in ("", "a: ", "yes: ", "a:", "n: ") for value in WORDS + ['"x"', '""']}
    simple = [line for line in lines if yaml_fast._SIMPLE_LINE.fullmatch(line)]
    assert len(simple) > 1000

    def token(read, line):
        try:
            return read(line)
        except yaml_fast.NotInSubset:
            return BAIL
    for line in simple:
        assert same(list(token(yaml_fast._token, line)),
                    list(token(yaml_fast._general_token, line))), line


def random_lines(rng: random.Random) -> str:
    """Lines picked at random from the shapes the reader knows, at random
    columns: every state of its loop meets every kind of line."""
    values = ["", " b", " 1", " |", " |-", " {}", " []", " 'x", " 'x y'", ' "q"', " yes", " b #c"]
    shapes = ["a:{v}", "b:{v}", "- a:{v}", "-{v}", "x{v}", "y'", "---", "# c", "", "  ", "- - a",
              "'k':{v}", "a b{v}", "<<:{v}", "-"]
    lines = []
    for _ in range(rng.randint(1, 12)):
        shape = rng.choice(shapes).format(v=rng.choice(values))
        lines.append(" " * rng.choice([0, 0, 1, 2, 2, 3, 4, 6]) + shape)
    return "\n".join(lines) + rng.choice(["\n", "", "\n\n"])


def test_random_lines_agree_or_bail():
    rng = random.Random(31)
    answered = sum(check(random_lines(rng)) for _ in range(30_000))
    assert answered >= 1000


def test_dump_all_quotes_what_the_agent_would_read_as_another_type():
    """PyYAML's dumpers leave `y` and `n` bare; Kubernetes (go-yaml v2) and
    our loader read them as booleans, so a namespace `y` would vanish."""
    from meshbpf.sources.yaml_load import dump_all
    docs = [{"metadata": {"namespace": "y", "name": "n"}, "v": ["on", "0755", "1e3", "~", "plain"]},
            {"kind": "Pod", "n": 3, "t": True, "z": None}]
    text = dump_all(docs)
    assert "namespace: 'y'" in text
    assert load_all(text) == docs
    assert load_all(yaml.safe_dump(docs[0]))[0]["metadata"]["namespace"] is True  # what it fixes
