"""Both generator runtimes implement :class:`~crossmodal_rag.generation.interface.TextGenerator`
(issue 26): every member of the Protocol exists on the transformers ``Generator`` and on
``LlamaCppGenerator`` with the same kind (attribute, property, method), and every method with the
same parameters (names, kinds, defaults, resolved types) and return type; what
``load_generator`` returns passes the same check. ``isinstance`` with ``runtime_checkable`` would
only look at the names, so the signatures are compared here, and a planted runtime with one method
renamed and others re-signatured proves the comparison is not blind."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest

from crossmodal_rag.generation import interface
from crossmodal_rag.generation.interface import LockStepState, TextGenerator
from crossmodal_rag.generation.llamacpp import LlamaCppGenerator, LlamaDecodeState
from crossmodal_rag.generation.models import DecodeState, Generator, load_generator
from crossmodal_rag.generation.prompting import GenerationSettings, Prefixes, Prompt

_EMPTY = inspect.Parameter.empty


def _is_protocol(obj: Any) -> bool:
    return isinstance(obj, type) and getattr(obj, "_is_protocol", False)


def protocol_members(proto: type) -> dict[str, str]:
    """The Protocol's own members: name -> "attribute" | "property" | "method"."""
    out = {name: "attribute" for name in inspect.get_annotations(proto)}
    for name, value in proto.__dict__.items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            out[name] = "property"
        elif inspect.isfunction(value):
            out[name] = "method"
    return out


def init_attributes(cls: type) -> set[str]:
    """The attributes ``__init__`` assigns on ``self`` (in ``cls`` or a base), read from the source."""
    out: set[str] = set()
    for klass in cls.__mro__[:-1]:
        init = vars(klass).get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                out.add(node.attr)
    return out


def _hints(func: Any) -> dict[str, Any]:
    return typing.get_type_hints(func)


def _returns_match(proto: type, cls: type, want: Any, got: Any, where: str) -> list[str]:
    if want is proto:  # returns the generator itself (a subclass may inherit its base's method)
        ok = isinstance(got, type) and issubclass(cls, got)
        return [] if ok else [f"{where} returns {got!r}, not the {cls.__name__} itself"]
    if _is_protocol(want):  # another interface: the returned class must satisfy it
        if not isinstance(got, type):
            return [f"{where} returns {got!r}, not a class satisfying {want.__name__}"]
        return [f"{where} -> {p}" for p in conformance(got, want)]
    return [] if want == got else [f"{where} returns {got!r}, the interface {want!r}"]


def _signature_problems(proto: type, cls: type, name: str) -> list[str]:
    want_f, got_f = proto.__dict__[name], inspect.getattr_static(cls, name)
    where = f"{cls.__name__}.{name}"
    want_sig, got_sig = inspect.signature(want_f), inspect.signature(got_f)
    want_h, got_h = _hints(want_f), _hints(got_f)
    problems = []
    want_ps = list(want_sig.parameters.values())
    got_ps = list(got_sig.parameters.values())
    for i, w in enumerate(want_ps):
        if i >= len(got_ps):
            problems.append(f"{where} lacks parameter {w.name!r}")
            continue
        g = got_ps[i]
        if (g.name, g.kind) != (w.name, w.kind):
            problems.append(f"{where} parameter {i} is {g.name!r} ({g.kind.description}), the interface's "
                            f"{w.name!r} ({w.kind.description})")
        elif g.default != w.default:
            problems.append(f"{where}({w.name}) defaults to {g.default!r}, the interface's to {w.default!r}")
        elif w.name != "self" and want_h.get(w.name) != got_h.get(g.name):
            problems.append(f"{where}({w.name}) is typed {got_h.get(g.name)!r}, the interface "
                            f"{want_h.get(w.name)!r}")
    for g in got_ps[len(want_ps):]:  # more parameters are fine when a caller may leave them out
        if g.default is _EMPTY and g.kind not in (g.VAR_POSITIONAL, g.VAR_KEYWORD):
            problems.append(f"{where} requires parameter {g.name!r}, which the interface lacks")
    problems += _returns_match(proto, cls, want_h.get("return"), got_h.get("return"), where)
    return problems


def conformance(cls: type, proto: type, instance: object | None = None) -> list[str]:
    """How ``cls`` falls short of ``proto`` (empty: it satisfies it). An attribute may be a class
    attribute or one ``__init__`` sets; given an ``instance``, it must also be there."""
    problems = []
    assigned = init_attributes(cls)
    for name, kind in protocol_members(proto).items():
        try:
            got = inspect.getattr_static(cls, name)
        except AttributeError:
            got = _EMPTY
        if kind == "attribute":
            if got is _EMPTY and name not in assigned:
                problems.append(f"{cls.__name__} lacks attribute {name!r}")
            elif instance is not None and got is _EMPTY and name not in vars(instance):
                problems.append(f"{cls.__name__}() has no attribute {name!r} after __init__")
        elif got is _EMPTY:
            problems.append(f"{cls.__name__} lacks {kind} {name!r}")
        elif kind == "property":
            if not isinstance(got, property):
                problems.append(f"{cls.__name__}.{name} is not a property")
            else:
                want = _hints(proto.__dict__[name].fget).get("return")
                problems += _returns_match(proto, cls, want, _hints(got.fget).get("return"),
                                           f"{cls.__name__}.{name}")
        elif not callable(got) or isinstance(got, property | staticmethod | classmethod):
            problems.append(f"{cls.__name__}.{name} is not a method")
        else:
            problems += _signature_problems(proto, cls, name)
    return problems


# -- the interface and its runtimes ------------------------------------------------------------
def test_the_interface_covers_what_callers_use() -> None:
    members = protocol_members(TextGenerator)
    assert {"spec", "runtime", "kind", "device"} <= {n for n, k in members.items() if k == "attribute"}
    assert {"max_input_tokens", "is_chat", "eos_ids"} <= {n for n, k in members.items() if k == "property"}
    assert {"load", "render", "count_tokens", "truncate_tokens", "decode", "prompt_ids", "answer_ids",
            "generate", "stream", "start", "encoder_reuse", "sequence_logprobs",
            "answer_token_logprobs"} <= {n for n, k in members.items() if k == "method"}
    assert protocol_members(LockStepState) == {"k": "attribute", "logprobs": "method", "feed": "method",
                                               "close": "method"}
    assert set(interface.__all__) == {"LockStepState", "TextGenerator"}


def test_the_transformers_runtime_satisfies_the_interface() -> None:
    assert conformance(Generator, TextGenerator, Generator("unused-spec", device="cpu")) == []
    assert conformance(DecodeState, LockStepState) == []


def test_the_llama_cpp_runtime_satisfies_the_interface() -> None:
    """Checked on the class (the llama.cpp binding is only needed to load a model)."""
    assert conformance(LlamaCppGenerator, TextGenerator, LlamaCppGenerator("unused.gguf", n_threads=1)) == []
    assert conformance(LlamaDecodeState, LockStepState) == []


@pytest.mark.parametrize("which", ["seq2seq", "causal"])
def test_load_generator_returns_a_text_generator(which: str, t5_dir: Path, lm_dir: Path) -> None:
    gen = load_generator(str(t5_dir if which == "seq2seq" else lm_dir), device="cpu")
    assert conformance(type(gen), TextGenerator, gen) == []
    assert gen.load() is gen and gen.kind == which and gen.runtime == "transformers"
    state = gen.start(["a prompt", "another one"], max_new_tokens=2)
    try:
        assert conformance(type(state), LockStepState, state) == []
        assert tuple(state.logprobs().shape) == (2, gen.model.config.vocab_size) and state.k == 2
    finally:
        state.close()
    ids = gen.prompt_ids("a prompt")
    assert gen.answer_ids("yes")[-1] in gen.eos_ids and all(isinstance(t, int) for t in ids)


# -- the check is not blind ----------------------------------------------------------------------
def _planted() -> type:
    """The transformers Generator with ``count_tokens`` renamed, a parameter renamed, a default
    changed, a type changed, a required parameter added and a property turned into a method."""
    attrs = {k: v for k, v in vars(Generator).items() if k not in ("__dict__", "__weakref__")}
    attrs["count_toks"] = attrs.pop("count_tokens")

    def truncate_tokens(self: Any, text: str, limit: int) -> str:
        return text

    def generate(self: Any, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 2, prefixes: Prefixes = None) -> list[list[str]]:
        return []

    def decode(self: Any, ids: list[int]) -> str:
        return ""

    def render(self: Any, prompt: Prompt, style: str) -> str:
        return ""

    def is_chat(self: Any) -> bool:
        return False

    attrs.update(truncate_tokens=truncate_tokens, generate=generate, decode=decode, render=render,
                 is_chat=is_chat)
    return type("Planted", (), attrs)


def test_a_renamed_or_resignatured_method_is_caught() -> None:
    planted = _planted()
    found = conformance(planted, TextGenerator)
    assert any("lacks method 'count_tokens'" in f for f in found), found
    assert any("truncate_tokens parameter 2 is 'limit'" in f for f in found), found
    assert any("generate(num_return_sequences) defaults to 2" in f for f in found), found
    assert any("decode(ids) is typed list[int]" in f for f in found), found
    assert any("render requires parameter 'style'" in f for f in found), found
    assert any("is_chat is not a property" in f for f in found), found
    assert any("Planted.load returns" in f and "not the Planted itself" in f for f in found), found
    assert len(found) == 7, found


class _State:
    """A lock-step state whose logprobs are not a tensor."""

    k = 1

    def logprobs(self) -> list[float]:
        return []

    def feed(self, token: int) -> None: ...

    def close(self) -> None: ...


class _Runtime(Generator):
    def start(self, prompts: list[Prompt], prefixes: Prefixes = None, max_new_tokens: int = 256
              ) -> _State:  # type: ignore[override]
        return _State()


def test_a_wrong_return_type_is_caught() -> None:
    assert conformance(_State, LockStepState) == [
        "_State.logprobs returns list[float], the interface <class 'torch.Tensor'>"]
    assert conformance(_Runtime, TextGenerator) == [
        "_Runtime.start -> _State.logprobs returns list[float], the interface <class 'torch.Tensor'>"]
