"""The measured kernel-choice table (pyevo/kernel_choices.py, csrc/cuda_kernel_choice.*): loading and
checking a table file, the shape keys of entries and of calls, exact lookup with ATen's as the
default, and the shipped table as the C++ ops see it. All on the CPU: a table is data, and the key of
a call is built from its tensors on any device."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pyevo import _C, ops
from pyevo.kernel_choices import (SHIPPED_TABLE, KernelChoiceError, choose_kernel, load_kernel_choices, shape_key,
                                  write_kernel_choices)

CONV_SHAPE = {"N": 2, "C_in": 16, "C_out": 24, "H": 8, "W": 6, "kernel_size": 3, "has_temb": True,
              "has_residual": False, "channels_last": True}
ATTENTION_SHAPE = {"B": 2, "S": 12, "C": 32, "heads": 3, "head_dim": 8, "cross": True, "S_kv": 5, "C_kv": 20}
ENTRY = {"device": "Test GPU", "capability": "9.0", "op": "fused_conv2d", "dtype": "bfloat16",
         "shape": CONV_SHAPE, "kernel": "pyevo", "pyevo_ms": 0.1, "aten_ms": 0.2, "date": "2026-12-08",
         "torch": "2.14.1", "source": "a test"}


def table_file(tmp_path, entries, name="choices.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    return path


def test_lookup_is_exact_and_defaults_to_aten():
    """The C++ rule the ops follow (the shipped table is installed at import): an entry's GPU, capability,
    dtype and shape give its kernel; change any one of them and no entry matches, so ATen's runs."""
    shipped = load_kernel_choices(SHIPPED_TABLE)
    chosen = [entry for entry in shipped.entries if entry["kernel"] == "pyevo"]
    if not chosen:
        pytest.skip("the shipped table chooses pyevo's kernel nowhere: exactness cannot show")
    entry = chosen[0]
    op, dtype, shape = entry["op"], entry["dtype"], dict(entry["shape"])
    assert _C._measured_kernel_choice(entry["device"], entry["capability"], shape_key(op, dtype, shape)) == "pyevo"
    keys = {key for _, _, key in shipped.choices}
    for field, value in shape.items():
        changed = shape_key(op, dtype, {**shape, field: (not value) if isinstance(value, bool) else value + 8})
        assert changed not in keys
        assert _C._measured_kernel_choice(entry["device"], entry["capability"], changed) == "aten", field
    other_dtype = shape_key(op, "float16" if dtype != "float16" else "bfloat16", shape)
    assert _C._measured_kernel_choice(entry["device"], entry["capability"], other_dtype) == "aten"
    assert _C._measured_kernel_choice("Other GPU", entry["capability"], shape_key(op, dtype, shape)) == "aten"
    assert _C._measured_kernel_choice(entry["device"], "8.0", shape_key(op, dtype, shape)) == "aten"


def test_loaded_entries_and_choices(tmp_path):
    attention = {**ENTRY, "op": "shared_attention", "shape": ATTENTION_SHAPE, "kernel": "aten"}
    table = load_kernel_choices(table_file(tmp_path, [ENTRY, attention]))
    assert table.choices == {("Test GPU", "9.0", shape_key("fused_conv2d", "bfloat16", CONV_SHAPE)): "pyevo",
                             ("Test GPU", "9.0", shape_key("shared_attention", "bfloat16", ATTENTION_SHAPE)): "aten"}
    assert table.entries[0]["source"] == "a test"


def test_shape_keys_of_calls_match_those_of_entries():
    """The C++ ops key a call from its tensors; an entry's fields give the same key."""
    x = torch.randn(2, 16, 8, 6).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 30)  # wider than C_out: a prefix is used, the key holds C_out
    assert _C._fused_conv2d_shape_key(x.bfloat16(), temb.bfloat16(), None, 24, 3) == \
        shape_key("fused_conv2d", "bfloat16", CONV_SHAPE)
    assert _C._fused_conv2d_shape_key(x.contiguous(), temb, torch.randn(2, 24, 8, 6), 24, 3) == \
        shape_key("fused_conv2d", "float32", {**CONV_SHAPE, "has_residual": True, "channels_last": False})
    hidden, context = torch.randn(2, 12, 32), torch.randn(2, 5, 20)
    assert _C._shared_attention_shape_key(hidden.half(), context.half(), 3, 8) == \
        shape_key("shared_attention", "float16", ATTENTION_SHAPE)
    self_attention = {**ATTENTION_SHAPE, "cross": False, "S_kv": 12, "C_kv": 32}
    assert _C._shared_attention_shape_key(hidden, None, 3, 8) == shape_key("shared_attention", "float32",
                                                                            self_attention)
    assert shape_key("fused_conv2d", "bfloat16", CONV_SHAPE) == (
        "fused_conv2d|bfloat16|N=2,C_in=16,C_out=24,H=8,W=6,kernel_size=3,has_temb=1,has_residual=0,"
        "channels_last=1")


def entry_with(**changes):
    """ENTRY with fields changed (shape_<name>: a shape field), a None value deleting the field."""
    entry = copy.deepcopy(ENTRY)
    for name, value in changes.items():
        target = entry["shape"] if name.startswith("shape_") else entry
        name = name.removeprefix("shape_")
        if value is None:
            del target[name]
        else:
            target[name] = value
    return entry


BAD_ENTRIES = {
    "op": (entry_with(op="shared_conv2d"),
           r"unknown op 'shared_conv2d' \(expected 'fused_conv2d', 'shared_attention'\)"),
    "kernel": (entry_with(kernel="auto"), r"unknown kernel 'auto' \(expected 'aten', 'pyevo'\)"),
    "dtype": (entry_with(dtype="int8"), r"unknown dtype 'int8'"),
    "shape field": (entry_with(shape_groups=1), r"unknown fields \['groups'\], missing fields \[\]"),
    "missing shape field": (ENTRY | {"shape": {k: v for k, v in CONV_SHAPE.items() if k != "W"}},
                            r"missing fields \['W'\]"),
    "flag as int": (entry_with(shape_has_temb=1), r"has_temb must be true or false, got 1"),
    "size as bool": (entry_with(shape_N=True), r"N must be a non-negative integer, got True"),
    "entry field": (entry_with(speedup=2.0), r"unknown fields \['speedup'\]"),
    "missing time": (entry_with(aten_ms=None), r"missing fields \['aten_ms'\]"),
    "time": (entry_with(pyevo_ms=0), r"pyevo_ms must be a positive number"),
    "capability": (entry_with(capability="sm90"), r"capability must be 'major.minor'"),
}


@pytest.mark.parametrize("name", list(BAD_ENTRIES))
def test_unknown_or_malformed_entries_are_refused_in_one_line(tmp_path, name):
    entry, message = BAD_ENTRIES[name]
    path = table_file(tmp_path, [ENTRY | {"device": "Other GPU"}, entry])
    with pytest.raises(KernelChoiceError, match=r"^" + str(path) + r": entry 1: .*" + message) as raised:
        load_kernel_choices(path)
    assert "\n" not in str(raised.value)


def test_malformed_tables_are_refused_in_one_line(tmp_path):
    cases = {"not json": ("{", "not a readable JSON file"),
             "format": (json.dumps({"format": 2, "entries": []}), "not a kernel-choice table of format 1"),
             "no entries list": (json.dumps({"format": 1, "entries": {}}), "entries must be a list"),
             "two entries for one call": (json.dumps({"format": 1, "entries": [ENTRY, ENTRY | {"kernel": "aten"}]}),
                                          "entry 1: a second entry for Test GPU")}
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(KernelChoiceError, match=message) as raised:
            load_kernel_choices(path)
        assert "\n" not in str(raised.value), name
    with pytest.raises(KernelChoiceError, match="not a readable JSON file"):
        load_kernel_choices(tmp_path / "missing.json")


def test_write_then_load_round_trips_and_digest_names_the_choices(tmp_path):
    path = tmp_path / "written.json"
    write_kernel_choices(path, [ENTRY], note="a test table")
    table = load_kernel_choices(path)
    assert table.entries == (ENTRY,) and json.loads(path.read_text())["note"] == "a test table"
    digest = table.digest("Test GPU", "9.0")
    assert len(digest) == 8 and table.digest("Other GPU", "9.0") == "aten"
    # Another choice changes the digest; other measured times alone do not.
    write_kernel_choices(path, [ENTRY | {"kernel": "aten"}])
    assert load_kernel_choices(path).digest("Test GPU", "9.0") != digest
    write_kernel_choices(path, [ENTRY | {"pyevo_ms": 0.05}])
    assert load_kernel_choices(path).digest("Test GPU", "9.0") == digest
    with pytest.raises(KernelChoiceError, match="unknown kernel 'fast'"):
        write_kernel_choices(path, [ENTRY | {"kernel": "fast"}])


def test_choose_kernel_keeps_aten_near_a_tie():
    assert choose_kernel(pyevo_ms=1.0, aten_ms=1.2) == "pyevo"
    assert choose_kernel(pyevo_ms=1.0, aten_ms=1.02) == "aten"
    assert choose_kernel(pyevo_ms=1.2, aten_ms=1.0) == "aten"


def test_the_shipped_table_is_what_the_ops_use():
    """pyevo.ops loaded the shipped file at import and installed the same choices in C++; installing
    again is refused (the table is not a switch)."""
    shipped = load_kernel_choices(SHIPPED_TABLE)
    assert ops.KERNEL_CHOICES == shipped
    for (device, capability, key), kernel in shipped.choices.items():
        assert _C._measured_kernel_choice(device, capability, key) == kernel
    # No fused_conv2d entries until a GPU measures the CUTLASS kernel.
    assert all(entry["op"] == "shared_attention" for entry in shipped.entries)
    assert _C._measured_kernel_choice("Test GPU", "9.0", shape_key("fused_conv2d", "bfloat16", CONV_SHAPE)) == "aten"
    with pytest.raises(RuntimeError, match="installed once"):
        _C._install_kernel_choices([])


def test_kernel_choice_on_the_cpu_and_refusals():
    x, w = torch.randn(2, 16, 8, 6), torch.randn(24, 16, 3, 3)
    for kernel in ("auto", "aten", "pyevo"):
        assert ops.kernel_choice("fused_conv2d", x, w, None, None, None, 1.0, 24, 3, impl=kernel) == "aten"
        assert _C._resolve_kernel("fused_conv2d", torch.device("cpu"), "any key", kernel) == "aten"
    with pytest.raises(RuntimeError, match=r"^pyevo::fused_conv2d: unknown impl 'fast' "
                                           r"\(expected 'auto', 'aten' or 'pyevo'\)$"):
        ops.kernel_choice("fused_conv2d", x, w, None, None, None, 1.0, 24, 3, impl="fast")
    with pytest.raises(ValueError, match="no kernel choice for op 'shared_conv2d'"):
        ops.kernel_choice("shared_conv2d", x, w, None, 24, 3)
    with pytest.raises(RuntimeError, match="no kernel choice for op 'shared_conv2d'"):
        _C._resolve_kernel("shared_conv2d", torch.device("cpu"), "any key", "auto")
