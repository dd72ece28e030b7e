"""Collaborative RL rollouts across Ray clusters behind NATs.

A learner on one cluster publishes its policy as a global object (`lattica_ray.put`); rollout
workers exported by other clusters fetch it (`lattica_ray.get`), play CartPole (the classic
control task, written here in numpy) and stream their trajectories back; the learner improves
the policy with REINFORCE and publishes the next one. Only data crosses clusters: weights,
observations, actions, rewards.

Run it on a mesh that is up (`lattica-ray up` on every cluster, with --bootstrap):

    # on each rollout cluster (keeps serving until Ctrl-C):
    python examples/rl_rollouts.py worker
    # on the learner's cluster, naming the rollout clusters:
    python examples/rl_rollouts.py learn --workers home campus --iterations 15

`lattica-ray demo` runs the same code on three Ray clusters it starts on this machine.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WORKER_NAME = "rollouts"  # the name rollout workers are exported under, on every cluster
OBSERVATION_SIZE = 4
MAX_STEPS = 200  # CartPole-v0's episode limit; "solved" is a mean return of 195
REPLAY_STEPS = 10_000  # how many recent steps a worker's replay buffer keeps


# -- the environment ----------------------------------------------------------------------------


class CartPole:
    """CartPole (Barto, Sutton & Anderson 1983) with gymnasium's constants and rules: push a
    cart left or right to keep a pole upright; +1 per step until it falls or leaves the track."""

    GRAVITY = 9.8
    CART_MASS = 1.0
    POLE_MASS = 0.1
    POLE_HALF_LENGTH = 0.5
    FORCE = 10.0
    DT = 0.02
    ANGLE_LIMIT = 12 * 2 * math.pi / 360
    POSITION_LIMIT = 2.4

    def __init__(self, seed: int, max_steps: int = MAX_STEPS) -> None:
        self.rng = np.random.default_rng(seed)
        self.max_steps = max_steps
        self.state = np.zeros(OBSERVATION_SIZE)
        self.steps = 0

    def reset(self) -> np.ndarray:
        self.state = self.rng.uniform(-0.05, 0.05, OBSERVATION_SIZE)
        self.steps = 0
        return self.state.copy()

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        x, x_dot, theta, theta_dot = self.state
        force = self.FORCE if action == 1 else -self.FORCE
        cos, sin = math.cos(theta), math.sin(theta)
        total_mass = self.CART_MASS + self.POLE_MASS
        pole_moment = self.POLE_MASS * self.POLE_HALF_LENGTH
        temp = (force + pole_moment * theta_dot**2 * sin) / total_mass
        theta_acc = (self.GRAVITY * sin - cos * temp) / (
            self.POLE_HALF_LENGTH * (4.0 / 3.0 - self.POLE_MASS * cos**2 / total_mass)
        )
        x_acc = temp - pole_moment * theta_acc * cos / total_mass
        self.state = np.array(
            [
                x + self.DT * x_dot,
                x_dot + self.DT * x_acc,
                theta + self.DT * theta_dot,
                theta_dot + self.DT * theta_acc,
            ]
        )
        self.steps += 1
        fell = abs(self.state[0]) > self.POSITION_LIMIT or abs(self.state[2]) > self.ANGLE_LIMIT
        return self.state.copy(), 1.0, fell or self.steps >= self.max_steps


# -- the policy ---------------------------------------------------------------------------------


def push_right_probability(weights: np.ndarray, observations: np.ndarray) -> np.ndarray:
    """A logistic policy: P(push right | obs) = sigmoid(w . obs + b); `weights` is [w, b]."""
    logits = observations @ weights[:OBSERVATION_SIZE] + weights[OBSERVATION_SIZE]
    return 1.0 / (1.0 + np.exp(-logits))


def initial_weights() -> np.ndarray:
    return np.zeros(OBSERVATION_SIZE + 1)


def play_episode(weights: np.ndarray, seed: int) -> dict[str, Any]:
    """One episode with actions sampled from the policy: the trajectory, as plain arrays."""
    env = CartPole(seed)
    rng = np.random.default_rng([seed, 1])
    observation = env.reset()
    observations, actions, rewards = [], [], []
    done = False
    while not done:
        action = int(rng.random() < push_right_probability(weights, observation))
        observations.append(observation)
        actions.append(action)
        observation, reward, done = env.step(action)
        rewards.append(reward)
    return {
        "observations": np.array(observations),
        "actions": np.array(actions, dtype=np.int8),
        "rewards": np.array(rewards, dtype=np.float32),
        "episode_return": float(sum(rewards)),
        "seed": seed,
    }


@dataclass
class Reinforce:
    """REINFORCE with a batch-normalised return-to-go baseline and Adam steps."""

    learning_rate: float = 0.5
    discount: float = 0.99
    weights: np.ndarray = field(default_factory=initial_weights)
    steps: int = 0
    _m: np.ndarray = field(default_factory=initial_weights)
    _v: np.ndarray = field(default_factory=initial_weights)

    def update(self, trajectories: list[dict[str, Any]]) -> None:
        observations = np.concatenate([t["observations"] for t in trajectories])
        actions = np.concatenate([t["actions"] for t in trajectories]).astype(np.float64)
        returns = np.concatenate([self._returns_to_go(t["rewards"]) for t in trajectories])
        advantages = (returns - returns.mean()) / (returns.std() + 1e-8)
        features = np.hstack([observations, np.ones((len(observations), 1))])
        probability = push_right_probability(self.weights, observations)
        # d log pi(a|s) / d logit = a - p for a Bernoulli policy.
        gradient = ((actions - probability) * advantages) @ features / len(trajectories)
        self.steps += 1
        self._m = 0.9 * self._m + 0.1 * gradient
        self._v = 0.999 * self._v + 0.001 * gradient**2
        m_hat = self._m / (1 - 0.9**self.steps)
        v_hat = self._v / (1 - 0.999**self.steps)
        self.weights = self.weights + self.learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)

    def _returns_to_go(self, rewards: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rewards))
        running = 0.0
        for i in range(len(rewards) - 1, -1, -1):
            running = rewards[i] + self.discount * running
            out[i] = running
        return out


def episode_seeds(seed: int, iteration: int, worker_index: int, episodes: int) -> list[int]:
    """Distinct, reproducible episode seeds for each worker of each iteration."""
    base = (seed * 1000 + iteration) * 100 + worker_index
    return [base * 1000 + e for e in range(episodes)]


# -- the actors ---------------------------------------------------------------------------------


class RolloutWorker:
    """Exported by each rollout cluster as "rollouts": plays episodes of the published policy."""

    def __init__(self, cluster: str = "") -> None:
        self.cluster = cluster
        self.episodes_played = 0
        self.policy_fetches = 0
        self._replay: list[np.ndarray] = []  # observations of recent episodes

    def rollouts(self, policy: Any, seeds: list[int]) -> Iterator[dict[str, Any]]:
        """Fetch the policy (a GlobalRef) and stream one trajectory per seed as it finishes."""
        import lattica_ray.ray as lattica_ray

        published = lattica_ray.get(policy, timeout=60)
        self.policy_fetches += 1
        weights = np.asarray(published["weights"], dtype=np.float64)
        for seed in seeds:
            trajectory = play_episode(weights, seed)
            trajectory["cluster"] = self.cluster
            trajectory["policy_version"] = int(published["version"])
            self.episodes_played += 1
            self._remember(trajectory["observations"])
            yield trajectory

    def _remember(self, observations: np.ndarray) -> None:
        self._replay.append(observations)
        while sum(len(o) for o in self._replay) - len(self._replay[0]) >= REPLAY_STEPS:
            self._replay.pop(0)

    def publish_replay(self) -> Any:
        """Publish the observations of the latest episodes (up to REPLAY_STEPS steps) as a
        global object; returns its GlobalRef, which any cluster can `lattica_ray.get`."""
        import lattica_ray.ray as lattica_ray

        steps = np.concatenate(self._replay) if self._replay else np.zeros((0, OBSERVATION_SIZE))
        return lattica_ray.put({"observations": steps[-REPLAY_STEPS:], "cluster": self.cluster})

    def stats(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "episodes_played": self.episodes_played,
            "policy_fetches": self.policy_fetches,
        }


class Learner:
    """Publishes the policy, collects trajectories from the rollout clusters, improves it."""

    def __init__(self, workers: list[str], episodes_per_worker: int = 8, seed: int = 0) -> None:
        self.workers = list(workers)
        self.episodes_per_worker = episodes_per_worker
        self.seed = seed
        self.algorithm = Reinforce()
        self.iteration = 0
        self._handles: dict[str, Any] = {}

    def _worker(self, cluster: str) -> Any:
        import lattica_ray.ray as lattica_ray

        handle = self._handles.get(cluster)
        if handle is None:
            handle = lattica_ray.get_actor(WORKER_NAME, cluster=cluster, wait=60)
            self._handles[cluster] = handle
        return handle

    def step(self) -> dict[str, Any]:
        """One iteration: publish, let every worker play, learn from what streamed back."""
        import ray

        import lattica_ray.ray as lattica_ray

        started = time.perf_counter()
        policy = lattica_ray.put(
            {"weights": self.algorithm.weights.copy(), "version": self.iteration}
        )
        streams = {
            cluster: self._worker(cluster).rollouts.remote(
                policy,
                episode_seeds(self.seed, self.iteration, index, self.episodes_per_worker),
            )
            for index, cluster in enumerate(self.workers)
        }
        trajectories: list[dict[str, Any]] = []
        for stream in streams.values():  # both play at once; read one stream, then the other
            trajectories.extend(ray.get(ref, timeout=120) for ref in stream)
        self.algorithm.update(trajectories)
        returns = [t["episode_return"] for t in trajectories]
        by_cluster = {
            cluster: float(
                np.mean([t["episode_return"] for t in trajectories if t["cluster"] == cluster])
            )
            for cluster in self.workers
        }
        result = {
            "iteration": self.iteration,
            "policy": policy.cid,
            "mean_return": float(np.mean(returns)),
            "by_cluster": by_cluster,
            "episodes": len(trajectories),
            "steps": int(sum(len(t["actions"]) for t in trajectories)),
            "seconds": time.perf_counter() - started,
        }
        self.iteration += 1
        return result

    def weights(self) -> np.ndarray:
        return self.algorithm.weights.copy()


def train_locally(
    iterations: int, workers: int = 2, episodes: int = 8, seed: int = 0
) -> list[float]:
    """The same training without Ray or a mesh: the mean return per iteration (a reference
    for what the distributed run must reproduce exactly, seed for seed)."""
    algorithm = Reinforce()
    history = []
    for iteration in range(iterations):
        trajectories = [
            play_episode(algorithm.weights, s)
            for index in range(workers)
            for s in episode_seeds(seed, iteration, index, episodes)
        ]
        history.append(float(np.mean([t["episode_return"] for t in trajectories])))
        algorithm.update(trajectories)
    return history


# -- running it on a mesh ----------------------------------------------------------------------
# Each returns plain data, so a driver can run it for someone else (`lattica-ray demo` does).

LEARNER_NAME = "learner"  # the learner's Ray actor name (it stays on its cluster)
NAMESPACE = "rl_rollouts"  # Ray namespace of the example's (detached) actors


def serve_worker(cluster: str | None = None) -> str:
    """Create this cluster's rollout worker (detached: `stop_worker` ends it) and export it to
    the mesh as "rollouts"; returns this cluster's mesh name."""
    import lattica_ray.ray as lattica_ray

    info = lattica_ray.init(cluster=cluster)
    actor_class = lattica_ray.remote(num_cpus=1)(RolloutWorker)
    actor_class.options(name=WORKER_NAME, namespace=NAMESPACE, lifetime="detached").remote(
        info["cluster"]
    )
    return info["cluster"]


def stop_worker() -> None:
    import ray

    ray.kill(ray.get_actor(WORKER_NAME, namespace=NAMESPACE), no_restart=True)


def rollout_stats() -> dict[str, Any]:
    import ray

    return ray.get(ray.get_actor(WORKER_NAME, namespace=NAMESPACE).stats.remote(), timeout=60)


def start_learner(workers: list[str], episodes: int, seed: int) -> None:
    """The learner as an actor of this cluster (it keeps the policy between iterations)."""
    import ray

    import lattica_ray.ray as lattica_ray

    lattica_ray.init()
    learner = ray.remote(num_cpus=0)(Learner)
    learner.options(name=LEARNER_NAME, namespace=NAMESPACE, lifetime="detached").remote(
        workers, episodes, seed
    )


def stop_learner() -> None:
    import ray

    ray.kill(ray.get_actor(LEARNER_NAME, namespace=NAMESPACE), no_restart=True)


def learner_step() -> dict[str, Any]:
    """One learning iteration (see `Learner.step`)."""
    import ray

    return ray.get(ray.get_actor(LEARNER_NAME, namespace=NAMESPACE).step.remote(), timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    worker = roles.add_parser("worker", help="export a rollout worker from this cluster")
    worker.add_argument("--cluster", help="this cluster's mesh name (default: as `up` set it)")
    learn = roles.add_parser("learn", help="train a policy with the rollout clusters' workers")
    learn.add_argument("--workers", nargs="+", required=True, help="rollout cluster names")
    learn.add_argument("--iterations", type=int, default=15)
    learn.add_argument("--episodes", type=int, default=8, help="per worker per iteration")
    learn.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.role == "worker":
        cluster = serve_worker(args.cluster)
        print(f"cluster {cluster!r} serves {WORKER_NAME!r}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(5)
                print(rollout_stats(), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            stop_worker()
        return

    start_learner(args.workers, args.episodes, args.seed)
    try:
        for _ in range(args.iterations):
            result = learner_step()
            per_cluster = ", ".join(f"{c} {r:5.1f}" for c, r in result["by_cluster"].items())
            print(
                f"iteration {result['iteration']:2d}: mean return {result['mean_return']:6.1f} "
                f"({per_cluster}), {result['episodes']} episodes in {result['seconds']:.2f} s",
                flush=True,
            )
    finally:
        stop_learner()


if __name__ == "__main__":
    main()
