"""Orbax save / restore of parameter trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str | Path, params: Any) -> None:
    """Writes a parameter tree (numpy or jax arrays) as an orbax checkpoint at `path` (must not exist)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)
        ckptr.wait_until_finished()


def restore_params(path: str | Path, abstract: Any = None) -> Any:
    """Reads a parameter tree; `abstract` (a tree of `jax.ShapeDtypeStruct`, with shardings if
    wanted) sets each leaf's dtype and placement. None restores as saved."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)


def abstract_like(tree: Any, dtype=None, sharding=None) -> Any:
    """A tree of `jax.ShapeDtypeStruct` mirroring `tree`, optionally with another dtype / sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding), tree)
