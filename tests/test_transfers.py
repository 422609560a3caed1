"""Host <-> device traffic while acting: per env step exactly one observation goes to the
learner's device and one action comes back, and evaluation moves one context per trajectory.

Counted on the CPU by wrapping the conversion calls; with ``--device cuda`` the same calls are
the PCIe copies, so a hidden per-step copy or sync (``.item()``, a context rebuilt every step)
fails this test without a GPU."""
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
    as_tensor, cpu, item = torch.as_tensor, torch.Tensor.cpu, torch.Tensor.item

    def counting_as_tensor(data, *a, **k):
        if not isinstance(data, torch.Tensor):
            counts["to_device"] += 1
        return as_tensor(data, *a, **k)

    def counting_cpu(self, *a, **k):
        counts["to_host"] += 1
        return cpu(self, *a, **k)

    def counting_item(self):
        counts["item"] += 1
        return item(self)

    monkeypatch.setattr(torch, "as_tensor", counting_as_tensor)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    return counts


def test_rollout_moves_one_observation_and_one_action_per_step(counted):
    env = make_family("four-corners")
    env.set_task(1)
    env.reset(seed=0)
    agent = make_agent()
    z = agent.prior_z()
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
    returns, _ = ev.run_task(0)
    posterior_trajectories = len(returns) - cfg.exploration_trajectories
    assert len(steps) >= 100 and posterior_trajectories >= 1
    # every env step: one observation in, one action out; each posterior trajectory: one context in
    assert counted == {"to_device": len(steps) + posterior_trajectories, "to_host": len(steps), "item": 0}
    assert np.isfinite(returns).all()
