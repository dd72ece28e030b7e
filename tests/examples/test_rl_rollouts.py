"""The RL code of examples/rl_rollouts.py on its own (no Ray, no mesh): the environment, the
policy, the learning rule, and the seeded run the demo depends on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from lattica_ray.demo import EXAMPLE, load_example

rl = load_example()


def test_cartpole_starts_near_upright_and_falls_when_pushed_one_way():
    env = rl.CartPole(seed=1)
    state = env.reset()
    assert np.all(np.abs(state) <= 0.05)
    steps, done = 0, False
    while not done:
        state, reward, done = env.step(1)
        steps += 1
        assert reward == 1.0
    assert steps < 20  # pushing right only tips the pole over within a few tenths of a second
    assert abs(state[2]) > env.ANGLE_LIMIT or abs(state[0]) > env.POSITION_LIMIT


def test_episodes_are_reproducible_and_capped():
    balancer = np.array([0.0, 0.0, 10.0, 10.0, 0.0])  # push towards where the pole falls
    first, again = rl.play_episode(balancer, 7), rl.play_episode(balancer, 7)
    assert np.array_equal(first["observations"], again["observations"])
    assert np.array_equal(first["actions"], again["actions"])
    assert first["episode_return"] == len(first["rewards"]) == rl.MAX_STEPS
    assert first["observations"].shape == (rl.MAX_STEPS, rl.OBSERVATION_SIZE)
    random_returns = [rl.play_episode(rl.initial_weights(), s)["episode_return"] for s in range(20)]
    assert np.mean(random_returns) < 50


def test_reinforce_makes_rewarded_actions_likelier():
    # Two one-step episodes in the same state: pushing right earned more than pushing left.
    state = np.array([[0.0, 0.0, 0.1, 0.0]])
    batch = [
        {"observations": state, "actions": np.array([1]), "rewards": np.array([2.0])},
        {"observations": state, "actions": np.array([0]), "rewards": np.array([1.0])},
    ]
    learner = rl.Reinforce(learning_rate=0.1)
    before = rl.push_right_probability(learner.weights, state)[0]
    learner.update(batch)
    assert rl.push_right_probability(learner.weights, state)[0] > before


def test_the_seeded_run_learns():
    history = rl.train_locally(15, workers=2, episodes=8, seed=0)
    assert history == rl.train_locally(15, workers=2, episodes=8, seed=0)
    assert np.mean(history[-3:]) >= 2 * history[0]
    seeds = rl.episode_seeds(0, 3, 1, 8)
    assert len(set(seeds)) == 8 and not set(seeds) & set(rl.episode_seeds(0, 3, 0, 8))


def test_the_script_explains_itself():
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "learn", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--workers" in done.stdout and "--iterations" in done.stdout


def test_a_role_is_required():
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True)
    assert done.returncode == 2 and "{worker,learn}" in done.stderr
