"""What `crosscheck.py` and `plateau.py` share: the authors' release built by its own launcher,
this library's weights and buffers copied into it, and the collection part of its loop body.

Import after the release checkout is on `sys.path` (both scripts put it there first).
"""
import copy
import json
import tempfile

import numpy as np
import torch


def build_release(rel_cfg):
    """The release's PEARLSoftActorCritic, built by its launcher from the config file `rel_cfg`
    (its train() captured instead of run; no log directory)."""
    import launch_experiment as le
    from configs.default import default_config

    captured = []
    le.PEARLSoftActorCritic.train = lambda self: captured.append(self)
    le.setup_logger = lambda *a, **k: tempfile.mkdtemp()
    with open(rel_cfg) as fh:
        variant = le.deep_update_dict(json.load(fh), copy.deepcopy(default_config))
    variant["util_params"]["gpu_id"] = 0
    le.experiment(variant)
    torch.set_num_threads(1)
    return captured[0]


def layer_pairs(agent, alg):
    """(this library's Linear layers, the release's) of each network but the critics, in order."""
    rel, pol = alg.agent, alg.agent.policy
    return {"encoder": ([*agent.encoder.hidden, agent.encoder.out], [*rel.context_encoder.fcs, rel.context_encoder.last_fc]),
            "policy": ([*agent.policy.net.hidden, agent.policy.net.out, agent.policy.log_std], [*pol.fcs, pol.last_fc, pol.last_fc_log_std]),
            "vf": ([*agent.vf.hidden, agent.vf.out], [*alg.vf.fcs, alg.vf.last_fc]),
            "target vf": ([*agent.target_vf.hidden, agent.target_vf.out], [*alg.target_vf.fcs, alg.target_vf.last_fc])}


def critic_pairs(agent, alg):
    """Per critic h: (this library's stacked (weight [2, in, out], bias [2, 1, out]) layers, the release's Linears)."""
    return {f"Q{h + 1}": (h, list(zip(agent.qf.weights, agent.qf.biases)), [*qf.fcs, qf.last_fc]) for h, qf in enumerate((alg.qf1, alg.qf2))}


@torch.no_grad()
def sync_weights(agent, alg):
    """Copy this library's weights into the release's networks."""
    for o_lins, r_lins in layer_pairs(agent, alg).values():
        assert len(o_lins) == len(r_lins)
        for o, r in zip(o_lins, r_lins):
            r.weight.copy_(o.weight)
            r.bias.copy_(o.bias)
    for h, o_layers, r_lins in critic_pairs(agent, alg).values():
        for (w, bias), r in zip(o_layers, r_lins):
            r.weight.copy_(w[h].T)
            r.bias.copy_(bias[h, 0])


def fill_release_buffers(trainer, alg):
    """Copy this library's RL, encoder and sampler buffers (every stored transition, and the RL
    buffer's start states) into the release's replay_buffer, enc_replay_buffer and
    sampler_enc_replay_buffer (each task's last visit: log Z draws its contexts there).  Both codes'
    next add to a task's encoder buffer then clears it (`should_clear` set), as after any iteration."""
    for ours, theirs in ((trainer.rl_buf, alg.replay_buffer), (trainer.enc_buf, alg.enc_replay_buffer),
                         (trainer.smp_buf, alg.sampler_enc_replay_buffer)):
        assert ours.size.sum() == ours.ptr.sum(), "a wrapped ring buffer"
        for t in range(trainer.num_tasks):
            n = int(ours.size[t])
            rows = ours.gather(np.array([t]), np.arange(n)[None])
            b = theirs.task_buffers[t]
            b.clear()
            b._observations[:n] = rows["obs"][0]
            b._actions[:n] = rows["actions"][0]
            b._rewards[:n] = rows["rewards"][0].reshape(n, 1)
            b._sparse_rewards[:n] = rows["rewards"][0].reshape(n, 1)  # Four-Corners' env_info "sparse_reward" is its reward
            b._terminals[:n] = rows["terminals"][0].reshape(n, 1)
            b._next_obs[:n] = rows["next_obs"][0]
            b._top = b._size = n
            if ours.store_starts:
                k = int(ours.start_size[t])
                b._start_obs[:k] = ours.starts[t, :k]
                b._start_obs_top = b._num_start_obs = k
    alg.should_clear[:] = 1.0


def release_collect(alg):
    """The collection part of the body of the release's train() loop (one iteration's task visits)."""
    for _ in range(alg.num_tasks_sample):
        np.random.uniform(0.0, 1.0)  # the loop's unused relabel_enc_data coin
        idx = np.random.randint(len(alg.train_tasks))
        alg.task_idx = idx
        alg.env.reset_task(idx)
        alg.sampler_enc_replay_buffer.task_buffers[idx].clear()
        alg.collect_data_new(alg.num_steps_prior, 1, np.inf, add_to_enc_buffer=True)
        alg.collect_data_new(alg.num_steps_posterior, 1, alg.update_post_train, add_to_enc_buffer=True)
        if alg.num_extra_rl_steps_posterior > 0:
            alg.collect_data_new(alg.num_extra_rl_steps_posterior, 1, alg.update_post_train, add_to_enc_buffer=False)
    alg.should_clear[:] = 1.0
