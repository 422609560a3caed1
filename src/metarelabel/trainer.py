"""The meta-training loop (SPEC section 3) and everything a run owns: environment, agent,
buffers, relabeler, evaluator, logger, checkpoints.

    iteration 0: for every train task collect num_initial_steps with z ~ prior (no relabeling)
    each iteration:
      num_tasks_sample times: pick a train task, clear its sampler buffer, then
        prior phase (z ~ prior per trajectory), posterior phase (z re-inferred from the
        sampler buffer after each trajectory), extra-RL phase (posterior, RL buffer only);
        every batch of collected paths goes through the relabeler into the buffers
      mark all encoder buffers clear-on-next-write; recompute log Z
      num_train_steps_per_itr gradient steps; meta-test evaluation; log; checkpoint
"""
from __future__ import annotations

import copy
import json
import math
import time
import uuid
from pathlib import Path as FsPath

import numpy as np
import torch

from . import checkpoint as ckpt
from .buffers import FIELDS, DeviceMirror, EncoderBuffers, Path, TaskBuffers
from .config import LEGACY_DEFAULTS, Config, config_differences
from .envs import make_family
from .errors import CheckpointError, ConfigError, NonFiniteError, RunDirError, TrainingDiverged
from .evaluation import PROTOCOL, Evaluator, train_task_sample
from .fmt import format_bytes, format_duration
from .logger import Logger, summary_line, truncate_csv
from .pearl import PEARL, make_dims
from .relabel import RelabelContext, make_relabeler
from .rollout import Job, lane_seeds, lanes_for, run_jobs
from .rundir import critical, parent_gone, prepare_run_dir
from .sampler import context_from, context_tensor, resolve_device, rollout, tune_allocator

__all__ = ["Trainer", "load_trainer", "prepare_run_dir", "resolve_device"]


class Visit(Job):
    """One collection visit of a task (``rollouts = vector``): its phases in order, each
    ``(num_steps, posterior, feeds_encoder)``; within a phase whole trajectories until at least
    ``num_steps`` steps.  A phase's first trajectory uses z ~ prior, as does every trajectory
    of a prior phase; a posterior phase re-infers z from the visit's own paths so far after
    each trajectory.  ``index`` is the visit's row in the trainer's visit buffer (None: the
    visit never infers a posterior and keeps no rows)."""

    def __init__(self, index: int | None, task: int, phases, relabel: bool = True):
        self.index, self.task, self.relabel = index, int(task), relabel
        self.phases = [p for p in phases if p[0] > 0]
        self.phase, self.steps, self.paths = 0, 0, []
        self.feeds: list[bool] = []
        self._pending: list[Path] = []
        #: batches ready to be filed: (paths, feeds_encoder)
        self.ready: list[tuple[list[Path], bool]] = []

    def want(self):
        while self.phase < len(self.phases) and self.steps >= self.phases[self.phase][0]:
            self.phase, self.steps = self.phase + 1, 0
        if self.phase == len(self.phases):
            return None
        _, posterior, _ = self.phases[self.phase]
        return "posterior" if posterior and self.steps > 0 else "prior"

    def take(self, path: Path) -> None:
        _, posterior, feeds = self.phases[self.phase]
        self.steps += len(path)
        self.paths.append(path)
        self.feeds.append(feeds)
        self._pending.append(path)
        # what the sequential collector files in one batch: a prior phase's paths together
        # when the phase ends, a posterior path on its own
        if posterior or self.steps >= self.phases[self.phase][0]:
            self.ready.append((self._pending, feeds))
            self._pending = []


def checkpoint_bytes(cfg: Config, num_tasks: int, obs_dim: int, act_dim: int, obs_shape=None) -> float:
    """About the size of a run's last checkpoint: what its buffers hold by then (every path
    collected, up to the RL buffers' capacity; the encoder and sampler buffers' contents),
    networks excluded."""
    from .buffers import stored_row_bytes

    caps = cfg.buffer_capacities(num_tasks)
    H = cfg.max_path_length
    visit = cfg.num_steps_prior + cfg.num_steps_posterior + cfg.num_extra_rl_steps_posterior
    collected = cfg.num_initial_steps * num_tasks + cfg.num_iterations * cfg.num_tasks_sample * visit
    rows = {"rl": min(collected, num_tasks * caps["rl"]),
            "encoder": min(collected, num_tasks * caps["encoder"]),
            "sampler": min(collected, num_tasks * caps["sampler"])}
    kw = dict(obs_shape=obs_shape, obs_dtype=np.uint8) if obs_shape is not None else {}
    return sum(n * stored_row_bytes(obs_dim, act_dim, path_length=H, with_starts=name == "rl", **kw)
               for name, n in rows.items())


def _write_json(path: FsPath, obj: dict) -> None:
    """``obj`` as indented JSON, written atomically (``checkpoint.write_atomic``)."""
    ckpt.write_atomic(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


class Trainer:
    def __init__(self, cfg: Config, run_dir, echo=print, progress: bool = False, tensorboard: bool = True):
        self.cfg, self.echo, self.progress = cfg, echo, progress
        self.run_dir = FsPath(run_dir)
        torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device)
        tune_allocator()
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)

        self.env = make_family(cfg.family, cfg.task_seed)
        self.env.reset(seed=cfg.seed)
        self.train_tasks = np.asarray(self.env.train_tasks)
        self.eval_tasks = np.asarray(self.env.eval_tasks)
        n = len(self.train_tasks)
        assert np.array_equal(self.train_tasks, np.arange(n)), "train tasks must be the first N tasks"
        self.num_tasks = n

        obs_dim = int(np.prod(self.env.observation_space.shape))
        act_dim = int(np.prod(self.env.action_space.shape))
        self.dims = make_dims(self.env, cfg)
        self.agent = PEARL(self.dims, cfg, self.device)
        self.agent.warn = lambda msg: self.echo(f"warning: {msg}")

        self.caps = cfg.buffer_capacities(n)
        # image families store observations as uint8 [C, H, W]; vector families as float32 [obs]
        layout = dict(obs_shape=self.dims.obs_shape, obs_dtype=np.uint8) if self.dims.image else {}
        self.rl_buf = TaskBuffers(n, self.caps["rl"], obs_dim, act_dim, store_starts=True, **layout)
        self.enc_buf = EncoderBuffers(n, self.caps["encoder"], obs_dim, act_dim, **layout)
        self.smp_buf = TaskBuffers(n, self.caps["sampler"], obs_dim, act_dim, **layout)
        self.ctx_key = cfg.context_reward_key
        self.rl_key = cfg.rl_reward_key
        self.ctx_keys = ("obs", "actions", self.ctx_key, "next_obs")
        self.rl_mirror = self.enc_mirror = None
        self._setup_device_buffers()

        self.relabeler = make_relabeler(cfg.relabel, RelabelContext(
            cfg=cfg, family=self.env, learner=self.agent, rl_buffers=self.rl_buf, enc_buffers=self.enc_buf,
            sampler_buffers=self.smp_buf, rng=self.rng, num_tasks=n))

        self.vector = cfg.rollouts == "vector"
        # collection lanes: every task visit of an iteration side by side, each with its own
        # rows of the visit buffer (the sampler buffer of that visit)
        lanes = lanes_for(self.env, max(cfg.num_tasks_sample, 1))
        self.venv = self.env.vector_env(lane_seeds(cfg.seed, lanes)) if self.vector else None
        self.visit_buf = (TaskBuffers(cfg.num_tasks_sample, self.caps["sampler"], obs_dim, act_dim, **layout)
                          if self.vector else None)

        eval_env = make_family(cfg.family, cfg.task_seed)
        self.evaluator = Evaluator(eval_env, self.agent, cfg, seed=cfg.seed + 100_003)
        self.eval_train_tasks = train_task_sample(n, cfg.num_eval_train_tasks)

        self.iteration = 0  # completed meta-training iterations
        self.env_steps = 0
        self.initial_done = False
        self.run_id = uuid.uuid4().hex
        self.logger: Logger | None = None
        self._tensorboard = tensorboard
        self._timers: dict[str, float] = {}
        self._collected: list[tuple[float, bool]] = []  # (return, success) of this iteration's paths
        self._moved: list[bool] = []  # success under the new task of this iteration's relabeled paths

    # ---- setup / output -------------------------------------------------------------------------
    def _setup_device_buffers(self) -> None:
        """Mirror the fields a gradient step reads (``device_buffers``), if they fit: at full
        capacity the mirror may take at most half of the device's free memory."""
        cfg = self.cfg
        if not (cfg.device_buffers == "on" or (cfg.device_buffers == "auto" and self.device.type == "cuda")):
            return
        rl_keys = ("obs", "actions", self.rl_key, "next_obs", "terminals") + ((self.ctx_key,) if cfg.learned_reward else ())
        enc_keys = ("obs", "actions", self.ctx_key) + (("next_obs",) if cfg.use_next_obs_in_context else ())
        need = DeviceMirror.full_bytes(self.rl_buf, rl_keys) + DeviceMirror.full_bytes(self.enc_buf, enc_keys)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > free // 2:
                msg = (f"the device buffers could need {format_bytes(need)} at full capacity, more than half of the "
                       f"{format_bytes(free)} free on {self.device}")
                if cfg.device_buffers == "on":
                    raise ConfigError(f"device_buffers: {msg}; use --device-buffers off or a smaller replay_buffer_size")
                self.echo(f"warning: {msg}; gathering minibatches on the host instead")
                return
        self.rl_mirror = DeviceMirror(self.rl_buf, self.device, rl_keys)
        self.enc_mirror = DeviceMirror(self.enc_buf, self.device, enc_keys)
        self._mirror_bytes = need

    def memory_estimate(self) -> str:
        bufs = (self.rl_buf, self.enc_buf, self.smp_buf) + ((self.visit_buf,) if self.visit_buf is not None else ())
        reserved = sum(b.nbytes for b in bufs)
        kind = (f"uint8 images {'x'.join(map(str, self.dims.obs_shape))} + float32" if self.dims.image
                else "float32")
        return (f"buffers: {self.num_tasks} tasks x (RL {self.caps['rl']:,} + encoder {self.caps['encoder']:,} + "
                f"sampler {self.caps['sampler']:,}) transitions"
                + (f" + {self.visit_buf.num_tasks} visits x {self.caps['sampler']:,}" if self.visit_buf is not None else "")
                + f", {kind}: {format_bytes(reserved)} reserved "
                f"(committed as data arrives)"
                + (f"; device mirror on {self.device}: up to {format_bytes(self._mirror_bytes)}" if self.rl_mirror else ""))

    def start(self) -> None:
        """Write config and run metadata into a fresh run directory."""
        (self.run_dir / "config.json").write_text(self.cfg.to_json() + "\n")
        from .provenance import provenance

        meta = {"run_id": self.run_id, "protocol": PROTOCOL, **provenance(self.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (self.run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
        self._open_logger()

    def _mark_finished(self, last: dict[str, float]) -> None:
        """Record completion in run.json (sweeps skip finished runs)."""
        path = self.run_dir / "run.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {"run_id": self.run_id}
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["final"] = {k: v for k, v in last.items() if k.startswith("meta_test/") and "by_trajectory" not in k}
        try:
            _write_json(path, meta)
        except OSError as exc:
            raise RunDirError(f"cannot write {path}: {exc.strerror}; the final checkpoint is intact") from None

    def record_extension(self, old: int) -> None:
        """Record in config.json and run.json that this run (built with its new
        ``num_iterations``) was extended from ``old`` iterations (``resume --num-iterations``)."""
        num_iterations = self.cfg.num_iterations
        if num_iterations == old:
            return
        try:
            meta = json.loads((self.run_dir / "run.json").read_text())
            meta.pop("finished", None)
            meta.setdefault("extended", []).append({"from": old, "to": num_iterations, "at_iteration": self.iteration,
                                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
            _write_json(self.run_dir / "config.json", self.cfg.to_dict())
            _write_json(self.run_dir / "run.json", meta)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"cannot record the new length in {self.run_dir}: {exc}") from None

    def _open_logger(self, purge_step: int | None = None) -> None:
        self.logger = Logger(self.run_dir, tensorboard=self._tensorboard, purge_step=purge_step)

    def prepare_resume(self) -> None:
        """Drop output rows written after the checkpoint, so the continued run adds each
        iteration exactly once to progress.csv, TensorBoard and the relabel matrix."""
        truncate_csv(self.run_dir / "progress.csv", "iteration", self.iteration)
        truncate_csv(self.run_dir / "relabel_matrix.csv", "iteration", self.iteration)
        self._open_logger(purge_step=self.env_steps + 1)

    # ---- collection -------------------------------------------------------------------------------
    def _tic(self) -> float:
        return time.perf_counter()

    def _add_time(self, key: str, t0: float) -> None:
        self._timers[key] = self._timers.get(key, 0.0) + time.perf_counter() - t0

    def _posterior_z(self, buf: TaskBuffers, rows) -> torch.Tensor:
        """z ~ the posterior of ``embedding_batch_size`` random transitions of each of ``rows``
        of ``buf`` (one draw, one encoder call): ``[len(rows), L]``."""
        batch = buf.sample(rows, self.cfg.embedding_batch_size, self.rng,
                           keys=("obs", "actions", self.ctx_key, "next_obs"))
        ctx = context_tensor(context_from(batch, self.ctx_key, self.cfg.use_next_obs_in_context), self.device)
        with torch.no_grad():
            return self.agent.sample_z(*self.agent.infer_posterior(ctx))

    def collect(self, task: int, num_steps: int, posterior: bool, feeds_encoder: bool, relabel: bool = True) -> int:
        """Collect about ``num_steps`` steps (whole trajectories) on ``task``."""
        cfg = self.cfg
        self.env.set_task(task)
        steps = 0
        if not posterior:
            paths = []
            while steps < num_steps:
                paths.append(rollout(self.env, self.agent, self.agent.prior_z(), cfg.max_path_length))
                steps += len(paths[-1])
            self.store(paths, feeds_encoder, relabel)
        else:
            z = self.agent.prior_z()  # like PEARL, each phase starts from the prior
            while steps < num_steps:
                path = rollout(self.env, self.agent, z, cfg.max_path_length)
                steps += len(path)
                self.store([path], feeds_encoder, relabel)
                if steps < num_steps:
                    z = self._posterior_z(self.smp_buf, [task])
        self.env_steps += steps
        return steps

    def store(self, paths: list[Path], feeds_encoder, relabel: bool = True, sampler: bool = True,
              groups=None) -> None:
        """File a batch of collected paths: originals to the sampler buffer (unless
        ``sampler`` is False: the vector engine writes it per visit), then each path (or
        transition) to the task the relabeler assigns.  ``feeds_encoder``: one flag for the
        batch or one per path; ``groups``: see ``Relabeler.assign``."""
        feeds = [feeds_encoder] * len(paths) if isinstance(feeds_encoder, bool) else list(feeds_encoder)
        if sampler:
            self.smp_buf.add_paths([p.task for p in paths], paths, with_start=False)
        for p in paths:
            self._collected.append((float(p.rewards.sum()), bool(p.success.any())))
        t0 = self._tic()
        if relabel:
            assignments = self.relabeler.assign(paths, groups)
        else:
            self.relabeler.observe(paths)
            assignments = [np.full(len(p), p.task, np.int64) for p in paths]
        rl, enc = [], []  # (task, transitions, start) for each buffer, in filing order
        for p, a, f in zip(paths, assignments, feeds):
            self._file(p, a, f, rl, enc)
        self.rl_buf.add_many(rl)
        self.enc_buf.add_many(enc)
        self._add_time("relabel", t0)

    def relabeled_path(self, path: Path, task: int, truncate: bool = True) -> Path:
        """``path`` with rewards, terminals and success recomputed under ``task``; with
        ``truncate`` it ends at its first terminal under that task."""
        r, d, s = self.env.reward(path.infos, [task])
        dense = self.env.dense_reward(path.infos, [task])
        r, d, s, dense = r[0], d[0], s[0], dense[0]
        T = len(path)
        if truncate and d.any():
            T = int(np.argmax(d)) + 1
        return Path(obs=path.obs[:T], actions=path.actions[:T], rewards=r[:T], dense_rewards=dense[:T],
                    terminals=d[:T], next_obs=path.next_obs[:T], success=s[:T],
                    infos={k: v[:T] for k, v in path.infos.items()}, task=int(task))

    def _file(self, path: Path, assigned: np.ndarray, feeds_encoder: bool, rl: list, enc: list) -> None:
        """Append the adds that file ``path`` as ``assigned`` to ``rl`` and ``enc``."""
        if np.all(assigned == assigned[0]):
            k = int(assigned[0])
            q = path if k == path.task else self.relabeled_path(path, k, truncate=self.cfg.relabel_truncate)
            if k != path.task:
                self._moved.append(bool(q.success.any()))
            rows = {f: getattr(q, f) for f in FIELDS}
            rl.append((k, rows, q.start_obs))
            if feeds_encoder:
                enc.append((k, rows, None))
            return
        for k in np.unique(assigned):  # per-transition assignment: no start state stored
            sel = assigned == k
            q = self.relabeled_path(path, int(k), truncate=False)
            rows = {f: getattr(q, f)[sel] for f in FIELDS}
            rl.append((int(k), rows, None))
            if feeds_encoder:
                enc.append((int(k), rows, None))

    # ---- collection with the lockstep engine (rollouts = vector) ------------------------------------
    def _visit_z(self, visits: list[Visit], kinds: list[str]) -> torch.Tensor:
        """z for the visits starting a trajectory: one prior draw for all prior ones, one
        sampler-buffer draw and one encoder call for all posterior ones."""
        L = self.dims.latent
        z = torch.empty(len(visits), L, device=self.device)
        pri = [i for i, k in enumerate(kinds) if k == "prior"]
        post = [i for i, k in enumerate(kinds) if k == "posterior"]
        if pri:
            z[pri] = self.agent.prior_z(len(pri))
        if post:
            z[post] = self._posterior_z(self.visit_buf, [visits[i].index for i in post])
        return z

    def run_visits(self, visits: list[Visit], clear_sampler: bool) -> None:
        """Collect ``visits`` side by side.  Each finished path goes to its visit's rows of the
        visit buffer at once (posterior inference reads them); the paths finished in one step
        are relabeled and filed as one batch; at the end each visit's paths replace its task's
        sampler-buffer contents, in visit order (what visiting them one after another leaves)."""
        cfg = self.cfg
        for v in visits:
            if v.index is not None:
                self.visit_buf.clear(v.index)

        def on_paths(done):
            mine = [(v.index, p) for v, p in done if v.index is not None]
            self.visit_buf.add_paths([i for i, _ in mine], [p for _, p in mine], with_start=False)
            # the batches completed in this step, filed together (one coin per batch)
            for relabel in (True, False):
                batches = [b for v, _ in done if v.relabel == relabel for b in v.ready]
                if batches:
                    self.store([p for ps, _ in batches for p in ps], [f for ps, f in batches for _ in ps],
                               relabel=relabel, sampler=False, groups=[g for g, (ps, _) in enumerate(batches) for _ in ps])
            for v, _ in done:
                v.ready = []

        steps = run_jobs(self.venv, self.agent, visits, cfg.max_path_length, self._visit_z, on_paths)
        self.env_steps += steps
        for v in visits:
            if clear_sampler:
                self.smp_buf.clear(v.task)
            self.smp_buf.add_paths([v.task] * len(v.paths), v.paths, with_start=False)

    def initial_collection(self) -> None:
        if self.vector:
            # prior trajectories only: nothing reads a visit buffer
            self.run_visits([Visit(None, int(t), [(self.cfg.num_initial_steps, False, True)], relabel=False)
                             for t in self.train_tasks], clear_sampler=False)
        else:
            for task in self.train_tasks:
                self.collect(int(task), self.cfg.num_initial_steps, posterior=False, feeds_encoder=True, relabel=False)
        if not self.cfg.keep_initial_encoder_data:
            self.enc_buf.mark_all_for_clear()
        self.initial_done = True

    def collect_iteration(self) -> None:
        cfg = self.cfg
        if self.vector:
            tasks = self.rng.integers(self.num_tasks, size=cfg.num_tasks_sample)
            phases = [(cfg.num_steps_prior, False, True), (cfg.num_steps_posterior, True, True),
                      (cfg.num_extra_rl_steps_posterior, True, False)]
            self.run_visits([Visit(i, int(t), phases) for i, t in enumerate(tasks)], clear_sampler=True)
            self.enc_buf.mark_all_for_clear()
            return
        for _ in range(cfg.num_tasks_sample):
            task = int(self.rng.integers(self.num_tasks))
            self.smp_buf.clear(task)
            if cfg.num_steps_prior > 0:
                self.collect(task, cfg.num_steps_prior, posterior=False, feeds_encoder=True)
            if cfg.num_steps_posterior > 0:
                self.collect(task, cfg.num_steps_posterior, posterior=True, feeds_encoder=True)
            if cfg.num_extra_rl_steps_posterior > 0:
                self.collect(task, cfg.num_extra_rl_steps_posterior, posterior=True, feeds_encoder=False)
        self.enc_buf.mark_all_for_clear()

    # ---- training ---------------------------------------------------------------------------------------
    def sample_training_batch(self, rng: np.random.Generator | None = None):
        """A meta-batch and its contexts, drawn with the run's generator (or ``rng``, which
        also skips the relabeler's per-step hook: for timing only)."""
        cfg = self.cfg
        own = rng is None
        rng = self.rng if own else rng
        tasks = rng.integers(0, self.num_tasks, size=cfg.meta_batch)
        idx = self.rl_buf.sample_indices(tasks, cfg.batch_size, rng)
        cmask = None
        if cfg.context_trajectories:
            cidx, cmask = self.enc_buf.sample_paths(tasks, cfg.context_trajectories, rng)
        else:
            cidx = self.enc_buf.sample_indices(tasks, cfg.embedding_batch_size, rng)
        dev = self.device
        if self.rl_mirror is not None and cmask is None:  # gathered on the device: only the indices travel, in one copy
            M, B, E = len(tasks), idx.shape[1], cidx.shape[1]
            packed = torch.as_tensor(np.concatenate([tasks, idx.ravel(), cidx.ravel()]), device=dev)
            t_dev = packed[:M]
            b = self.rl_mirror.gather(t_dev, packed[M: M + M * B].view(M, B))
            c = self.enc_mirror.gather(t_dev, packed[M + M * B:].view(M, E))
        else:
            b = self.rl_buf.gather(tasks, idx)
            c = self.enc_buf.gather(tasks, cidx, self.ctx_keys)
        batch = {"obs": b["obs"], "actions": b["actions"], "rewards": b[self.rl_key],
                 "next_obs": b["next_obs"], "terminals": b["terminals"]}
        if cmask is not None:
            batch["context_mask"] = cmask
        batch = {k: torch.as_tensor(v, device=dev) for k, v in batch.items()}
        context = context_tensor(context_from(c, self.ctx_key, cfg.use_next_obs_in_context), dev)
        if own:
            self.relabeler.on_gradient_step(tasks, b)
        return batch, context

    def time_gradient_step(self, steps: int = 2) -> float:
        """Seconds per gradient step, timed on a copy of the agent with batches of a private
        generator; the run's networks and random streams are untouched."""
        agent = copy.deepcopy(self.agent)
        state = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        rng = np.random.default_rng(0)
        try:
            agent.update(*self.sample_training_batch(rng))  # warm-up (allocations, flat views)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                agent.update(*self.sample_training_batch(rng))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return (time.perf_counter() - t0) / steps
        finally:
            self.agent._no_inductor = agent._no_inductor  # grad_step fast: probed (and said) once
            torch.set_rng_state(state)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def time_estimate(self) -> tuple[float, str]:
        """(seconds, line): the remaining iterations' gradient steps at the timed rate, and the
        size of the run's last checkpoint (``checkpoint_bytes``)."""
        cfg = self.cfg
        per_step = self.time_gradient_step()
        left = max(cfg.num_iterations - self.iteration, 0)
        total = per_step * cfg.num_train_steps_per_itr * left
        full = checkpoint_bytes(cfg, self.num_tasks, self.rl_buf.obs_dim, self.rl_buf.act_dim,
                                self.dims.obs_shape if self.dims.image else None)
        line = (f"estimate: {format_duration(total)} for {left} iterations of gradient steps alone "
                f"({per_step * 1e3:.1f} ms per {self.agent.step_kind} step x {cfg.num_train_steps_per_itr:,} per iteration on {self.device}; "
                f"collection and evaluation add to it); the last checkpoint will be about {format_bytes(full)}")
        return total, line

    def train_steps(self, n: int) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        for _ in range(n):
            batch, context = self.sample_training_batch()
            out = self.agent.update(batch, context)
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        return {k: float(v) / max(n, 1) for k, v in sums.items()}

    # ---- the loop --------------------------------------------------------------------------------------------
    def run_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        it = self.iteration + 1
        self._timers = {}
        self._collected = []
        self._moved = []
        t_start = self._tic()
        t0 = self._tic()
        self.collect_iteration()
        collect_total = time.perf_counter() - t0
        t0 = self._tic()
        self.relabeler.update_log_z()
        self._add_time("log_z", t0)
        t0 = self._tic()
        losses = self.train_steps(cfg.num_train_steps_per_itr)
        train_s = time.perf_counter() - t0
        self._check_finite(losses)
        row: dict[str, float] = {"iteration": it, "env_steps": self.env_steps}
        row.update(losses)
        if self._collected:
            ret, succ = np.asarray(self._collected).T
            row.update({"collect/return": float(ret.mean()), "collect/success_rate": float(succ.mean())})
        row.update(self.relabeler.diagnostics())
        row["relabel/moved_success_rate"] = float(np.mean(self._moved)) if self._moved else math.nan
        self._matrix = self.relabeler.take_matrix()
        t0 = self._tic()
        if it % cfg.eval_every == 0 or it == cfg.num_iterations:
            row.update(self.evaluator.evaluate(self.eval_tasks, "meta_test"))
            if len(self.eval_train_tasks):
                row.update(self.evaluator.evaluate(self.eval_train_tasks, "meta_train"))
        eval_s = time.perf_counter() - t0
        relabel_s = self._timers.get("relabel", 0.0)
        row.update({
            "time/collect_s": collect_total - relabel_s,
            "time/relabel_s": relabel_s,
            "time/log_z_s": self._timers.get("log_z", 0.0),
            "time/train_s": train_s,
            "time/grad_steps_per_s": cfg.num_train_steps_per_itr / train_s if train_s > 0 else math.nan,
            "time/eval_s": eval_s,
            "time/iteration_s": time.perf_counter() - t_start,
        })
        self.iteration = it
        return row

    def _check_finite(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            if not math.isfinite(v):
                raise NonFiniteError(k, v)

    def _write_matrix(self, it: int, m: np.ndarray) -> None:
        path = self.run_dir / "relabel_matrix.csv"
        new = not path.exists()
        with open(path, "a") as fh:
            if new:
                fh.write("iteration,original,assigned,paths\n")
            for i, j in zip(*np.nonzero(m)):
                fh.write(f"{it},{i},{j},{float(m[i, j])!r}\n")

    def train(self) -> dict[str, float]:
        """Run (or continue) meta-training to ``num_iterations``; returns the last row."""
        cfg = self.cfg
        t_run = time.perf_counter()
        self.echo(self.memory_estimate())
        if not self.initial_done:
            t0 = self._tic()
            self.initial_collection()
            self.echo(f"initial collection: {self.env_steps:,} steps in {time.perf_counter() - t0:.1f}s")
        if self.iteration < cfg.num_iterations:
            if self.agent.step_kind == "compiled":
                self.echo(f"compiling the gradient step (grad_step={cfg.grad_step}; torch.compile, about 5-70 s the "
                          "first time on a machine)")
            total, line = self.time_estimate()
            self.echo(line)
            if total > 2 * 3600:
                faster = ("; for a CPU-sized run try --preset cpu (or --preset quick for a smoke test)"
                          if self.device.type == "cpu" and cfg.preset != "cpu" else "")
                self.echo(f"warning: this run will take about {format_duration(total)} on {self.device}{faster}")
        t_loop, first = time.perf_counter(), self.iteration
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.num_iterations, initial=self.iteration, unit="it", dynamic_ncols=True)
        last: dict[str, float] = {}
        try:
            while self.iteration < cfg.num_iterations:
                try:
                    row = self.run_iteration()
                except NonFiniteError as exc:
                    it = self.iteration + 1
                    path = self.save_checkpoint(failed=True, iteration=it)
                    raise TrainingDiverged(
                        f"{exc.quantity} became {exc.value} at iteration {it}; stopped and saved {path} "
                        "(marked failed; resume uses the last good checkpoint). Try a smaller lr or reward_scale."
                    ) from None
                with critical():  # a stop signal waits for the rows and the checkpoint
                    try:
                        self._write_matrix(self.iteration, self._matrix)
                        self.logger.record_dict(row)
                        last = self.logger.dump(self.env_steps)
                    except OSError as exc:
                        raise RunDirError(f"cannot write to run directory {self.run_dir}: {exc.strerror}; "
                                          "the last good checkpoint is intact (metarelabel resume continues from it)") from None
                    elapsed = time.perf_counter() - t_loop
                    eta = elapsed / (self.iteration - first) * (cfg.num_iterations - self.iteration)
                    line = (summary_line(self.iteration, cfg.num_iterations, last)
                            + f" | {format_duration(elapsed)} elapsed, eta {format_duration(eta)}")
                    if bar is not None:
                        bar.update(1)
                        bar.write(line)
                    else:
                        self.echo(line)
                    if self.iteration == first + 1 and self.iteration < cfg.num_iterations:
                        self.echo(f"estimated time to finish: {format_duration(eta)} "
                                  f"({elapsed:.1f} s per iteration, {cfg.num_iterations - self.iteration} to go)")
                    due = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
                    if due or self.iteration == cfg.num_iterations:
                        self.save_checkpoint()
                if parent_gone():  # started by a sweep that is no longer there
                    raise KeyboardInterrupt
            with critical():
                self._mark_finished(last)
            self.wall_s = time.perf_counter() - t_run
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
        return last

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
               "env": self.env.get_state(), "eval_env": self.evaluator.env.get_state(),
               "eval_torch": self.evaluator.generator.get_state()}
        if self.venv is not None:  # the lanes' start-state generators (all trajectories are done)
            rng["lanes"] = self.venv.get_state()
            rng["eval_lanes"] = self.evaluator.venv.get_state()
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": self.cfg.to_dict(), "iteration": self.iteration, "env_steps": self.env_steps,
            "initial_done": self.initial_done, "agent": self.agent.state_dict(),
            "buffers": {"rl": self.rl_buf.state_dict(), "encoder": self.enc_buf.state_dict(),
                        "sampler": self.smp_buf.state_dict()},
            "relabeler": self.relabeler.state_dict(), "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        for name, buf in (("rl", self.rl_buf), ("encoder", self.enc_buf), ("sampler", self.smp_buf)):
            buf.load_state_dict(ckpt.to_numpy(state["buffers"][name]))
        self.relabeler.load_state_dict(ckpt.to_numpy(state["relabeler"]))
        rng = state["rng"]
        self.rng.bit_generator.state = rng["numpy"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.env.set_state(ckpt.to_numpy(rng["env"]))
        self.evaluator.env.set_state(ckpt.to_numpy(rng["eval_env"]))
        self.evaluator.generator.set_state(rng["eval_torch"])
        if self.venv is not None:
            if "lanes" not in rng:
                raise CheckpointError("checkpoint was written with rollouts=sequential; resume it with that setting")
            self.venv.set_state(ckpt.to_numpy(rng["lanes"]))
            self.evaluator.venv.set_state(ckpt.to_numpy(rng["eval_lanes"]))
        self.iteration = int(state["iteration"])
        self.env_steps = int(state["env_steps"])
        self.initial_done = bool(state["initial_done"])

    def save_checkpoint(self, failed: bool = False, iteration: int | None = None) -> FsPath:
        it = self.iteration if iteration is None else iteration
        try:
            t0 = time.perf_counter()
            path = ckpt.save(self.run_dir / "checkpoints", it, self.state_dict(), self.cfg.keep_checkpoints,
                             self.run_id, failed=failed)
            self.last_checkpoint = {"path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}
            if not failed:
                self.echo(f"checkpoint {path.name}: {format_bytes(self.last_checkpoint['bytes'])} "
                          f"in {self.last_checkpoint['seconds']:.2f}s")
            return path
        except OSError as exc:
            raise RunDirError(f"cannot write checkpoint for iteration {it}: {exc.strerror}; "
                              "the previous checkpoint is intact") from None


def load_trainer(run_dir, echo=print, device: str | None = None, tensorboard: bool = False,
                 progress: bool = False, num_iterations: int | None = None) -> tuple[Trainer, dict]:
    """Rebuild a run's trainer from its directory and newest good checkpoint."""
    from .config import load_config_json

    run_dir = FsPath(run_dir)
    if not (run_dir / "config.json").exists():
        raise RunDirError(f"{run_dir} is not a metarelabel run directory (no config.json)")
    cfg = load_config_json(run_dir / "config.json")
    if device is not None:
        cfg = cfg.replace(device=device)
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise RunDirError(f"{run_dir}/run.json is missing or unreadable") from None
    body = ckpt.load_latest(run_dir / "checkpoints", run_id=meta.get("run_id"))
    # a field the checkpoint lacks did not exist when it was made: the run behaved as its
    # default did (or as LEGACY_DEFAULTS says, where the default changed since)
    made_with = {**Config().to_dict(), **LEGACY_DEFAULTS, **body["payload"].get("config", {})}
    # num_iterations may have been raised to extend the run; run-only fields may differ
    diffs = [d for d in config_differences(made_with, cfg.to_dict()) if not d.startswith("num_iterations ")]
    if diffs:
        raise RunDirError(f"{run_dir}/config.json differs from the config its checkpoint was made with "
                          f"({', '.join(diffs)}); restore it, or start a new run")
    if num_iterations is not None:  # extended: buffers sized for the longer run
        if num_iterations < int(body["iteration"]):
            raise ConfigError(f"--num-iterations {num_iterations} is below the {int(body['iteration'])} iterations "
                              "this run has already done")
        old = cfg.num_iterations
        cfg = cfg.replace(num_iterations=num_iterations)
    trainer = Trainer(cfg, run_dir, echo=echo, progress=progress, tensorboard=tensorboard)
    trainer.run_id = meta["run_id"]
    try:
        trainer.load_state_dict(body["payload"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match this run's config ({type(exc).__name__}: {exc})") from None
    if num_iterations is not None:
        trainer.record_extension(old)
    return trainer, body
