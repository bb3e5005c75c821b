"""Small pure functions: metadata merge, member-name safety, tree hash."""

from __future__ import annotations

import pytest

from vllm_forge.assemble import merge_requires
from vllm_forge.errors import ForgeError
from vllm_forge.fa4 import tree_sha256
from vllm_forge.fetch import safe_member_name

META = """Metadata-Version: 2.4
Name: vllm
Version: 0.19.1
Requires-Dist: einops
Requires-Dist: quack-kernels>=0.2.7
Requires-Dist: scipy; extra == "bench"
Requires-Dist: quack-kernels; extra == "other"

Long description
Version: not a header
"""


def test_merge_requires() -> None:
    out = merge_requires(META, "0.19.1+fa4.bce2942", ["quack-kernels>=0.4.0", "apache-tvm-ffi<0.2,>=0.1.5", "einops"])
    head, body = out.split("\n\n", 1)
    assert "Version: 0.19.1+fa4.bce2942" in head.splitlines()
    assert "Requires-Dist: quack-kernels>=0.2.7,>=0.4.0" in head.splitlines()
    assert 'Requires-Dist: quack-kernels; extra == "other"' in head.splitlines()  # extras untouched
    assert head.splitlines().count("Requires-Dist: einops") == 1
    assert head.splitlines()[-1] == "Requires-Dist: apache-tvm-ffi<0.2,>=0.1.5"
    assert body == "Long description\nVersion: not a header\n"


@pytest.mark.parametrize("name", ["../x.py", "/etc/passwd", "a/../../b", "C:/x", "a\\b.py", ""])
def test_unsafe_names(name: str) -> None:
    with pytest.raises(ForgeError, match="unsafe archive member name"):
        safe_member_name(name, "test.whl")


def test_safe_name() -> None:
    assert str(safe_member_name("vllm/x/..y.py", "t")) == "vllm/x/..y.py"


def test_tree_hash_depends_on_names_and_contents() -> None:
    a = tree_sha256({"a.py": b"1", "b.py": b"2"})
    assert a == tree_sha256({"b.py": b"2", "a.py": b"1"})
    assert a != tree_sha256({"a.py": b"1", "c.py": b"2"})
    assert a != tree_sha256({"a.py": b"1", "b.py": b"3"})
