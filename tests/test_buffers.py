"""Per-task ring buffers (SPEC section 2)."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from metarelabel.buffers import FIELDS, EncoderBuffers, Path, TaskBuffers

OBS, ACT = 3, 2


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    """n transitions whose every field encodes its global index (start + i)."""
    i = np.arange(start, start + n, dtype=np.float64)
    return {
        "obs": np.stack([i, i + 0.25, i + 0.5], 1),
        "actions": np.stack([-i, -i - 0.5], 1),
        "rewards": i * 10,
        "dense_rewards": i * 100,
        "terminals": (i % 3 == 0).astype(np.float64),
        "next_obs": np.stack([i + 1, i + 1.25, i + 1.5], 1),
    }


def make_path(task: int, start: int, n: int) -> Path:
    r = rows(start, n)
    return Path(obs=r["obs"], actions=r["actions"], rewards=r["rewards"], dense_rewards=r["dense_rewards"],
                terminals=r["terminals"], next_obs=r["next_obs"], success=np.zeros(n, bool),
                infos={"pos": r["obs"][:, :2]}, task=task)


def ids_in_order(buf: TaskBuffers, task: int) -> np.ndarray:
    """The stored rows of ``task`` oldest first (reading the ring from ``ptr`` when full)."""
    size, ptr, cap = buf.size[task], buf.ptr[task], buf.capacity
    order = (ptr + np.arange(cap)) % cap if size == cap else np.arange(size)
    return buf.data["rewards"][task, order, 0] / 10


def test_shapes_dtype_and_bytes():
    buf = TaskBuffers(4, 50, OBS, ACT, store_starts=True)
    for k, dim in {"obs": OBS, "actions": ACT, "rewards": 1, "dense_rewards": 1, "terminals": 1,
                   "next_obs": OBS}.items():
        assert buf.data[k].shape == (4, 50, dim) and buf.data[k].dtype == np.float32
    assert buf.starts.shape == (4, 50, OBS)
    assert buf.nbytes == TaskBuffers.bytes_needed(4, 50, OBS, ACT, store_starts=True) == 4 * 4 * 50 * (2 * OBS + ACT + 3 + OBS)
    assert TaskBuffers.bytes_needed(4, 50, OBS, ACT) == 4 * 4 * 50 * (2 * OBS + ACT + 3)


def test_sizes_and_contents():
    buf = TaskBuffers(3, 20, OBS, ACT)
    buf.add(1, rows(0, 7))
    buf.add(1, rows(7, 5))
    buf.add(2, rows(100, 3))
    assert buf.size.tolist() == [0, 12, 3]
    np.testing.assert_array_equal(ids_in_order(buf, 1), np.arange(12))
    np.testing.assert_array_equal(ids_in_order(buf, 2), [100, 101, 102])
    r = rows(0, 12)
    for k in FIELDS:
        np.testing.assert_array_equal(buf.data[k][1, :12], np.asarray(r[k], np.float32).reshape(12, -1))
    buf.add(0, rows(0, 0))  # empty add is a no-op
    assert buf.size[0] == 0


@pytest.mark.parametrize("chunks", [[7, 7, 7, 7], [3, 11, 6, 9, 2], [25], [10, 10, 10], [1] * 23])
def test_ring_wraparound_keeps_newest_in_order(chunks):
    cap = 10
    buf = TaskBuffers(2, cap, OBS, ACT)
    start = 0
    for n in chunks:
        buf.add(0, rows(start, n))
        start += n
    total = sum(chunks)
    assert buf.size[0] == min(cap, total) and buf.size[1] == 0
    newest = np.arange(max(0, total - cap), total)
    np.testing.assert_array_equal(ids_in_order(buf, 0), newest)
    # every field of a row belongs to the same transition
    i = buf.data["rewards"][0, :, 0] / 10
    np.testing.assert_array_equal(buf.data["obs"][0, :, 0], i)
    np.testing.assert_array_equal(buf.data["next_obs"][0, :, 0], i + 1)
    np.testing.assert_array_equal(buf.data["actions"][0, :, 1], -i - 0.5)
    np.testing.assert_array_equal(buf.data["dense_rewards"][0, :, 0], i * 100)


def test_sample_only_filled_rows_and_shapes():
    buf = TaskBuffers(4, 100, OBS, ACT)
    buf.add(0, rows(0, 5))
    buf.add(2, rows(1000, 30))
    buf.add(3, rows(5000, 120))  # wrapped: rows 5020..5119
    rng = np.random.default_rng(0)
    tasks = [2, 0, 3, 0, 2]
    out = buf.sample(tasks, 400, rng)
    for k, dim in {"obs": OBS, "actions": ACT, "rewards": 1, "terminals": 1, "next_obs": OBS,
                   "dense_rewards": 1}.items():
        assert out[k].shape == (5, 400, dim)
    ids = out["rewards"][..., 0] / 10
    allowed = {0: set(range(0, 5)), 2: set(range(1000, 1030)), 3: set(range(5020, 5120))}
    for m, t in enumerate(tasks):
        got = set(ids[m].astype(int).tolist())
        assert got <= allowed[t]
        assert len(got) >= 0.8 * min(len(allowed[t]), 100)  # spread over the filled rows
        # rows are sampled whole
        np.testing.assert_array_equal(out["obs"][m, :, 0], ids[m])
        np.testing.assert_array_equal(out["next_obs"][m, :, 0], ids[m] + 1)
    sub = buf.sample([0], 3, rng, keys=("obs", "rewards"))
    assert set(sub) == {"obs", "rewards"} and sub["obs"].shape == (1, 3, OBS)
    with pytest.raises(RuntimeError, match="task 1"):
        buf.sample([0, 1], 4, rng)


def test_sample_is_reproducible_from_rng():
    buf = TaskBuffers(2, 50, OBS, ACT)
    buf.add(0, rows(0, 40))
    buf.add(1, rows(100, 40))
    a = buf.sample([0, 1], 16, np.random.default_rng(5))
    b = buf.sample([0, 1], 16, np.random.default_rng(5))
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k])


def test_clear():
    buf = TaskBuffers(2, 10, OBS, ACT, store_starts=True)
    buf.add_path(0, make_path(0, 0, 8))
    buf.add_path(1, make_path(1, 50, 4))
    buf.clear(0)
    assert buf.size.tolist() == [0, 4] and buf.start_size.tolist() == [0, 1]
    buf.add(0, rows(200, 3))
    np.testing.assert_array_equal(ids_in_order(buf, 0), [200, 201, 202])
    ids = buf.sample([0], 100, np.random.default_rng(0))["rewards"][0, :, 0] / 10
    assert set(ids.astype(int)) <= {200, 201, 202}


def test_start_observations_stored_per_path():
    buf = TaskBuffers(3, 6, OBS, ACT, store_starts=True)
    buf.add_path(1, make_path(1, 0, 4))
    buf.add_path(1, make_path(1, 10, 5))
    buf.add_path(2, make_path(2, 20, 3), with_start=False)
    buf.add(2, rows(30, 2))  # no start given
    assert buf.start_size.tolist() == [0, 2, 0]
    np.testing.assert_array_equal(buf.starts[1, :2, 0], [0, 10])
    np.testing.assert_array_equal(buf.starts[1, :2], [rows(0, 1)["obs"][0], rows(10, 1)["obs"][0]])
    s = buf.sample_starts([1, 1], 50, np.random.default_rng(0))
    assert s.shape == (2, 50, OBS)
    assert set(s[..., 0].ravel().tolist()) == {0.0, 10.0}
    with pytest.raises(RuntimeError):
        buf.sample_starts([2], 1, np.random.default_rng(0))
    # start ring wraps as well: only the newest `capacity` starts survive
    for j in range(10):
        buf.add_path(0, make_path(0, 100 + j, 1))
    assert buf.start_size[0] == 6
    assert sorted(buf.starts[0, :, 0].tolist()) == list(range(104, 110))


def test_encoder_buffers_clear_on_first_write():
    buf = EncoderBuffers(3, 20, OBS, ACT)
    buf.add(0, rows(0, 5))
    buf.add(1, rows(100, 6))
    buf.add(2, rows(200, 7))
    buf.mark_all_for_clear()
    assert buf.size.tolist() == [5, 6, 7]  # nothing cleared until data arrives
    buf.add_path(0, make_path(0, 1000, 3))  # first write: clears task 0 first
    assert buf.size.tolist() == [3, 6, 7]
    np.testing.assert_array_equal(ids_in_order(buf, 0), [1000, 1001, 1002])
    buf.add(0, rows(2000, 2))  # second write in the same phase appends
    np.testing.assert_array_equal(ids_in_order(buf, 0), [1000, 1001, 1002, 2000, 2001])
    # other tasks keep their old data and are still marked
    np.testing.assert_array_equal(ids_in_order(buf, 1), np.arange(100, 106))
    np.testing.assert_array_equal(ids_in_order(buf, 2), np.arange(200, 207))
    assert buf.should_clear.tolist() == [False, True, True]
    s = buf.sample([1, 2], 64, np.random.default_rng(0))["rewards"][..., 0] / 10
    assert set(s[0].astype(int)) <= set(range(100, 106)) and set(s[1].astype(int)) <= set(range(200, 207))
    buf.add(2, rows(300, 1))
    np.testing.assert_array_equal(ids_in_order(buf, 2), [300])
    np.testing.assert_array_equal(ids_in_order(buf, 1), np.arange(100, 106))


def test_plain_task_buffers_never_clear_on_write():
    buf = TaskBuffers(1, 20, OBS, ACT)
    buf.add(0, rows(0, 4))
    buf.add(0, rows(4, 4))
    np.testing.assert_array_equal(ids_in_order(buf, 0), np.arange(8))


@pytest.mark.parametrize("cls", [TaskBuffers, EncoderBuffers])
def test_state_dict_round_trip(cls):
    kw = {"store_starts": True} if cls is TaskBuffers else {}
    buf = cls(3, 12, OBS, ACT, **kw)
    buf.add_path(0, make_path(0, 0, 5))
    buf.add_path(0, make_path(0, 5, 10))  # wraps
    buf.add_path(2, make_path(2, 50, 4))
    if cls is EncoderBuffers:
        buf.mark_all_for_clear()
        buf.add(2, rows(70, 2))
    state = buf.state_dict()
    other = cls(3, 12, OBS, ACT, **kw)
    other.add(1, rows(999, 3))  # stale content must not survive the load
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.size, buf.size)
    np.testing.assert_array_equal(other.ptr, buf.ptr)
    for t in range(3):
        np.testing.assert_array_equal(ids_in_order(other, t), ids_in_order(buf, t))
    assert other.size[1] == 0
    with pytest.raises(RuntimeError):
        other.sample([1], 1, np.random.default_rng(0))
    a = buf.sample([0, 2], 32, np.random.default_rng(3))
    b = other.sample([0, 2], 32, np.random.default_rng(3))
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
    if cls is TaskBuffers:
        np.testing.assert_array_equal(other.start_size, buf.start_size)
        np.testing.assert_array_equal(other.start_ptr, buf.start_ptr)
        np.testing.assert_array_equal(other.starts[:, :2], buf.starts[:, :2])
    else:
        np.testing.assert_array_equal(other.should_clear, buf.should_clear)
        other.add(0, rows(500, 1))  # task 0 was still marked: first write clears it
        np.testing.assert_array_equal(ids_in_order(other, 0), [500])
    # continuing both gives the same result
    buf.add(0, rows(77, 4))
    other2 = cls(3, 12, OBS, ACT, **kw)
    other2.load_state_dict(state)
    other2.add(0, rows(77, 4))
    np.testing.assert_array_equal(ids_in_order(other2, 0), ids_in_order(buf, 0))
    with pytest.raises(ValueError):
        cls(3, 13, OBS, ACT, **kw).load_state_dict(state)


# ---- device mirror (gathering minibatches on the learner's device) ----------------------------
def _assert_mirror_equals_host(buf, mirror, rng):
    tasks = np.flatnonzero(buf.size > 0)
    idx = buf.sample_indices(tasks, 64, rng)
    host = buf.gather(tasks, idx, mirror.wanted)
    dev = mirror.gather(tasks, idx)
    assert set(dev) == set(mirror.wanted)
    for k in mirror.wanted:
        np.testing.assert_array_equal(dev[k].cpu().numpy(), host[k], err_msg=k)


@pytest.mark.parametrize("cls", [TaskBuffers, EncoderBuffers])
def test_device_mirror_follows_writes_wraparound_clears_and_loads(cls):
    from metarelabel.buffers import DeviceMirror

    rng = np.random.default_rng(0)
    buf = cls(3, 2500, OBS, ACT)
    mirror = DeviceMirror(buf, "cpu")
    assert mirror.alloc == 0  # nothing reserved before data arrives
    start = 0
    for step in range(100):  # paths of random length on random tasks: growth and wraparound
        task, n = int(rng.integers(3)), int(rng.integers(1, 200))
        buf.add_path(task, make_path(task, start, n))
        start += n
        if step == 50 and cls is EncoderBuffers:
            buf.mark_all_for_clear()
        _assert_mirror_equals_host(buf, mirror, rng)
    assert buf.size.max() <= mirror.alloc <= 2500  # grows as needed, never past the host capacity
    if cls is TaskBuffers:
        assert buf.size.max() == 2500 and mirror.alloc == 2500  # the ring wrapped
    buf.clear(1)
    buf.add_path(1, make_path(1, start, 7))
    _assert_mirror_equals_host(buf, mirror, rng)

    fresh = cls(3, 2500, OBS, ACT)
    fresh_mirror = DeviceMirror(fresh, "cpu", keys=("obs", "rewards"))
    fresh.load_state_dict(buf.state_dict())
    _assert_mirror_equals_host(fresh, fresh_mirror, rng)


def test_device_mirror_of_image_observations():
    from metarelabel.buffers import DeviceMirror

    buf = TaskBuffers(2, 50, 0, 2, obs_shape=(3, 4, 4), obs_dtype=np.uint8)
    mirror = DeviceMirror(buf, "cpu", keys=("obs", "actions", "rewards", "next_obs"))
    rng = np.random.default_rng(1)
    for task in (0, 1, 0):
        n = 30
        obs = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
        buf.add(task, {"obs": obs, "actions": rng.uniform(-1, 1, (n, 2)), "rewards": rng.normal(size=n),
                       "dense_rewards": np.zeros(n), "terminals": np.zeros(n), "next_obs": obs})
    assert mirror.data["obs"].dtype == torch.uint8
    _assert_mirror_equals_host(buf, mirror, rng)


def _image_path(rng, n: int, first_id: int):
    """A path of n image transitions: next_obs[t] == obs[t + 1]; rewards carry global row ids."""
    frames = rng.integers(0, 256, (n + 1, 3, 4, 4), dtype=np.uint8)
    return {"obs": frames[:-1], "actions": rng.uniform(-1, 1, (n, 2)), "rewards": np.arange(first_id, first_id + n, dtype=np.float64),
            "dense_rewards": np.zeros(n), "terminals": np.zeros(n), "next_obs": frames[1:]}


@pytest.mark.parametrize("cls", [TaskBuffers, EncoderBuffers])
def test_image_buffers_store_each_frame_once(cls):
    from metarelabel.buffers import FOLLOWS, DeviceMirror

    rng = np.random.default_rng(0)
    buf = cls(2, 40, 0, 2, obs_shape=(3, 4, 4), obs_dtype=np.uint8)
    mirror = DeviceMirror(buf, "cpu", keys=("obs", "actions", "rewards", "next_obs"))
    truth: dict[int, dict] = {}  # global row id -> its transition
    nid, paths = 0, 0
    for task, n in [(0, 7), (1, 12), (0, 20), (0, 9), (1, 5), (0, 15), (0, 1), (1, 30)]:  # task 0 wraps
        p = _image_path(rng, n, nid)
        buf.add(task, p)
        for t in range(n):
            truth[nid + t] = {k: v[t] for k, v in p.items()}
        nid += n
        paths += 1
    all_rows = {}
    for task in (0, 1):
        idx = np.arange(buf.size[task])[None]
        got = buf.gather([task], idx)
        for j in range(idx.shape[1]):
            rid = int(got["rewards"][0, j, 0])
            for k in ("obs", "actions", "next_obs"):
                np.testing.assert_array_equal(got[k][0, j], truth[rid][k].astype(got[k].dtype))
            all_rows[(task, j)] = rid
    # one stored next frame per stored path end, every other row reads the following row's obs
    own = sum(int((~buf.data[FOLLOWS][t, : buf.size[t]]).sum()) for t in (0, 1))
    state = buf.state_dict()
    assert len(state["data"]["next_obs"]) == own <= paths
    assert state["data"]["next_obs"].nbytes < state["data"]["obs"].nbytes / 4
    fresh = cls(2, 40, 0, 2, obs_shape=(3, 4, 4), obs_dtype=np.uint8)
    fresh.load_state_dict(state)
    idx = rng.integers(0, 40, (2, 64))
    for k, v in buf.gather([0, 1], idx).items():
        np.testing.assert_array_equal(fresh.gather([0, 1], idx)[k], v)
    _assert_mirror_equals_host(buf, mirror, rng)


def test_image_buffer_stores_next_frames_that_are_not_the_following_obs():
    rng = np.random.default_rng(3)
    buf = TaskBuffers(1, 10, 0, 2, obs_shape=(3, 4, 4), obs_dtype=np.uint8)
    p = _image_path(rng, 6, 0)
    p["next_obs"] = p["next_obs"].copy()
    p["next_obs"][2] ^= 1  # not one path: that row keeps its own next frame
    buf.add(0, p)
    got = buf.gather([0], np.arange(6)[None])
    np.testing.assert_array_equal(got["next_obs"][0], p["next_obs"])


def test_encoder_buffers_draw_whole_paths():
    """``sample_paths``: k whole paths per task, 1 <= k <= K, without replacement, in the
    order collected; the mask covers exactly their rows.  A wrapped ring cuts the oldest path
    where it was overwritten, never joins it to the newest."""
    buf = EncoderBuffers(2, 30, OBS, ACT)
    lens = [4, 7, 3, 5]
    start = 0
    for n in lens:
        buf.add_path(0, make_path(0, start, n))
        start += n
    buf.add_path(1, make_path(1, 500, 6))
    want = np.split(np.arange(sum(lens)), np.cumsum(lens)[:-1])
    assert [list(ids_in_order(buf, 0)[p]) for p in buf.paths(0)] == [list(w) for w in want]
    rng = np.random.default_rng(0)
    seen_k = set()
    for _ in range(200):
        idx, mask = buf.sample_paths([0, 1, 0], 3, rng)
        assert idx.shape == mask.shape and mask[:, 0].all()
        got = buf.gather([0, 1, 0], idx)["rewards"][..., 0] / 10
        ids = got[0][mask[0]].astype(int)
        parts = [w for w in want if np.isin(w, ids).any()]
        assert 1 <= len(parts) <= 3 and sorted(ids) == list(ids)  # in collection order
        np.testing.assert_array_equal(np.concatenate(parts), ids)  # whole paths, each once
        seen_k.add(len(parts))
        np.testing.assert_array_equal(got[1][mask[1]], np.arange(500, 506))  # task 1 holds one path
        assert np.isin(got[0][~mask[0]], ids).all()  # padding repeats a drawn row
    assert seen_k == {1, 2, 3}
    # wrap: 30 rows hold 4 + 7 + 3 + 5 = 19; a 17-row path overwrites path 0 and 2 rows of path 1
    buf.add_path(0, make_path(0, 100, 17))
    segs = [list(buf.data["rewards"][0, p, 0] / 10) for p in buf.paths(0)]
    assert segs == [list(range(6, 11)), list(range(11, 14)), list(range(14, 19)), list(range(100, 117))]
    # round trip through a checkpoint keeps the path marks
    other = EncoderBuffers(2, 30, OBS, ACT)
    other.load_state_dict(buf.state_dict())
    assert [list(p) for p in other.paths(0)] == [list(p) for p in buf.paths(0)]


def _buffer_state(buf):
    state = {k: v.copy() for k, v in buf.data.items()}
    state.update(size=buf.size.copy(), ptr=buf.ptr.copy())
    if buf.store_starts:
        state.update(starts=buf.starts.copy(), start_size=buf.start_size.copy(), start_ptr=buf.start_ptr.copy())
    if isinstance(buf, EncoderBuffers):
        state.update(should_clear=buf.should_clear.copy(), path_start=buf.path_start.copy())
    return state


@pytest.mark.parametrize("cls", [TaskBuffers, EncoderBuffers])
def test_add_many_equals_the_adds_one_by_one(cls):
    """One write per field for a batch of paths leaves every array (data, rings, starts,
    path starts, clear flags) exactly as the same adds one by one: repeated tasks in one
    batch, wrap-around, an empty add, and the fallbacks (a task over its capacity)."""
    rng = np.random.default_rng(0)
    one, many = (cls(4, 23, OBS, ACT, store_starts=True) for _ in range(2))
    if cls is EncoderBuffers:
        for b in (one, many):
            b.add(1, rows(0, 5))
            b.mark_all_for_clear()
    start = 100
    for batch in range(12):
        items = []
        for _ in range(int(rng.integers(2, 7))):
            n = int(rng.integers(0 if batch == 3 else 1, 9))
            t = int(rng.integers(0, 4))
            items.append((t, rows(start, n), rows(start, max(n, 1))["obs"][0] if rng.random() < 0.7 else None))
            start += n
        if batch == 5:  # task 2 gets more than its capacity in one batch: the one-by-one fallback
            items += [(2, rows(start, 20), None), (2, rows(start + 20, 10), None)]
            start += 30
        if batch == 8 and cls is EncoderBuffers:
            for b in (one, many):
                b.mark_all_for_clear()
        for t, tr, s in items:
            one.add(t, tr, s)
        many.add_many(items)
        a, b = _buffer_state(one), _buffer_state(many)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {batch}: {k}")
        if cls is EncoderBuffers:
            for t in range(4):
                assert [list(p) for p in one.paths(t)] == [list(p) for p in many.paths(t)]
    # the rings wrapped (the encoder buffer's were cleared again after batch 8)
    assert np.all(one.size == 23) if cls is TaskBuffers else one.size.max() == 23


def test_add_paths_feeds_the_device_mirror_like_add_path():
    from metarelabel.buffers import DeviceMirror

    one, many = TaskBuffers(3, 17, OBS, ACT), TaskBuffers(3, 17, OBS, ACT)
    mirrors = DeviceMirror(one, "cpu"), DeviceMirror(many, "cpu")
    paths = [make_path(t, 10 * i, 4 + i % 5) for i, t in enumerate([0, 2, 0, 1, 0, 2, 2])]
    for p in paths:
        one.add_path(p.task, p, with_start=False)
    many.add_paths([p.task for p in paths], paths, with_start=False)
    for k in mirrors[0].keys:
        np.testing.assert_array_equal(mirrors[0].data[k].numpy(), mirrors[1].data[k].numpy(), err_msg=k)
    _assert_mirror_equals_host(many, mirrors[1], np.random.default_rng(1))
