"""Host <-> device traffic while acting: per env step exactly one observation goes to the
learner's device and one action comes back, and evaluation moves one context per posterior
trajectory.

Counted on the CPU by wrapping the usual conversion calls (``torch.as_tensor``/``torch.tensor``
of host data, ``Tensor.to`` with a device, ``.cpu()``, ``.item()``, ``.tolist()``); with
``--device cuda`` these are the PCIe copies and syncs.  A copy made some other way would not be
seen here: on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the stronger check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_agent, small_config
from metarelabel.envs import make_family
from metarelabel.evaluation import Evaluator
from metarelabel.sampler import rollout


@pytest.fixture
def counted(monkeypatch):
    counts = {"to_device": 0, "to_host": 0, "item": 0}
    as_tensor, tensor = torch.as_tensor, torch.tensor
    cpu, item, tolist, to = torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.to

    def host_data_to(fn):
        def wrapped(data, *a, **k):
            if not isinstance(data, torch.Tensor):
                counts["to_device"] += 1
            return fn(data, *a, **k)
        return wrapped

    def counting(fn, key):
        def wrapped(self, *a, **k):
            counts[key] += 1
            return fn(self, *a, **k)
        return wrapped

    def counting_to(self, *a, **k):
        if "device" in k or any(isinstance(x, (str, torch.device)) for x in a):
            counts["to_device"] += 1
        return to(self, *a, **k)

    monkeypatch.setattr(torch, "as_tensor", host_data_to(as_tensor))
    monkeypatch.setattr(torch, "tensor", host_data_to(tensor))
    monkeypatch.setattr(torch.Tensor, "cpu", counting(cpu, "to_host"))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(tolist, "item"))
    monkeypatch.setattr(torch.Tensor, "item", counting(item, "item"))
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    return counts


def test_rollout_moves_one_observation_and_one_action_per_step(counted):
    env = make_family("four-corners")
    env.set_task(1)
    env.reset(seed=0)
    agent = make_agent()
    z = agent.prior_z()
    counted.update(to_device=0, to_host=0, item=0)  # building the agent does not count
    path = rollout(env, agent, z, 20)
    assert len(path) >= 1
    assert counted == {"to_device": len(path), "to_host": len(path), "item": 0}


def test_evaluation_moves_one_context_per_posterior_trajectory(counted):
    cfg = small_config(eval_steps=100, exploration_trajectories=2)
    env = make_family("four-corners")
    agent = make_agent()
    ev = Evaluator(env, agent, cfg, seed=0)
    steps = []
    step = env.step
    env.step = lambda action: steps.append(1) or step(action)
    counted.update(to_device=0, to_host=0, item=0)
    returns = ev.run_task(0).returns
    posterior_trajectories = len(returns) - cfg.exploration_trajectories
    assert len(steps) >= 100 and posterior_trajectories >= 1
    # every env step: one observation in, one action out; each posterior trajectory: one context in
    assert counted == {"to_device": len(steps) + posterior_trajectories, "to_host": len(steps), "item": 0}
    assert np.isfinite(returns).all()


@pytest.mark.parametrize("lane_actor", [False, True])
def test_vector_evaluation_moves_one_batch_per_lockstep_step(counted, lane_actor):
    """The lockstep engine: per step one observation batch in and one action batch out for all
    lanes (``act_batch``, the path on other devices); per batch of posterior inferences one
    context in.  The CPU's lane actor shares its input tensor's memory with the engine's
    observation array and hands back a view of the actions: no per-step conversion at all."""
    cfg = small_config(eval_steps=100, exploration_trajectories=2, eval_runs=2)
    env = make_family("four-corners")
    agent = make_agent()
    if not lane_actor:
        agent.lane_actor = lambda lanes: None
    ev = Evaluator(env, agent, cfg, seed=0)
    steps, posteriors = [], []
    vstep, infer = ev.venv.step, agent.infer_posterior
    ev.venv.step = lambda lanes, actions: steps.append(len(lanes)) or vstep(lanes, actions)
    agent.infer_posterior = lambda ctx, mask=None: posteriors.append(1) or infer(ctx, mask)
    counted.update(to_device=0, to_host=0, item=0)
    pairs = ev.run_pairs([0, 1, 2, 3])
    assert len(pairs) == 8 and sum(steps) == sum(p.steps for p in pairs) and max(steps) == 8
    assert len(steps) < sum(steps) / 4  # lanes really ran side by side
    per_step = 0 if lane_actor else len(steps)
    assert counted == {"to_device": per_step + len(posteriors), "to_host": per_step, "item": 0}
