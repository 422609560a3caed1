"""Per-task transition buffers (SPEC section 2).

One ``TaskBuffers`` holds ring buffers for N tasks in preallocated float32 arrays of shape
``[N, capacity, dim]``; observations (``obs``, ``next_obs`` and the start observations) may
instead have any shape and dtype (``obs_shape``, ``obs_dtype``): image families store
``uint8 [N, capacity, 3, H, W]``.  ``np.zeros`` reserves the memory lazily (pages are committed by the OS
as data arrives), so a generous capacity costs nothing until it is used.  Minibatches for M
tasks are drawn in one gather.

Three instances per run:
- the RL buffer (never cleared; also keeps each path's start observation),
- the encoder buffer (``EncoderBuffers``: cleared the first time a task receives a path after
  ``mark_all_for_clear``),
- the sampler buffer (original paths of the task being collected; cleared by the trainer when
  the task is chosen).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FIELDS = ("obs", "actions", "rewards", "dense_rewards", "terminals", "next_obs")


@dataclass
class Path:
    """One trajectory.  Arrays have T rows; ``infos`` holds the family's per-step quantities
    (``info_spec``) for the hindsight reward; ``task`` is the task it was collected on."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dense_rewards: np.ndarray
    terminals: np.ndarray
    next_obs: np.ndarray
    success: np.ndarray
    infos: dict
    task: int

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def start_obs(self) -> np.ndarray:
        return self.obs[0]


OBS_FIELDS = ("obs", "next_obs")


def _dims(obs_dim: int, act_dim: int) -> dict[str, int]:
    return {"obs": obs_dim, "actions": act_dim, "rewards": 1, "dense_rewards": 1, "terminals": 1, "next_obs": obs_dim}


#: image buffers: per row, whether ``next_obs`` is the following row's ``obs`` (see TaskBuffers)
FOLLOWS = "next_follows"


def _layout(obs_dim, act_dim, obs_shape, obs_dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-field row shape and dtype (image layouts add the ``next_follows`` flag)."""
    shape = (int(obs_dim),) if obs_shape is None else tuple(int(s) for s in obs_shape)
    out = {}
    for k, d in _dims(obs_dim, act_dim).items():
        out[k] = (shape, np.dtype(obs_dtype)) if k in OBS_FIELDS else ((d,), np.dtype(np.float32))
    if len(shape) > 1:
        out[FOLLOWS] = ((), np.dtype(np.bool_))
    return out


def stored_row_bytes(obs_dim: int, act_dim: int, obs_shape=None, obs_dtype=np.float32, path_length: int = 1,
                     with_starts: bool = False) -> float:
    """Checkpoint bytes per stored transition (an image layout keeps one next frame per path;
    ``with_starts`` adds the RL buffer's start observation per path)."""
    layout = _layout(obs_dim, act_dim, obs_shape, obs_dtype)
    per = float(sum(int(np.prod(shp)) * dt.itemsize for shp, dt in layout.values()))
    frame = int(np.prod(layout["obs"][0])) * layout["obs"][1].itemsize
    H = max(int(path_length), 1)
    if FOLLOWS in layout:
        per -= frame * (1 - 1 / H)
    return per + (frame / H if with_starts else 0.0)


class TaskBuffers:
    """Per-task ring buffers of transitions.

    Image layouts store each frame once: within a stored path ``next_obs[t]`` is ``obs[t + 1]``,
    so a row's ``next_obs`` is kept only where it is not the following row's ``obs`` (the last
    row of each path; ``next_follows`` says which), and ``gather`` reads it from the following
    row otherwise.  A ring overwrites rows oldest first, so a row whose next frame lives in the
    following row is always overwritten before that row.  The ``next_obs`` array is written
    only at those rows, so the rest of it is never committed, and checkpoints hold each frame
    once."""

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int, store_starts: bool = False,
                 obs_shape: tuple[int, ...] | None = None, obs_dtype=np.float32):
        self.num_tasks, self.capacity = int(num_tasks), int(capacity)
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.layout = _layout(obs_dim, act_dim, obs_shape, obs_dtype)
        self.obs_shape, self.obs_dtype = self.layout["obs"]
        self.linked = FOLLOWS in self.layout
        self.data = {k: np.zeros((num_tasks, capacity) + shp, dt) for k, (shp, dt) in self.layout.items()}
        self.size = np.zeros(num_tasks, np.int64)
        self.ptr = np.zeros(num_tasks, np.int64)
        self.store_starts = store_starts
        self.mirrors: list[DeviceMirror] = []
        if store_starts:
            self.starts = np.zeros((num_tasks, capacity) + self.obs_shape, self.obs_dtype)
            self.start_size = np.zeros(num_tasks, np.int64)
            self.start_ptr = np.zeros(num_tasks, np.int64)

    @staticmethod
    def bytes_needed(num_tasks: int, capacity: int, obs_dim: int, act_dim: int, store_starts: bool = False,
                     obs_shape: tuple[int, ...] | None = None, obs_dtype=np.float32) -> int:
        """Bytes of full buffers as allocated (reserved; committed as data arrives)."""
        layout = _layout(obs_dim, act_dim, obs_shape, obs_dtype)
        per = sum(int(np.prod(shp)) * dt.itemsize for shp, dt in layout.values())
        if store_starts:
            shp, dt = layout["obs"]
            per += int(np.prod(shp)) * dt.itemsize
        return num_tasks * capacity * per

    @property
    def nbytes(self) -> int:
        total = sum(a.nbytes for a in self.data.values())
        return total + (self.starts.nbytes if self.store_starts else 0)

    # ---- writing --------------------------------------------------------------------------
    def add(self, task: int, transitions: dict[str, np.ndarray], start_obs: np.ndarray | None = None) -> None:
        """Append T transitions (arrays with T rows) to ``task``'s ring buffer."""
        n = len(transitions["rewards"])
        if n == 0:
            return
        cap = self.capacity
        if n > cap:  # only the newest `cap` rows survive anyway
            transitions = {k: v[-cap:] for k, v in transitions.items()}
            n = cap
        idx = (self.ptr[task] + np.arange(n)) % cap
        for key in FIELDS:
            shp, dt = self.layout[key]
            if key == "next_obs" and self.linked:
                nxt = np.asarray(transitions[key], dt).reshape((n,) + shp)
                obs = self.data["obs"][task, idx]
                # next frame = the following row's obs, checked (a batch that is not one path keeps its own)
                follows = np.zeros(n, bool)
                if n > 1:
                    follows[:-1] = (nxt[:-1] == obs[1:]).reshape(n - 1, -1).all(1)
                self.data[FOLLOWS][task, idx] = follows
                keep = idx[~follows]
                self.data[key][task, keep] = nxt[~follows]
                continue
            self.data[key][task, idx] = np.asarray(transitions[key], dt).reshape((n,) + shp)
        for mirror in self.mirrors:
            mirror.write(task, idx)
        self.ptr[task] = (self.ptr[task] + n) % cap
        self.size[task] = min(cap, self.size[task] + n)
        if self.store_starts and start_obs is not None:
            self.starts[task, self.start_ptr[task]] = start_obs
            self.start_ptr[task] = (self.start_ptr[task] + 1) % cap
            self.start_size[task] = min(cap, self.start_size[task] + 1)

    def add_path(self, task: int, path: Path, with_start: bool = True) -> None:
        self.add(task, {k: getattr(path, k) for k in FIELDS}, path.start_obs if with_start else None)

    def add_many(self, items) -> None:
        """``add(task, transitions, start_obs)`` for each item of ``items`` in order, as one
        write per field (the buffers end up exactly as after the adds one by one).  Image
        layouts, and a batch that gives one task more rows than its capacity, take the adds
        one by one."""
        items = list(items)
        tasks = np.fromiter((int(it[0]) for it in items), np.int64, len(items))
        lens = np.fromiter((len(it[1]["rewards"]) for it in items), np.int64, len(items))
        totals = np.bincount(tasks, weights=lens, minlength=self.num_tasks).astype(np.int64)
        if len(items) < 2 or self.linked or np.any(totals > self.capacity):
            for task, transitions, start in items:
                self.add(task, transitions, start)
            return
        self._before_write(tasks)  # (an empty add still counts as a write here, as in ``add``)
        keep = lens > 0
        if not keep.all():
            items, tasks, lens = [it for it, k in zip(items, keep) if k], tasks[keep], lens[keep]
            if not items:
                return
        cap = self.capacity
        before = np.zeros(len(items), np.int64)  # rows this batch writes to the item's task before it
        seen = np.zeros(self.num_tasks, np.int64)
        for j, (t, n) in enumerate(zip(tasks, lens)):
            before[j] = seen[t]
            seen[t] += n
        first = (self.ptr[tasks] + before) % cap
        bounds = np.concatenate([[0], np.cumsum(lens)])
        rows = (np.repeat(first - bounds[:-1], lens) + np.arange(bounds[-1])) % cap
        owner = np.repeat(tasks, lens)
        for key in FIELDS:
            shp, dt = self.layout[key]
            self.data[key][owner, rows] = np.concatenate(
                [np.asarray(it[1][key], dt).reshape((n,) + shp) for it, n in zip(items, lens)])
        self._after_write(tasks, owner, first, rows)
        for mirror in self.mirrors:
            for j, t in enumerate(tasks):
                mirror.write(int(t), rows[bounds[j]: bounds[j + 1]])
        hit = np.flatnonzero(totals)
        self.ptr[hit] = (self.ptr[hit] + totals[hit]) % cap
        self.size[hit] = np.minimum(cap, self.size[hit] + totals[hit])
        if self.store_starts:
            for t, (_, _, start) in zip(tasks, items):
                if start is not None:
                    self.starts[t, self.start_ptr[t]] = start
                    self.start_ptr[t] = (self.start_ptr[t] + 1) % cap
                    self.start_size[t] = min(cap, self.start_size[t] + 1)

    def add_paths(self, tasks, paths, with_start: bool = True) -> None:
        """``add_path(task, path, with_start)`` for each pair, through ``add_many``."""
        self.add_many([(t, {k: getattr(p, k) for k in FIELDS}, p.start_obs if with_start else None)
                       for t, p in zip(tasks, paths)])

    def _before_write(self, tasks: np.ndarray) -> None:
        """Hook of ``add_many`` before it writes rows of ``tasks`` (one entry per item)."""

    def _after_write(self, tasks: np.ndarray, owner: np.ndarray, first: np.ndarray, rows: np.ndarray) -> None:
        """Hook of ``add_many`` after it wrote ``rows`` (of tasks ``owner``); ``first``: each item's first row."""

    def clear(self, task: int) -> None:
        self.size[task] = 0
        self.ptr[task] = 0
        if self.store_starts:
            self.start_size[task] = 0
            self.start_ptr[task] = 0

    # ---- reading ----------------------------------------------------------------------
    def _check_nonempty(self, tasks: np.ndarray, sizes: np.ndarray, what: str) -> None:
        if np.any(sizes[tasks] == 0):
            empty = int(tasks[np.argmax(sizes[tasks] == 0)])
            raise RuntimeError(f"{what}: task {empty} has no data")

    def sample_indices(self, tasks, n: int, rng: np.random.Generator) -> np.ndarray:
        """Row indices ``[M, n]`` of ``n`` transitions per task (uniform, with replacement)."""
        tasks = np.asarray(tasks, np.int64)
        self._check_nonempty(tasks, self.size, "sample")
        return rng.integers(0, self.size[tasks][:, None], size=(len(tasks), n))

    def gather(self, tasks, idx: np.ndarray, keys=FIELDS) -> dict[str, np.ndarray]:
        tasks = np.asarray(tasks, np.int64)
        out = {k: self.data[k][tasks[:, None], idx] for k in keys if not (self.linked and k == "next_obs")}
        if self.linked and "next_obs" in keys:
            t = tasks[:, None]
            follows = self.data[FOLLOWS][t, idx]
            nxt = self.data["next_obs"][t, idx]
            if follows.any():
                nxt[follows] = self.data["obs"][t, (idx + 1) % self.capacity][follows]
            out["next_obs"] = nxt
        return out

    def sample(self, tasks, n: int, rng: np.random.Generator, keys=FIELDS) -> dict[str, np.ndarray]:
        """``n`` transitions per task (uniform, with replacement), arrays ``[M, n, dim]``."""
        return self.gather(tasks, self.sample_indices(tasks, n, rng), keys)

    def sample_starts(self, tasks, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` stored start observations per task, ``[M, n, *obs_shape]``."""
        tasks = np.asarray(tasks, np.int64)
        self._check_nonempty(tasks, self.start_size, "sample_starts")
        idx = rng.integers(0, self.start_size[tasks][:, None], size=(len(tasks), n))
        return self.starts[tasks[:, None], idx]

    # ---- state (checkpoints store only the filled part) ------------------------------
    def state_dict(self) -> dict:
        """Only the filled rows: each task's ``[:size]`` (a ring buffer is either not yet
        wrapped, ``ptr == size``, or full), concatenated over tasks."""
        state = {
            "capacity": self.capacity, "size": self.size.copy(), "ptr": self.ptr.copy(),
            "data": {k: np.concatenate([v[t, : self.size[t]] for t in range(self.num_tasks)]) for k, v in self.data.items()
                     if not (self.linked and k == "next_obs")},
        }
        if self.linked:  # only the frames that are not the following row's obs
            state["data"]["next_obs"] = np.concatenate(
                [self.data["next_obs"][t, : self.size[t]][~self.data[FOLLOWS][t, : self.size[t]]]
                 for t in range(self.num_tasks)])
        if self.store_starts:
            state.update(starts=np.concatenate([self.starts[t, : self.start_size[t]] for t in range(self.num_tasks)]),
                         start_size=self.start_size.copy(), start_ptr=self.start_ptr.copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; into a larger buffer (a run extended with ``resume --num-iterations``)
        only if no task's ring has wrapped, so the rows keep their order and the grown buffer
        is the one a longer run would have had."""
        old = int(state["capacity"])
        size = np.asarray(state["size"], np.int64)
        if size.shape != self.size.shape:
            raise ValueError(f"buffer has {len(size)} tasks, this run {self.num_tasks}")
        ptr = np.asarray(state["ptr"], np.int64)
        grow = old != self.capacity
        if grow:
            in_order = bool(np.all((ptr == size) | ((size == old) & (ptr == 0))))
            if old > self.capacity or not in_order:
                raise ValueError(f"buffer capacity {old} != {self.capacity}")
            ptr = size.copy()  # the next row goes after the filled ones
        self.size[:] = size
        self.ptr[:] = ptr
        bounds = np.concatenate([[0], np.cumsum(size)])
        for k, v in state["data"].items():
            if self.linked and k == "next_obs":
                continue
            for t in range(self.num_tasks):
                self.data[k][t, : size[t]] = v[bounds[t]: bounds[t + 1]]
        if self.linked:
            own = [~self.data[FOLLOWS][t, : size[t]] for t in range(self.num_tasks)]
            nb = np.concatenate([[0], np.cumsum([int(o.sum()) for o in own])])
            for t in range(self.num_tasks):
                self.data["next_obs"][t, np.nonzero(own[t])[0]] = state["data"]["next_obs"][nb[t]: nb[t + 1]]
        if self.store_starts:
            ssize = np.asarray(state["start_size"], np.int64)
            sptr = np.asarray(state["start_ptr"], np.int64)
            if grow:
                if not np.all((sptr == ssize) | ((ssize == old) & (sptr == 0))):
                    raise ValueError(f"buffer capacity {old} != {self.capacity}")
                sptr = ssize.copy()
            self.start_size[:] = ssize
            self.start_ptr[:] = sptr
            sb = np.concatenate([[0], np.cumsum(ssize)])
            for t in range(self.num_tasks):
                self.starts[t, : ssize[t]] = state["starts"][sb[t]: sb[t + 1]]
        for mirror in self.mirrors:
            mirror.sync()


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}


class DeviceMirror:
    """A copy of some fields of a ``TaskBuffers`` on a torch device, written whenever the host
    buffer is written (one copy per stored path), so minibatches are gathered on the device
    from the same row indices as the host would use: per gradient step only the indices travel.
    The host buffer stays the source of truth (relabelers, checkpoints); the mirror's capacity
    grows by doubling up to the host's, so unused capacity costs no device memory."""

    def __init__(self, host: TaskBuffers, device, keys=FIELDS):
        keys = tuple(dict.fromkeys(keys))
        self.wanted = keys
        if host.linked and "next_obs" in keys:  # the next frame comes from the following row
            keys = tuple(dict.fromkeys(keys + ("obs", FOLLOWS)))
        self.host, self.device, self.keys = host, torch.device(device), keys
        self.alloc = 0
        self.data: dict[str, torch.Tensor] = {}
        host.mirrors.append(self)
        self.sync()

    @staticmethod
    def full_bytes(host: TaskBuffers, keys=FIELDS) -> int:
        """Device memory of a mirror of ``keys`` once it has grown to the host capacity."""
        keys = tuple(dict.fromkeys(keys))
        if host.linked and "next_obs" in keys:
            keys = tuple(dict.fromkeys(keys + ("obs", FOLLOWS)))
        row = sum(int(np.prod(host.layout[k][0])) * host.layout[k][1].itemsize for k in keys)
        return host.num_tasks * host.capacity * row

    def _grow(self, need: int) -> None:
        new = min(self.host.capacity, max(need, 2 * self.alloc, 1024))
        for k in self.keys:
            shp, dt = self.host.layout[k]
            t = torch.zeros((self.host.num_tasks, new) + shp, dtype=_TORCH_DTYPES[dt], device=self.device)
            if self.alloc:
                t[:, : self.alloc] = self.data[k]
            self.data[k] = t
        self.alloc = new

    def write(self, task: int, idx: np.ndarray) -> None:
        """Copy the host rows ``idx`` of ``task`` (just written) to the device."""
        need = int(idx.max()) + 1
        if need > self.alloc:
            self._grow(need)
        lo, hi = int(idx.min()), need
        if hi - lo == len(idx):  # contiguous (no wrap): one slice copy per field
            for k in self.keys:
                self.data[k][task, lo:hi] = torch.as_tensor(self.host.data[k][task, lo:hi], device=self.device)
            return
        ii = torch.as_tensor(idx, device=self.device)
        for k in self.keys:
            self.data[k][task, ii] = torch.as_tensor(self.host.data[k][task, idx], device=self.device)

    def sync(self) -> None:
        """Copy every filled row (after loading a checkpoint)."""
        need = int(self.host.size.max()) if self.host.num_tasks else 0
        if need > self.alloc:
            self._grow(need)
        if need:
            for k in self.keys:
                self.data[k][:, :need] = torch.as_tensor(self.host.data[k][:, :need], device=self.device)

    def gather(self, tasks, idx) -> dict[str, torch.Tensor]:
        """Rows ``idx`` ``[M, n]`` of ``tasks`` ``[M]`` (numpy, or int64 tensors already on the
        device) as device tensors ``[M, n, ...]``."""
        t = tasks if isinstance(tasks, torch.Tensor) else torch.as_tensor(np.asarray(tasks, np.int64), device=self.device)
        i = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx, device=self.device)
        out = {k: self.data[k][t[:, None], i] for k in self.wanted}
        if self.host.linked and "next_obs" in self.wanted:
            follows = self.data[FOLLOWS][t[:, None], i]
            following = self.data["obs"][t[:, None], (i + 1) % self.host.capacity]
            shape = follows.shape + (1,) * (following.dim() - follows.dim())
            out["next_obs"] = torch.where(follows.view(shape), following, out["next_obs"])
        return out


class EncoderBuffers(TaskBuffers):
    """Encoder buffers with clear-on-first-write: after ``mark_all_for_clear`` a task's old
    context is dropped the first time it receives a new path.  Each ``add`` is one path (or
    one batch of a path's transitions); its first row is marked, so whole paths can be drawn
    as contexts (``sample_paths``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.should_clear = np.zeros(self.num_tasks, bool)
        self.path_start = np.zeros((self.num_tasks, self.capacity), bool)
        self._paths: dict[int, list[np.ndarray]] = {}  # task -> paths(task), until it changes

    def mark_all_for_clear(self) -> None:
        self.should_clear[:] = True

    def add(self, task, transitions, start_obs=None):
        if self.should_clear[task]:
            self.clear(task)
            self.should_clear[task] = False
        self._paths.pop(int(task), None)
        n = min(len(transitions["rewards"]), self.capacity)
        if n:  # the rows this add writes (only the newest `capacity` of a longer batch survive)
            idx = (self.ptr[task] + np.arange(n)) % self.capacity
            self.path_start[task, idx] = False
            self.path_start[task, idx[0]] = True
        super().add(task, transitions, start_obs)

    def _before_write(self, tasks):
        for t in np.unique(tasks):
            if self.should_clear[t]:
                self.clear(t)
                self.should_clear[t] = False
            self._paths.pop(int(t), None)

    def _after_write(self, tasks, owner, first, rows):
        self.path_start[owner, rows] = False
        self.path_start[tasks, first] = True

    def paths(self, task: int) -> list[np.ndarray]:
        """Row indices of each stored path of ``task``, oldest first.  Once the ring has
        wrapped, the oldest path may have lost its first rows; its remaining rows are a path."""
        task = int(task)
        if task not in self._paths:
            size, ptr = int(self.size[task]), int(self.ptr[task])
            order = np.arange(size) if size < self.capacity else (ptr + np.arange(size)) % self.capacity
            cuts = np.union1d(np.flatnonzero(self.path_start[task, order]), [0])
            self._paths[task] = np.split(order, cuts[1:]) if size else []
        return self._paths[task]

    def clear(self, task: int) -> None:
        self._paths.pop(int(task), None)
        super().clear(task)

    def sample_paths(self, tasks, max_paths: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Per task: k whole paths, k uniform in 1..min(max_paths, paths stored), drawn without
        replacement and kept in the order they were collected.  Returns row indices ``[M, C]``
        and a mask ``[M, C]`` (True = a real row; padding repeats a real row), C the longest
        context of the batch."""
        tasks = np.asarray(tasks, np.int64)
        self._check_nonempty(tasks, self.size, "sample_paths")
        rows = []
        for t in tasks:
            segs = self.paths(int(t))
            k = int(rng.integers(1, min(max_paths, len(segs)) + 1))
            pick = np.sort(rng.choice(len(segs), size=k, replace=False))
            rows.append(np.concatenate([segs[i] for i in pick]))
        C = max(len(r) for r in rows)
        idx = np.empty((len(tasks), C), np.int64)
        mask = np.zeros((len(tasks), C), bool)
        for m, r in enumerate(rows):
            idx[m, : len(r)] = r
            idx[m, len(r):] = r[0]
            mask[m, : len(r)] = True
        return idx, mask

    def state_dict(self):
        starts = np.concatenate([self.path_start[t, : self.size[t]] for t in range(self.num_tasks)])
        return {**super().state_dict(), "should_clear": self.should_clear.copy(), "path_start": starts}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._paths.clear()
        self.should_clear[:] = state["should_clear"]
        self.path_start[:] = False
        starts = state.get("path_start")  # absent in checkpoints written before paths were marked
        if starts is not None:
            bounds = np.concatenate([[0], np.cumsum(self.size)])
            for t in range(self.num_tasks):
                self.path_start[t, : self.size[t]] = starts[bounds[t]: bounds[t + 1]]
