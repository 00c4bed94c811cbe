"""Merkle tree: every index proves, and every kind of tampering is refused."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byteleap.core import merkle

CONTEXT = b"challenge-0001ab"


def build(count: int) -> tuple[merkle.MerkleTree, list[bytes]]:
    data = [hashlib.sha256(i.to_bytes(4, "big")).digest() * 3 for i in range(count)]
    leaves = [merkle.leaf_hash(CONTEXT, i, d) for i, d in enumerate(data)]
    return merkle.MerkleTree(leaves), leaves


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=300))
def test_every_index_verifies(count: int) -> None:
    tree, leaves = build(count)
    for i in range(count):
        path = tree.proof(i)
        assert len(path) == merkle.proof_length(i, count)
        assert merkle.verify_proof(tree.root, leaves[i], i, count, path)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=2, max_value=200))
    tree, leaves = build(count)
    i = data.draw(st.integers(min_value=0, max_value=count - 1))
    path = tree.proof(i)
    target = data.draw(st.sampled_from(["leaf", "root", "path"] if path else ["leaf", "root"]))
    bit = data.draw(st.integers(min_value=0, max_value=255))

    def flip(b: bytes) -> bytes:
        raw = bytearray(b)
        raw[bit // 8] ^= 1 << (bit % 8)
        return bytes(raw)

    leaf, root = leaves[i], tree.root
    if target == "leaf":
        leaf = flip(leaf)
    elif target == "root":
        root = flip(root)
    else:
        j = data.draw(st.integers(min_value=0, max_value=len(path) - 1))
        path = [*path[:j], flip(path[j]), *path[j + 1 :]]
    assert not merkle.verify_proof(root, leaf, i, count, path)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_wrong_index_fails(data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=2, max_value=200))
    tree, leaves = build(count)
    i = data.draw(st.integers(min_value=0, max_value=count - 1))
    j = data.draw(st.integers(min_value=0, max_value=count - 1).filter(lambda x: x != i))
    assert not merkle.verify_proof(tree.root, leaves[i], j, count, tree.proof(i))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_wrong_length_fails(data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=2, max_value=200))
    tree, leaves = build(count)
    i = data.draw(st.integers(min_value=0, max_value=count - 1))
    path = tree.proof(i)
    longer = [*path, tree.root]
    assert not merkle.verify_proof(tree.root, leaves[i], i, count, longer)
    assert not merkle.verify_proof(tree.root, leaves[i], i, count, path[:-1])
    # The same path does not prove the leaf in a tree of another size.
    other = data.draw(st.integers(min_value=i + 1, max_value=400).filter(lambda x: x != count))
    assert not merkle.verify_proof(tree.root, leaves[i], i, other, path)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_swapped_direction_fails(data: st.DataObject) -> None:
    """A leaf's siblings folded with the other direction (its pair partner's index) fail.

    Leaves 2j and 2j+1 share every sibling above level 0, so the only thing that tells them apart
    is the direction derived from the index: a prover-chosen direction would pass here.
    """
    count = data.draw(st.integers(min_value=2, max_value=200))
    tree, leaves = build(count)
    left = 2 * data.draw(st.integers(min_value=0, max_value=count // 2 - 1))
    right = left + 1
    assert merkle.proof_length(left, count) == merkle.proof_length(right, count)
    assert not merkle.verify_proof(tree.root, leaves[left], right, count, tree.proof(left))
    assert not merkle.verify_proof(tree.root, leaves[right], left, count, tree.proof(right))


def test_domain_separation_and_context() -> None:
    data = b"x" * 64
    leaf = merkle.leaf_hash(CONTEXT, 0, data)
    assert leaf != merkle.leaf_hash(b"other-challenge!", 0, data)
    assert leaf != merkle.leaf_hash(CONTEXT, 1, data)
    # A node cannot pose as a leaf: the prefixes differ.
    left, right = leaf, merkle.leaf_hash(CONTEXT, 1, data)
    assert merkle.node_hash(left, right) != hashlib.sha256(b"\x00" + left + right).digest()


def test_odd_node_is_promoted_not_duplicated() -> None:
    tree3, leaves3 = build(3)
    top = merkle.node_hash(merkle.node_hash(leaves3[0], leaves3[1]), leaves3[2])
    assert tree3.root == merkle.seal_root(top, 3)
    assert tree3.proof(2) == [merkle.node_hash(leaves3[0], leaves3[1])]
    # Duplicating the last leaf gives a tree of another size with another root.
    tree4 = merkle.MerkleTree([*leaves3, leaves3[2]])
    assert tree4.root != tree3.root


def test_single_leaf_tree() -> None:
    tree, leaves = build(1)
    assert tree.root == merkle.seal_root(leaves[0], 1)
    assert tree.proof(0) == []
    assert merkle.verify_proof(tree.root, leaves[0], 0, 1, [])


def test_from_rows_threads_match_serial() -> None:
    rows = np.arange(64 * 300, dtype=np.float32).reshape(300, 64)
    serial = merkle.MerkleTree.from_rows(CONTEXT, rows, threads=1)
    parallel = merkle.MerkleTree.from_rows(CONTEXT, rows, threads=4)
    assert serial.root == parallel.root
    assert serial.leaf(7) == merkle.leaf_hash(CONTEXT, 7, rows[7].tobytes())


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(merkle.MerkleError):
        merkle.MerkleTree([])
    with pytest.raises(merkle.MerkleError):
        merkle.MerkleTree([b"short"])
    tree, _ = build(4)
    with pytest.raises(merkle.MerkleError):
        tree.proof(4)
    with pytest.raises(merkle.MerkleError):
        tree.proof(-1)
    assert not merkle.verify_proof(tree.root, b"\x00" * 31, 0, 4, tree.proof(0))
    assert not merkle.verify_proof(tree.root, tree.leaf(0), 0, 0, tree.proof(0))
    assert not merkle.verify_proof(tree.root, tree.leaf(0), 0, 4, [b"\x00" * 31, b"\x00" * 32])
