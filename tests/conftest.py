import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' models are tiny: one intra-op thread is faster and never oversubscribes the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same RNG state and an empty Pyro param store."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


@pytest.fixture(scope="module")
def two_node_cluster():
    """A Ray cluster of two one-CPU nodes simulated on this machine (``ray.cluster_utils.Cluster``),
    this process connected to it; yields the alive nodes' ids."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pyro_langevin.executor import import_ray

    import_ray()  # the settings the commands use (worker niceness 0: Ray's 15 crawls on a busy machine)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        yield {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
