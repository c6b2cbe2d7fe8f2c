"""Multi-device and multi-host execution with JAX's own SPMD machinery (Mesh, NamedSharding, jit).

The mesh has three named axes:
  data    pure data parallelism: the batch is split, parameters are replicated;
  fsdp    fully sharded data parallelism: the batch is split AND every large parameter is split
          along one dimension; XLA all-gathers each weight where a layer uses it;
  tensor  tensor (Megatron) parallelism: attention heads, the MLP width and the vocabulary are
          split, so each device computes a slice of every layer.

Nothing here changes the model code: parameters, inputs and the KV cache carry `NamedSharding`s,
`jax.jit` propagates them through the program (GSPMD), and `with_sharding_constraint` pins the
values XLA cannot infer (inputs that arrive as host arrays, the cache created inside the program).
Every rule falls back to replication when a dimension does not divide the mesh axis, so any
model runs under any mesh; the rules only decide how much memory and communication it costs.

    mesh = make_mesh("data=2,fsdp=4")                 # or "fsdp=-1": every device on one axis
    pg = PaliGemma.from_pretrained(path, mesh=mesh)     # parameters loaded straight onto their shards
    abstract = abstract_sharded_params(preset("paligemma2-28b-224"), abstract_mesh("fsdp=8"), jnp.bfloat16)
    print("\n".join(memory_report(abstract).lines()))   # per-device memory, no weights, no devices
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pali_jax import quantize
from pali_jax.checkpoint import restore_params
from pali_jax.config import PaliGemmaConfig
from pali_jax.distributed import initialize_distributed
from pali_jax.errors import UserError
from pali_jax.kv_cache import KVCache
from pali_jax.backend import Layout
from pali_jax.paligemma import abstract_params, axes_table, path_key

AXES = ("data", "fsdp", "tensor")
# Tensors with fewer elements stay whole on every device: splitting a norm scale or a bias saves
# nothing worth a collective. 2**18 elements is 1 MiB in float32. Every `min_elements=None` below
# reads this when called: assign it to change the threshold for a whole process (the tests do, to
# split tiny models).
MIN_SHARDED_ELEMENTS = 1 << 18

AnyMesh = Mesh | AbstractMesh


class MeshError(UserError):
    """A mesh spec that cannot be built on the devices present."""


# -- meshes ------------------------------------------------------------------------------------
def parse_mesh(spec: str | Mapping[str, int] | Sequence[int]) -> dict[str, int]:
    """Axis sizes from "data=2,fsdp=4" (unnamed axes are 1), "2,4,1" (data, fsdp, tensor in order)
    or a mapping / sequence of the same. One size may be -1: all remaining devices."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise MeshError("empty mesh spec; use e.g. data=2,fsdp=4 or 2,4,1")
        if all("=" in p for p in parts):
            pairs = [p.split("=", 1) for p in parts]
            spec = {name.strip(): _int(size, spec) for name, size in pairs}
        elif any("=" in p for p in parts):
            raise MeshError(f"mesh spec {spec!r} mixes named and positional sizes")
        else:
            spec = [_int(p, spec) for p in parts]
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(AXES))
        if unknown:
            raise MeshError(f"unknown mesh axis {unknown[0]!r}; axes are {', '.join(AXES)}")
        sizes = {a: int(spec.get(a, 1)) for a in AXES}
    else:
        if len(spec) > len(AXES):
            raise MeshError(f"mesh spec {list(spec)} has more than {len(AXES)} sizes ({', '.join(AXES)})")
        sizes = {a: int(s) for a, s in zip(AXES, list(spec) + [1] * (len(AXES) - len(spec)))}
    if sum(s == -1 for s in sizes.values()) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh sizes {sizes} must be positive, with at most one -1")
    return sizes


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MeshError(f"mesh spec {spec!r}: {text.strip()!r} is not an integer") from None


def make_mesh(spec: str | Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    A mesh smaller than the device count uses the first devices, which only a single process
    may do: in a multi-host run every process must own part of the mesh.
    """
    requested = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    fixed = math.prod(s for s in requested.values() if s != -1)
    if -1 in requested.values() and len(devices) % fixed:
        raise MeshError(f"mesh {requested}: {len(devices)} devices do not divide by {fixed}")
    sizes = {a: (len(devices) // fixed if s == -1 else s) for a, s in requested.items()}
    total = math.prod(sizes.values())
    if total > len(devices):
        raise MeshError(f"mesh {sizes} needs {total} devices; {len(devices)} present")
    if total < len(devices) and jax.process_count() > 1:
        raise MeshError(f"mesh {sizes} covers {total} of {len(devices)} devices; a multi-host mesh must use all")
    # Auto axes: shardings propagate through jit (GSPMD) and the model code needs no annotations,
    # unlike the Explicit axes that jax.make_mesh picks by default.
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def abstract_mesh(spec: str | Mapping[str, int] | Sequence[int]) -> AbstractMesh:
    """A mesh of the given shape without devices: shardings and memory estimates for hardware
    that is not present (no -1 sizes)."""
    sizes = parse_mesh(spec)
    if -1 in sizes.values():
        raise MeshError("an abstract mesh needs every size given (no -1)")
    return AbstractMesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    """--mesh and --distributed, as `pali-jax generate`, `annotate` and `finetune` take them."""
    parser.add_argument(
        "--mesh", metavar="SPEC",
        help='device mesh over the axes data, fsdp, tensor, e.g. "fsdp=-1" (every device), "data=2,fsdp=4" or '
        '"1,1,8"; default: one device (all devices, fsdp, in a multi-host run)',
    )
    parser.add_argument(
        "--distributed", action="store_true",
        help="join a multi-host run with jax.distributed.initialize() (needed on a Cloud TPU VM pod slice; "
        "Slurm, Open MPI and JAX_COORDINATOR_ADDRESS launches are detected without it)",
    )


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """Joins a multi-host run when launched as one, then builds --mesh. Call it before anything
    touches a device (jax.distributed.initialize() must come first)."""
    initialize_distributed(args.distributed)
    spec = args.mesh or ("fsdp=-1" if jax.process_count() > 1 else None)
    return make_mesh(spec) if spec else None


# -- parameter rules ---------------------------------------------------------------------------
# The one table: which mesh axis each logical axis of a weight (`layers.Einsum`, the modules'
# `nn.with_logical_partitioning`) may be split over. "tensor" axes (heads, MLP width, vocabulary)
# are what tensor parallelism splits; "fsdp" axes (widths, head dims) are what FSDP splits; a
# "tensor" axis the tensor axis does not take goes to fsdp when no "fsdp" axis divides it. None:
# never split: the [L] axis of stacked layers (the scan slices one layer per step, and a split
# layer axis would make every step gather whole layers across devices) and the k-v / gate-up pair.
RULES: dict[str | None, str | None] = {
    "vocab": "tensor", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "vision_heads": "tensor", "vision_mlp": "tensor",
    "embed": "fsdp", "head_dim": "fsdp", "vision_embed": "fsdp", "vision_head_dim": "fsdp", "patches": "fsdp",
    "layers": None, "pair": None, None: None,
}
_ROLE = {"tensor": "T", "fsdp": "F", None: "."}
_STACKED = re.compile(r"(^|/)(layers|encoderblock)/")  # nn.scan'd parameters: a leading [L] axis


@functools.cache
def _axes_by_path(out_first: bool) -> dict[str, tuple]:
    """{path key: logical axes} of every model parameter, stacked and per-layer."""
    return axes_table(Layout(True, out_first)) | axes_table(Layout(False, out_first))


def _roles(path: str, ndim: int, out_first: bool = False) -> str:
    """One role letter per dimension of the parameter at `path` ("T" tensor, "F" fsdp, "." whole).

    A tree that mirrors the parameters by path (optimizer statistics, a train state) finds each
    leaf's axes at the longest suffix of its path that names a parameter of the same rank.
    """
    table = _axes_by_path(out_first)
    parts = path_key(tuple(path.split("/"))).split("/")
    if parts[-1] in (quantize.QVALUE, quantize.SCALE):  # a quantised weight's leaves: the weight's axes
        parts = parts[:-1]
    for i in range(len(parts)):
        axes = table.get("/".join(parts[i:]))
        if axes is not None and len(axes) == ndim:
            return "".join(_ROLE[RULES[a]] for a in axes)
    # Anything else (LoRA factors, other trees): every non-layer dimension is an fsdp candidate.
    stacked = 1 if _STACKED.search(path) else 0
    return "." * min(stacked, ndim) + "F" * max(ndim - stacked, 0)


def partition_spec(
    path: str, shape: Sequence[int], mesh: AnyMesh, min_elements: int | None = None, out_first: bool = False
) -> P:
    """The PartitionSpec of one parameter (`path` joins its tree keys with "/").

    Tensor parallelism takes the first "T" dimension that divides the tensor axis; FSDP then takes
    the largest "F" dimension that divides the fsdp axis (else the largest free "T" one). Tensors
    under `min_elements` (None: MIN_SHARDED_ELEMENTS) and dimensions that divide nothing stay replicated.
    """
    spec: list[str | None] = [None] * len(shape)
    if math.prod(shape) < (MIN_SHARDED_ELEMENTS if min_elements is None else min_elements):
        return P()
    roles = _roles(path, len(shape), out_first)
    sizes = dict(mesh.shape)
    if sizes["tensor"] > 1:
        for i, role in enumerate(roles):
            if role == "T" and shape[i] % sizes["tensor"] == 0:
                spec[i] = "tensor"
                break
    if sizes["fsdp"] > 1:
        # "F" dimensions first: an unused "T" dimension (vocab, heads, MLP width) split over fsdp
        # makes XLA split the activations that dimension produces (logits, hidden units), which
        # then clash with the batch split over the same axis.
        for allowed in ("F", "T"):
            candidates = [
                i for i, role in enumerate(roles)
                if role == allowed and spec[i] is None and shape[i] % sizes["fsdp"] == 0
            ]
            if candidates:
                spec[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
                break
    return _canonical(spec)


def _canonical(spec: Sequence[Any]) -> P:
    """A PartitionSpec without trailing Nones, the form jit gives its outputs: shardings compare
    unequal otherwise, and an array passed back into the jitted function would recompile it."""
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _path_str(path: tuple) -> str:
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(p) for p in parts)


def param_specs(tree: Any, mesh: AnyMesh, min_elements: int | None = None, out_first: bool = False) -> Any:
    """A tree of PartitionSpecs for a tree of arrays / ShapeDtypeStructs.

    Works for parameters and for anything that mirrors them by path (optimizer states such as
    adam's mu / nu: their paths end with the parameter's path; scalars are replicated). A
    quantised weight's scales follow its values (`scale_spec`).
    """

    def walk(node, path):
        if quantize.is_quantized(node):
            qvalue, qscale = node[quantize.QVALUE], node[quantize.SCALE]
            spec = partition_spec("/".join((*path, quantize.QVALUE)), qvalue.shape, mesh, min_elements, out_first)
            return {quantize.QVALUE: spec,
                    quantize.SCALE: scale_spec(spec, qvalue.shape, qscale.shape, mesh, "/".join(path))}
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        return jax.tree_util.tree_map_with_path(
            lambda p, x: partition_spec("/".join((*path, _path_str(p))).strip("/"), x.shape, mesh, min_elements,
                                        out_first), node
        )

    return walk(tree, ())


def scale_spec(spec: P, qvalue_shape: Sequence[int], scale_shape: Sequence[int], mesh: AnyMesh, name: str) -> P:
    """The PartitionSpec of a quantised weight's scales, given its values' `spec`: split like the
    values, so that each device dequantises its own slice; whole along a reduced axis of one scale
    (int8's contracted axes). A split that cuts a group of int4's is refused."""
    sizes = dict(mesh.shape)
    out = []
    for axis, (n, s) in enumerate(zip(qvalue_shape, scale_shape)):
        mesh_axis = spec[axis] if axis < len(spec) else None
        if mesh_axis is None or s == n:
            out.append(mesh_axis)
        elif s == 1:
            out.append(None)
        elif s % sizes[mesh_axis]:
            raise quantize.QuantizationError(
                f"the mesh splits {name}'s axis of {n} {sizes[mesh_axis]} ways, cutting its int4 groups of {n // s}: "
                "use a smaller mesh axis or a smaller group size"
            )
        else:
            out.append(mesh_axis)
    return _canonical(out)


def param_shardings(tree: Any, mesh: AnyMesh, min_elements: int | None = None, out_first: bool = False) -> Any:
    """`param_specs` as NamedShardings on `mesh` (out_first: the tree holds output-first projections)."""
    return _named(param_specs(tree, mesh, min_elements, out_first), mesh)


def constrain_params(tree: Any, mesh: AnyMesh, min_elements: int | None = None) -> Any:
    """Inside jit: pins a parameter-like tree (params, optimizer state, a whole train state) to
    `param_specs`. On a step's output this keeps the layout the step was given: left to itself
    XLA may return a different one (it splits small replicated leaves), and the next call with
    those inputs would compile the step again."""
    return jax.lax.with_sharding_constraint(tree, param_shardings(tree, mesh, min_elements))


def _named(specs: Any, mesh: AnyMesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, min_elements: int | None = None) -> Any:
    """Places a tree that every process holds whole (numpy or jax arrays) onto its shards.

    Each process copies only its own devices' slices. For checkpoints too large for one host,
    load with `weights.load(..., mesh=mesh)` or `restore_sharded` instead.
    """
    shardings = param_shardings(params, mesh, min_elements)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x[index])), params, shardings
    )


# -- batches, activations, KV cache -------------------------------------------------------------
def batch_axes(batch: int, mesh: AnyMesh) -> str | tuple[str, ...] | None:
    """The mesh axes a batch of `batch` rows is split over: (data, fsdp) when the batch divides
    both, else whichever one it divides, else None (replicated: every device runs every row)."""
    sizes = dict(mesh.shape)
    for axes in (("data", "fsdp"), ("data",), ("fsdp",)):
        axes = tuple(a for a in axes if sizes[a] > 1)
        if axes and batch % math.prod(sizes[a] for a in axes) == 0:
            return axes if len(axes) > 1 else axes[0]
    return None


def batch_spec(shape: Sequence[int], mesh: AnyMesh) -> P:
    """Rows (axis 0) over the batch axes, every other dimension whole."""
    return _canonical([batch_axes(shape[0], mesh)] if shape else [])


def constrain_batch(tree: Any, mesh: AnyMesh) -> Any:
    """Inside jit: pins every array of `tree` to rows-over-the-batch-axes. Inputs that arrive as
    host arrays carry no sharding; without this hint XLA may keep the whole batch on every device."""
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(x.shape, mesh)), tree)
    return jax.lax.with_sharding_constraint(tree, shardings)


def cache_specs(cache: KVCache, mesh: AnyMesh) -> KVCache:
    """The KV cache's PartitionSpecs: rows over the batch axes, kv heads over `tensor` where
    they divide it (with MQA / few kv heads the cache is replicated across `tensor`)."""
    batch, heads = cache.valid.shape[0], jax.tree.leaves(cache.v)[0].shape[-2]
    rows = batch_axes(batch, mesh)
    tensor = dict(mesh.shape)["tensor"]
    layer = [rows, None, "tensor" if tensor > 1 and heads % tensor == 0 else None]
    if cache.stacked:
        kv = _canonical([None, *layer])
    else:
        kv = tuple(_canonical(layer) for _ in cache.k)
    return KVCache(k=kv, v=kv, valid=_canonical([rows]), index=P(), positions=_canonical([rows]))


def constrain_cache(cache: KVCache, mesh: AnyMesh) -> KVCache:
    """Inside jit: pins the cache to `cache_specs`. The cache is created inside the program
    (zeros) and carried through a while loop, where XLA has nothing to infer its layout from."""
    return jax.lax.with_sharding_constraint(cache, _named(cache_specs(cache, mesh), mesh))


def replicate(tree: Any, mesh: AnyMesh) -> Any:
    """Inside jit: every array of `tree` whole on every device. For outputs the host reads: in a
    multi-host run a process can only fetch an array that its own devices hold entirely."""
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def process_rows(rows: int, mesh: Mesh) -> np.ndarray:
    """Which rows of a global batch of `rows` rows this process's devices hold (`batch_spec`), in
    order: the rows it passes to `shard_batch`. Every row on one process, or when the batch is
    replicated (it divides no batch axis)."""
    placement = NamedSharding(mesh, batch_spec((rows,), mesh))
    held = {r for index in placement.addressable_devices_indices_map((rows,)).values()
            for r in range(*index[0].indices(rows))}
    return np.array(sorted(held), np.int64)


def shard_batch(batch: Any, mesh: Mesh, rows: int | None = None) -> Any:
    """Host batches -> global arrays of `rows` rows, split over the batch axes. Each process
    passes its own rows, `process_rows(rows, mesh)` of the global batch (process-local data, as a
    data loader yields them); rows None: this process's rows times the process count, the global
    batch then being the processes' rows in process order. On one process this is a plain
    sharded device_put."""

    def place(x):
        x = np.asarray(x)
        if not x.ndim:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x)
        shape = (x.shape[0] * jax.process_count() if rows is None else rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(shape, mesh)), x, shape)

    return jax.tree.map(place, batch)


# -- loading straight onto shards ------------------------------------------------------------------
def abstract_sharded_params(
    cfg: PaliGemmaConfig, mesh: AnyMesh, dtype: Any = jnp.float32, min_elements: int | None = None
) -> Any:
    """The parameter tree as ShapeDtypeStructs with shardings (jax.eval_shape: no memory)."""
    return placed_abstract(abstract_params(cfg, dtype), mesh, min_elements)


def placed_abstract(abstract: Any, mesh: AnyMesh, min_elements: int | None = None, out_first: bool = False) -> Any:
    """An abstract parameter tree (`paligemma.abstract_params`) with each leaf's sharding on `mesh`
    (`param_shardings`): what loading onto shards, or compiling before loading, is given."""
    shardings = param_shardings(abstract, mesh, min_elements, out_first)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_sharded(
    path: str | Path,
    cfg: PaliGemmaConfig,
    mesh: Mesh,
    dtype: Any = jnp.float32,
    min_elements: int | None = None,
) -> Any:
    """Restores a converted orbax checkpoint with every parameter on its shards, cast to `dtype`.

    Each process reads only the stored chunks that overlap its own devices' shards (orbax stores a
    leaf as one chunk up to 2 GiB, larger leaves in chunks of at most 2 GiB), never the model."""
    return restore_params(path, abstract_sharded_params(cfg, mesh, dtype, min_elements))


# -- memory accounting -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of a sharded tree. `per_device` is what one device holds (every device holds the
    same: the rules only split evenly); `replicated` is the part every device holds whole;
    `leaves` lists (path, PartitionSpec, per-device bytes), largest first: the rule behind each."""

    total: int
    per_device: int
    replicated: int
    leaves: list[tuple[str, str, int]]

    def lines(self, top: int = 12) -> list[str]:
        gib = 1 << 30
        out = [
            f"total {self.total / gib:.2f} GiB, per device {self.per_device / gib:.2f} GiB "
            f"({self.per_device / self.total:.1%}), replicated on every device {self.replicated / gib:.3f} GiB"
        ]
        out += [f"  {path:<72} {spec:<34} {n / gib:7.3f} GiB" for path, spec, n in self.leaves[:top]]
        return out


def memory_report(tree: Any) -> MemoryReport:
    """Per-device bytes of a tree of arrays or ShapeDtypeStructs, from their shardings alone."""
    total = per_device = replicated = 0
    leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        itemsize = np.dtype(x.dtype).itemsize
        whole = math.prod(x.shape) * itemsize
        shard = math.prod(x.sharding.shard_shape(x.shape)) * itemsize
        total, per_device = total + whole, per_device + shard
        replicated += whole if shard == whole else 0
        spec = str(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else type(x.sharding).__name__
        leaves.append((_path_str(path), spec, shard))
    return MemoryReport(total, per_device, replicated, sorted(leaves, key=lambda leaf: -leaf[2]))
